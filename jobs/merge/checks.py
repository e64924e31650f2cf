"""The checks a merged model must pass before it is published: what merge compares and how closely.

`reference_run` generates greedily with the unmerged base + adapter and keeps the teacher-forced logits;
`compare_run` feeds the same sequences through the merged model loaded back from disk.
"""

from __future__ import annotations

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


def reference_run(model: Any, prompt_ids: list[list[int]], max_new_tokens: int, eos: list[int],
                  device: str) -> list[tuple[list[int], int, Any]]:
    """Greedy generation with the unmerged model, then the logits of that sequence (teacher-forced)."""
    import torch

    out = []
    with torch.no_grad():
        for ids in prompt_ids:
            x = torch.tensor([ids], device=device)
            seq = model.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                 do_sample=False, eos_token_id=eos, pad_token_id=eos[0])[0]
            logits = model(input_ids=seq[None]).logits[0, len(ids) - 1: -1].float().cpu()
            out.append((seq.tolist(), len(ids), logits))
    return out


def compare_run(model: Any, reference: list[tuple[list[int], int, Any]], tokenizer: Any, atol: float,
                device: str) -> dict[str, Any]:
    """The merged model on the reference sequences: same greedy choices, or logits within atol."""
    import torch

    results, first_failure = [], None
    with torch.no_grad():
        for i, (seq, n_prompt, ref_logits) in enumerate(reference):
            logits = model(input_ids=torch.tensor([seq], device=device)).logits[0, n_prompt - 1: -1].float().cpu()
            want = seq[n_prompt:]
            got = logits.argmax(-1).tolist()
            diff = float((logits - ref_logits).abs().max()) if len(want) else 0.0
            first = next((j for j, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
            ok = first is None or diff <= atol
            results.append({"prompt": i, "tokens": len(want), "tokens_equal": first is None,
                            "first_diff_step": first, "max_logit_diff": diff, "ok": ok})
            if not ok and first_failure is None and first is not None:
                first_failure = (f"prompt {i}, generated token {first}: base+adapter chose "
                                 f"{want[first]} ({tokenizer.decode([want[first]])!r}), merged chose {got[first]} "
                                 f"({tokenizer.decode([got[first]])!r}); max |logit diff| {diff:.4g} > {atol:g}")
    return {"prompts": results, "tokens_equal": all(r["tokens_equal"] for r in results),
            "max_logit_diff": max((float(r["max_logit_diff"] or 0.0) for r in results), default=0.0),
            "logit_atol": atol,
            "ok": all(r["ok"] for r in results), "first_failure": first_failure}
