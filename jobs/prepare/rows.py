"""Raw records to canonical chat rows: format detection, column and role
mapping, validation with a named reason per dropped row, duplicate keys.

Every function here is pure (no I/O) so each rule is tested directly.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")

# Source role names -> canonical roles. Config `roles` entries win over these.
DEFAULT_ROLES = {
    "system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
    "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "function_call": "assistant", "observation": "tool", "function": "tool", "ipython": "tool",
}
CANONICAL_ROLES = ("system", "user", "assistant", "tool")

# What may follow each role in a conversation (after any leading system message).
NEXT = {"user": ("assistant",), "assistant": ("user", "tool"), "tool": ("tool", "assistant")}

# Every reason a row can be dropped for, in the order the reason table prints.
REASONS = (
    "invalid_json", "invalid_utf8", "line_too_long", "invalid_csv", "wrong_type", "missing_field",
    "empty_content", "unknown_role", "broken_alternation", "no_assistant_turn", "too_long_chars",
    "too_long_tokens", "zero_trainable_tokens", "multiple_bos", "duplicate_exact", "duplicate_normalized",
)
# Reasons that mean the file itself is broken: fatal unless skip_bad_lines.
STRUCTURAL = ("invalid_json", "invalid_utf8", "line_too_long", "invalid_csv")


class Drop(Exception):
    """A row that cannot be used, with its reason (one of REASONS) and a detail for people."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


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
    role = roles.get(raw, roles.get(raw.lower()))
    if role not in CANONICAL_ROLES:
        raise Drop("unknown_role", f"{where} has role {raw!r}; map it with roles: {{{raw}: user|assistant|...}}")
    return role


def _chat_list(items: list[Any], role_key: str, content_key: str, roles: Mapping[str, str],
               field_name: str) -> list[dict[str, str]]:
    out = []
    for i, m in enumerate(items):
        where = f"{field_name}[{i}]"
        if not isinstance(m, dict):
            raise Drop("wrong_type", f"{where} is {_type(m)}, expected an object with {role_key!r}/{content_key!r}")
        if role_key not in m:
            raise Drop("missing_field", f"{where} has no {role_key!r} key (keys: {', '.join(map(str, m))})")
        role = _role(m[role_key], roles, where)
        content = _text(m.get(content_key), f"{where}.{content_key}")
        out.append({"role": role, "content": content or ""})
    return out


def to_messages(rec: Mapping[str, Any], fmt: str, columns: Mapping[str, str],
                roles: Mapping[str, str]) -> list[dict[str, str]]:
    """One raw record as canonical messages; raises Drop with the reason."""
    c = columns
    if fmt == "messages":
        items = _json_list(rec.get(c["messages"]), c["messages"])
        msgs = _chat_list(items, c.get("role") or "role", c.get("content") or "content", roles, c["messages"])
    elif fmt == "sharegpt":
        items = _json_list(rec.get(c["conversations"]), c["conversations"])
        msgs = _chat_list(items, c.get("role") or "from", c.get("content") or "value", roles, c["conversations"])
        system = _text(rec.get(c["system"]), c["system"], required=False)
        if system and not (msgs and msgs[0]["role"] == "system"):
            msgs.insert(0, {"role": "system", "content": system})
    elif fmt == "alpaca":
        instruction = _text(rec.get(c["instruction"]), c["instruction"])
        extra = _text(rec.get(c["input"]), c["input"], required=False)
        output = _text(rec.get(c["output"]), c["output"])
        system = _text(rec.get(c["system"]), c["system"], required=False)
        msgs = [{"role": "system", "content": system}] if system else []
        hist = rec.get(c["history"])
        if hist not in (None, "", []):
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
            msgs = _chat_list(prompt, "role", "content", roles, c["prompt"])
            if not isinstance(completion, list):
                raise Drop("wrong_type", f"{c['completion']} must be a list of messages when {c['prompt']} is one")
            msgs += _chat_list(completion, "role", "content", roles, c["completion"])
        else:
            msgs = [{"role": "user", "content": _text(prompt, c["prompt"]) or ""},
                    {"role": "assistant", "content": _text(completion, c["completion"]) or ""}]
    elif fmt == "text":
        msgs = [{"role": "text", "content": _text(rec.get(c["text"]), c["text"]) or ""}]
    else:  # pragma: no cover - Config rejects other names
        raise ValueError(fmt)
    return msgs


def validate(msgs: list[dict[str, str]], max_chars: int) -> list[dict[str, str]]:
    """Check a conversation's shape; returns it without empty system messages."""
    if len(msgs) == 1 and msgs[0]["role"] == "text":
        if not msgs[0]["content"].strip():
            raise Drop("empty_content", "text is empty")
    else:
        msgs = [m for m in msgs if not (m["role"] == "system" and not m["content"].strip())]
        for i, m in enumerate(msgs):
            if not m["content"].strip():
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
    chars = sum(len(m["content"]) for m in msgs)
    if chars > max_chars:
        raise Drop("too_long_chars", f"{chars:,} characters > max_chars {max_chars:,}")
    return msgs


def canonical(msgs: list[dict[str, str]]) -> str:
    return json.dumps(msgs, ensure_ascii=False, separators=(",", ":"))


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


def normalized_key(msgs: list[dict[str, str]]) -> int:
    """Rows that differ only in letter case or whitespace share this key."""
    text = "\x1e".join(f"{m['role']}\x1f{' '.join(m['content'].casefold().split())}" for m in msgs)
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "big")


def split_point(row_id_: str, seed: int) -> float:
    """A uniform number in [0, 1) from the row id and seed: the split decision."""
    digest = hashlib.sha256(f"{seed}:{row_id_}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64
