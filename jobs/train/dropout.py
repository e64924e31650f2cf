"""LoRA's input dropout on CPU, drawing only the dropped positions.

peft puts `nn.Dropout(p)` before every LoRA `A` matrix. On CPU, torch's
dropout draws one Bernoulli number per element (`bernoulli_` on a float
tensor the size of the input), then scales and multiplies: with LoRA on every
linear layer and gradient checkpointing recomputing each forward, that RNG work
was about a sixth of a training step of the benchmark's tiny Llama (profile:
bench/RESULTS.md 2026-12-07, branch trainspeed). With p = 0.05 only one element
in twenty is dropped, so `SparseDropout` draws the gaps between dropped
positions instead (geometric with parameter p: the positions of the successes
of i.i.d. Bernoulli(p) trials, exactly), zeroes those, and scales the rest by
1 / (1 - p): the same distribution as `nn.Dropout`, from about p as many random
numbers. Backward zeroes the same positions; it keeps their indices (8 bytes
per dropped element) instead of a float mask (4 bytes per element).

The draws come from torch's default generator, so the job's seed fixes them and
gradient checkpointing (which restores the RNG state before it recomputes a
layer) replays them exactly. CUDA keeps peft's module: its dropout is one fused
kernel there.
"""

from __future__ import annotations

import math
from typing import Any

import torch


class SparseDropout(torch.nn.Module):
    """`nn.Dropout(p)` in distribution: each element dropped with probability p, the rest scaled by 1/(1-p)."""

    def __init__(self, p: float) -> None:
        super().__init__()
        if not 0 < p < 1:
            raise ValueError(f"dropout probability must be in (0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        return _Drop.apply(x, dropped_positions(x.numel(), self.p), 1.0 / (1.0 - self.p))

    def extra_repr(self) -> str:
        return f"p={self.p}"


def dropped_positions(n: int, p: float) -> torch.Tensor:
    """Sorted flat indices in [0, n), each present independently with probability p."""
    expected = n * p
    chunk = int(expected + 8 * math.sqrt(expected * (1 - p)) + 16)  # short of n only once in ~1e15 calls
    found, end = [], 0
    while end < n:
        gaps = torch.empty(chunk, dtype=torch.float64).geometric_(p)  # trials up to and including a success
        at = gaps.cumsum_(0).add_(end - 1).to(torch.int64)
        found.append(at)
        end = int(at[-1]) + 1
    positions = torch.cat(found) if len(found) > 1 else found[0]
    return positions[positions < n]


class _Drop(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(dropped)
        ctx.scale = scale
        return _scaled_without(x, dropped, scale)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (dropped,) = ctx.saved_tensors
        return _scaled_without(grad, dropped, ctx.scale), None, None


def _scaled_without(t: torch.Tensor, dropped: torch.Tensor, scale: float) -> torch.Tensor:
    """t * scale with the dropped flat positions zeroed: the forward on x, the backward on its gradient."""
    out = (t * scale).contiguous()
    out.view(-1)[dropped] = 0
    return out


def use_sparse(model: Any) -> int:
    """Swap every LoRA input dropout of this peft model for `SparseDropout`; returns how many were swapped."""
    swapped = 0
    for module in model.modules():
        table = getattr(module, "lora_dropout", None)
        if not isinstance(table, torch.nn.ModuleDict):
            continue
        for name, drop in list(table.items()):
            if type(drop) is torch.nn.Dropout and 0 < drop.p < 1:
                table[name] = SparseDropout(drop.p)
                swapped += 1
    return swapped
