"""The checks a merged model must pass before it is published: what merge compares and how closely.

What is compared (`CheckInputs`, read by `check_data.py`): by default a few held-out rows of the run's own
prepared data, prompt + reference answer, so the check covers the answer positions where a finetune moves
the model most at the cost of one teacher-forced forward per model; where no such rows can be read, the
configured prompts and the unmerged model's own greedy answers to them.

`reference_run` runs the unmerged base + adapter in the merge dtype over those sequences (one batched
forward for rows; greedy generation for prompts) and keeps the logits of every position. For a 16-bit
dtype it then feeds the same sequences once more through the same model upcast to float32: the adapter's
function without the dtype's rounding (a bfloat16 base upcasts exactly). `compare_run` feeds the
sequences, teacher-forced, through the merged model loaded back from disk, and judges:

- float32: strict. The merged model makes the unmerged model's greedy choice at every position, or its
  logits stay within `logit_atol` (1e-3) where a choice differs. float32 rounding cannot flip a choice
  that is not a tie to a thousandth of a logit.
- bfloat16 / float16: within the dtype's own rounding. A 16-bit merge rounds W + s*B@A once more than the
  unmerged model does, so it may flip a near-tie token; a rule on single tokens fails such merges at random.
  Both 16-bit models are measured against the float32 reference over every position of every check prompt,
  as token agreement (greedy choices equal to float32's) and mean KL(float32 || model) in nats. The
  unmerged model's distance is what rounding alone does (the yardstick); the merged model passes when
  it is not clearly farther: see `within_rounding` for the rule and its margins.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from common import chat
from common.errors import InputError

DEFAULT_PROMPTS = (
    "What is two plus three?",
    "Write one sentence about a red car.",
    "Reverse the words: the cat sat on the road.",
    "Say hello to the world, then list three colours.",
)
DTYPES = ("float32", "bfloat16", "float16")
# float32, the strict comparison: largest |logit| difference accepted where a greedy choice differs.
STRICT_LOGIT_ATOL = 1e-3
# 16-bit, the rounding rule (see within_rounding): the merged model's mean KL from the float32 reference may
# be up to KL_FACTOR times the unmerged model's plus KL_FLOOR nats, and its greedy choices that differ from
# float32's up to FLIP_FACTOR times the unmerged model's plus FLIP_SLACK_SHARE of the positions (at least
# one). Margins: a faithful merge measured on tiny and demo bases (bf16) stays under 3x the yardstick's KL;
# a scale-by-2 adapter or a corrupted tensor lands 10-1000x above it (docs/merge.md).
KL_FACTOR = 4.0
KL_FLOOR = 1e-4
FLIP_FACTOR = 2.0
FLIP_SLACK_SHARE = 0.05
# Per-tensor probe: ||W'x - (Wx + s*B(Ax))|| / ||Wx + s*B(Ax)|| allowed, about 8x the dtype's rounding.
PROBE_RTOL = {"float32": 1e-5, "bfloat16": 3e-2, "float16": 4e-3}


class MergeCheckError(InputError):
    """A check on the merged model failed: the same inputs fail the same way, so exit 3 (no retry)."""


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    fmt = chat.chat_format(tokenizer)
    return [chat.encode_prompt(tokenizer, fmt, [{"role": "user", "content": p}]) for p in prompts if p.strip()]


@dataclass(frozen=True)
class CheckInputs:
    """The token sequences both models are compared on, and what the manifest says about them."""

    seqs: list[list[int]]    # rows: prompt + reference answer; prompts: the rendered prompts (answers generated)
    n_prompt: list[int]      # per sequence, where its answer starts (a row's first trained token)
    names: list[str]         # per sequence, as failures name it: "row 'eval-3'" or "prompt 0"
    max_new_tokens: int      # greedy tokens the unmerged model adds to each sequence (0 for rows)
    answer_positions: int | None  # rows: positions whose next token is a trained one; prompts: None (generated)
    record: dict[str, Any]   # the manifest's `generation.compared`: source, which rows or prompts, why

    @property
    def rows(self) -> bool:
        return self.record.get("source") == "data"


def prompt_inputs(tokenizer: Any, prompts: list[str], max_new_tokens: int, why: str | None = None) -> CheckInputs:
    """The configured prompts, whose answers the unmerged model generates (`why`: why not the data's rows)."""
    ids = encode_prompts(tokenizer, prompts)
    record: dict[str, Any] = {"source": "prompts", "prompts": len(ids), "max_new_tokens": max_new_tokens}
    if why:
        record["why_not_data"] = why
    return CheckInputs(seqs=ids, n_prompt=[len(p) for p in ids], names=[f"prompt {i}" for i in range(len(ids))],
                       max_new_tokens=max_new_tokens, answer_positions=None, record=record)


def reference_bytes(model_bytes: int, dtype: str) -> int:
    """Memory the reference model needs at its peak: upcast to float32 for a 16-bit dtype."""
    return model_bytes if dtype == "float32" else model_bytes * 2


@dataclass(frozen=True)
class Reference:
    """The unmerged model's sequences (rows as read, or prompts + greedy answers) and their logits."""

    seqs: list[list[int]]   # a row as read; or prompt + generated tokens, cut after the first end-of-turn token
    n_prompt: list[int]     # where each sequence's answer starts
    names: list[str]
    rows: bool              # the sequences are prepared rows (answers given), not generated
    answer_positions: int   # positions whose next token is an answer token (trained, or generated)
    logits: list[Any]       # per sequence: the logits at every position but the last (each predicts the next)
    exact: list[Any] | None  # the same positions with the model in float32; None when the dtype is float32
    pad: int
    dtype: str
    seconds: dict[str, float] = field(default_factory=dict)  # what the reference cost, by part


def _padded(seqs: list[list[int]], pad: int, device: str) -> tuple[Any, Any, Any]:
    """Left-padded ids, attention mask and position ids for a batch of token sequences."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad] * (width - len(s)) + s for s in seqs], device=device)
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs], device=device)
    return ids, mask, (mask.cumsum(-1) - 1).clamp_min(0)


def _forced_logits(model: Any, seqs: list[list[int]], pad: int, device: str) -> list[Any]:
    """Teacher-forced logits at every position of each sequence but its last, from one batched forward."""
    import torch

    ids, mask, positions = _padded(seqs, pad, device)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits.float().cpu()
    width = ids.shape[1]
    return [logits[i, width - len(s): width - 1] for i, s in enumerate(seqs)]


@contextlib.contextmanager
def upcast(model: Any) -> Iterator[Any]:
    """The model in float32 for the duration, then every parameter and buffer back in the dtype it had.

    Upcasting a 16-bit weight is exact and so is casting it back; peft's float32 adapter weights stay
    float32. Parameters are converted in place (`.data`), so tied weights stay tied.
    """
    params = [(p, p.dtype) for p in model.parameters() if p.is_floating_point()]
    buffers = [(m, name, b.dtype) for m in model.modules() for name, b in m._buffers.items()
               if b is not None and b.is_floating_point()]
    model.float()
    try:
        yield model
    finally:
        for p, dtype in params:
            p.data = p.data.to(dtype)
        for m, name, dtype in buffers:
            m._buffers[name] = m._buffers[name].to(dtype)


def reference_run(model: Any, inputs: CheckInputs, eos: list[int], device: str, dtype: str) -> Reference:
    """The unmerged model in the merge dtype over the check's sequences, keeping the logits of every
    position: one teacher-forced forward (rows, or prompts with max_new_tokens 0), or greedy generation
    after each prompt; for a 16-bit dtype, one more batched forward over the same sequences with the model
    upcast to float32.

    Generating in the dtype and upcasting for one forward is the cheaper order: measured on a CPU, a
    float32 decode step costs 1.6x a bfloat16 one, and decoding is most of the reference's time.
    """
    start = time.monotonic()
    if inputs.max_new_tokens:
        seqs, logits, pad = _generate(model, inputs.seqs, inputs.max_new_tokens, eos, device)
    else:
        seqs, pad = [list(p) for p in inputs.seqs], eos[0]
        logits = _forced_logits(model, seqs, pad, device)
    seconds = {"reference_forward" if not inputs.max_new_tokens else "reference_generate": time.monotonic() - start}
    exact = None
    if dtype != "float32":
        start = time.monotonic()
        with upcast(model):
            exact = _forced_logits(model, seqs, pad, device)
        seconds["reference_float32"] = time.monotonic() - start
    answers = inputs.answer_positions
    if answers is None:  # generated: every position from the prompt's last on predicts an answer token
        answers = sum(len(s) - n for s, n in zip(seqs, inputs.n_prompt, strict=True))
    return Reference(seqs=seqs, n_prompt=inputs.n_prompt, names=inputs.names, rows=inputs.rows,
                     answer_positions=answers, logits=logits, exact=exact, pad=pad, dtype=dtype, seconds=seconds)


def _generate(model: Any, prompt_ids: list[list[int]], max_new_tokens: int, eos: list[int],
              device: str) -> tuple[list[list[int]], list[Any], int]:
    """All prompts as one left-padded batch: the prefill gives the logits of every prompt position, each
    cached decode step the next one, so the reference costs one pass over the weights per generated token
    and no teacher-forced pass of its own (on a large model, reading the weights is what a step costs).
    Each sequence is cut after its first end-of-turn token."""
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
    return seqs, kept, pad


@dataclass(frozen=True)
class Distance:
    """How far a model's logits are from a reference's, over every check position of every prompt."""

    positions: int
    agree: int                       # positions where both make the same greedy choice
    mean_kl: float                   # mean KL(reference || model), nats
    first: tuple[int, int] | None    # (prompt, position) of the first differing greedy choice

    @property
    def flips(self) -> int:
        return self.positions - self.agree

    def as_dict(self) -> dict[str, Any]:
        return {"agreement": round(self.agree / self.positions, 4) if self.positions else 1.0,
                "agree": self.agree, "positions": self.positions, "mean_kl": float(f"{self.mean_kl:.4g}")}


def distance(reference: list[Any], other: list[Any]) -> Distance:
    import torch

    agree = positions = 0
    kl_sum = 0.0
    first = None
    for i, (ref, got) in enumerate(zip(reference, other, strict=True)):
        if not len(ref):
            continue
        same = ref.argmax(-1) == got.argmax(-1)
        agree, positions = agree + int(same.sum()), positions + len(ref)
        logp_ref, logp = torch.log_softmax(ref, -1), torch.log_softmax(got, -1)
        kl_sum += float((logp_ref.exp() * (logp_ref - logp)).sum(-1).clamp_min(0).sum())
        if first is None and not bool(same.all()):
            first = (i, int((~same).nonzero()[0]))
    return Distance(positions=positions, agree=agree, mean_kl=kl_sum / max(positions, 1), first=first)


def allowed(yardstick: Distance) -> tuple[float, int]:
    """The rounding rule's bounds for the merged model: (mean KL, differing greedy choices)."""
    slack = max(1, math.ceil(FLIP_SLACK_SHARE * yardstick.positions))
    return KL_FACTOR * yardstick.mean_kl + KL_FLOOR, int(FLIP_FACTOR * yardstick.flips) + slack


def within_rounding(merged: Distance, yardstick: Distance) -> bool:
    """The 16-bit rule: against the float32 reference, the merged model's mean KL is at most KL_FACTOR x the
    unmerged model's (in the same dtype) + KL_FLOOR, and its differing greedy choices at most FLIP_FACTOR x
    the unmerged model's + max(1, FLIP_SLACK_SHARE x positions)."""
    max_kl, max_flips = allowed(yardstick)
    return merged.mean_kl <= max_kl and merged.flips <= max_flips


def _where(reference: Reference, seq: int, position: int) -> str:
    n = reference.n_prompt[seq]
    answer = "answer token" if reference.rows else "generated token"
    where = f"{answer} {position - (n - 1)}" if position >= n - 1 else f"prompt position {position + 1}"
    return f"{reference.names[seq]}, {where}"


def compare_run(model: Any, reference: Reference, tokenizer: Any, atol: float, device: str) -> dict[str, Any]:
    """The merged model on the reference's batch, at every position of prompt and generation, judged
    strictly (float32) or against the dtype's rounding (16-bit); the result is the manifest's record."""
    start = time.monotonic()
    merged = _forced_logits(model, reference.seqs, reference.pad, device)
    seconds = {**reference.seconds, "merged_forward": time.monotonic() - start}
    result = _strict(merged, reference, tokenizer, atol)
    result["answer_positions"] = reference.answer_positions
    result["merged_vs_unmerged"] = distance(reference.logits, merged).as_dict()
    result["rule"] = "strict"
    if reference.exact is not None:  # per-prompt details stay as facts; the verdict is the rounding rule's
        result.update(_rounding(merged, reference, tokenizer))
        del result["logit_atol"]
        for p in result["prompts"]:
            del p["ok"]
    result["seconds"] = {k: round(v, 4) for k, v in seconds.items()}
    return result


def _rounding(merged: list[Any], reference: Reference, tokenizer: Any) -> dict[str, Any]:
    """The 16-bit judgement: both models against the float32 reference, the unmerged one as the yardstick."""
    assert reference.exact is not None
    yardstick, got = distance(reference.exact, reference.logits), distance(reference.exact, merged)
    max_kl, max_flips = allowed(yardstick)
    ok = within_rounding(got, yardstick)
    failure = None
    if not ok:
        first = ""
        if got.first is not None:
            i, j = got.first
            want, chose = int(reference.exact[i][j].argmax()), int(merged[i][j].argmax())
            first = (f"; first difference: {_where(reference, i, j)}: float32 base+adapter chose "
                     f"{want} ({tokenizer.decode([want])!r}), merged chose {chose} ({tokenizer.decode([chose])!r})")
        failure = (f"the merged model departs from base + adapter more than {reference.dtype} rounding explains: "
                   f"against the float32 reference it agrees on {got.agree}/{got.positions} greedy choices with "
                   f"mean KL {got.mean_kl:.3g}; the unmerged model in {reference.dtype} agrees on "
                   f"{yardstick.agree}/{yardstick.positions} with mean KL {yardstick.mean_kl:.3g} (allowed: "
                   f"mean KL <= {max_kl:.3g}, differing choices <= {max_flips})" + first)
    return {"rule": "rounding", "unmerged_vs_float32": yardstick.as_dict(), "merged_vs_float32": got.as_dict(),
            "allowed": {"mean_kl": float(f"{max_kl:.4g}"), "differing_choices": max_flips},
            "ok": ok, "first_failure": failure}


def _strict(merged: list[Any], reference: Reference, tokenizer: Any, atol: float) -> dict[str, Any]:
    """Per prompt: the unmerged model's greedy choice (its generated token, or its argmax over the prompt) at
    every position, or logits within atol where the choice differs."""
    results: list[dict[str, Any]] = []
    first_failure = None
    for i, (seq, n, ref_logits, logits) in enumerate(zip(reference.seqs, reference.n_prompt, reference.logits,
                                                         merged, strict=True)):
        want = ref_logits.argmax(-1).tolist()  # over the generation: the token it chose (generating, or not)
        got = logits.argmax(-1).tolist()
        diff = float((logits - ref_logits).abs().max()) if len(want) else 0.0
        first = next((j for j, (a, b) in enumerate(zip(want, got, strict=True)) if a != b), None)
        ok = first is None or diff <= atol
        results.append({"prompt": i, "name": reference.names[i], "tokens": len(seq) - n, "positions": len(want),
                        "tokens_equal": first is None,
                        "first_diff_position": first,
                        "first_diff_step": first - (n - 1) if first is not None and first >= n - 1 else None,
                        "max_logit_diff": diff, "ok": ok})
        if not ok and first_failure is None and first is not None:
            first_failure = (f"{_where(reference, i, first)}: base+adapter chose "
                             f"{want[first]} ({tokenizer.decode([want[first]])!r}), merged chose {got[first]} "
                             f"({tokenizer.decode([got[first]])!r}); max |logit diff| {diff:.4g} > {atol:g}")
    return {"prompts": results, "tokens_equal": all(r["tokens_equal"] for r in results),
            "positions": sum(r["positions"] for r in results),
            "max_logit_diff": max((float(r["max_logit_diff"] or 0.0) for r in results), default=0.0),
            "logit_atol": atol,
            "ok": all(r["ok"] for r in results),
            "first_failure": (f"{'teacher-forced answers differ' if reference.rows else 'greedy generation differs'}"
                              f": {first_failure}") if first_failure else None}


def summary(generation: dict[str, Any]) -> str:
    """One line for logs and tables: how close the merged model came, and to what, on what."""
    if generation.get("skipped"):
        return f"skipped ({generation['skipped']})"
    if "merged_vs_unmerged" not in generation:
        return "not run"
    compared = generation.get("compared") or {}
    on = (f" on {len(compared['rows'])} prepared rows" if compared.get("source") == "data"
          else f" on {compared['prompts']} prompts" if compared else "")
    on += f" ({generation.get('answer_positions', 0)} answer positions)"
    if generation.get("rule") == "rounding":
        got, yard = generation["merged_vs_float32"], generation["unmerged_vs_float32"]
        return (f"{'passed' if generation['ok'] else 'FAILED'} within rounding{on}: against float32, merged agrees "
                f"{got['agree']}/{got['positions']} (mean KL {got['mean_kl']:.2g}), unmerged "
                f"{yard['agree']}/{yard['positions']} (mean KL {yard['mean_kl']:.2g})")
    same = generation["merged_vs_unmerged"]
    return (f"{'passed' if generation['ok'] else 'FAILED'} strict{on}: merged agrees with unmerged "
            f"{same['agree']}/{same['positions']}, max |logit diff| {generation['max_logit_diff']:.2g}")
