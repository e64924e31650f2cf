"""Raw records to canonical chat rows: format detection, column and role
mapping, validation with a named reason per dropped row, duplicate keys.

Every function here is pure (no I/O) so each rule is tested directly.

Tool calling: a row's tools come from the `tools` column (JSON schemas, or JSON text of them, as
LLaMA-Factory's sharegpt files hold) and OpenAI's older top-level `functions` list; assistant
`tool_calls` (OpenAI style), an assistant's `function_call` (OpenAI's older form) and sharegpt
`function_call` turns (role `tool_call`: the value is a call `{name, arguments}` or a list of them)
become canonical tool calls; tool results (roles `tool`, `function`, `observation`) keep
`tool_call_id` and `name`, and a `tool_call_id` must name a call of the assistant turn before it.
Reasoning (`reasoning_content`, or the key `columns.reasoning` names) is kept on assistant turns.

OpenAI's chat fine-tuning format besides: `weight` (0 or 1) on an assistant message is kept (see
`common.chat` for what it trains), `name` is kept on every message, and `ignored_keys` names what a
messages record holds that nothing reads, for prepare to count and log. A preference row (OpenAI's
`input`/`preferred_output`/`non_preferred_output`, or `chosen`/`rejected`) is recognised by `is_preference`:
prepare reads such files as pairs (jobs/prepare/preference.py) and never misreads one as a supervised row.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Literal, get_args

from common import tools as T

# The input formats, declared once: the config, the CLI and the messages read this.
Format = Literal["alpaca", "sharegpt", "messages", "prompt_completion", "text"]
FORMATS: tuple[str, ...] = get_args(Format)

# Source role names -> canonical roles. Config `roles` entries win over these.
DEFAULT_ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "developer": "system",  # OpenAI's name for the system message since its o1 models
    "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "ai": "assistant",
    "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",  # the raw ShareGPT dumps' assistants
    "function_call": "tool_call", "observation": "tool", "function": "tool", "ipython": "tool",
}
CANONICAL_ROLES = ("system", "user", "assistant", "tool")
# What a source role may map to: a canonical role, or tool_call (an assistant turn whose text is a tool call).
ROLE_TARGETS = Literal["system", "user", "assistant", "tool", "tool_call"]
ROLE_TARGET_NAMES: tuple[str, ...] = get_args(ROLE_TARGETS)  # read for every message: spelled out once

# A turn's (role, content) keys: OpenAI's and sharegpt's. Either format's turns may use either pair (LLaMA-Factory
# maps them with `tags`, HF datasets mix them); the first turn's keys decide unless columns.role/content name them.
TURN_KEYS = {"role": "content", "from": "value"}

# What may follow each role in a conversation (after any leading system message).
NEXT = {"user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}

# Every reason a row can be dropped for, in the order the reason table prints.
REASONS = (
    "invalid_json", "invalid_utf8", "invalid_unicode", "line_too_long", "invalid_csv", "invalid_record",
    "invalid_tools", "wrong_type", "missing_field", "empty_content", "unknown_role", "broken_alternation",
    "unknown_tool_call_id", "no_assistant_turn", "too_many_messages", "too_long_chars", "too_long_tokens",
    "zero_trainable_tokens", "multiple_bos", "special_token_in_text", "duplicate_exact", "duplicate_normalized",
    "eval_overlap",
)
# Drops that mean the source is unusable as given (not one odd row among good ones): exit 3 naming the file
# and line unless skip_bad_lines, like an unreadable line.
FATAL = ("invalid_record", "invalid_tools")
# Keys that make a record a preference pair (OpenAI's preference fine-tuning format), which supervised rows
# cannot hold: read as anything else it would lose one of its answers or the pairing.
PREFERENCE_KEYS = ("preferred_output", "non_preferred_output")
# The same for TRL's and LLaMA-Factory's preference layouts (jobs/prepare/preference.py reads them all).
PAIR_KEYS = ("chosen", "rejected")
# Message keys a messages record may hold besides its role, content and reasoning keys.
MESSAGE_KEYS = ("tool_calls", "function_call", "tool_call_id", "name", "weight")


class Drop(Exception):
    """A row that cannot be used, with its reason (one of REASONS) and a detail for people."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


def is_preference(keys: Iterable[str]) -> bool:
    """Whether a record is a preference pair: a preferred and a non-preferred answer (OpenAI's `input` /
    `preferred_output` / `non_preferred_output`, or `chosen` / `rejected` with or without a prompt)."""
    k = set(keys)
    return set(PREFERENCE_KEYS) <= k or set(PAIR_KEYS) <= k


def turn_keys(items: Any, columns: Mapping[str, Any], default: str) -> tuple[str, str]:
    """The (role, content) keys of a list of turns: the ones columns name, else the `default` pair ("role" or
    "from") unless the first turn has only the other pair's role key."""
    role = columns.get("role") or default
    if not columns.get("role") and items and isinstance(items, list) and isinstance(items[0], dict) \
            and role not in items[0]:
        role = next((k for k in TURN_KEYS if k in items[0]), role)
    return role, columns.get("content") or TURN_KEYS.get(role, "content")


def ignored_keys(rec: Mapping[str, Any], columns: Mapping[str, str]) -> list[str]:
    """What a messages record holds that prepare does not read, set (not null): top-level keys by name
    (`parallel_tool_calls`, `metadata`, ...), message keys as `messages[].KEY` (`refusal`, `audio`, ...)."""
    known = {columns["messages"], columns["tools"], columns["system"], "functions"}
    out = sorted(k for k, v in rec.items() if k not in known and v is not None)
    items = rec.get(columns["messages"])
    if isinstance(items, list):
        msg_known = {*turn_keys(items, columns, "role"), columns.get("reasoning") or "reasoning_content",
                     *MESSAGE_KEYS}
        extra = {k for m in items if isinstance(m, dict) for k, v in m.items() if k not in msg_known and v is not None}
        out += [f"{columns['messages']}[].{k}" for k in sorted(extra)]
    return out


def detect(keys: Iterable[str], columns: Mapping[str, str]) -> str | None:
    """The format a record's keys look like, given the (mapped) column names."""
    k = set(keys)
    if columns["messages"] in k:
        return "messages"
    if columns["conversations"] in k:
        return "sharegpt"
    if columns["instruction"] in k and columns["output"] in k:
        return "alpaca"
    if columns["prompt"] in k and columns["completion"] in k:
        return "prompt_completion"
    if columns["text"] in k:
        return "text"
    return None


def other_format(rec: Mapping[str, Any], fmt: str, columns: Mapping[str, str]) -> str:
    """For a row dropped for a missing field: a hint when its keys are another format's (files concatenated
    from two data sets), else ''. Only called on drops: nothing on the path of a good row."""
    seen = detect(rec, columns)
    return (f"; the row looks like {seen}, not {fmt}: one format per file (split it, or one source each)"
            if seen not in (None, fmt) else "")


def required_columns(fmt: str, columns: Mapping[str, str]) -> list[str]:
    """Columns a table (CSV, Parquet, Arrow) must have for a format."""
    return {
        "alpaca": [columns["instruction"], columns["output"]],
        "sharegpt": [columns["conversations"]],
        "messages": [columns["messages"]],
        "prompt_completion": [columns["prompt"], columns["completion"]],
        "text": [columns["text"]],
    }[fmt]


def _type(v: Any) -> str:
    return "null" if v is None else type(v).__name__


def _text(value: Any, where: str, *, required: bool = True) -> str | None:
    """A string field; text parts lists (OpenAI style) are joined."""
    if value is None:
        if required:
            raise Drop("missing_field", f"{where} is missing")
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(p, dict) for p in value):
        parts = []
        for p in value:
            if p.get("type", "text") != "text" or not isinstance(p.get("text"), str):
                raise Drop("wrong_type", f"{where} has a non-text part ({p.get('type')!r}); only text is supported")
            parts.append(p["text"])
        return "".join(parts)
    raise Drop("wrong_type", f"{where} is {_type(value)}, expected a string")


def _json_list(value: Any, where: str) -> list[Any]:
    """A list field; CSV cells holding JSON text are parsed."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            raise Drop("wrong_type", f"{where} is a string that is not a JSON list") from None
    if value is None:
        raise Drop("missing_field", f"{where} is missing")
    if not isinstance(value, list):
        raise Drop("wrong_type", f"{where} is {_type(value)}, expected a list")
    return value


def _role(raw: Any, roles: Mapping[str, str], where: str) -> str:
    if not isinstance(raw, str):
        raise Drop("wrong_type" if raw is not None else "missing_field", f"{where} role is {_type(raw)}")
    role = roles[raw] if raw in roles else roles.get(raw.lower())  # lower-cased only when the name is unknown
    if role is None or role not in ROLE_TARGET_NAMES:
        raise Drop("unknown_role", f"{where} has role {raw!r}; map it with roles: {{{raw}: user|assistant|...}}")
    return role


def _calls(value: Any, where: str, turn: str) -> list[dict[str, Any]]:
    try:
        return T.normalize_calls(value, where)
    except ValueError as exc:
        raise Drop("wrong_type", f"{exc}; {turn} must hold tool calls as {{name, arguments}} JSON") from None


def _message(m: dict[str, Any], role_key: str, content_key: str, reasoning_key: str, roles: Mapping[str, str],
             where: str) -> dict[str, Any]:
    if role_key not in m:
        raise Drop("missing_field", f"{where} has no {role_key!r} key (keys: {', '.join(map(str, m))})")
    role = _role(m[role_key], roles, where)
    if role == "tool_call":  # sharegpt function_call: the turn's text is the call
        return {"role": "assistant", "content": "",
                "tool_calls": _calls(m.get(content_key), f"{where}.{content_key}", f"a {m[role_key]!r} turn")}
    raw_calls = m.get("tool_calls") if role == "assistant" else None
    calls = _calls(raw_calls, f"{where}.tool_calls", "tool_calls") if raw_calls not in (None, "", []) else None
    legacy = m.get("function_call") if role == "assistant" else None
    if legacy not in (None, "", {}, []):  # OpenAI's older form: one call {name, arguments} on the message
        if calls:
            raise Drop("wrong_type", f"{where} has both tool_calls and function_call; give its calls in one of them")
        calls = _calls(legacy, f"{where}.function_call", "function_call")
    content = m.get(content_key)
    if role == "tool" and isinstance(content, dict | list) and not _is_parts(content):
        content = T.dumps(content)  # a structured tool result: its JSON is the text the model reads
    msg: dict[str, Any] = {"role": role,
                           "content": _text(content, f"{where}.{content_key}", required=calls is None) or ""}
    if role == "assistant":
        reasoning = _text(m.get(reasoning_key), f"{where}.{reasoning_key}", required=False)
        if reasoning and reasoning.strip():
            msg["reasoning_content"] = reasoning
    if calls:
        msg["tool_calls"] = calls
    if role == "tool" and isinstance(m.get("tool_call_id"), str) and m["tool_call_id"]:
        msg["tool_call_id"] = m["tool_call_id"]
    if isinstance(m.get("name"), str) and m["name"]:  # a tool result's function, or a participant's name
        msg["name"] = m["name"]
    weight = _weight(m.get("weight"), role, where)
    if weight is not None:
        msg["weight"] = weight
    return msg


def _weight(value: Any, role: str, where: str) -> int | None:
    """An assistant turn's weight, as OpenAI's chat format gives it: 0 (context only) or 1 (trained)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value not in (0, 1):
        raise Drop("wrong_type", f"{where}.weight is {value!r}; a weight is 0 (context only, not trained) or 1 "
                   "(trained)")
    if role != "assistant":
        raise Drop("wrong_type", f"{where}.weight is set on a {role} message; only assistant turns have a weight "
                   "(0: context only, 1: trained). Remove it.")
    return int(value)


def _is_parts(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(p, dict) and "type" in p for p in value)


def _chat_list(items: list[Any], role_key: str, content_key: str, roles: Mapping[str, str],
               field_name: str, reasoning_key: str = "reasoning_content") -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for i, m in enumerate(items):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise Drop("wrong_type", f"{where} is {_type(m)}, expected an object with {role_key!r}/{content_key!r}")
        msg = _message(m, role_key, content_key, reasoning_key, roles, where)
        prev = out[-1] if out else None
        if (prev is not None and prev["role"] == "assistant" and "tool_calls" not in prev
                and msg["role"] == "assistant" and not msg["content"] and "tool_calls" in msg
                and prev.get("weight") == msg.get("weight")):
            prev["tool_calls"] = msg["tool_calls"]  # an answer, then its function_call turn: one assistant turn
            continue
        out.append(msg)
    return out


def to_tools(rec: Mapping[str, Any], columns: Mapping[str, str]) -> list[dict[str, Any]] | None:
    """The record's tool schemas (None when it has none): its tools column, then its `functions` (OpenAI's
    older list of bare function schemas); raises Drop(invalid_tools) when unusable."""
    out: list[dict[str, Any]] = []
    for key in dict.fromkeys((columns["tools"], "functions")):
        try:
            out += T.normalize_tools(rec.get(key)) or []
        except ValueError as exc:
            raise Drop("invalid_tools", f"column {key!r}: {exc}") from None
    return out or None


def to_messages(rec: Mapping[str, Any], fmt: str, columns: Mapping[str, str],
                roles: Mapping[str, str]) -> list[dict[str, Any]]:
    """One raw record as canonical messages; raises Drop with the reason."""
    c = columns
    reasoning = c.get("reasoning") or "reasoning_content"
    if fmt in ("messages", "sharegpt"):  # one shape, two spellings: OpenAI's role/content, sharegpt's from/value
        key = c["messages"] if fmt == "messages" else c["conversations"]
        items = _json_list(rec.get(key), key)
        msgs = _chat_list(items, *turn_keys(items, c, "role" if fmt == "messages" else "from"), roles, key, reasoning)
        system = _text(rec.get(c["system"]), c["system"], required=False)  # a top-level system prompt
        if system and not (msgs and msgs[0]["role"] == "system"):  # a system turn wins, as in LLaMA-Factory
            msgs.insert(0, {"role": "system", "content": system})
    elif fmt == "alpaca":
        instruction = _text(rec.get(c["instruction"]), c["instruction"])
        extra = _text(rec.get(c["input"]), c["input"], required=False)
        output = _text(rec.get(c["output"]), c["output"])
        system = _text(rec.get(c["system"]), c["system"], required=False)
        msgs = [{"role": "system", "content": system}] if system else []
        hist = rec.get(c["history"])
        if hist not in (None, "", []) and not (isinstance(hist, str) and hist.strip() in ("", "null", "[]")):
            for i, pair in enumerate(_json_list(hist, c["history"])):
                if not (isinstance(pair, list) and len(pair) == 2):
                    raise Drop("wrong_type", f"{c['history']}[{i}] must be a [user, assistant] pair")
                msgs.append({"role": "user", "content": _text(pair[0], f"{c['history']}[{i}][0]") or ""})
                msgs.append({"role": "assistant", "content": _text(pair[1], f"{c['history']}[{i}][1]") or ""})
        user = f"{instruction}\n\n{extra}" if extra and extra.strip() else instruction
        msgs += [{"role": "user", "content": user or ""}, {"role": "assistant", "content": output or ""}]
    elif fmt == "prompt_completion":
        prompt, completion = rec.get(c["prompt"]), rec.get(c["completion"])
        if isinstance(prompt, list):  # conversational prompt/completion (TRL style)
            msgs = _chat_list(prompt, *turn_keys(prompt, c, "role"), roles, c["prompt"])
            if not isinstance(completion, list):
                raise Drop("wrong_type", f"{c['completion']} must be a list of messages when {c['prompt']} is one")
            msgs += _chat_list(completion, *turn_keys(completion, c, "role"), roles, c["completion"])
        elif isinstance(completion, list) and completion and isinstance(completion[0], dict) \
                and "type" not in completion[0]:
            raise Drop("wrong_type", f"{c['completion']} is a list of messages but {c['prompt']} is "
                       f"{_type(prompt)}; give both as message lists (TRL's conversational form) or both as text")
        else:
            msgs = [{"role": "user", "content": _text(prompt, c["prompt"]) or ""},
                    {"role": "assistant", "content": _text(completion, c["completion"]) or ""}]
    elif fmt == "text":
        msgs = [{"role": "text", "content": _text(rec.get(c["text"]), c["text"]) or ""}]
    else:  # pragma: no cover - Config rejects other names
        raise ValueError(fmt)
    return msgs


def validate(msgs: list[dict[str, Any]], max_chars: int, max_messages: int | None = None) -> list[dict[str, Any]]:
    """Check a conversation's shape; returns it without empty system messages."""
    if max_messages is not None and len(msgs) > max_messages:  # before any per-message work
        raise Drop("too_many_messages", f"{len(msgs):,} messages > max_messages {max_messages:,}")
    if len(msgs) == 1 and msgs[0]["role"] == "text":
        if not msgs[0]["content"].strip():
            raise Drop("empty_content", "text is empty")
    else:
        msgs = [m for m in msgs if not (m["role"] == "system" and not m["content"].strip())]
        for i, m in enumerate(msgs):
            if not m["content"].strip() and not m.get("tool_calls"):
                raise Drop("empty_content", f"message {i} ({m['role']}) is empty")
        body = msgs[1:] if msgs and msgs[0]["role"] == "system" else msgs
        if not any(m["role"] == "assistant" for m in body):
            raise Drop("no_assistant_turn", "the conversation has no assistant turn to learn from")
        if body[0]["role"] != "user":
            raise Drop("broken_alternation", f"the conversation starts with {body[0]['role']}, expected user")
        for prev, cur in zip(body, body[1:], strict=False):
            if cur["role"] not in NEXT.get(prev["role"], ()):
                raise Drop("broken_alternation", f"{cur['role']} follows {prev['role']}")
        if body[-1]["role"] != "assistant":
            raise Drop("broken_alternation", f"the conversation ends with {body[-1]['role']}, not an assistant answer")
        ids: set[str] = set()
        for i, m in enumerate(msgs):
            if m["role"] == "assistant":
                ids = {c["id"] for c in m.get("tool_calls") or [] if c.get("id")}
            elif m["role"] == "tool" and m.get("tool_call_id") and m["tool_call_id"] not in ids:
                raise Drop("unknown_tool_call_id", f"message {i} (tool) answers tool_call_id {m['tool_call_id']!r}, "
                           "which no call of the assistant turn before it has "
                           f"(its call ids: {', '.join(sorted(ids)) or 'none'})")
    chars = sum(len(m["content"]) + len(m.get("reasoning_content") or "")
                + sum(len(c["function"]["arguments"]) for c in m.get("tool_calls") or []) for m in msgs)
    if chars > max_chars:
        raise Drop("too_long_chars", f"{chars:,} characters > max_chars {max_chars:,}")
    return msgs


def canonical(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> str:
    """The row as one JSON text: what its id and exact-duplicate key hash. Tool-less rows keep the form
    they had before tools existed (the messages list), so their ids and splits do not move."""
    value: Any = msgs if not tools else {"messages": msgs, "tools": tools}
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def row_id(canonical_json: str, occurrence: int = 0) -> str:
    """Stable id: sha256 of the normalized row, whatever file or location it came from.

    The split hashes this id, so the same data gives the same split after it is moved, copied to S3
    or cloned elsewhere. Without dedup an identical row can repeat: its n-th repeat gets `#n` mixed in,
    so ids stay unique (infer and evaluate key predictions by id).
    """
    key = canonical_json if occurrence == 0 else f"{canonical_json}\n#{occurrence}"
    return hashlib.sha256(key.encode()).hexdigest()


def exact_key(canonical_json: str) -> int:
    return int.from_bytes(hashlib.blake2b(canonical_json.encode(), digest_size=8).digest(), "big")


def normalized_key(msgs: list[dict[str, Any]], tools: list[dict[str, Any]] | None = None) -> int:
    """Rows that differ only in letter case or whitespace share this key (their tools, calls and weights
    included: rows that train different turns are not duplicates)."""
    def norm(text: str) -> str:
        return " ".join(text.casefold().split())

    # norm("") is "" and a message without calls gives norm(json.dumps([])), "[]": spelled out, not recomputed
    # for every message (most have neither).
    parts = [f"{m['role']}\x1f{norm(m['content'])}\x1f"
             + (norm(m['reasoning_content']) if m.get('reasoning_content') else "") + "\x1f"
             + (norm(json.dumps(m["tool_calls"], ensure_ascii=False)) if m.get("tool_calls") else "[]")
             + (f"\x1fweight {m['weight']}" if m.get("weight") is not None else "") for m in msgs]
    if tools:
        parts.append(norm(json.dumps(tools, ensure_ascii=False, sort_keys=True)))
    text = "\x1e".join(parts)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def split_point(row_id_: str, seed: int) -> float:
    """A uniform number in [0, 1) from the row id and seed: the split decision."""
    digest = hashlib.sha256(f"{seed}:{row_id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def drop_table(dropped: Any, examples: Mapping[str, list[dict[str, Any]]], rows_in: int, kept: int,
               fraction: float, limit: float, unit: str, fix: str) -> str:
    """The error when too much was dropped: counts, the limit, and a table of reasons with each one's first
    example (file:line and detail). `unit` names what was counted (rows, preference pairs)."""
    total = sum(dropped.values())
    lines = [f"Dropped {total:,} of {rows_in:,} {unit} ({fraction:.1%}); max_drop_fraction is {limit:.1%}."
             if kept else f"No {unit} left: dropped {total:,} of {rows_in:,}.",
             f"  reason                   {unit.split()[-1]:>7}  first example"]
    for reason, n in dropped.most_common():
        ex = (examples.get(reason) or [{}])[0]
        where = f"{ex.get('source', '')}:{ex.get('line', '')}  {ex.get('detail', '')}"
        lines.append(f"  {reason:<24} {n:>7,}  {where[:160]}")
    lines.append(fix)
    return "\n".join(lines)
