"""merge's plan: what the merge will do, decided before any weight is read.

`plan_merge` checks the adapter and tokenizer bytes (against the train manifest), the base (its revision,
not quantized), decides the merged dtype, the mode (in_memory or sharded) and which checks fit the memory
budget, and reads what the check compares (`check_inputs`). The job that runs the plan is `job.py`.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import chat, models, storage
from common import manifest as mf
from common.errors import ConfigError, InputError
from jobs.merge.check_data import check_inputs
from jobs.merge.checks import DTYPES, CheckInputs, reference_bytes
from jobs.merge.config import Config, parse_size
from jobs.merge.lora import Quant, sharded_refusal
from jobs.merge.tensors import TensorInfo, read_checkpoint

LOG = logging.getLogger("jobs.merge.job")  # the stage's one logger: its lines read as the job's

# What in_memory needs beside the weights (activations, peft wrappers, allocator slack), as a factor.
IN_MEMORY_FACTOR = 1.5


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
    check_inputs: CheckInputs | None  # what the generation check compares on (None: it does not run)


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
                eos=[e for e in eos if e is not None],
                check_inputs=check_inputs(config.checks, train, tokenizer, fmt, work) if gen_check else None)


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


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]
