"""Padding-free packing and the token loss: torch and the standard library only.

Examples (input_ids + labels) are packed best-fit-decreasing into rows of at
most `max_len` tokens. Each example keeps its own `position_ids` (restarting
at 0), so attention never crosses an example boundary:

- `position_ids` mode: no attention mask is passed; transformers (>= 4.56)
  detects the restarts and builds the block-diagonal mask itself (SDPA and
  eager), and flash-attention uses them as varlen boundaries. On CPU the job
  runs SDPA per example instead, with no mask (`jobs/train/segments.py`).
- `mask` mode: an explicit 4D block-diagonal causal mask, for attention
  implementations that do not read packed position ids.
- `none` mode: one example per row, padded to the micro-batch's longest.

Both packing modes keep examples apart inside attention only. Layers that
carry state along the sequence (state-space/Mamba, linear attention, short
convolutions, recurrent blocks: the "hybrid" models such as Qwen3-Next, Jamba,
Bamba, LFM2, Falcon-H1) read a packed row as one sequence whatever the position
ids or the mask say, so `refusal` refuses packing for them. transformers' fused
CUDA kernels for some of them take explicit boundaries (`seq_idx`,
`cu_seq_lens`), but their torch fallbacks drop them (transformers 5.19:
`Lfm2ShortConv` passes `seq_idx` into a `causal_conv1d_fn` that ignores it), so
whether packing would be exact depends on which kernels a machine has: such
models train with `packing: none`.

Targets are shifted per example here (label of token t+1 at position t), so no
position ever predicts the first token of the next example. The loss runs the
output head only on positions that have a target: prompt tokens and padding
cost no logits at all.

This module is imported by `bench/gpu_bench.py` on machines without pydantic
or boto3: keep it to torch and the standard library.
"""

from __future__ import annotations

import bisect
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Example:
    """One tokenized example; `trainable` counts the positions that get a target (labels[1:] != -100)."""

    input_ids: Sequence[int]
    labels: Sequence[int]
    trainable: int

    def __len__(self) -> int:
        return len(self.input_ids)


def example(input_ids: Sequence[int] | Any, labels: Sequence[int] | Any) -> Example:
    """An example from token ids and labels (Python lists, or numpy/torch arrays as read from Parquet)."""
    tail = labels[1:]
    if hasattr(tail, "dtype"):  # numpy or torch: count without a Python loop
        trainable = int((tail != IGNORE_INDEX).sum())  # type: ignore[union-attr]
    else:
        trainable = sum(1 for x in tail if x != IGNORE_INDEX)
    return Example(input_ids=input_ids, labels=labels, trainable=trainable)


# Layer kinds (a config's `layer_types`, older configs' `layers_block_type`) whose state runs along the sequence.
STATEFUL_LAYERS = ("linear_attention", "conv", "hybrid", "hybrid_sliding", "mamba", "mamba2", "ssm", "recurrent",
                   "rwkv")
# Model types made only of such layers, whose configs name no layer kinds.
RECURRENT_MODELS = ("mamba", "mamba2", "falcon_mamba", "rwkv", "xlstm", "recurrent_gemma")


def refusal(config: Any, mode: str) -> str | None:
    """Why `mode` would let packed examples see each other in a model with this (transformers) config, or None."""
    if mode == "none":
        return None
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    model_type = getattr(text, "model_type", None) or getattr(config, "model_type", "?")
    kinds = set(getattr(text, "layer_types", None) or []) | set(getattr(text, "layers_block_type", None) or [])
    stateful = sorted(k for k in kinds if isinstance(k, str) and k in STATEFUL_LAYERS)
    if not stateful and model_type not in RECURRENT_MODELS:
        return None
    what = f"{', '.join(stateful)} layers" if stateful else "recurrent layers"
    return (f"packing: {mode} cannot keep packed examples apart in model type {model_type!r}: its {what} carry "
            "state along the sequence whatever the position ids or an attention mask say, so each example would "
            "read the ones packed before it. Set packing: none (one example per row, padded).")


def pack(lengths: Sequence[int], max_len: int, separate: bool = False) -> list[list[int]]:
    """Group example indices into rows of at most `max_len` tokens (best fit, longest first), or with
    `separate` one example per row.

    Deterministic for the same lengths. Every length must be <= max_len.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if separate:
        for i in order:
            if lengths[i] > max_len:
                raise ValueError(f"example {i} has {lengths[i]} tokens, more than max_len {max_len}")
        return [[i] for i in order]
    rows: list[list[int]] = []
    # (remaining capacity, row index), kept sorted: best fit = smallest capacity that still fits.
    free: list[tuple[int, int]] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"example {i} has {n} tokens, more than max_len {max_len}")
        at = bisect.bisect_left(free, (n, -1))
        if at < len(free):
            cap, r = free.pop(at)
            rows[r].append(i)
            cap -= n
        else:
            r = len(rows)
            rows.append([i])
            cap = max_len - n
        if cap > 0:
            bisect.insort(free, (cap, r))
    return rows


def epoch_rows(rows: list[list[int]], seed: int, epoch: int) -> list[list[int]]:
    """The rows in this epoch's order: a fixed shuffle per (seed, epoch), so a resume replays it exactly."""
    out = list(rows)
    random.Random(seed * 1_000_003 + epoch).shuffle(out)
    return out


def micro_batches(rows: list[list[int]], batch_size: int, seed: int, epoch: int) -> list[list[list[int]]]:
    """This epoch's micro-batches: `batch_size` packed rows each (the last one may hold fewer)."""
    ordered = epoch_rows(rows, seed, epoch)
    return [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]


def step_share(batches: Sequence[Any], per_step: int, step_in_epoch: int, rank: int = 0,
               world: int = 1) -> list[Any]:
    """The micro-batches process `rank` of `world` trains on in optimizer step `step_in_epoch` of an epoch.

    A step takes the epoch's next `per_step` micro-batches (its last step what is left: never the epoch's
    first ones again); process r takes every `world`-th of them, starting at the r-th. So over an epoch each
    micro-batch is trained on exactly once, by one process, whatever `world` is, and a step's micro-batches
    are the same set on any number of processes: the data position is the global step alone.
    """
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of {world} processes")
    first = step_in_epoch * per_step
    return list(batches[first:first + per_step][rank::world])


def collate(batch: list[list[int]], examples: Sequence[Example], pad_id: int,
            with_mask: bool = False) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch of packed rows, padded only to its longest row.

    Returns input_ids, position_ids, targets (already shifted; IGNORE_INDEX
    where nothing is predicted), and with `with_mask` a 4D additive attention
    mask [B, 1, L, L] (see `block_causal_mask`). Padding forms its own segment and has no targets.
    """
    row_len = [sum(len(examples[i]) for i in row) for row in batch]
    width = max(row_len)
    bsz = len(batch)
    input_ids = torch.full((bsz, width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((bsz, width), dtype=torch.long)
    targets = torch.full((bsz, width), IGNORE_INDEX, dtype=torch.long)
    segments = torch.zeros((bsz, width), dtype=torch.long)
    for b, row in enumerate(batch):
        at = 0
        for seg, i in enumerate(row):
            ex = examples[i]
            n = len(ex)
            input_ids[b, at:at + n] = torch.as_tensor(ex.input_ids, dtype=torch.long)
            position_ids[b, at:at + n] = torch.arange(n)
            targets[b, at:at + n - 1] = torch.as_tensor(ex.labels, dtype=torch.long)[1:]
            segments[b, at:at + n] = seg
            at += n
        if at < width:
            position_ids[b, at:] = torch.arange(width - at)
            segments[b, at:] = len(row)
    out = {"input_ids": input_ids, "position_ids": position_ids, "targets": targets}
    if with_mask:
        out["attention_mask"] = block_causal_mask(segments)
    return out


def block_causal_mask(segments: torch.Tensor) -> torch.Tensor:
    """[B, L] segment ids -> [B, 1, L, L] additive float mask: 0 where a query may attend
    (causal, same segment), the most negative float elsewhere.

    Additive rather than bool because eager attention adds the mask to its
    scores (a bool mask there would be added as 0/1 and leak); SDPA takes both.
    """
    width = segments.shape[1]
    causal = torch.ones((width, width), dtype=torch.bool).tril()
    allowed = (segments[:, :, None] == segments[:, None, :]) & causal
    mask = torch.zeros(allowed.shape, dtype=torch.float32)
    mask.masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return mask[:, None, :, :]


def count_tokens(batch: list[list[int]], examples: Sequence[Example]) -> tuple[int, int]:
    """(real tokens, tokens with a target) in a micro-batch."""
    tokens = sum(len(examples[i]) for row in batch for i in row)
    trained = sum(examples[i].trainable for row in batch for i in row)
    return tokens, trained


def head_and_decoder(model: Any) -> tuple[Any, Any]:
    """The decoder stack and output head of a causal LM (peft-wrapped or not).

    Returns (None, None) when the model post-processes logits (soft-capping,
    logit scaling), where only its own forward is correct.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = getattr(base, "module", base)  # DDP
    cfg = getattr(base, "config", None)
    if getattr(cfg, "final_logit_softcapping", None) or getattr(cfg, "logit_scale", None) not in (None, 1, 1.0):
        return None, None
    try:
        return base.get_decoder(), base.get_output_embeddings()
    except (AttributeError, NotImplementedError):
        return None, None


def loss_sum(model: Any, batch: dict[str, torch.Tensor], chunk: int = 4096) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over the batch's targets, and how many there were.

    Runs the decoder, then the output head only on positions with a target,
    `chunk` positions at a time, so a large vocabulary never materializes
    [B, L, V] logits.
    """
    targets = batch["targets"]
    keep = targets != IGNORE_INDEX
    n = int(keep.sum())
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    decoder, head = head_and_decoder(model)
    if decoder is None:
        logits = model(**kwargs).logits
        loss = torch.nn.functional.cross_entropy(logits[keep].float(), targets[keep], reduction="sum")
        return loss, n
    hidden = decoder(**kwargs).last_hidden_state
    picked = hidden[keep]
    wanted = targets[keep]
    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, max(n, 1), chunk):
        h = picked[start:start + chunk]
        if h.shape[0] == 0:
            total = total + hidden.sum() * 0.0  # keeps the graph connected for an all-prompt batch
            break
        y = wanted[start:start + chunk]
        if torch.is_grad_enabled():
            # Recompute this chunk's logits in backward instead of keeping [chunk, V] floats alive.
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, head, h, y, use_reentrant=False)
        else:
            total = total + _chunk_loss(head, h, y)
    return total, n


def _chunk_loss(head: Any, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cross_entropy(head(h).float(), y, reduction="sum")
