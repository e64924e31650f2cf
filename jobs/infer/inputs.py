"""infer's inputs: the model (merge manifest, model source, or base + train-manifest adapter), the
prompt rows (prepare manifest or a Parquet/JSONL file), and the chat-template check between them."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import Field

from common import chat, data, models, rawinputs, storage
from common import manifest as mf
from common.config import JobConfig
from common.errors import ConfigError, InputError
from common.generate import download_named

if TYPE_CHECKING:
    from jobs.infer import Config

LOG = logging.getLogger(__name__)


class Columns(JobConfig):
    """Column names in a plain Parquet/JSONL prompts file (a prepare manifest always uses the canonical ones)."""

    id: str = Field("id", description="Row id column; rows without one are numbered row-NNNNNNNN by position.")
    messages: str = Field("messages", description="List of {role, content}; a final assistant turn becomes "
                                                  "the reference.")
    prompt: str = Field("prompt", description="Plain prompt text, used as one user turn when there is no "
                                              "messages column.")
    reference: str = Field("reference", description="Reference answer column for prompt-style files (optional).")
    tools: str = Field("tools", description="The row's tool schemas (a list, or JSON text of one), rendered into "
                                            "the prompt as the template's `tools=` (optional).")



def resolve_registered(config: Config) -> Config:
    """`models:/NAME[/VERSION]` as the model it names: a merge manifest as --model, or a train manifest's adapter
    on its base. The run then records the resolved manifest (its identity is the model, not the pointer)."""
    from common import registry

    if not registry.is_ref(config.model):
        return config
    assert config.model is not None
    version = registry.resolve(config.model, config.root)
    if version.stage == "merge":
        return config.model_copy(update={"model": version.manifest})
    if config.adapter is not None:
        raise ConfigError(f"--model {config.model} is an adapter (version {version.version} is a train manifest) "
                          "and --adapter names another: drop --adapter")
    return config.model_copy(update={"model": version.base_model, "adapter": version.manifest})


def load_model_input(src: str) -> mf.Loaded | None:
    """A merge manifest when `src` names one; None for a plain model source."""
    if models.looks_like_hf_id(src) or not storage.exists(mf.as_manifest_uri(src)):
        return None
    return mf.load(src, expect_stage="merge")


def load_prompts_input(src: str) -> mf.Loaded | mf.InputRef:
    name = src.lower().rstrip("/")
    if name.endswith((".parquet", ".jsonl")):
        # hashed as it is fetched; load_rows parses that same copy (common/rawinputs.py)
        return mf.InputRef(uri=src, sha256=rawinputs.fetch(src, "Prompts file").sha256, stage=None, role="data")
    if name.endswith(".json") and not name.endswith(mf.MANIFEST_NAME):
        raise ConfigError(f"Prompts file {src}: use JSON Lines (.jsonl), one object per line, or Parquet")
    return mf.load(src, expect_stage="prepare")


def prepare_model(config: Config, model_in: mf.Loaded | None, adapter_in: mf.Loaded | None,
                  cache: Path) -> dict[str, Any]:
    """Local model (and adapter) folders, the tokenizer, and what the model says about its template."""
    from transformers import AutoTokenizer

    adapter_dir = None
    if model_in is not None:
        if adapter_in is not None:
            raise ConfigError(f"--adapter needs a base model source, but --model {config.model} is a merge "
                              "manifest that already has an adapter merged in: drop one of them")
        path = download_named(model_in, "model/", cache / "models" / f"merge-{model_in.sha256[:16]}")
        recorded: mf.ModelBlock = mf.model_block(model_in)
        identity = {"model": model_in.uri, "adapter": None, "base_model": getattr(recorded, "base_model", None)}
    else:
        assert config.model is not None  # Config requires it unless finalizing, which loads no model
        ref = models.resolve(config.model, cache_dir=cache / "models")
        path = ref.path
        recorded = mf.ModelBlock()
        identity = {"model": config.model, "adapter": None, "base_model": config.model,
                    "revision": ref.revision}
        if adapter_in is not None:
            recorded = mf.model_block(adapter_in)
            check_adapter(config, adapter_in, ref)
            step = config.adapter_step
            named, folder = ("adapter/", adapter_in.sha256[:16]) if step is None else (
                f"candidates/step-{step:08d}/", f"{adapter_in.sha256[:16]}-step-{step:08d}")
            if step is not None and not adapter_in.manifest.artifacts_named(named):
                kept = sorted({a.name.split("/")[1] for a in adapter_in.manifest.artifacts_named("candidates/")})
                raise InputError(f"{adapter_in.uri} keeps no candidate adapter of step {step} (adapter_step); it "
                                 f"keeps {', '.join(kept) or 'none (train without select)'}")
            adapter_dir = download_named(adapter_in, named, cache / "adapters" / folder)
            identity["adapter"] = adapter_in.uri
            if step is not None:
                identity["adapter_step"] = step
    models.check_trust_remote_code(path, config.trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=config.trust_remote_code)
    want_tok = recorded.tokenizer or {}
    if want_tok.get("vocab_sha256") and want_tok["vocab_sha256"] != chat.tokenizer_identity(tokenizer)["vocab_sha256"]:
        raise ConfigError(f"The tokenizer recorded upstream ({want_tok.get('vocab_size')} tokens) differs from "
                          f"the one in {path}: the adapter added tokens. Run `ftjobs merge` and infer the merged "
                          "model instead.")
    template = config.chat_template or recorded.chat_template
    fmt = chat.chat_format(tokenizer, template)
    identity |= {"template_hash": fmt.hash, "chat_template": fmt.template, "engine": config.engine}
    return {"path": path, "adapter_dir": adapter_dir, "tokenizer": tokenizer, "fmt": fmt, "recorded": recorded,
            "identity": mf.InferModel.model_validate(identity).model_dump(mode="json", exclude_unset=True)}


def check_adapter(config: Config, adapter_in: mf.Loaded, base: models.ModelRef) -> None:
    info: mf.TrainModel = mf.model_block(adapter_in)
    if info.lora is None:  # method full: a whole model, no adapter
        raise ConfigError(f"{adapter_in.uri} is a full finetune (method {info.method}), not an adapter: run `ftjobs "
                          f"merge --input {adapter_in.uri} --output <prefix>` (it passes the model through) and "
                          "pass that merge manifest as --model, without --adapter.")
    if info.lora.modules_to_save and config.engine == "vllm":
        raise ConfigError(f"The adapter in {adapter_in.uri} trains whole modules too (modules_to_save: "
                          f"{info.lora.modules_to_save}); vLLM serves only LoRA matrices. Run `ftjobs merge "
                          f"--input {adapter_in.uri} --output <prefix>` and pass the merge manifest "
                          "(<prefix>/manifest.json) as --model (or use --engine transformers).")
    want = info.base_revision
    if want and base.revision and want != base.revision and not config.force_base:
        raise ConfigError(f"The adapter was trained on {info.base_model} (revision {want}), but --model "
                          f"{config.model} is revision {base.revision}. Pass the base it was trained on, or set "
                          "force_base: true.")


def template_check(config: Config, model: dict[str, Any], prompts_in: mf.Loaded | mf.InputRef) -> None:
    """Refuse a template that differs from what the model or the prompts recorded upstream."""
    used = model["fmt"].hash
    recorded = [(f"the model ({model['identity']['adapter'] or model['identity']['model']})",
                 model["recorded"].template_hash)]
    if isinstance(prompts_in, mf.Loaded):
        recorded.append((f"the prompts ({prompts_in.uri})", mf.model_block(prompts_in).template_hash))
    for who, want in recorded:
        if want and want != used:
            if config.force_template:
                LOG.warning("template mismatch forced: %s recorded %s, using %s", who, want[:12], used[:12])
                continue
            raise ConfigError(f"Chat template mismatch: {who} recorded template sha256 {want[:12]}..., but this "
                              f"run would render with {used[:12]}... Prompts would not look like training data. "
                              "Use the matching model/prompts (re-run prepare with the model's tokenizer), or set "
                              "force_template: true.")


def load_rows(config: Config, prompts_in: mf.Loaded | mf.InputRef) -> list[dict[str, Any]]:
    """Prompt rows: id, prompt messages, reference, and an error when the row cannot be used."""
    if isinstance(prompts_in, mf.Loaded):
        if not data.split_artifacts(prompts_in, config.split):
            # Only `<split>/part-NNNNN` artifacts are splits; prepare also publishes drops and stats.
            have = sorted({a.name.split("/")[0] for a in prompts_in.manifest.artifacts_named("")
                           if "/part-" in a.name})
            raise InputError(f"{prompts_in.uri} has no {config.split!r} split (has: {', '.join(have) or 'none'}): "
                             "set split to one of those")
        raw = data.read_split(prompts_in, config.split, columns=["id", "messages", "tools"]).to_pylist()
        cols, where = Columns(), prompts_in.uri
    else:
        where = prompts_in.uri
        local = rawinputs.local_copy(where, prompts_in.sha256, "Prompts file")  # the bytes its sha256 came from
        raw = read_parquet(local, where) if where.lower().endswith(".parquet") else read_jsonl(local, where)
        cols = config.columns
    if raw and cols.messages not in raw[0] and cols.prompt not in raw[0]:
        raise InputError(f"{where} has neither a {cols.messages!r} nor a {cols.prompt!r} column (has: "
                         f"{', '.join(raw[0])}): set columns.messages or columns.prompt")
    rows, seen = [], set()
    for i, item in enumerate(raw):
        row_id = item.get(cols.id)
        row_id = f"row-{i:08d}" if row_id is None else str(row_id)
        if row_id in seen:
            raise InputError(f"{where}: id {row_id!r} appears twice (row {i}); ids must be unique so each "
                             "prediction maps to one prompt")
        seen.add(row_id)
        rows.append(normalize_row(row_id, item, cols, i, where))
    if not rows:
        raise InputError(f"{where} holds no prompts ({config.split!r} split)" if isinstance(prompts_in, mf.Loaded)
                         else f"{where} holds no prompts")
    return rows


def read_parquet(local: Path, where: str) -> list[dict[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        return pq.read_table(local).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{where}: not a readable Parquet file ({exc}): it is truncated or not Parquet. "
                         "Re-create it, or give the prompts as JSON Lines (.jsonl).") from None


def read_jsonl(local: Path, where: str) -> list[dict[str, Any]]:
    out = []
    for n, obj in data.json_lines(local, where, "prompts"):
        if not isinstance(obj, dict):
            raise InputError(f"{where} line {n}: expected a JSON object, got {type(obj).__name__}")
        out.append(obj)
    return out


def _message(m: Any) -> dict[str, Any] | None:
    """A prompt message in canonical form (tool calls normalized), or None when it is not one."""
    from common import tools as T

    if not isinstance(m, dict) or m.get("role") not in (*chat.ROLES, "text"):
        return None
    calls = m.get("tool_calls") if m["role"] == "assistant" else None
    content = m.get("content")
    if not isinstance(content, str) and not (content is None and calls):
        return None
    out = {**{k: m[k] for k in chat.OPTIONAL_FIELDS if m.get(k) is not None}, "role": m["role"],
           "content": content or ""}
    if calls:
        try:
            out["tool_calls"] = T.normalize_calls(calls, "tool_calls")
        except ValueError:
            return None
    return out


def normalize_row(row_id: str, item: dict[str, Any], cols: Columns, i: int, where: str) -> dict[str, Any]:
    from common import tools as T

    reference = item.get(cols.reference)
    error = None
    try:
        tools = T.normalize_tools(item.get(cols.tools))
    except ValueError as exc:  # a tools column that cannot be used: never dropped without a word
        raise InputError(f"{where} row {i}: column {cols.tools!r}: {exc}. Fix the prompts file.") from None
    messages = item.get(cols.messages)
    if messages is not None:
        msgs = [_message(m) for m in messages] if isinstance(messages, list) else []
        ok = bool(msgs) and all(m is not None for m in msgs)
        if ok:
            prompt, last = chat.split_prompt(msgs)  # type: ignore[arg-type]
            reference = last if last is not None else reference
            if not prompt:
                error = "the conversation has no turns before its assistant answer"
        else:
            prompt = []
            error = f"{cols.messages!r} is not a list of {{role, content}} messages (row {i} of {where})"
    elif isinstance(item.get(cols.prompt), str) and item[cols.prompt]:
        prompt = [{"role": "user", "content": item[cols.prompt]}]
    else:
        prompt = []
        error = f"no {cols.messages!r} or non-empty {cols.prompt!r} (row {i} of {where})"
    return {"id": row_id, "prompt": prompt, "tools": tools,
            "reference": None if reference is None else str(reference), "error": error}
