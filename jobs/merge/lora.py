"""LoRA arithmetic for the streaming merge, read straight from the adapter files, and the 4-bit roundtrip.

`read_adapter` maps every update to the base tensor it changes (A/B pairs with their scale, rank and
alpha patterns, rsLoRA, fan_in_fan_out, modules_to_save replacements); `lora_merge` applies one;
`Probe` checks one merged tensor against the unmerged computation. `roundtrip_4bit` reproduces what a
bitsandbytes Linear4bit weight looked like to training.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError, InputError
from jobs.merge.checks import DTYPES
from jobs.merge.tensors import fresh_tensor


@dataclass(frozen=True)
class Quant:
    """The 4-bit settings the adapter trained with (train manifest `model.quantization`)."""

    mode: str  # nf4 | fp4 | none
    blocksize: int = 64
    double_quant: bool = False
    skip_modules: tuple[str, ...] = ()
    dtype: str | None = None  # the dtype training loaded the base in before quantizing (compute_dtype)

    @staticmethod
    def from_manifest(q: dict[str, Any]) -> Quant:
        mode = str(q.get("mode") or "none").lower()
        if mode not in ("nf4", "fp4", "none"):
            raise InputError(f"train manifest model.quantization.mode is {mode!r}; merge knows nf4, fp4 and none")
        return Quant(mode=mode, blocksize=int(q.get("blocksize") or 64), double_quant=bool(q.get("double_quant")),
                     skip_modules=tuple(q.get("skip_modules") or ()),
                     dtype=q.get("compute_dtype") if q.get("compute_dtype") in DTYPES else None)


def roundtrip_4bit(w: Any, quant: Quant) -> Any:
    """dequantize(quantize(w)) exactly as bitsandbytes does it for a Linear4bit weight."""
    import bitsandbytes.functional as bnbf
    import torch

    src = w.to(getattr(torch, quant.dtype)) if quant.dtype else w  # quantize what training quantized
    packed, state = bnbf.quantize_4bit(src.contiguous(), blocksize=quant.blocksize,
                                       compress_statistics=quant.double_quant, quant_type=quant.mode)
    return bnbf.dequantize_4bit(packed, state).to(w.dtype)


def quantized_weight_names(model: Any, quant: Quant) -> set[str]:
    """Weights bitsandbytes turns into 4-bit when a QLoRA run loads this model: every nn.Linear except the
    output embeddings (and tied / last modules), as transformers decides, minus the configured skips."""
    import torch
    from transformers.quantizers.base import get_keys_to_not_convert

    skip = set(get_keys_to_not_convert(model)) | set(quant.skip_modules)
    out = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and not any(name == s or name.endswith("." + s) for s in skip):
            out.add(f"{name}.weight")
    return out




@dataclass
class LoraUpdate:
    a: Any = None
    b: Any = None
    scale: float = 1.0
    transpose: bool = False  # fan_in_fan_out (Conv1D) or an embedding: delta is (B @ A).T
    replace: Any = None      # modules_to_save: the trained copy replaces the base tensor
    source: Any = None       # peft saved the base layer itself (save_embedding_layers): merge into this


@dataclass
class Adapter:
    config: dict[str, Any]
    updates: dict[str, LoraUpdate] = field(default_factory=dict)  # base tensor name -> update


def pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's rank_pattern / alpha_pattern: a key matches a module name at a dot boundary, as a regex."""
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


UNSUPPORTED = ("use_dora", "lora_bias", "layer_replication", "trainable_token_indices", "target_parameters",
               "alora_invocation_tokens")


def tied_head(model: Any, stored: set[str]) -> dict[str, str]:
    """{output head weight: input embedding weight} when the checkpoint stores only the embedding (tied).

    A head trained on such a base (modules_to_save, or LoRA on the head) no longer equals the embedding:
    the merged model has to store it as its own tensor, starting from the embedding's values.
    """
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or embed is None:
        return {}
    modules = {id(m): n for n, m in model.named_modules()}
    head_name, embed_name = f"{modules[id(head)]}.weight", f"{modules[id(embed)]}.weight"
    if head_name in stored or embed_name not in stored:
        return {}
    return {head_name: embed_name}


def sharded_refusal(cfg: dict[str, Any]) -> str | None:
    """Why the streaming merge cannot apply an adapter with this adapter_config.json, or None."""
    if cfg.get("peft_type") != "LORA":
        return f"adapter is {cfg.get('peft_type')}, not LORA; mode: sharded merges LoRA only"
    used = [k for k in UNSUPPORTED if cfg.get(k)]
    if cfg.get("bias", "none") != "none":
        used.append(f"bias={cfg['bias']}")
    return f"adapter uses {', '.join(used)}; mode: sharded merges plain LoRA only" if used else None


def read_adapter(adapter_dir: Path, base_names: set[str]) -> Adapter:
    """Every update the adapter makes, keyed by the base tensor it changes (for the streaming merge).

    base_names: the tensors the merged model will have (a tied base's head included, see `tied_head`).
    """
    from safetensors.torch import load_file

    cfg = json.loads((adapter_dir / "adapter_config.json").read_text())
    refusal = sharded_refusal(cfg)
    if refusal:
        raise ConfigError(f"{refusal}. Set mode: in_memory (peft's own merge)")
    weights = load_file(str(adapter_dir / "adapter_model.safetensors"))
    adapter = Adapter(cfg)
    r0, alpha0 = cfg["r"], cfg["lora_alpha"]
    for key, tensor in weights.items():
        name = key.removeprefix("base_model.model.")
        m = re.match(r"^(.*)\.lora_(A|B|embedding_A|embedding_B)(\.weight)?$", name)
        if m:
            module, part = m.group(1), m.group(2)
            target = f"{module}.weight"
            up = adapter.updates.setdefault(target, LoraUpdate())
            r = pattern_value(cfg.get("rank_pattern") or {}, module, r0)
            alpha = pattern_value(cfg.get("alpha_pattern") or {}, module, alpha0)
            up.scale = alpha / (math.sqrt(r) if cfg.get("use_rslora") else r)
            up.transpose = part.startswith("embedding") or bool(cfg.get("fan_in_fan_out"))
            if part.endswith("A"):
                up.a = tensor
            else:
                up.b = tensor
        elif name.endswith(".base_layer.weight") and name.replace(".base_layer", "") in base_names:
            # peft saves an embedding-like target's base weight (vocabulary resized, or a head tied to the
            # embeddings); loading the adapter puts it in place of the checkpoint's, so the merge starts there.
            adapter.updates.setdefault(name.replace(".base_layer", ""), LoraUpdate()).source = tensor
        elif name in base_names:  # modules_to_save: saved under the module's own name
            adapter.updates.setdefault(name, LoraUpdate()).replace = tensor
        else:
            raise ConfigError(f"adapter tensor {key!r} is neither LoRA A/B nor a tensor of the base checkpoint; "
                              "mode: sharded cannot place it. Set mode: in_memory (peft's own merge)")
    for target, up in adapter.updates.items():
        if target not in base_names:
            raise InputError(f"adapter changes {target}, which the base checkpoint does not have: is this the "
                             "adapter's base model?")
        if up.replace is None and up.a is None and up.b is None:  # a saved base layer and no LoRA on it
            up.replace = up.source
        elif up.replace is None and (up.a is None or up.b is None):
            raise InputError(f"adapter has only one of lora_A/lora_B for {target}")
    return adapter


def lora_merge(src: Any, up: LoraUpdate, device: str) -> Any:
    """W' = W + scale * B @ A, in float32 (or the modules_to_save replacement), in a tensor of its own.

    `src` is never written: it may be a view of the checkpoint's memory map (`tensors.map_tensor`). A
    float32 `src` is read once by an out-of-place addmm; another dtype is upcast into a fresh tensor and
    updated in place. Either way one W-sized tensor is allocated and no B @ A temporary.
    """
    import torch

    if up.replace is not None:
        return up.replace.to(device, torch.float32)
    a, b = up.a.to(device, torch.float32), up.b.to(device, torch.float32)
    m1, m2 = (a.T, b.T) if up.transpose else (b, a)  # (B @ A)^T = A^T @ B^T
    on_cpu = torch.device(device).type == "cpu"
    out = fresh_tensor(tuple(src.shape), torch.float32) if on_cpu else None
    if src.dtype == torch.float32 and src.device.type == torch.device(device).type:
        return torch.addmm(src, m1, m2, alpha=up.scale, out=out)
    w = out.copy_(src) if out is not None else src.to(device, torch.float32)
    return w.addmm_(m1, m2, alpha=up.scale)


@dataclass(frozen=True)
class Probe:
    """A random input and what the unmerged computation gives for it: Wx + s*B(Ax).

    One vector, as matrix-vector products: a product with a few columns is a skinny GEMM that torch runs
    7x slower than a matrix-vector product on this CPU (measured: 52 ms against 7 ms for a 46 MB weight),
    and one Gaussian vector already exposes any wrong update (E x = 0 has probability zero for E != 0).
    """

    x: Any
    want: Any

    @classmethod
    def before_merge(cls, w_src: Any, up: LoraUpdate, device: str) -> Probe:
        """Taken from the base weight before `lora_merge` updates it in place."""
        import torch

        gen = torch.Generator(device="cpu").manual_seed(0)
        a, b = up.a.to(device, torch.float32), up.b.to(device, torch.float32)
        x = torch.randn(w_src.shape[1], generator=gen)
        x[x == 0] = 1.0  # no zero input: a NaN/Inf weight then always shows in W'x (see `error`)
        x = x.to(device)
        if up.transpose:  # embedding rows: (B @ A)^T x = A^T (B^T x), through the same algebra
            return cls(x, w_src.float().mv(x) + a.T.mv(b.T.mv(x)) * up.scale)
        return cls(x, w_src.float().mv(x) + b.mv(a.mv(x)) * up.scale)

    def error(self, merged: Any) -> tuple[float, bool]:
        """Relative error of the merged weight (in the output dtype) on the same inputs, and whether W'x is
        finite. Every weight meets a nonzero input, so a NaN or Inf anywhere in W' makes its row of W'x
        non-finite: a finite W'x proves W' finite, and the writer skips its own pass over the tensor."""
        import torch

        got = merged.float().mv(self.x)
        finite = bool(torch.isfinite(got).all())
        return float((got - self.want).norm() / self.want.norm().clamp_min(1e-30)), finite


