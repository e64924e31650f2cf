"""Attention per packed example: SDPA over each example's own tokens instead of a whole packed row.

With `packing: position_ids` and SDPA, transformers sees the restarting
position ids and builds a [B, 1, L, L] block-diagonal causal mask, and SDPA
then scores every query against every key of the row: L^2 work per head,
almost all of it masked away. An example of n tokens only needs its own n^2/2
(the long-tailed chat lengths of `bench/bench_train.py` need about a third of
the dense work). Here each example runs its own causal SDPA call on its slice
of the row, and no mask is built at all. Same segments as transformers' dense
path (a new example starts wherever a position id is not the previous one +
1), so the result is the same to float rounding, forward and gradients
(tests/jobs/test_train_segments.py).

Used on CPU for `attention: sdpa` + `packing: position_ids` (`choose`); on
CUDA, flash-attention's varlen kernels already do this (`attention:
flash_attention_2`). `choose` keeps plain SDPA where per-example causal
attention is not what the model computes: sliding-window or chunked layers,
soft-capped scores, attention sinks, non-causal or multimodal configs. A padded
micro-batch (an explicit 2D/4D mask) goes through plain SDPA with its mask.
Nothing here is distributed: every process runs its own rows, so DDP and FSDP
are unaffected.

Registered through transformers' `AttentionInterface` and
`AttentionMaskInterface` under `NAME`; the mask function returns None (no
[L, L] mask per step) unless a padding mask comes in.
"""

from __future__ import annotations

from typing import Any

NAME = "ftjobs_segment_sdpa"

# Config fields whose non-empty value means a layer's attention is more than causal attention within an example.
NOT_PLAIN_CAUSAL = ("sliding_window", "attention_chunk_size", "attn_logit_softcapping", "final_logit_softcapping")


def choose(config: Any, attention: str, packing: str, cuda: bool) -> str:
    """The attn_implementation to load the model with: `NAME` where it is exact and saves work, else `attention`."""
    if cuda or attention != "sdpa" or packing != "position_ids" or not plain_causal(config):
        return attention
    register()
    return NAME


def in_use(model: Any) -> bool:
    """Whether this (peft-wrapped or not) model runs its attention per example."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return getattr(getattr(base, "config", None), "_attn_implementation", None) == NAME


def plain_causal(config: Any) -> bool:
    """Whether every layer of this (transformers) config attends causally over all earlier tokens, nothing else."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config or not getattr(config, "is_causal", True):
        return False  # multimodal wrappers (image tokens may attend both ways) and encoders
    if any(getattr(text, field, None) for field in NOT_PLAIN_CAUSAL):
        return False
    kinds = set(getattr(text, "layer_types", None) or ["full_attention"])
    return kinds == {"full_attention"}


def register() -> None:
    """Make `NAME` a valid attn_implementation (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(NAME, attention)
    AttentionMaskInterface.register(NAME, mask)


def mask(batch_size: int, q_length: int, kv_length: int, attention_mask: Any = None, **kwargs: Any) -> Any:
    """No mask for unpadded input (`attention` finds the examples in the position ids); a padded batch gets
    SDPA's own mask and plain SDPA."""
    if attention_mask is None or bool(attention_mask.all()):
        return None
    from transformers.masking_utils import sdpa_mask

    return sdpa_mask(batch_size=batch_size, q_length=q_length, kv_length=kv_length, attention_mask=attention_mask,
                     **kwargs)


def attention(module: Any, query: Any, key: Any, value: Any, attention_mask: Any, dropout: float = 0.0,
              scaling: float | None = None, **kwargs: Any) -> tuple[Any, None]:
    """transformers' attention-function contract: query/key/value [B, heads, L, head_dim] in, [B, L, heads,
    head_dim] out."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if attention_mask is not None or query.shape[2] != key.shape[2] or query.shape[2] == 1:
        # A padded batch, or a cache in use: plain SDPA, with whatever mask came.
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    if position_ids is None:
        raise RuntimeError(f"{NAME}: {type(module).__name__} does not pass position_ids to its attention function, "
                           "so packed examples cannot be told apart; train this model with packing: mask")
    rows = segment_lengths(position_ids.expand(query.shape[0], -1))
    if all(len(r) == 1 for r in rows):
        kwargs.pop("is_causal", None)
        return sdpa_attention_forward(module, query, key, value, None, dropout=dropout, scaling=scaling,
                                      is_causal=True, **kwargs)
    gqa = query.shape[1] != key.shape[1]
    out = [_row(query[b:b + 1], key[b:b + 1], value[b:b + 1], lengths, dropout, scaling, gqa)
           for b, lengths in enumerate(rows)]
    import torch

    return torch.cat(out).transpose(1, 2).contiguous(), None


def segment_lengths(position_ids: Any) -> list[list[int]]:
    """[B, L] position ids -> each row's example lengths, in order. An example starts where a position id is
    not the previous one + 1 (transformers' own rule for packed rows); trailing padding is an example of its own."""
    import torch

    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    width = position_ids.shape[1]
    out = []
    for row in starts:
        at = row.nonzero().flatten().tolist() + [width]
        out.append([b - a for a, b in zip(at, at[1:], strict=False)])
    return out


def _row(q: Any, k: Any, v: Any, lengths: list[int], dropout: float, scaling: float | None, gqa: bool) -> Any:
    """One row ([1, heads, L, head_dim] each): causal SDPA per example, the outputs side by side. 4D views, so
    that CPU SDPA takes its flash kernel (3D inputs fall back to the unfused math path)."""
    import torch
    from torch.nn.functional import scaled_dot_product_attention as sdpa

    parts = [sdpa(a, b, c, dropout_p=dropout, is_causal=True, scale=scaling, enable_gqa=gqa)
             for a, b, c in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)]
    return torch.cat(parts, 2)
