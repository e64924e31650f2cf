"""merge: fold a trained LoRA adapter into its 16-bit base model, prove it, publish a folder vLLM loads.

Reads:  a train manifest (`adapter/` and `tokenizer/` artifacts, `model` = base model, revision, chat
        template, quantization and LoRA settings) and the base model it names (Hugging Face id, `s3://`
        prefix or local folder; safetensors only). Adapter and tokenizer bytes are checked against the
        manifest's sha256 before anything loads them.
Writes: under `--output`: `model/` (sharded safetensors, `model.safetensors.index.json` when sharded,
        `config.json` without any quantization_config, `generation_config.json` whose EOS includes the
        chat template's end-of-turn token, the tokenizer with the training chat template), then
        `manifest.json` (stage "merge") last.

    ftjobs merge --input s3://ml/ftjobs/runs/R1/train/ --output s3://ml/ftjobs/runs/R1/merge/ \\
        --set dtype=bfloat16 --set max_shard_size=2GB

How it works, in order (see `run` and the phases after it):
1. The already-done rule: a finished merge of the same config and adapter at `--output` is returned as is.
2. `plan_merge`: adapter, tokenizer and base are checked, and dtype, mode and checks decided, before any
   weight loads. The base loads in 16 (or 32) bits, never 4: a quantized base is refused.
   `base_weights: nf4_roundtrip` replaces each weight training saw quantized by dequantize(quantize(W))
   with the adapter's NF4/FP4 settings, since that is what the adapter learned to correct.
3. `mode: in_memory` (`merge_in_memory`) loads the model and uses peft's merge; `mode: sharded`
   (`merge_streaming`) streams the base checkpoint tensor by tensor (peak memory: about one tensor) and
   applies W + scale * B @ A itself; `auto` picks sharded for plain LoRA (what it cannot place, such as
   DoRA, goes to in_memory). Both hand `write_model` the same tensors, written to the same files, streamed
   and hashed.
4. `check`, before publishing: NaN/Inf and shapes on every tensor; greedy generation of the saved merged
   folder (loaded back by transformers) against the unmerged base + adapter on fixed chat prompts;
   in sharded mode, a per-tensor probe W'x = Wx + s*B(Ax). A failed check exits 3 and names the first
   difference; nothing is published.

Code: this module (config, `run` and its phases, the output folder, CLI); `tensors.py` (a checkpoint's
tensors from its headers, shard plan, the streaming writer); `lora.py` (adapter files to per-tensor
updates, the 4-bit roundtrip); `checks.py` (the generation comparison and its tolerances).
"""

from __future__ import annotations

import functools
import gc
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import click

from common import chat, models, stage, storage
from common import manifest as mf
from common.config import dump
from common.errors import ConfigError, InputError
from common.logs import Progress
from common.runner import config_options, execute
from jobs.merge import passthrough
from jobs.merge.checks import (
    DTYPES,
    PROBE_RTOL,
    STRICT_LOGIT_ATOL,
    MergeCheckError,
    Reference,
    compare_run,
    encode_prompts,
    reference_bytes,
    reference_run,
    summary,
)
from jobs.merge.config import Checks, Config, parse_size
from jobs.merge.lora import (
    Adapter,
    LoraUpdate,
    Probe,
    Quant,
    lora_merge,
    pattern_value,
    quantized_weight_names,
    read_adapter,
    roundtrip_4bit,
    sharded_refusal,
    tied_head,
)
from jobs.merge.tensors import (
    TensorInfo,
    finite_check,
    plan_shards,
    read_checkpoint,
    read_tensor,
    shard_names,
    tensors_float,
    write_safetensors,
)

__all__ = ["Adapter", "Checks", "Config", "LoraUpdate", "MergeCheckError", "Quant", "TensorInfo", "command",
           "encode_prompts", "lora_merge", "parse_size", "pattern_value", "plan_shards", "run", "shard_names"]

STAGE = "merge"
LOG = logging.getLogger(__name__)
MODEL_DIR = "model"  # the merged folder, under the output prefix

# What in_memory needs beside the weights (activations, peft wrappers, allocator slack), as a factor.
IN_MEMORY_FACTOR = 1.5

# --------------------------------------------------------------------------- the job
#
# run: the stage skeleton (common.stage: already done?, manifest published last) around `merge`, whose
# phases run in order:
#   plan_merge                        -> adapter, tokenizer and base checked; dtype, mode and checks decided
#   merge_in_memory | merge_streaming -> the merged tensors, ready to be pulled one at a time
#   write_model                       -> the folder under model/, streamed, checked and hashed
#   check                             -> parameter count, probes, generation; nothing is published on failure
#   record_model                      -> the folder's files as the attempt's artifacts


def run(config: Config) -> mf.Loaded:
    """Merge the adapter of the train run at `config.input`; returns the published (or already done) manifest."""
    started = time.monotonic()
    train = mf.load(config.input, verify="size", expect_stage=("train", "select"))  # select: the chosen step
    identity = stage.Identity(STAGE, config.output, dump(config), [train.ref("adapter")])
    result = stage.run(identity, lambda attempt: merge(config, train, attempt, started))
    assert isinstance(result, mf.Loaded)  # merge never leaves publishing to another attempt
    return result


def merge(config: Config, train: mf.Loaded, attempt: stage.Attempt, started: float) -> stage.Outcome:
    """plan -> merge -> write -> check -> record; the outcome becomes the manifest."""
    if passthrough.is_full(train):  # a full finetune: its model passes through unchanged
        return passthrough.publish(config, train, attempt, started)
    work = Path(tempfile.mkdtemp(prefix="ftjobs-merge-"))
    try:
        timings: dict[str, float] = {}
        plan = plan_merge(config, train, work)
        timings["load"] = time.monotonic() - started
        merged = merge_in_memory(plan, timings) if plan.mode == "in_memory" else merge_streaming(plan, timings)
        out_dir = model_folder(attempt.writer, work)
        written = write_model(plan, merged, out_dir, timings)
        metrics = check(plan, merged, written, out_dir, timings)
        t = time.monotonic()
        record_model(attempt.writer, out_dir, written)
        timings["upload"] = time.monotonic() - t
        timings["total"] = time.monotonic() - started
        return _outcome(plan, written, metrics, timings)
    finally:
        shutil.rmtree(work, ignore_errors=True)


# --------------------------------------------------------------------------- plan


@dataclass(frozen=True)
class Plan:
    """What the merge will do, decided before any weight is read."""

    config: Config
    train: mf.Loaded
    info: mf.TrainModel            # the train manifest's model block
    quant: Quant                   # the 4-bit settings the adapter trained under
    roundtrip: Quant | None        # quant when base_weights is nf4_roundtrip
    device: str
    adapter_dir: Path              # verified local copies of the train run's adapter/ and tokenizer/
    tok_dir: Path
    adapter_sha: str
    base_src: str                  # where the base is read from (config.base_model or the manifest's)
    base: models.ModelRef
    base_cfg: dict[str, Any]       # the base's config.json
    tokenizer: Any
    fmt: chat.ChatFormat
    dtype: str                     # of the merged weights
    tensors: list[TensorInfo]      # the base checkpoint's, in file order
    model_bytes: int               # the base's tensors at `dtype`
    budget: int                    # memory budget, bytes
    mode: str                      # in_memory or sharded
    gen_check: bool                # the generation check runs (the model fits the budget)
    skipped: str | None            # why the generation check does not run, when it is on but does not fit
    eos: list[int]                 # end-of-turn and EOS ids: generation_config.json and the checks stop on them
    prompt_ids: list[list[int]]


def plan_merge(config: Config, train: mf.Loaded, work: Path) -> Plan:
    """Refuse what cannot be merged before loading weights; decide dtype, mode and which checks run."""
    info, quant, roundtrip = _adapter_settings(config, train)
    device = _device(config)
    adapter_dir, tok_dir, adapter_sha = _fetch_adapter(train, work)
    base_src, base = _resolve_base(config, info)
    tokenizer, fmt = _training_tokenizer(train, tok_dir, info)
    base_cfg = models.read_config(base.path)
    dtype = resolve_dtype(config, base_cfg, device)
    tensors = read_checkpoint(base.path)
    model_bytes = sum(t.nbytes(dtype) for t in tensors)
    budget = memory_budget(config, device)
    fits = model_bytes * IN_MEMORY_FACTOR <= budget
    mode = config.mode if config.mode != "auto" else _auto_mode(adapter_dir, fits, model_bytes, budget)
    # a 16-bit check runs the unmerged model once more upcast to float32: its peak is the float32 model
    gen_check = config.checks.generation and reference_bytes(model_bytes, dtype) * IN_MEMORY_FACTOR <= budget
    skipped = None if gen_check or not config.checks.generation else (
        f"model is {model_bytes / 1e9:.2f} GB at {dtype} (the check needs "
        f"{reference_bytes(model_bytes, dtype) / 1e9:.2f} GB); budget {budget / 1e9:.2f} GB")
    LOG.info("merging %s (%d tensors, %.2f GB at %s) with adapter %s: mode %s, base weights %s, device %s",
             base_src, len(tensors), model_bytes / 1e9, dtype, adapter_sha[:12], mode, config.base_weights, device)
    gen_path = base.path / "generation_config.json"
    eos = list(dict.fromkeys([tokenizer.eos_token_id] + _as_list(
        (json.loads(gen_path.read_text()) if gen_path.exists() else base_cfg).get("eos_token_id"))))
    return Plan(config=config, train=train, info=info, quant=quant, roundtrip=roundtrip, device=device,
                adapter_dir=adapter_dir, tok_dir=tok_dir, adapter_sha=adapter_sha, base_src=base_src, base=base,
                base_cfg=base_cfg, tokenizer=tokenizer, fmt=fmt, dtype=dtype, tensors=tensors,
                model_bytes=model_bytes, budget=budget, mode=mode, gen_check=gen_check, skipped=skipped,
                eos=[e for e in eos if e is not None], prompt_ids=encode_prompts(tokenizer, config.checks.prompts))


def _auto_mode(adapter_dir: Path, fits: bool, model_bytes: int, budget: int) -> str:
    """sharded for a plain LoRA adapter (bounded memory, per-tensor probes, and faster: no model object
    to build and tear down); in_memory, peft's own merge, for what only peft can place, when it fits."""
    refusal = sharded_refusal(json.loads((adapter_dir / "adapter_config.json").read_text()))
    if refusal is None:
        return "sharded"
    if not fits:
        raise ConfigError(f"{refusal}, and mode: in_memory needs the model in memory ({model_bytes / 1e9:.2f} GB "
                          f"x {IN_MEMORY_FACTOR}; budget {budget / 1e9:.2f} GB). Raise max_memory or merge on a "
                          "larger machine")
    return "in_memory"


def _adapter_settings(config: Config, train: mf.Loaded) -> tuple[mf.TrainModel, Quant, Quant | None]:
    info: mf.TrainModel = mf.model_block(train)  # exit 3 naming the manifest when it is not train's block
    quant = Quant.from_manifest(info.quantization)
    if config.base_weights == "nf4_roundtrip" and quant.mode == "none":
        raise ConfigError("base_weights: nf4_roundtrip, but the adapter trained on unquantized weights "
                          "(quantization.mode none): there is no 4-bit roundtrip to reproduce. Use original")
    return info, quant, quant if config.base_weights == "nf4_roundtrip" else None


def _device(config: Config) -> str:
    import torch

    device = ("cuda" if torch.cuda.is_available() else "cpu") if config.device == "auto" else config.device
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: cuda, but no CUDA device is visible; use device: cpu or auto")
    if device == "cpu":
        from common.resources import limit_torch_threads

        limit_torch_threads()  # torch's default is the node's cores, not the pod's CPU limit
    return device


def _fetch_adapter(train: mf.Loaded, work: Path) -> tuple[Path, Path, str]:
    """Adapter and tokenizer into `work`, verified byte for byte before anything parses them."""
    for art in train.manifest.artifacts_named("adapter/") + train.manifest.artifacts_named("tokenizer/"):
        mf.fetch_artifact(train, art, storage.safe_destination(work, art.name))
    for need in ("adapter/adapter_config.json", "adapter/adapter_model.safetensors"):
        if not (work / need).exists():
            raise InputError(f"{train.uri} has no artifact {need!r}: not a LoRA adapter from `ftjobs train`")
    if not (work / "tokenizer").exists():
        raise InputError(f"{train.uri} has no tokenizer/ artifacts; merge ships the training tokenizer")
    return work / "adapter", work / "tokenizer", train.manifest.artifact("adapter/adapter_model.safetensors").sha256


def _resolve_base(config: Config, info: mf.TrainModel) -> tuple[str, models.ModelRef]:
    """The 16-bit base the adapter was trained on, at the revision the train manifest records."""
    base_src = config.base_model or info.base_model
    ref = models.resolve(base_src, revision=info.base_revision if models.looks_like_hf_id(base_src) else None)
    quantized = models.is_quantized(ref.path)
    if quantized:
        raise InputError(f"base model {base_src} is quantized ({quantized}). Merging into quantized weights "
                         "either loses the adapter to rounding or needs requantizing; merge needs the 16-bit "
                         "base the adapter was trained from. Point base_model at the unquantized checkpoint.")
    if info.base_revision and ref.revision != info.base_revision:
        raise InputError(f"base model {base_src} is revision {ref.revision}; the adapter was trained on "
                         f"{info.base_revision}. Give the same base (base_model: ...).")
    models.check_trust_remote_code(ref.path, config.trust_remote_code)
    return base_src, ref


def _training_tokenizer(train: mf.Loaded, tok_dir: Path, info: mf.TrainModel) -> tuple[Any, chat.ChatFormat]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tok_dir))
    fmt = chat.chat_format(tokenizer)
    if fmt.hash != info.template_hash:
        raise InputError(f"tokenizer in {train.uri} renders chat template {fmt.hash[:12]}; the manifest "
                         f"records {info.template_hash[:12]}. The train output is inconsistent.")
    return tokenizer, fmt


def resolve_dtype(config: Config, base_cfg: dict[str, Any], device: str) -> str:
    if config.dtype != "auto":
        if config.dtype == "float16" and device == "cpu":
            raise ConfigError("dtype float16 on a CPU-only machine: use bfloat16 or float32")
        return config.dtype
    stored = str(base_cfg.get("dtype") or base_cfg.get("torch_dtype") or "float32")
    if stored not in DTYPES:
        stored = "float32"
    return "float32" if stored == "float16" and device == "cpu" else stored


def memory_budget(config: Config, device: str) -> int:
    if config.max_memory:
        return parse_size(config.max_memory)
    if device == "cuda":
        import torch

        return int(torch.cuda.mem_get_info()[0])
    import psutil

    return int(psutil.virtual_memory().available)


# --------------------------------------------------------------------------- merge: in memory or streaming


class TensorSource(Protocol):
    """Hands the writer each merged tensor by name, in any order."""

    probes: dict[str, float]  # tensor -> relative error of W'x against Wx + s*B(Ax), where probed

    def tensor(self, info: TensorInfo) -> Any: ...

    def close(self) -> None: ...


@dataclass
class Merged:
    """The merged model, as tensors the writer pulls one at a time."""

    tensors: list[TensorInfo]  # what the output holds: the base's, plus a trained head untied from the embeddings
    untied: bool               # such a head exists (config.json says tie_word_embeddings: false)
    reference: Reference | None  # the unmerged base + adapter's greedy run, for the generation check
    source: TensorSource


def merge_in_memory(plan: Plan, timings: dict[str, float]) -> Merged:
    """peft's merge on the whole model; the generation reference is taken from the unmerged model first."""
    from peft import PeftModel

    t = time.monotonic()
    peft_model = PeftModel.from_pretrained(load_base(plan.base.path, plan.dtype, plan.device,
                                                     plan.config.trust_remote_code, plan.roundtrip),
                                           str(plan.adapter_dir), is_trainable=False)
    timings["load"] += time.monotonic() - t
    t = time.monotonic()
    reference = _reference(plan, peft_model) if plan.gen_check else None
    timings["check"] = time.monotonic() - t
    t = time.monotonic()
    tensors, names = list(plan.tensors), {x.name for x in plan.tensors}
    tied, untied = bool(plan.base_cfg.get("tie_word_embeddings")), False
    if tied:
        untie_adapted_head(peft_model.get_base_model())
    merged_model = peft_model.merge_and_unload()
    state = merged_model.state_dict()
    head = merged_model.get_output_embeddings().weight
    if tied and head.data_ptr() != merged_model.get_input_embeddings().weight.data_ptr():
        # The output head was trained on a tied base: it is its own tensor now, and the base checkpoint
        # holds none for it. Write it, and say so in config.json, or loading re-ties the head to the
        # input embeddings and the trained head is silently lost.
        head_name = next(n for n, p in merged_model.named_parameters(remove_duplicate=False) if p is head)
        if head_name not in names:
            like = next(x for x in tensors if x.shape == tuple(head.shape))
            tensors.append(TensorInfo(head_name, like.file, tuple(head.shape), like.dtype))
            names.add(head_name)
            untied = True
    del merged_model, peft_model
    absent = sorted(names - set(state))
    if absent:
        raise ConfigError(f"the loaded model names its weights differently from the checkpoint (e.g. "
                          f"{absent[:3]}); use mode: sharded")
    timings["merge"] = time.monotonic() - t
    return Merged(tensors=tensors, untied=untied, reference=reference, source=InMemoryTensors(state))


@dataclass
class InMemoryTensors:
    """The merged model's state dict."""

    state: dict[str, Any]
    probes: dict[str, float] = field(default_factory=dict)  # peft merged: nothing to probe

    def tensor(self, info: TensorInfo) -> Any:
        return self.state[info.name]

    def close(self) -> None:
        self.state = {}
        gc.collect()  # release the in-memory model before the check loads the saved one


def merge_streaming(plan: Plan, timings: dict[str, float]) -> Merged:
    """W + scale * B @ A per tensor while the base checkpoint is read: peak memory about one tensor."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.monotonic()
    reference = None
    if plan.gen_check:
        peft_model = PeftModel.from_pretrained(load_base(plan.base.path, plan.dtype, plan.device,
                                                         plan.config.trust_remote_code, plan.roundtrip),
                                               str(plan.adapter_dir), is_trainable=False)
        loaded_s = time.monotonic() - t
        reference = _reference(plan, peft_model)
        reference.seconds["reference_load"] = loaded_s
        del peft_model
        gc.collect()  # the reference model is not needed while streaming
    timings["check"] = time.monotonic() - t
    t = time.monotonic()
    tensors, names = list(plan.tensors), {x.name for x in plan.tensors}
    rt_names: set[str] = set()
    aliases: dict[str, str] = {}  # a tied base's head -> the embedding the checkpoint stores for it
    tied = bool(plan.base_cfg.get("tie_word_embeddings"))
    if plan.roundtrip is not None or tied:
        trust = plan.config.trust_remote_code
        with torch.device("meta"):  # the structure only: no weights are allocated
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                str(plan.base.path), trust_remote_code=trust), trust_remote_code=trust)
        if plan.roundtrip is not None:
            rt_names = quantized_weight_names(skeleton, plan.roundtrip) & names
        if tied:
            aliases = tied_head(skeleton, names)
    adapter = read_adapter(plan.adapter_dir, names | set(aliases))
    untied = False
    for head_name, embed_name in aliases.items():
        if head_name in adapter.updates:  # the head was trained: it becomes its own tensor
            like = next(x for x in tensors if x.name == embed_name)
            tensors.append(TensorInfo(head_name, like.file, like.shape, like.dtype))
            untied = True
    timings["merge"] = time.monotonic() - t
    return Merged(tensors=tensors, untied=untied, reference=reference,
                  source=StreamedTensors(base=plan.base.path, device=plan.device, dtype=plan.dtype, quant=plan.quant,
                                         adapter=adapter, aliases=aliases, roundtrip_names=rt_names,
                                         stored={x.name: x for x in plan.tensors}))


@dataclass
class StreamedTensors:
    """Base tensors read from the checkpoint files one at a time, each merged with its LoRA update."""

    base: Path
    device: str
    dtype: str
    quant: Quant
    adapter: Adapter
    aliases: dict[str, str]      # output name -> the base tensor it starts from (a tied head: the embedding)
    roundtrip_names: set[str]    # weights replaced by their 4-bit roundtrip first
    stored: dict[str, TensorInfo]  # the base checkpoint's tensors by name: where each one's bytes are
    probes: dict[str, float] = field(default_factory=dict)
    handles: dict[str, Any] = field(default_factory=dict)  # open base checkpoint files

    def tensor(self, info: TensorInfo) -> Any:
        import torch

        stored = self.stored[self.aliases.get(info.name, info.name)]
        if stored.file not in self.handles:
            self.handles[stored.file] = open(self.base / stored.file, "rb")  # noqa: SIM115 - closed in close()
        w = read_tensor(self.handles[stored.file], stored, self.base / stored.file)
        up = self.adapter.updates.get(info.name)
        if up is None and info.name not in self.roundtrip_names:
            return w
        if up is not None and up.source is not None:
            if tuple(up.source.shape) != info.shape:
                raise ConfigError(f"the adapter saves {info.name} as {tuple(up.source.shape)}; the base "
                                  f"has {info.shape} (vocabulary resized?). Set mode: in_memory")
            w = up.source.clone()  # the merge updates its input in place
        torch_dtype = getattr(torch, self.dtype)
        src = w.to(self.device, torch_dtype)
        if info.name in self.roundtrip_names:
            src = roundtrip_4bit(src, self.quant)
        if up is None:
            return src
        check = Probe.before_merge(src, up, self.device) if up.replace is None else None
        merged = lora_merge(src, up, self.device)
        if check is not None:
            self.probes[info.name] = check.error(merged.to(torch_dtype))
        return merged

    def close(self) -> None:
        for f in self.handles.values():
            f.close()
        self.handles.clear()


def _reference(plan: Plan, peft_model: Any) -> Reference:
    return reference_run(peft_model, plan.prompt_ids, plan.config.checks.max_new_tokens, plan.eos, plan.device,
                         plan.dtype)


def load_base(path: Path, dtype: str, device: str, trust: bool, roundtrip: Quant | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                      trust_remote_code=trust)
    model.to(device).eval()
    if roundtrip is not None:
        names = quantized_weight_names(model, roundtrip)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in names:
                    p.copy_(roundtrip_4bit(p.data, roundtrip))
    return model


# --------------------------------------------------------------------------- write


def model_folder(writer: mf.ArtifactWriter, work: Path) -> Path:
    """The local folder the merged model is written to, emptied of what an unfinished attempt left.

    A local output is written in place under `<output>/model` (no copy of a multi-GB folder); an s3://
    output is written under the work folder and uploaded by `record_model`.
    """
    uri = writer.uri(MODEL_DIR)
    storage.delete_prefix(uri)  # an unfinished attempt: safe to overwrite
    out_dir = work / MODEL_DIR if storage.is_s3(uri) else storage.local_path(uri)
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


@dataclass
class Written:
    """What write_model wrote, and what it counted on the way."""

    files: list[str]                       # the safetensors shards
    digests: dict[str, str] = field(default_factory=dict)  # shard -> sha256, computed while writing
    params: int = 0                        # parameters written
    bytes: int = 0
    merge_s: float = 0.0                   # time spent producing tensors (the merge itself) while writing
    problems: list[str] = field(default_factory=list)      # non-finite tensors

    def pull(self, source: TensorSource, dtype: str, progress: Progress, info: TensorInfo) -> Any:
        """The next tensor for the writer, in the output dtype, checked for NaN/Inf and counted."""
        import torch

        start = time.monotonic()
        tensor = source.tensor(info)
        if tensors_float(info):
            tensor = tensor.to(getattr(torch, dtype))
        problem = finite_check(info.name, tensor)
        if problem:
            self.problems.append(problem)
        self.merge_s += time.monotonic() - start
        self.params += math.prod(info.shape)
        self.bytes += info.nbytes(dtype)
        progress.update(1, GB=round(self.bytes / 1e9, 3))
        return tensor


def write_model(plan: Plan, merged: Merged, out_dir: Path, timings: dict[str, float]) -> Written:
    """The shards (streamed, checked and hashed tensor by tensor), their index, config and tokenizer files."""
    t = time.monotonic()
    shards = plan_shards(merged.tensors, plan.dtype, parse_size(plan.config.max_shard_size))
    written = Written(files=shard_names(len(shards)))
    progress = Progress("merge", total=len(merged.tensors), unit="tensors", logger=LOG)
    pull = functools.partial(written.pull, merged.source, plan.dtype, progress)
    for fname, shard in zip(written.files, shards, strict=True):
        written.digests[fname] = write_safetensors(out_dir / fname, shard, plan.dtype, pull, timings)
    progress.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": plan.model_bytes},
                 "weight_map": {t.name: f for f, shard in zip(written.files, shards, strict=True) for t in shard}}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    write_folder_files(out_dir, plan.base.path, plan.base_cfg, plan.dtype, plan.tokenizer, plan.tok_dir, plan.eos,
                       untied=merged.untied)
    merged.source.close()
    timings["merge"] += written.merge_s
    timings["save"] = time.monotonic() - t - written.merge_s - timings.get("hash", 0.0)
    return written


# --------------------------------------------------------------------------- check


def check(plan: Plan, merged: Merged, written: Written, out_dir: Path, timings: dict[str, float]) -> dict[str, Any]:
    """The checks on what was written; their results are the manifest's metrics. Raises MergeCheckError
    naming the first failure, before anything is published."""
    import torch
    from transformers import AutoModelForCausalLM

    t = time.monotonic()
    failures = list(written.problems)
    base_count = sum(math.prod(x.shape) for x in merged.tensors)
    if written.params != base_count:
        failures.append(f"merged model has {written.params} parameters; the base has {base_count}")
    probes = merged.source.probes
    rtol = PROBE_RTOL[plan.dtype]
    bad_probe = next(((n, e) for n, e in probes.items() if not e <= rtol), None)
    if bad_probe:
        failures.append(f"{bad_probe[0]}: merged weight differs from W + scale*B@A by relative error "
                        f"{bad_probe[1]:.3g} > {rtol:g}")
    atol = plan.config.checks.logit_atol or STRICT_LOGIT_ATOL
    generation: dict[str, Any] = {"skipped": plan.skipped or ("disabled" if not plan.config.checks.generation
                                                              else None)}
    if merged.reference is not None and not written.problems:
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(out_dir), dtype=getattr(torch, plan.dtype), trust_remote_code=plan.config.trust_remote_code,
            output_loading_info=True)
        merged_model, loading = loaded
        # transformers only warns about weights the folder lacks (it initializes them at random) or holds
        # in excess: either means the folder does not load as the model that was checked.
        for what in ("missing_keys", "unexpected_keys", "mismatched_keys"):
            if loading.get(what):
                failures.append(f"transformers loading the merged folder reports {what.replace('_', ' ')}: "
                                f"{sorted(map(str, loading[what]))[:3]}")
        merged_model.to(plan.device).eval()
        merged.reference.seconds["merged_load"] = time.monotonic() - t
        generation = compare_run(merged_model, merged.reference, plan.tokenizer, atol, plan.device)
        del merged_model
        LOG.info("generation check: %s", summary(generation))
        if not generation["ok"]:
            failures.append(generation["first_failure"])
    timings["check"] = timings.get("check", 0.0) + time.monotonic() - t
    if failures:
        for f in failures:
            LOG.error("check failed: %s", f)
        raise MergeCheckError(f"merged model failed {len(failures)} check(s); first: {failures[0]}. "
                              "Nothing was published.")
    return {
        "checks_passed": True,
        "nonfinite_tensors": len(written.problems),
        "param_count": written.params, "base_param_count": base_count, "tensors": len(merged.tensors),
        "shapes_equal": True,  # write_safetensors refuses a tensor whose shape differs from the base's
        "generation": generation,
        "generation_check": summary(generation),  # one line: what `ftjobs inspect` and the logs show
        "probe_max_rel_error": max(probes.values(), default=None), "probe_tensors": len(probes),
        "probe_rtol": rtol,
    }


# --------------------------------------------------------------------------- record


def record_model(writer: mf.ArtifactWriter, out_dir: Path, written: Written) -> None:
    """model/<file> artifacts: uploaded from the work folder to s3://, or recorded where they were written."""
    if storage.is_s3(writer.uri(MODEL_DIR)):
        writer.add_dir(out_dir, MODEL_DIR)
        return
    for p in sorted(x for x in out_dir.iterdir() if x.is_file()):
        writer.add_existing(f"{MODEL_DIR}/{p.name}", sha256=written.digests.get(p.name))


def _outcome(plan: Plan, written: Written, metrics: dict[str, Any], timings: dict[str, float]) -> stage.Outcome:
    """What the manifest records beside the artifacts: the model block, stats, check results, timings."""
    info, quant = plan.info, plan.quant
    model_info = mf.MergeModel(
        base_model=info.base_model, base_revision=plan.base.revision, base_source=plan.base_src,
        adapter_sha256=plan.adapter_sha, dtype=plan.dtype, base_weights=plan.config.base_weights, mode=plan.mode,
        template_hash=plan.fmt.hash, chat_template=plan.fmt.template,
        # the tokenizer loaded from a temporary folder: name it as training did
        tokenizer={**chat.tokenizer_identity(plan.tokenizer), "name": (info.tokenizer or {}).get("name", "")},
        quantization={"mode": quant.mode, "blocksize": quant.blocksize, "double_quant": quant.double_quant},
        lora=info.lora).model_dump(mode="json")
    stats = {"mode": plan.mode, "device": plan.device, "model_bytes": plan.model_bytes, "shards": len(written.files),
             "memory_budget": plan.budget}
    return stage.Outcome(stats=stats, metrics=metrics, timings=timings, model=model_info)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def untie_adapted_head(model: Any) -> None:
    """Give a LoRA-adapted output head its own copy of a tied weight before peft merges into it.

    Otherwise W += B @ A lands in the one tensor the head shares with the input embeddings and changes
    both (peft warns about tied target modules; the generation check catches the result). A head under
    modules_to_save needs nothing: peft replaces it with the trained copy.
    """
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    base_layer = getattr(head, "base_layer", None)
    if base_layer is not None and base_layer.weight.data_ptr() == embed.weight.data_ptr():
        base_layer.weight = torch.nn.Parameter(base_layer.weight.detach().clone(), requires_grad=False)


def write_folder_files(out_dir: Path, base: Path, base_cfg: dict[str, Any], dtype: str, tokenizer: Any,
                       tok_dir: Path, eos: list[int], untied: bool = False) -> None:
    """config.json (no quantization_config, the merged dtype), generation_config.json, tokenizer files."""
    cfg = {k: v for k, v in base_cfg.items() if k != "quantization_config"}
    if untied:
        cfg["tie_word_embeddings"] = False
    cfg["dtype"] = dtype
    if "torch_dtype" in cfg:
        cfg["torch_dtype"] = dtype
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    gen_path = base / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    gen["eos_token_id"] = eos[0] if len(eos) == 1 else eos
    if tokenizer.pad_token_id is not None:
        gen["pad_token_id"] = tokenizer.pad_token_id
    if tokenizer.bos_token_id is not None:
        gen["bos_token_id"] = tokenizer.bos_token_id
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2, sort_keys=True) + "\n")
    for p in tok_dir.iterdir():
        if p.is_file():
            shutil.copyfile(p, out_dir / p.name)


@click.command(name="merge")
@click.option("--input", "input_", metavar="TRAIN_MANIFEST", help="Train manifest URI or the train output prefix.")
@click.option("--output", metavar="URI", help="Output prefix for model/ and manifest.json.")
@config_options(example="dtype=bfloat16")
def command(input_: str | None, output: str | None, config_file: str | None, sets: tuple[str, ...]) -> None:
    """Merge a LoRA adapter into its 16-bit base; check it; write a folder transformers and vLLM load."""
    execute(sys.modules[__name__], config_file, sets, {"input": input_, "output": output})
