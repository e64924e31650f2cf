"""A batch of conversations to token ids and labels: `encode_many`, what prepare (and the benchmarks) call.

`common/chat.py` renders each conversation and finds its assistant turns' character spans (and says which
rules decide them); this module tokenizes the batch in one call to the fast tokenizer and turns each span
into labels (a trained turn's tokens from its content through its end-of-turn token, the rest
IGNORE_INDEX), truncating whole trailing turns. Split from chat.py, which is about templates and text.
"""

from __future__ import annotations

import bisect
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from common import chat
from common.errors import ConfigError


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    kept_messages: int
    truncated: bool = False
    drop_reason: str | None = None
    # Set when the template refused the row or a turn could not be located: the caller names the row.
    error: str | None = None
    # A plain-text row kept whole past max_length (encode_many's long_text): each token's character span in
    # `text`, the document (None for a BOS added here; BOS/EOS markup falls outside it), for the caller to cut
    # it into windows (jobs/prepare/windows.py).
    offsets: list[tuple[int, int] | None] | None = None
    text: str | None = None
    detail: str | None = None  # what the row's drop_reason found, where it says more than the reason
    _trainable: int | None = field(default=None, repr=False, compare=False)

    @property
    def num_trainable(self) -> int:
        if self._trainable is None:
            self._trainable = len(self.labels) - self.labels.count(chat.IGNORE_INDEX)
        return self._trainable


def encode_many(tokenizer: Any, fmt: chat.ChatFormat, conversations: Sequence[chat.Messages], *,
                tools: Sequence[chat.ToolList] | None = None, max_length: int | None = None,
                train_on: chat.TrainOn = "assistant", long_text: bool = False,
                special_tokens: Literal["keep", "drop"] = "keep") -> list[Encoded]:
    """Tokenize a batch of conversations (each with its tools, when given) in one call to the fast tokenizer.

    Rendering is per row (Jinja), tokenizing is one batched call (Rust, all
    cores), masks are built from the token offsets by binary search, so the
    Python work per row does not grow with its length. A row the template
    refuses comes back with `error` set and no tokens. With `long_text`, a plain-text row longer than
    max_length comes back whole, with its offsets, rather than dropped (a document to cut into windows).
    With `special_tokens="drop"`, a row whose own text holds one of the template's special tokens comes back
    dropped (`special_token_in_text`, `detail` says where) rather than tokenized (`special_in_text`).
    """
    if not conversations:  # fast tokenizers fail on an empty batch
        return []
    all_spans: list[chat.Spans | Encoded] = []
    for n, conv in enumerate(conversations):
        if special_tokens == "drop" and (where := special_in_text(fmt, conv)) is not None:
            all_spans.append(Encoded([], [], 0, drop_reason="special_token_in_text", detail=where))
            continue
        fits = _fits(tokenizer, max_length) if max_length is not None else None  # its state is per conversation
        try:
            all_spans.append(chat.spans(fmt, conv, tools[n] if tools is not None else None, fits))
        except ConfigError as exc:
            all_spans.append(Encoded([], [], 0, drop_reason="template_error", error=str(exc)))
    texts = [s.text for s in all_spans if isinstance(s, chat.Spans)]
    encoded = iter(_tokenize(tokenizer, texts) if texts else [])
    bos_id = tokenizer.bos_token_id
    out = []
    for conv, sp in zip(conversations, all_spans, strict=True):
        if isinstance(sp, Encoded):  # refused or dropped before tokenizing
            out.append(sp)
            continue
        ids, offsets = next(encoded)
        whole = long_text and sp.method == "text" and max_length is not None
        out.append(_labels_for(conv, sp, ids, offsets, bos_id, fmt, None if whole else max_length, train_on))
        if whole and len(out[-1].input_ids) > max_length:  # type: ignore[operator]
            lead: list[tuple[int, int] | None] = [None] * (len(out[-1].input_ids) - len(ids))
            shift = len(fmt.bos_token or "")  # offsets into the document's own text
            out[-1].offsets = lead + [(int(a) - shift, int(b) - shift) for a, b in offsets.offsets()]
            out[-1].text = conv[0]["content"]
    return out


@lru_cache(maxsize=16)
def _markup(fmt: chat.ChatFormat) -> re.Pattern[str] | None:
    """The special tokens the template writes around turns (those in a rendering of one exchange) and EOS, as
    one pattern (None: none). BOS is left to the multiple_bos check, which knows a template's own BOS per turn.
    Special tokens the template never writes (a vocabulary's spare `<|reserved_N|>`) are not looked for: the
    tokenizer reads them as one token too, but they break no turn."""
    try:
        text = chat.render(fmt, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    except ConfigError:
        text = ""
    tokens = {t for t in fmt.specials if t in text} | ({fmt.eos_token} if fmt.eos_token else set())
    tokens.discard(fmt.bos_token or "")
    return re.compile("|".join(re.escape(t) for t in sorted(tokens, key=len, reverse=True))) if tokens else None


def special_in_text(fmt: chat.ChatFormat, conv: chat.Messages) -> str | None:
    """Where a row's own text (content, reasoning, tool call arguments) holds a special token of the template's
    markup (`<|im_end|>`, `<|eot_id|>`, `</s>` ...), or None. The fast tokenizer reads such text as the token
    itself, not as characters, so the turn would end (or a new one start) inside the row's text: a model trained
    on it learns the broken structure. Pasted chat logs and scraped pages carry them."""
    pattern = _markup(fmt)
    if pattern is None:
        return None
    search = pattern.search  # every row passes here: the common case (no hit) builds nothing
    for i, m in enumerate(conv):
        if search(m.get("content") or "") or ("reasoning_content" in m and search(m["reasoning_content"] or "")) \
                or ("tool_calls" in m and any(search(c["function"]["arguments"]) for c in m["tool_calls"] or ())):
            texts = [("content", m.get("content")), ("reasoning_content", m.get("reasoning_content"))]
            texts += [("tool call arguments", c["function"]["arguments"]) for c in m.get("tool_calls") or ()]
            what, hit = next((w, h) for w, t in texts if (h := search(t or "")))
            return (f"message {i} ({m['role']}) {what} holds {hit.group()!r}, which the tokenizer reads as the "
                    "template's special token, not as text: the turn would end there. Remove it from the data, "
                    "or set special_tokens_in_text: keep to train on it as the tokenizer reads it")
    return None


def _fits(tokenizer: Any, max_length: int) -> chat.Fits:
    """A prefix check that costs linear time over a conversation: a prefix is tokenized only when its length
    in characters has doubled since the last check (and no sooner than max_length characters: a token is at
    least one character), so the checks add up to about twice the longest prefix. A prefix over max_length
    tokens plus a margin (tokens may merge differently where the prefix ends) certainly does not fit."""
    state = {"next": max_length}

    def fits(prefix: str) -> bool:
        if len(prefix) < state["next"]:
            return True
        state["next"] = 2 * len(prefix)
        return len(_tokenize(tokenizer, [prefix])[0][0]) <= max_length + 8

    return fits


def _tokenize(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], Starts]]:
    """(ids, token starts) per text, without special tokens: exactly what `tokenizer(texts, ...)` returns.

    The Rust backend is called directly when the wrapper would not change its
    state first (no truncation or padding configured, special tokens not
    split): that skips building a BatchEncoding, a large share of the time.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if (backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None
            and backend.padding is None
            and bool(getattr(backend, "encode_special_tokens", False))
            == bool(getattr(tokenizer, "split_special_tokens", False))):
        return [(e.ids, Starts(e, len(e))) for e in backend.encode_batch(texts, add_special_tokens=False)]
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return [(list(i), Starts([tuple(o) for o in off], len(i)))
            for i, off in zip(batch["input_ids"], batch["offset_mapping"], strict=True)]


class Starts:
    """Where a text's tokens start: `first_at(char)`, the index of the first token that starts at or after
    `char` (token starts are sorted), which is what a turn's character span needs to become a token span.

    Converting a Rust Encoding's offsets to Python (a tuple per token) cost about as much per row as the rest
    of the label building together (~30 us of ~480 us); a turn has two boundaries, so the Encoding is asked
    about those characters only (`char_to_token`, `token_to_chars`), and the answer is checked against its
    neighbours' starts: where the check fails (gaps, zero-width tokens) the full offsets are read, as before.
    """

    __slots__ = ("_encoding", "_offsets", "n")

    def __init__(self, source: Any, n: int):
        self.n = n
        self._encoding: Any = None if isinstance(source, list) else source
        self._offsets: list[tuple[int, int]] | None = source if isinstance(source, list) else None

    def offsets(self) -> list[tuple[int, int]]:
        if self._offsets is None:
            self._offsets = self._encoding.offsets
        return self._offsets

    def first_at(self, char: int) -> int:
        enc = self._encoding
        if enc is not None and self._offsets is None:
            n = self.n
            start = enc.token_to_chars  # a token's (start, end) in the text
            try:
                t = enc.char_to_token(char)
                k = n if t is None else t if start(t)[0] >= char else t + 1
                if (k == n or start(k)[0] >= char) and (k == 0 or start(k - 1)[0] < char):
                    return k
            except TypeError:  # a token without characters: token_to_chars gives None
                pass
        return bisect.bisect_left(self.offsets(), char, key=lambda o: o[0])


def _stray_bos(conv: chat.Messages, bos: str, ids: list[int], bos_id: int) -> bool:
    """Whether a text holding several BOS tokens holds one the template did not mean: two leading the text, or
    one written in the row's own text (content, reasoning, tool calls). A template may render a BOS per turn
    (Llama 2: `<s>[INST] ... [/INST] answer </s><s>[INST] ...`): those are its format and kept."""
    return ids[1] == bos_id == ids[0] or any(bos in str(v) for m in conv for k, v in m.items() if k != "role")


def _labels_for(conv: chat.Messages, sp: chat.Spans, ids: list[int], offsets: Starts,
                bos_id: int | None, fmt: chat.ChatFormat, max_length: int | None, train_on: chat.TrainOn) -> Encoded:
    prepend = 0
    if fmt.needs_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
        prepend = 1
    if bos_id is not None and fmt.bos_token and ids.count(bos_id) > 1 and _stray_bos(conv, fmt.bos_token, ids, bos_id):
        return Encoded(ids, [chat.IGNORE_INDEX] * len(ids), len(conv), drop_reason="multiple_bos")

    turns = sp.assistant
    if not turns:
        return Encoded(ids, [chat.IGNORE_INDEX] * len(ids), len(conv), drop_reason="no_assistant_turn")

    # Token index where each assistant turn ends (exclusive): tokens starting before the turn's end.
    turn_end_tok = [prepend + offsets.first_at(end) for (_, end, _) in turns]
    keep_turns = len(turns)
    truncated = False
    if max_length is not None and (len(ids) > max_length or not sp.complete):
        keep_turns = 0
        for k, n in enumerate(turn_end_tok):
            if n <= max_length:
                keep_turns = k + 1
        if keep_turns == 0:
            return Encoded(ids[:max_length], [chat.IGNORE_INDEX] * max_length, 0, truncated=True,
                           drop_reason="too_long_tokens")
        ids = ids[: turn_end_tok[keep_turns - 1]]
        truncated = True
    kept = turns[:keep_turns]
    kept_messages = kept[-1][2] + 1 if truncated else len(conv)

    n = len(ids)
    rules = chat.turn_rules(conv, train_on, [i for _, _, i in kept])

    def tokens(k: int, start: int) -> tuple[int, int]:  # turn k's token span (its end is turn_end_tok[k])
        return min(prepend + offsets.first_at(start), n), min(turn_end_tok[k], n)

    if train_on == "all":
        labels = list(ids)
        if prepend or (bos_id is not None and ids and ids[0] == bos_id):
            labels[0] = chat.IGNORE_INDEX
        for k, ((start, _, _), rule) in enumerate(zip(kept, rules, strict=True)):
            if rule == "weight_0":  # a weight in the data wins: context only, also when every token is trained
                lo, hi = tokens(k, start)
                labels[lo:hi] = [chat.IGNORE_INDEX] * max(hi - lo, 0)
        trainable = n - labels.count(chat.IGNORE_INDEX)
    else:
        labels = [chat.IGNORE_INDEX] * n
        trainable = 0
        for k, ((start, _, _), rule) in enumerate(zip(kept, rules, strict=True)):
            if rule != "trained":  # context only: its tokens stay chat.IGNORE_INDEX
                continue
            lo, hi = tokens(k, start)
            if hi > lo:
                labels[lo:hi] = ids[lo:hi]
                trainable += hi - lo
    enc = Encoded(ids, labels, kept_messages, truncated=truncated, _trainable=trainable)
    if trainable == 0:
        enc.drop_reason = "zero_trainable_tokens"
    return enc
