"""One batch of raw records to verdicts and ready Arrow columns: prepare's per-row work.

A batch is the records of one file, as read: undecoded JSON lines (bytes),
records (dicts, from JSON arrays, CSV and tables) or lines that could not be
read (`sources.Bad`). `process` decodes, normalizes and validates each
record, computes its duplicate keys, id and split point, tokenizes it and
builds its labels, and returns one verdict per record plus the Arrow columns
of the rows that survived it. It runs in the tokenizer workers (`encode.py`),
so the job's process only reads lines, decides what the order of the rows
decides (duplicates, the eval_size heap, errors: the first in row order
wins), and writes Parquet.

Verdicts are plain tuples, cheap to pickle; their first item says the kind:

- `BAD, reason, detail, preview`: the line could not be read.
- `PREFERENCE, kind`: a preference pair (`pair`) or an unpaired KTO row (`kto`: its label would be lost),
  refused whatever the format.
- `DROP, ignored, saw_tools, reason, detail, fatal`: the record is unusable
  (`fatal`: a reason in rows.FATAL, or `invalid_record` for whatever else
  broke on it).
- `TEMPLATE_ERROR, ignored, saw_tools, exact_key, normalized_key, error`.
- `ENCODE_DROP, ignored, saw_tools, exact_key, normalized_key, reason,
  detail, preview`: tokenizing dropped it (too long, nothing trained, ...).
- `KEPT, ignored, saw_tools, exact_key, normalized_key, point, truncated,
  turns, named, num_tokens, num_trainable, windows`: the row is next in the columns; a long document cut
  into windows (windows.py) is that many rows, `windows` their token counts (empty for one row).

`ignored` is the record's ignored keys (messages format) and `saw_tools`
whether it has the tools column: counted per file, for every record read.
`turns` counts its assistant turns by chat.TURN_RULES; `point` is its split
point (rows.split_point of its id, which the job recomputes for a repeat).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from common import chat, chat_encode, data
from jobs.prepare import rows as R
from jobs.prepare import sources as S
from jobs.prepare import windows as W
from jobs.prepare.pref_layouts import is_kto

BAD, PREFERENCE, DROP, TEMPLATE_ERROR, ENCODE_DROP, KEPT = range(6)
ALL_WEIGHT_0 = "every assistant turn has weight 0 (context only): nothing to train on"


@dataclass(frozen=True)
class Rules:
    """What the per-row work depends on, from the config: sent once to each worker."""

    columns: Mapping[str, Any]
    roles: Mapping[str, str]
    max_chars: int
    dedup: str
    seed: int
    train_on: chat.TrainOn
    max_length: int | None
    on_too_long: str
    max_messages: int | None = None
    long_documents: str = "windows"  # windows | drop (text rows past max_length: windows.py)
    window_overlap: int = 0
    last_window: str = "keep"
    # The overlap check's MinHash signature of each kept row (decontam.py), computed here where the row is
    # already in hand rather than after the fact in the job's process: a `minhash` column the writers drop.
    signatures: bool = False
    special_tokens_in_text: str = "drop"  # drop | keep (chat_encode.special_in_text)


def preview(rec: Any) -> str:
    """A row for drops.jsonl that cannot fail (the record may be what JSON chokes on: too deep, not text)."""
    try:
        return json.dumps(rec, ensure_ascii=False, default=str)[:2000].encode("utf-8", "backslashreplace").decode()
    except Exception:  # noqa: BLE001 - too deep for json: too deep for repr as well
        return f"<a {type(rec).__name__} that cannot be shown>"


def record(item: dict[str, Any] | bytes | S.Bad) -> dict[str, Any] | S.Bad:
    """The record a read item holds (a JSON line is decoded here)."""
    return S.parse_json_line(item) if isinstance(item, bytes) else item


def normalize(rec: dict[str, Any], fmt: str, rules: Rules) -> tuple[list[dict[str, Any]], Any, str]:
    """Canonical messages, tools and canonical JSON of a record; raises rows.Drop, or anything the data breaks."""
    tools = R.to_tools(rec, rules.columns)
    msgs = R.validate(R.to_messages(rec, fmt, rules.columns, rules.roles), rules.max_chars, rules.max_messages)
    return msgs, tools, R.canonical(msgs, tools)


def untrained(messages: list[dict[str, Any]], train_on: str) -> str:
    """Why a row has no trained token: its weights, or train_on."""
    rules = chat.turn_rules(messages, train_on)  # type: ignore[arg-type]
    if rules and all(r == "weight_0" for r in rules):
        return ALL_WEIGHT_0
    weight_0 = rules.count("weight_0")
    return f"no token is trained on (train_on={train_on}" + (f"; {weight_0} turns have weight 0)" if weight_0 else ")")


def process(fmt: str | None, items: Sequence[dict[str, Any] | bytes | S.Bad], rules: Rules, encode: Any
            ) -> tuple[list[tuple[Any, ...]], Any]:
    """Verdicts for a batch of one file's items, and the columns of its kept rows (a pyarrow Table).

    `encode(conversations, tools)` returns common.chat.Encoded per row, or is None (no tokenizer).
    """
    cols = rules.columns
    verdicts: list[tuple[Any, ...] | None] = []
    pending: list[tuple[int, tuple[Any, ...], list[dict[str, Any]], Any, str]] = []
    for item in items:
        rec = record(item)
        if isinstance(rec, S.Bad):
            verdicts.append((BAD, rec.reason, rec.detail, rec.preview))
            continue
        assert fmt is not None  # a file whose format is unknown has no readable record
        if R.is_preference(rec):
            verdicts.append((PREFERENCE, "pair"))
            continue
        if fmt == "prompt_completion" and "label" in rec and is_kto(rec):  # read as SFT, its label would be lost
            verdicts.append((PREFERENCE, "kto"))
            continue
        ignored = tuple(R.ignored_keys(rec, cols)) if fmt == "messages" else ()
        saw_tools = cols["tools"] in rec
        try:
            msgs, tools, canon = normalize(rec, fmt, rules)
        except R.Drop as d:
            detail = d.detail + (R.other_format(rec, fmt, cols) if d.reason == "missing_field" else "")
            verdicts.append((DROP, ignored, saw_tools, d.reason, detail, d.reason in R.FATAL))
            continue
        except Exception as exc:  # noqa: BLE001 - whatever breaks on a row is that row's data, never a retry
            detail = f"the record cannot be read as a {fmt} row ({type(exc).__name__}: {str(exc)[:200]})"
            verdicts.append((DROP, ignored, saw_tools, "invalid_record", detail, True))
            continue
        keys = (ignored, saw_tools, R.exact_key(canon),
                R.normalized_key(msgs, tools) if rules.dedup == "normalized" else 0)
        pending.append((len(verdicts), keys, msgs, tools, canon))
        verdicts.append(None)

    encoded = encode([p[2] for p in pending], [p[3] for p in pending]) if encode is not None and pending else None
    kept: list[tuple[str, list[dict[str, Any]], Any, chat_encode.Encoded | None]] = []
    for k, (at, keys, msgs, tools, canon) in enumerate(pending):
        e = encoded[k] if encoded is not None else None
        if e is None:
            weights = [m.get("weight") for m in msgs if m["role"] == "assistant"]
            if weights and all(w == 0 for w in weights) and rules.train_on != "all":
                verdicts[at] = (ENCODE_DROP, *keys, "zero_trainable_tokens", ALL_WEIGHT_0, preview(msgs))
                continue
            truncated = False
        else:
            if e.error is not None:  # the template refused the row, or a turn of it cannot be located
                verdicts[at] = (TEMPLATE_ERROR, *keys, e.error)
                continue
            reason = e.drop_reason
            truncated = e.truncated
            if reason is None and truncated and rules.on_too_long == "drop":
                reason = "too_long_tokens"
            if reason is not None:
                first = "the document" if chat.is_text(msgs) else "the first answer"
                detail = {"too_long_tokens": f"{first} does not fit in max_length {rules.max_length}",
                          "zero_trainable_tokens": untrained(msgs[:e.kept_messages], rules.train_on),
                          "multiple_bos": "the rendered text holds more than one BOS token",
                          "no_assistant_turn": "no assistant turn"}.get(reason, e.detail or reason)
                if reason == "too_long_tokens" and (rules.on_too_long == "drop" or chat.is_text(msgs)):
                    detail = (f"{'the document has ' if chat.is_text(msgs) else ''}{len(e.input_ids)} tokens > "
                              f"max_length {rules.max_length}")
                verdicts[at] = (ENCODE_DROP, *keys, reason, detail, preview(msgs))
                continue
            if truncated:
                msgs = msgs[:e.kept_messages]
        row_id = R.row_id(canon)
        turns = chat.turn_rules(msgs, rules.train_on)
        named = sum(1 for m in msgs if m.get("name") and m["role"] != "tool")
        n_tokens = len(e.input_ids) if e is not None else 0
        parts = W.split(e, rules.max_length, rules.window_overlap, rules.last_window) \
            if e is not None and e.offsets is not None and rules.max_length else []
        verdicts[at] = (KEPT, *keys, R.split_point(row_id, rules.seed), truncated,
                        tuple(turns.count(r) for r in chat.TURN_RULES), named, n_tokens,
                        e.num_trainable if e is not None else 0, tuple(len(w.input_ids) for w in parts))
        if parts:
            kept += [(W.window_id(row_id, k), [{"role": "text", "content": w.text}], tools,
                      chat_encode.Encoded(w.input_ids, w.labels, 1)) for k, w in enumerate(parts)]
        else:
            kept.append((row_id, msgs, tools, e))
    return verdicts, columns_of(kept, encode is not None, rules.signatures)  # type: ignore[return-value]


def columns_of(kept: list[tuple[str, list[dict[str, Any]], Any, chat_encode.Encoded | None]], tokenized: bool,
             signatures: bool = False) -> Any:
    """The kept rows' columns of the output schema, but `split` and `source` (the job's process sets them);
    with `signatures`, also `minhash` (decontam.SIGNATURE)."""
    import pyarrow as pa

    schema = data.schema(tokenized)
    arrays = {"id": pa.array([k[0] for k in kept], type=pa.string()),
              "messages": pa.array([k[1] for k in kept], type=schema.field("messages").type),
              "tools": pa.array([data.tools_json(k[2]) for k in kept], type=pa.string())}
    if tokenized:
        encoded = [k[3] for k in kept]
        arrays["input_ids"] = int_lists([e.input_ids for e in encoded])  # type: ignore[union-attr]
        arrays["labels"] = int_lists([e.labels for e in encoded])  # type: ignore[union-attr]
        arrays["num_tokens"] = pa.array([len(e.input_ids) for e in encoded], type=pa.int32())  # type: ignore[union-attr]
        arrays["num_trainable"] = pa.array([e.num_trainable for e in encoded], type=pa.int32())  # type: ignore[union-attr]
    if signatures:
        from jobs.prepare import decontam

        arrays[decontam.SIGNATURE] = decontam.signatures([k[1] for k in kept])
    return pa.table(arrays)


def int_lists(values: Sequence[Sequence[int]]) -> Any:
    """list<int32> column through numpy: ~5x faster than pyarrow converting Python lists one by one."""
    import itertools

    import numpy as np
    import pyarrow as pa

    lengths = np.fromiter((len(v) for v in values), dtype=np.int64, count=len(values))
    offsets = np.zeros(len(values) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    flat = np.fromiter(itertools.chain.from_iterable(values), dtype=np.int32, count=int(offsets[-1]))
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat, type=pa.int32()))
