"""The checks a merged model must pass before it is published: what merge compares and how closely.

`reference_run` generates greedily with the unmerged base + adapter and keeps the logits of every position;
`compare_run` feeds the same sequences, teacher-forced, through the merged model loaded back from disk.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from common import chat
from common.errors import InputError

DEFAULT_PROMPTS = (
    "What is two plus three?",
    "Write one sentence about a red car.",
    "Reverse the words: the cat sat on the road.",
    "Say hello to the world, then list three colours.",
)
# Largest |logit| difference accepted when greedy tokens differ: the dtype's rounding over a deep model.
DEFAULT_LOGIT_ATOL = {"float32": 1e-3, "bfloat16": 0.5, "float16": 0.1}
# Per-tensor probe: ||W'x - (Wx + s*B(Ax))|| / ||Wx + s*B(Ax)|| allowed, about 8x the dtype's rounding.
PROBE_RTOL = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


class MergeCheckError(InputError):
    """A check on the merged model failed: the same inputs fail the same way, so exit 3 (no retry)."""


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    fmt = chat.chat_format(tokenizer)
    return [chat.encode_prompt(tokenizer, fmt, [{"role": "user", "content": p}]) for p in prompts if p.strip()]


@dataclass(frozen=True)
class Reference:
    """The unmerged model's greedy sequences and their teacher-forced logits, batched as they were run."""

    seqs: list[list[int]]   # prompt + generated tokens, cut after the first end-of-turn token
    n_prompt: list[int]
    logits: list[Any]       # per sequence: the logits at every position but the last (each predicts the next)
    pad: int


def _padded(seqs: list[list[int]], pad: int, device: str) -> tuple[Any, Any, Any]:
    """Left-padded ids, attention mask and position ids for a batch of token sequences."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _forced_logits(model: Any, seqs: list[list[int]], pad: int, device: str) -> list[Any]:
    """Teacher-forced logits at every position of each sequence but its last, from one batched forward."""
    ids, mask, positions = _padded(seqs, pad, device)
    logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().cpu()
    width = ids.shape[1]
    return [logits[i, width - len(s): width - 1] for i, s in enumerate(seqs)]


def reference_run(model: Any, prompt_ids: list[list[int]], max_new_tokens: int, eos: list[int],
                  device: str) -> Reference:
    """Greedy generation with the unmerged model, keeping the logits of every position on the way.

    All prompts go through as one left-padded batch: the prefill gives the logits of every prompt position,
    each cached decode step the next one, so the reference costs one pass over the weights per generated
    token and no teacher-forced pass of its own (on a large model, reading the weights is what a step
    costs). Each sequence is cut after its first end-of-turn token.
    """
    import torch

    pad = eos[0]
    stop_ids = torch.tensor(eos, device=device)
    with torch.no_grad():
        ids, mask, positions = _padded(prompt_ids, pad, device)
        width = ids.shape[1]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        steps = [out.logits.float().cpu()]
        token = out.logits[:, -1].argmax(-1)
        new, done = [token], torch.isin(token, stop_ids)
        for _ in range(max_new_tokens - 1):
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=mask, position_ids=positions,
                        past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits.float().cpu())
            token = out.logits[:, -1].argmax(-1)
            new.append(token)
            done |= torch.isin(token, stop_ids)
        logits = torch.cat(steps, dim=1)
        seqs, kept = [], []
        for i, (prompt, row) in enumerate(zip(prompt_ids, torch.stack(new, dim=1).tolist(), strict=True)):
            stop = next((j + 1 for j, t in enumerate(row) if t in eos), len(row))
            seqs.append(prompt + row[:stop])
            start = width - len(prompt)  # sequence position p sits in column start + p
            kept.append(logits[i, start: start + len(prompt) + stop - 1].clone())
    return Reference(seqs=seqs, n_prompt=[len(p) for p in prompt_ids], logits=kept, pad=pad)


def compare_run(model: Any, reference: Reference, tokenizer: Any, atol: float, device: str) -> dict[str, Any]:
    """The merged model on the reference's batch, at every position of prompt and generation: the same
    greedy choice as base + adapter (its generated token, or its argmax over the prompt), or logits within
    atol where the choice differs."""
    import torch

    with torch.no_grad():
        merged = _forced_logits(model, reference.seqs, reference.pad, device)
    results, first_failure = [], None
    for i, (seq, n, ref_logits, logits) in enumerate(zip(reference.seqs, reference.n_prompt, reference.logits,
                                                         merged, strict=True)):
        want = ref_logits[: n - 1].argmax(-1).tolist() + seq[n:]
        got = logits.argmax(-1).tolist()
        diff = float((logits - ref_logits).abs().max()) if len(want) else 0.0
        first = next((j for j, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
        ok = first is None or diff <= atol
        results.append({"prompt": i, "tokens": len(seq) - n, "positions": len(want), "tokens_equal": first is None,
                        "first_diff_position": first,
                        "first_diff_step": first - (n - 1) if first is not None and first >= n - 1 else None,
                        "max_logit_diff": diff, "ok": ok})
        if not ok and first_failure is None and first is not None:
            where = (f"generated token {first - (n - 1)}" if first >= n - 1 else f"prompt position {first + 1}")
            first_failure = (f"prompt {i}, {where}: base+adapter chose "
                             f"{want[first]} ({tokenizer.decode([want[first]])!r}), merged chose {got[first]} "
                             f"({tokenizer.decode([got[first]])!r}); max |logit diff| {diff:.4g} > {atol:g}")
    return {"prompts": results, "tokens_equal": all(r["tokens_equal"] for r in results),
            "positions": sum(r["positions"] for r in results),
            "max_logit_diff": max((float(r["max_logit_diff"] or 0.0) for r in results), default=0.0),
            "logit_atol": atol,
            "ok": all(r["ok"] for r in results), "first_failure": first_failure}
