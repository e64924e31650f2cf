"""Preference pairs: the Parquet layout prepare writes and train and pairs read, and how a pair is tokenized.

A pair is a prompt (messages, with its tools) and two completions to it, `chosen` and `rejected` (lists of
messages, usually one assistant message each). Prepare, train (when it tokenizes itself) and the pairs stage
tokenize pairs with `encode_pairs`, the one implementation:

- each completion is rendered after the prompt with the model's chat template (`common.chat`), the prompt's
  assistant turns as context (weight 0) and the completion's assistant turns trained, so the masks are
  exactly SFT's for the same conversation;
- the prompt's tokens are stored once (`prompt_ids`): the longest common token prefix of the two renderings
  that holds no trained token. A template that renders the prompt differently depending on the answer after
  it (none we know of) simply gets a shorter shared prefix; nothing is lost;
- `max_length` bounds prompt + each completion. A completion that does not fit is cut at its end (the
  pair counts as truncated, as TRL's `max_length` does); a pair whose prompt leaves no room for a single
  trained token of either answer is dropped as `prompt_too_long` (the prompt would be truncated away).

Rows of a preference prepare run (its manifest's `stats.kind` is `preference`) hold the columns of
`schema(tokenized)`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from common import chat, chat_encode

KIND = "preference"  # a prepare manifest's stats.kind for preference data (absent: supervised rows)
IGNORE_INDEX = chat.IGNORE_INDEX


def schema(tokenized: bool) -> Any:
    import pyarrow as pa

    from common import data

    msgs = pa.list_(data.ROW_MESSAGE)
    fields = [
        pa.field("id", pa.string(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),  # what the split and the pairs stage key prompts by
        pa.field("prompt", msgs, nullable=False),
        pa.field("chosen", msgs, nullable=False),
        pa.field("rejected", msgs, nullable=False),
        pa.field("tools", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),
    ]
    if tokenized:
        ids = pa.list_(pa.int32())
        fields += [pa.field("prompt_ids", ids), pa.field("chosen_ids", ids), pa.field("chosen_labels", ids),
                   pa.field("rejected_ids", ids), pa.field("rejected_labels", ids),
                   pa.field("num_tokens", pa.int32()), pa.field("truncated", pa.bool_())]
    return pa.schema(fields)


def is_preference_run(loaded: Any) -> bool:
    """Whether a prepare manifest holds preference pairs."""
    return (loaded.manifest.stats or {}).get("kind") == KIND


@dataclass
class EncodedPair:
    """A tokenized pair, or why it cannot be one (`drop_reason`, `detail`)."""

    prompt_ids: list[int]
    chosen_ids: list[int]       # the completion's tokens only (after the prompt)
    chosen_labels: list[int]    # labels of those tokens (IGNORE_INDEX where a completion holds untrained text)
    rejected_ids: list[int]
    rejected_labels: list[int]
    truncated: bool = False
    drop_reason: str | None = None
    detail: str = ""

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def conversation(prompt: Sequence[dict[str, Any]], completion: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The prompt as context (its assistant turns weight 0), the completion's assistant turns trained."""
    ctx = [{**m, "weight": 0} if m["role"] == "assistant" else dict(m) for m in prompt]
    done = [{**m, "weight": 1} if m["role"] == "assistant" and m.get("weight") is None else dict(m)
            for m in completion]
    return ctx + done


def encode_pairs(tokenizer: Any, fmt: chat.ChatFormat, pairs: Sequence[tuple[Any, Any, Any, Any]], *,
                 max_length: int | None, special_tokens: Literal["keep", "drop"] = "keep") -> list[EncodedPair]:
    """Tokenize (prompt, chosen, rejected, tools) tuples in one batched call (see the module docstring);
    `special_tokens` as in chat_encode.encode_many (prepare drops a pair whose text holds one)."""
    convs = [conversation(p, c) for p, c, _, _ in pairs] + [conversation(p, r) for p, _, r, _ in pairs]
    tools = [t for *_, t in pairs] * 2
    enc = chat_encode.encode_many(tokenizer, fmt, convs, tools=tools, max_length=None, train_on="assistant",
                                  special_tokens=special_tokens)
    n = len(pairs)
    return [_pair(enc[i], enc[n + i], max_length) for i in range(n)]


def _first_label(labels: list[int]) -> int:
    return next((i for i, x in enumerate(labels) if x != IGNORE_INDEX), len(labels))


def _pair(c: chat_encode.Encoded, r: chat_encode.Encoded, max_length: int | None) -> EncodedPair:
    empty = EncodedPair([], [], [], [], [])
    for side, e in (("chosen", c), ("rejected", r)):
        if e.error is not None:
            empty.drop_reason, empty.detail = "template_error", f"{side}: {e.error}"
            return empty
        if e.drop_reason is not None:
            empty.drop_reason, empty.detail = e.drop_reason, f"{side}: {e.detail or e.drop_reason}"
            return empty
    limit = min(_first_label(c.labels), _first_label(r.labels))
    p = 0
    while p < limit and c.input_ids[p] == r.input_ids[p]:
        p += 1
    out = EncodedPair(c.input_ids[:p], c.input_ids[p:], c.labels[p:], r.input_ids[p:], r.labels[p:])
    if max_length is None:
        return out
    budget = max_length - p
    for name in ("chosen", "rejected"):
        ids, labels = getattr(out, f"{name}_ids"), getattr(out, f"{name}_labels")
        if len(ids) > budget:
            out.truncated = True
            setattr(out, f"{name}_ids", ids[:max(budget, 0)])
            setattr(out, f"{name}_labels", labels[:max(budget, 0)])
        if all(x == IGNORE_INDEX for x in getattr(out, f"{name}_labels")):
            out.drop_reason = "prompt_too_long"
            out.detail = (f"the prompt is {p} tokens; with max_length {max_length} no token of the {name} answer "
                          "is left to train on")
            return out
    return out
