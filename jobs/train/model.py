"""The model train fits: the base loaded (4-bit or 16-bit) with its LoRA adapter or for full finetuning,
parameter counts, the optimizer, and peak memory."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common.errors import ConfigError, InputError
from jobs.train import segments, strategy
from jobs.train.config import Config

LOG = logging.getLogger(__name__)


def load_model(config: Config, path: Path, device: Any, cuda: bool) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q, mode, method = config.quantization, strategy.quant_mode(config), strategy.method_of(config)
    if q.compute_dtype != "auto":
        dtype = getattr(torch, q.compute_dtype)
    elif cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": torch.float32 if method == "full" else dtype,  # full: float32 masters
                              "attn_implementation": config.attention,
                              "trust_remote_code": config.trust_remote_code,
                              "device_map": {"": device.index if cuda else "cpu"}}
    quant: dict[str, Any] = {"mode": mode, "compute_dtype": str(dtype).removeprefix("torch.")}
    if mode != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=dtype, **strategy.quant_storage(config, dtype))
        quant.update({"method": "bitsandbytes", "bits": 4, "double_quant": q.double_quant})
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"Could not load base model {config.base_model}: {exc}") from None
    attention = segments.choose(model.config, config.attention, config.packing, cuda) if config.per_example_attention \
        else config.attention
    if attention != config.attention:
        model.set_attn_implementation(attention)  # exact, a fraction of the work: jobs/train/segments.py
    if mode != "none" and not cuda:
        # bitsandbytes 0.50 on CPUs with AVX512-BF16: the first forward in eval mode (our eval loss) repacks
        # the 4-bit weights for an inference kernel that has no autograd, and they stay repacked, so later
        # training steps silently lose the gradient through every base layer. Keep the trainable layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    gc_kwargs = {"use_reentrant": False}
    if mode != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False
    if method == "full":
        model.requires_grad_(True)
        return model, dtype, quant
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha,  # type: ignore[arg-type] # peft takes floats
                      lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, modules_to_save=config.lora.modules_to_save or None,
                      bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"LoRA settings do not fit {config.base_model}: {exc}") from None
    if not cuda:
        from jobs.train import dropout

        dropout.use_sparse(model)  # the same dropout from ~p as many random numbers: jobs/train/dropout.py
    return model, dtype, quant


def count_params(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def make_optimizer(config: Config, params: list[Any], cuda: bool) -> tuple[Any, str]:
    import torch

    name = config.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if cuda else "adamw_torch"
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay), name
    if not cuda:
        raise ConfigError(f"optimizer {name} needs CUDA (bitsandbytes' 8-bit optimizers); use adamw_torch on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=config.learning_rate, weight_decay=config.weight_decay), name


def peak_memory(cuda: bool, device: Any) -> dict[str, Any]:
    if cuda:
        import torch

        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    import resource

    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "cpu_max_rss"}
