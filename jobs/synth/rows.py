"""synth's rows: the declared formats, the seeds, the teacher's prompts, and reading a completion into a row.

Formats (one JSON object per example):

    messages           {"messages": [{"role": "user", "content": ...}, {"role": "assistant", "content": ...}]}
                       an optional leading system turn, then user and assistant in turn, ending with assistant
    prompt_completion  {"prompt": ..., "completion": ...}
    json               any object that satisfies the configured JSON schema (`json_schema`)

Seeds and completions are read by the same rules, so a seed that does not fit the format is refused (exit 3
naming its file and line: the teacher would copy it) and a completion that does not is a counted reject.
Seeds may be converted between messages and prompt/completion (one user and one assistant turn);
completions may not. Every function but `read_seeds` is pure.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, get_args

from common import data, rawinputs
from common import manifest as mf
from common.errors import ConfigError, InputError
from common.judge import first_json_object

Format = Literal["messages", "prompt_completion", "json"]
FORMATS: tuple[str, ...] = get_args(Format)
ROLES = ("system", "user", "assistant")

# Every reason a completion can be rejected for, in the order the reason table prints (the manifest's
# `rejected` counts and rejects.jsonl use these names).
REASONS = (
    "prompt_too_long",         # the few-shot prompt does not fit the teacher's context
    "truncated",               # the completion hit max_tokens: whatever it holds is cut off
    "not_json",                # no JSON object in the completion
    "wrong_format",            # a JSON object, but not a row of the declared format (fields, roles, turns)
    "schema_invalid",          # format json: fails the JSON schema
    "too_short",               # a text field shorter than limits.min_chars
    "too_long",                # the row's text longer than limits.max_chars
    "near_duplicate_of_seed",  # near_duplicates.threshold or more similar to a seed
    "judge_unparseable",       # the judge's verdict could not be read (never guessed)
    "judge_rejected",          # the judge scored it below judge.min_score
    "near_duplicate",          # near_duplicates.threshold or more similar to an earlier kept row
)

DEFAULT_INSTRUCTION = ("Below are examples from a data set, one JSON object per line. Write one new example for the "
                       "same data set: the same kind of task and the same format, but a different case from every "
                       "example shown.")


class Reject(Exception):
    """A row that cannot be used, with its reason (one of REASONS) and a detail for people."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Seed:
    row: dict[str, Any]  # in the declared format, as the teacher is shown it
    where: str  # file and line (or manifest and row), for messages


# --------------------------------------------------------------------------- reading one row


def to_row(obj: Any, fmt: str, validator: Any = None, *, convert: bool = False) -> dict[str, Any]:
    """`obj` as a row of the format, or Reject. `convert` (seeds only): messages <-> prompt/completion."""
    if not isinstance(obj, dict):
        raise Reject("wrong_format", f"expected a JSON object, got {type(obj).__name__}")
    if fmt == "json":
        if validator is not None:
            errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.path))
            if errors:
                where = "/".join(str(p) for p in errors[0].path) or "(root)"
                raise Reject("schema_invalid", f"at {where}: {errors[0].message[:200]}")
        return obj
    if fmt == "messages":
        if "messages" not in obj and convert and "prompt" in obj and "completion" in obj:
            obj = {"messages": [{"role": "user", "content": obj["prompt"]},
                                {"role": "assistant", "content": obj["completion"]}]}
        return {"messages": _messages(obj.get("messages"))}
    if "prompt" not in obj and convert and "messages" in obj:
        msgs = _messages(obj["messages"])
        if [m["role"] for m in msgs] != ["user", "assistant"]:
            raise Reject("wrong_format", "only a conversation of one user and one assistant turn becomes a "
                                         f"prompt/completion row (roles: {[m['role'] for m in msgs]})")
        obj = {"prompt": msgs[0]["content"], "completion": msgs[1]["content"]}
    for key in ("prompt", "completion"):
        if not isinstance(obj.get(key), str):
            raise Reject("wrong_format", f"'{key}' is {_type(obj.get(key))}, expected a string")
    return {"prompt": obj["prompt"], "completion": obj["completion"]}


def _type(v: Any) -> str:
    return "missing" if v is None else type(v).__name__


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise Reject("wrong_format", f"'messages' is {_type(value) if value != [] else 'empty'}, expected a list "
                                     "of {role, content} turns")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("content"), str):
            raise Reject("wrong_format", f"turn {i} is not a {{role, content}} object with text content")
        if m.get("role") not in ROLES:
            raise Reject("wrong_format", f"turn {i} has role {m.get('role')!r}; expected one of {', '.join(ROLES)} "
                                         "(tool calls are not generated)")
        out.append({"role": m["role"], "content": m["content"]})
    roles = [m["role"] for m in out]
    body = roles[1:] if roles[0] == "system" else roles
    expected = ["user", "assistant"] * (len(body) // 2 + 1)
    if not body or body != expected[:len(body)] or body[-1] != "assistant":
        raise Reject("wrong_format", f"turns must be user and assistant in turn (after an optional system "
                                     f"turn), ending with assistant; got {roles}")
    return out


def texts(row: dict[str, Any], fmt: str) -> list[str]:
    """The row's text fields (what the length limits and near-duplicate check read)."""
    if fmt == "messages":
        return [m["content"] for m in row["messages"]]
    if fmt == "prompt_completion":
        return [row["prompt"], row["completion"]]
    return [json.dumps(row, sort_keys=True, ensure_ascii=False)]


def check_length(row: dict[str, Any], fmt: str, min_chars: int, max_chars: int) -> None:
    fields = texts(row, fmt)
    short = [i for i, t in enumerate(fields) if len(t.strip()) < min_chars]
    if short:
        raise Reject("too_short", f"text field {short[0]} has {len(fields[short[0]].strip())} characters; "
                                  f"limits.min_chars is {min_chars}")
    total = sum(len(t) for t in fields)
    if total > max_chars:
        raise Reject("too_long", f"{total} characters; limits.max_chars is {max_chars}")


def parse_completion(text: str, finish_reason: str, fmt: str, validator: Any) -> dict[str, Any]:
    """A teacher's completion as a row, or Reject (truncated, not JSON, not the format)."""
    if finish_reason == "length":
        raise Reject("truncated", "the completion hit sampling.max_tokens")
    obj, why = first_json_object(text)
    if obj is None:
        raise Reject("not_json", why or "no JSON object")
    return to_row(obj, fmt, validator)


def shown(row: dict[str, Any]) -> str:
    """How an example appears in a prompt and in the output: one line of JSON."""
    return json.dumps(row, ensure_ascii=False)


# --------------------------------------------------------------------------- what the teacher is asked


def guided_schema(fmt: str, json_schema: dict[str, Any] | None, min_chars: int, max_chars: int,
                  max_turns: int) -> dict[str, Any]:
    """The JSON schema a guided teacher's output must follow: the format's shape (user and assistant turns in
    turn, starting with user) with each text field's length such that the whole row fits max_chars."""
    if fmt == "json":
        assert json_schema is not None
        return json_schema
    fields = 2 if fmt == "prompt_completion" else max_turns

    def text() -> dict[str, Any]:
        return {"type": "string", "minLength": min_chars, "maxLength": max(min_chars, max_chars // fields)}

    if fmt == "prompt_completion":
        return {"type": "object", "properties": {"prompt": text(), "completion": text()},
                "required": ["prompt", "completion"], "additionalProperties": False}
    turns = [{"type": "object", "properties": {"role": {"const": ("user", "assistant")[i % 2]}, "content": text()},
              "required": ["role", "content"], "additionalProperties": False} for i in range(max_turns)]
    return {"type": "object", "properties": {"messages": {"type": "array", "prefixItems": turns, "items": False,
                                                          "minItems": 2, "maxItems": max_turns}},
            "required": ["messages"], "additionalProperties": False}


def teacher_prompt(instruction: str, system: str | None, examples: list[dict[str, Any]], fmt: str,
                   json_schema: dict[str, Any] | None) -> list[dict[str, str]]:
    lines = [instruction, ""]
    if examples:
        lines += ["Examples:", *[shown(e) for e in examples], ""]
    if fmt == "json":
        lines += ["The example must be a JSON object that follows this JSON schema:",
                  json.dumps(json_schema, ensure_ascii=False), ""]
    else:
        lines += [f"Format: {FORMAT_HINT[fmt]}", ""]
    lines.append("Answer with the new example as one JSON object on one line, and nothing else.")
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": "\n".join(lines)}]


FORMAT_HINT = {
    "messages": '{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]}',
    "prompt_completion": '{"prompt": "...", "completion": "..."}',
}


def draw_shots(seeds: list[Seed], shots: int, seed: int, index: int) -> list[dict[str, Any]]:
    """The seeds prompt `index` shows: a draw of its own (seed and index alone decide it, so every attempt
    builds the same prompts)."""
    rng = random.Random(f"{seed}/{index}")
    picked = rng.sample(range(len(seeds)), min(shots, len(seeds)))
    return [seeds[i].row for i in picked]


# --------------------------------------------------------------------------- seeds


def seed_input(src: str) -> mf.Loaded | mf.InputRef:
    """A prepare manifest, or a JSONL/Parquet file (its sha256 read now: it is part of the run's identity)."""
    name = src.lower().rstrip("/")
    if name.endswith((".jsonl", ".parquet")):
        # hashed as it is fetched; _records parses that same copy (common/rawinputs.py)
        return mf.InputRef(uri=src, sha256=rawinputs.fetch(src, "Seeds file").sha256, stage=None, role="seeds")
    if name.endswith((".json", ".csv", ".tsv", ".gz")) and not name.endswith(mf.MANIFEST_NAME):
        raise ConfigError(f"Seeds {src}: synth reads JSON Lines (.jsonl) or Parquet with `messages` or "
                          "`prompt`/`completion`, or a prepare manifest. For other formats run `ftjobs prepare "
                          "--source FILE` first and pass its manifest.")
    return mf.load(src, expect_stage="prepare")


def read_seeds(inputs: list[mf.Loaded | mf.InputRef], fmt: str, validator: Any, split: str) -> list[Seed]:
    seeds: list[Seed] = []
    for given in inputs:
        for where, obj in _records(given, split):
            try:
                row = to_row(obj, fmt, validator, convert=True)
            except Reject as exc:
                raise InputError(f"{where}: this seed is not a {fmt} row ({exc.reason}: {exc.detail}). The "
                                 "teacher copies its seeds: fix it, or choose the format the seeds have.") from None
            seeds.append(Seed(row=row, where=where))
    if not seeds:
        raise InputError(f"No seed examples in {', '.join(g.uri for g in inputs)}"
                         + (f" ({split!r} split)" if any(isinstance(g, mf.Loaded) for g in inputs) else ""))
    return seeds


def _records(given: mf.Loaded | mf.InputRef, split: str) -> list[tuple[str, Any]]:
    if isinstance(given, mf.Loaded):
        if not data.split_artifacts(given, split):
            raise InputError(f"{given.uri} has no {split!r} split: set seed_split to one it has")
        rows = data.read_split(given, split, columns=["id", "messages", "tools"]).to_pylist()
        out = []
        for i, r in enumerate(rows):
            if r.get("tools") or any(m.get("tool_calls") or m.get("role") == "tool" for m in r["messages"]):
                raise InputError(f"{given.uri} row {i} (id {r['id']}): a seed with tools or tool calls; synth "
                                 "generates text turns only. Use seeds without tools.")
            out.append((f"{given.uri} row {i}", {"messages": [{"role": m["role"], "content": m["content"]}
                                                              for m in r["messages"]]}))
        return out
    local = rawinputs.local_copy(given.uri, given.sha256, "Seeds file")  # the bytes its sha256 came from
    if given.uri.lower().endswith(".parquet"):
        return _parquet(local, given.uri)
    return _jsonl(local, given.uri)


def _parquet(local: Path, where: str) -> list[tuple[str, Any]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(local).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{where}: not a readable Parquet file ({exc}); re-create it or use JSON Lines") from None
    return [(f"{where} row {i}", r) for i, r in enumerate(rows)]


def _jsonl(local: Path, where: str) -> list[tuple[str, Any]]:
    return [(f"{where} line {n}", obj) for n, obj in data.json_lines(local, where, "seeds")]
