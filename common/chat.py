"""Chat formatting and loss masks: the one implementation prepare, train and
infer share, so training and inference can never disagree about the template.

A conversation is a list of `{"role", "content"}` messages (roles: system,
user, assistant, tool). `render` turns it into text with the model's Jinja
chat template exactly as `tokenizer.apply_chat_template(tokenize=False)`
would; `encode_many` tokenizes a batch and builds labels:

- `train_on`: `assistant` (every assistant turn, the default),
  `last_assistant` (only the final one) or `all` (every token but BOS).
- A trained turn's label span runs from the first token of its content
  through the end-of-turn token (EOS), so the model learns to stop.
- Exactly one BOS: added when the template does not render it, never twice.
- Truncation drops whole trailing turns; it never cuts inside a kept turn and
  never keeps a prompt whose answer was cut off.

Spans come from rendering prefixes of the conversation: the text of
messages[:i] with the generation prompt ends where assistant turn i starts;
the text of messages[:i+1] ends where it ends. A template for which those are
not prefixes of the whole rendering cannot be masked reliably and is refused.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from common.errors import ConfigError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
TrainOn = Literal["assistant", "last_assistant", "all"]

# Used when a tokenizer has no chat template and the config names none.
# ChatML: plain, widely used, and each turn ends in a token the model learns.
CHATML = (
    "{{ bos_token if bos_token else '' }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}


def template_hash(template: str) -> str:
    """sha256 of the template text: travels in every manifest downstream of prepare."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatFormat:
    """A chat template plus the special tokens it renders."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None
    # Whether a BOS id must lead every sequence (the tokenizer adds one by default).
    needs_bos: bool = False
    extra: tuple[tuple[str, str], ...] = ()

    @property
    def hash(self) -> str:
        return template_hash(self.template)

    def variables(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["bos_token"] = self.bos_token or ""
        out["eos_token"] = self.eos_token or ""
        return out


def resolve_template(tokenizer: Any, override: str | None = None) -> str:
    """The template to use: an override (builtin name or template text), else the tokenizer's own."""
    if override:
        return BUILTIN_TEMPLATES.get(override, override)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers carry several named templates
        template = template.get("default") or next(iter(template.values()))
    if not template:
        return CHATML
    return str(template)


def chat_format(tokenizer: Any, override: str | None = None) -> ChatFormat:
    template = resolve_template(tokenizer, override)
    bos = getattr(tokenizer, "bos_token", None)
    eos = getattr(tokenizer, "eos_token", None)
    needs_bos = False
    if bos and tokenizer.bos_token_id is not None:
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        needs_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    extra = tuple(
        (k, str(v)) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()
        if isinstance(v, str) and k not in ("bos_token", "eos_token")
    )
    return ChatFormat(template=template, bos_token=bos, eos_token=eos, needs_bos=needs_bos, extra=extra)


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Name, vocabulary size and a hash of the vocabulary: enough to tell two tokenizers apart."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {
        "name": getattr(tokenizer, "name_or_path", "") or "",
        "class": type(tokenizer).__name__,
        "vocab_size": len(vocab),
        "vocab_sha256": h,
        "bos_token": getattr(tokenizer, "bos_token", None),
        "eos_token": getattr(tokenizer, "eos_token", None),
    }


# --------------------------------------------------------------------------- rendering


def _raise(message: str) -> None:
    raise ConfigError(f"Chat template raised: {message}")


@lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])

    def tojson(x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
               sort_keys: bool = False) -> str:
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = _raise

    def strftime_now(fmt: str) -> str:
        import datetime as dt

        return dt.datetime.now().strftime(fmt)

    env.globals["strftime_now"] = strftime_now
    try:
        return env.from_string(template)
    except Exception as exc:
        raise ConfigError(f"Chat template does not compile: {exc}") from None


def render(fmt: ChatFormat, messages: Sequence[dict[str, Any]], add_generation_prompt: bool = False) -> str:
    """Render with the Jinja template, as `apply_chat_template(tokenize=False)` does."""
    return str(_compiled(fmt.template).render(
        messages=list(messages), add_generation_prompt=add_generation_prompt, **fmt.variables()
    ))


def is_text(messages: Sequence[dict[str, Any]]) -> bool:
    """Plain-text rows (pretraining-style) are one message with role 'text'."""
    return len(messages) == 1 and messages[0].get("role") == "text"


@dataclass
class Spans:
    """The rendered text and, per assistant turn, its trainable character span."""

    text: str
    # (start, end, message_index) for assistant turns, in order.
    assistant: list[tuple[int, int, int]] = field(default_factory=list)


def spans(fmt: ChatFormat, messages: Sequence[dict[str, Any]]) -> Spans:
    if is_text(messages):
        text = (fmt.bos_token or "") + messages[0]["content"] + (fmt.eos_token or "")
        start = len(fmt.bos_token or "")
        return Spans(text=text, assistant=[(start, len(text), 0)])
    full = render(fmt, messages)
    out = Spans(text=full)
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render(fmt, messages[:i], add_generation_prompt=True)
        through = render(fmt, messages[: i + 1])
        if not full.startswith(before) or not full.startswith(through) or len(through) < len(before):
            raise ConfigError(
                "The chat template renders a conversation's prefix differently from the whole conversation "
                f"(at message {i}), so assistant turns cannot be located for the loss mask. Use a template "
                "whose rendering of messages[:i] is a prefix of the full rendering (set chat_template: chatml "
                "to use ChatML)."
            )
        end = len(through.rstrip())  # the turn's own end-of-turn token is trained; the newline after is not
        out.assistant.append((len(before), max(end, len(before)), i))
    return out


# --------------------------------------------------------------------------- tokenizing


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]
    kept_messages: int
    truncated: bool = False
    drop_reason: str | None = None
    _trainable: int | None = field(default=None, repr=False, compare=False)

    @property
    def num_trainable(self) -> int:
        if self._trainable is None:
            self._trainable = len(self.labels) - self.labels.count(IGNORE_INDEX)
        return self._trainable


def encode_many(tokenizer: Any, fmt: ChatFormat, conversations: Sequence[Sequence[dict[str, Any]]], *,
                max_length: int | None = None, train_on: TrainOn = "assistant") -> list[Encoded]:
    """Tokenize a batch of conversations in one call to the fast tokenizer.

    Rendering is per row (Jinja), tokenizing is one batched call (Rust, all
    cores), masks are built from the token offsets by binary search, so the
    Python work per row does not grow with its length.
    """
    if not conversations:  # fast tokenizers fail on an empty batch
        return []
    all_spans = [spans(fmt, conv) for conv in conversations]
    texts = [s.text for s in all_spans]
    bos_id = tokenizer.bos_token_id
    out = []
    for conv, sp, (ids, offsets) in zip(conversations, all_spans, _tokenize(tokenizer, texts), strict=True):
        out.append(_labels_for(conv, sp, ids, offsets, bos_id, fmt, max_length, train_on))
    return out


def _tokenize(tokenizer: Any, texts: list[str]) -> list[tuple[list[int], list[tuple[int, int]]]]:
    """(ids, offsets) per text, without special tokens: exactly what `tokenizer(texts, ...)` returns.

    The Rust backend is called directly when the wrapper would not change its
    state first (no truncation or padding configured, special tokens not
    split): that skips building a BatchEncoding, a large share of the time.
    """
    backend = getattr(tokenizer, "_tokenizer", None)
    if (backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None
            and backend.padding is None
            and bool(getattr(backend, "encode_special_tokens", False))
            == bool(getattr(tokenizer, "split_special_tokens", False))):
        return [(e.ids, e.offsets) for e in backend.encode_batch(texts, add_special_tokens=False)]
    batch = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return [(list(i), [tuple(o) for o in off]) for i, off in zip(batch["input_ids"], batch["offset_mapping"],
                                                                 strict=True)]


def _first_at(offsets: Sequence[Sequence[int]], char: int) -> int:
    """Index of the first token that starts at or after `char` (offsets are sorted by start)."""
    return bisect.bisect_left(offsets, char, key=lambda o: o[0])


def _labels_for(conv: Sequence[dict[str, Any]], sp: Spans, ids: list[int], offsets: Sequence[Sequence[int]],
                bos_id: int | None, fmt: ChatFormat, max_length: int | None, train_on: TrainOn) -> Encoded:
    prepend = 0
    if fmt.needs_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
        prepend = 1
    if bos_id is not None and fmt.bos_token and ids.count(bos_id) > 1:
        return Encoded(ids, [IGNORE_INDEX] * len(ids), len(conv), drop_reason="multiple_bos")

    turns = sp.assistant
    if not turns:
        return Encoded(ids, [IGNORE_INDEX] * len(ids), len(conv), drop_reason="no_assistant_turn")

    # Token index where each assistant turn ends (exclusive): tokens starting before the turn's end.
    turn_end_tok = [prepend + _first_at(offsets, end) for (_, end, _) in turns]
    keep_turns = len(turns)
    truncated = False
    if max_length is not None and len(ids) > max_length:
        keep_turns = 0
        for k, n in enumerate(turn_end_tok):
            if n <= max_length:
                keep_turns = k + 1
        if keep_turns == 0:
            return Encoded(ids[:max_length], [IGNORE_INDEX] * max_length, 0, truncated=True,
                           drop_reason="too_long_tokens")
        ids = ids[: turn_end_tok[keep_turns - 1]]
        truncated = True
    kept = turns[:keep_turns]
    kept_messages = kept[-1][2] + 1 if truncated else len(conv)

    n = len(ids)
    if train_on == "all":
        labels = list(ids)
        if prepend or (bos_id is not None and ids and ids[0] == bos_id):
            labels[0] = IGNORE_INDEX
        trainable = n - labels.count(IGNORE_INDEX)
    else:
        labels = [IGNORE_INDEX] * n
        trainable = 0
        chosen = kept[-1:] if train_on == "last_assistant" else kept
        for start, end, _ in chosen:
            lo = min(prepend + _first_at(offsets, start), n)
            hi = min(prepend + _first_at(offsets, end), n)
            if hi > lo:
                labels[lo:hi] = ids[lo:hi]
                trainable += hi - lo
    enc = Encoded(ids, labels, kept_messages, truncated=truncated, _trainable=trainable)
    if trainable == 0:
        enc.drop_reason = "zero_trainable_tokens"
    return enc


# --------------------------------------------------------------------------- prompts for inference


def split_prompt(messages: Sequence[dict[str, Any]]) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation up to its last assistant turn, and that turn's text as the reference."""
    msgs = list(messages)
    if msgs and msgs[-1].get("role") == "assistant":
        return msgs[:-1], str(msgs[-1]["content"])
    return msgs, None


def render_prompt(fmt: ChatFormat, messages: Sequence[dict[str, Any]]) -> str:
    """The text a model continues from: the conversation plus the generation prompt."""
    if is_text(messages):
        return (fmt.bos_token or "") + messages[0]["content"]
    return render(fmt, messages, add_generation_prompt=True)


def encode_prompt(tokenizer: Any, fmt: ChatFormat, messages: Sequence[dict[str, Any]]) -> list[int]:
    """Token ids of the prompt, with the same single-BOS rule as training.

    Engines get ids, not text, so they cannot add a second BOS of their own.
    """
    ids = list(tokenizer(render_prompt(fmt, messages), add_special_tokens=False)["input_ids"])
    bos_id = tokenizer.bos_token_id
    if fmt.needs_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
    return ids
