"""What train trains (`method`) and how the processes share the model (`strategy`): the config keys and
the rules that tie them to the quantization block, declared once for train, the estimate and the docs.

- method qlora: 4-bit base (bitsandbytes nf4/fp4) + a LoRA adapter (today's default).
- method lora:  16-bit (or 32-bit on CPU) base + a LoRA adapter.
- method full:  every weight trained; the published result is a safetensors model (model/), which merge
                passes through unchanged and infer serves.
- strategy ddp: every process holds the whole model; gradients summed once per step (jobs/train).
- strategy fsdp: FSDP2 (`torch.distributed.fsdp.fully_shard`) shards parameters, gradients and optimizer
                state over the processes (jobs/train/fsdp.py); checkpoints are sharded (torch.distributed
                .checkpoint), one file per rank, and reshard on resume onto another number of processes.

Reference: docs/distributed.md.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from common.config import JobConfig
from common.errors import ConfigError

METHODS = ("qlora", "lora", "full")
STRATEGIES = ("ddp", "fsdp")


class Fsdp(JobConfig):
    mixed_precision: Literal["auto", "bfloat16", "float16", "none"] = Field(
        "auto", description="dtype the gathered layers compute in (FSDP2 MixedPrecisionPolicy param_dtype); "
                            "gradients are reduced in float32 and the sharded master weights stay float32. auto: "
                            "the run's compute dtype (bfloat16 on recent CUDA, float32 on CPU); none: no cast.")
    cpu_offload: bool = Field(False, description="Keep the sharded parameters, gradients and optimizer state in "
                                                 "host memory (FSDP2 CPUOffloadPolicy): far less GPU memory, "
                                                 "slower steps. CUDA only.")
    reshard_after_forward: bool = Field(True, description="Free each layer's gathered weights after its forward "
                                                          "(gather them again in backward): less memory, one "
                                                          "more all-gather per layer.")


def method_of(config: Any) -> str:
    """The method a train config asks for: `method`, else qlora (or lora when quantization.mode is none)."""
    if config.method is not None:
        return str(config.method)
    return "lora" if config.quantization.mode == "none" else "qlora"


def quant_mode(config: Any) -> str:
    """The quantization mode the base weights load with: the block's mode for qlora, none otherwise."""
    return str(config.quantization.mode) if method_of(config) == "qlora" else "none"


def check(config: Any) -> None:
    """Contradictions between method, quantization and strategy, as a message that says the fix (ValueError,
    which the config model turns into exit 2)."""
    method, mode = config.method, config.quantization.mode
    if method == "qlora" and mode == "none":
        raise ValueError("method qlora needs 4-bit base weights, but quantization.mode is none: set "
                         "quantization.mode nf4 (or fp4), or method lora for a 16-bit base")
    if method in ("lora", "full") and "mode" in config.quantization.model_fields_set and mode != "none":
        raise ValueError(f"method {method} trains on a 16-bit base, but quantization.mode is {mode}: drop "
                         "quantization.mode (or set it to none), or use method qlora")
    if method == "full" and config.lora.modules_to_save:
        raise ValueError("method full trains every weight: lora.modules_to_save means nothing there; drop it")
    if config.strategy == "ddp" and "fsdp" in config.model_fields_set:
        raise ValueError("the fsdp block is for strategy fsdp: set strategy fsdp, or drop the block")


def refuse_on_device(config: Any, cuda: bool) -> None:
    """What a device cannot do, before a model is loaded (ConfigError: exit 2)."""
    if config.strategy != "fsdp":
        return
    if config.fsdp.cpu_offload and not cuda:
        raise ConfigError("fsdp.cpu_offload moves the shards off the GPU; on CPU there is nothing to offload: "
                          "set fsdp.cpu_offload false")


def quant_storage(config: Any, dtype: Any) -> dict[str, Any]:
    """bitsandbytes' storage dtype for the packed 4-bit weights. Under FSDP it must be a float dtype the shards
    are gathered in unchanged: the mixed-precision dtype (else the compute dtype), so FSDP's cast is a no-op on
    the packed bytes (bnb_4bit_quant_storage; uint8 otherwise). Checked on CPU with bitsandbytes 0.50.2: FSDP2
    QLoRA on 2 processes gives one process's loss curve (tests/jobs/test_train_fsdp.py)."""
    if config.strategy != "fsdp":
        return {}
    import torch

    mp = config.fsdp.mixed_precision
    return {"bnb_4bit_quant_storage": dtype if mp in ("auto", "none") else getattr(torch, mp)}


def save_full_model(model: Any, dest: Any, dtype: Any, weights: dict[str, Any] | None) -> None:
    """method full's result: a transformers folder of safetensors in the compute dtype (what merge passes
    through and infer serves). `weights`: gathered from FSDP shards, else the model's own."""
    import torch

    state = weights if weights is not None else model.state_dict()
    state = {k: (v.to(dtype) if torch.is_floating_point(v) else v).detach().cpu().contiguous()
             for k, v in state.items()}
    model.config.use_cache = True
    model.config.dtype = dtype  # what infer loads it as
    model.save_pretrained(str(dest), state_dict=state, safe_serialization=True)
