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

Code: this module (`run` and its phases in order, the output folder, the check, CLI); `config.py`;
`plan.py` (what is checked and decided before any weight loads); `sources.py` (the merge itself, in memory
or streaming); `tensors.py` (a checkpoint's tensors from its headers, shard plan, the streaming writer);
`lora.py` (adapter files to per-tensor updates, the 4-bit roundtrip); `checks.py` (the generation
comparison and its tolerances).
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from common import chat, stage, storage
from common import manifest as mf
from common.config import dump
from common.logs import Progress
from common.runner import config_options, execute
from jobs.merge import passthrough
from jobs.merge.checks import PROBE_RTOL, STRICT_LOGIT_ATOL, MergeCheckError, compare_run, encode_prompts, summary
from jobs.merge.config import Checks, Config, parse_size
from jobs.merge.lora import Adapter, LoraUpdate, Quant, pattern_value
from jobs.merge.plan import Plan, plan_merge
from jobs.merge.sources import InMemoryTensors, Merged, TensorSource, merge_in_memory, merge_streaming
from jobs.merge.tensors import TensorInfo, finite_check, plan_shards, shard_names, tensors_float, write_safetensors

__all__ = ["Adapter", "Checks", "Config", "InMemoryTensors", "LoraUpdate", "MergeCheckError", "Quant", "TensorInfo",
           "command", "encode_prompts", "parse_size", "pattern_value", "plan_shards", "run", "shard_names"]

STAGE = "merge"
LOG = logging.getLogger(__name__)
MODEL_DIR = "model"  # the merged folder, under the output prefix

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
            tensor = tensor.to(getattr(torch, dtype))  # a no-op for what the streaming source already cast
        problem = None if info.name in source.finite else finite_check(info.name, tensor)
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
    with torch_threads_beside_hashing(plan.device):
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
    # save: what the merge waited for (writes, hashing, the folder's other files); timings["hash"] is the
    # sha256 thread's own seconds, spent beside the merge, so it is not taken out of either.
    timings["save"] = time.monotonic() - t - written.merge_s
    return written


@contextlib.contextmanager
def torch_threads_beside_hashing(device: str) -> Iterator[None]:
    """One CPU core left to the sha256 thread while tensors are merged on CPU, then torch's threads as they were.

    Measured on 2 cores (1.6 GB, sharded, checks off): 2.89 s with one torch thread against 3.57 s with two,
    whose matrix products fought the hash thread for the second core.
    """
    import torch

    before = torch.get_num_threads()
    if device == "cpu" and before > 1:
        torch.set_num_threads(before - 1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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
        generation["compared"] = plan.check_inputs.record if plan.check_inputs else None
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