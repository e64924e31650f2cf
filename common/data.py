"""The canonical row format that prepare writes and train/infer/evaluate read.

Rows (one Parquet table per split, zstd, written in shards):

| column          | type                               | notes                                      |
|-----------------|------------------------------------|--------------------------------------------|
| id              | string                             | stable: sha256 of the normalized row       |
| messages        | list<ROW_MESSAGE> (below)          | roles: system, user, assistant, tool; or a |
|                 |                                    | single {"role": "text"} for plain text     |
| tools           | string, null when none             | JSON text: the list of tool schemas        |
|                 |                                    | ({"type": "function", "function": {...}})  |
| split           | string                             | "train" or "eval"                          |
| source          | string                             | the raw input URI the row came from        |
| input_ids       | list<int32>  (with a tokenizer)    | exactly one BOS                            |
| labels          | list<int32>  (with a tokenizer)    | -100 where not trained on                  |
| num_tokens      | int32        (with a tokenizer)    |                                            |
| num_trainable   | int32        (with a tokenizer)    |                                            |

MESSAGE is a struct of `role` and `content` (strings; content "" for an
assistant turn that only calls tools) and optional fields, null when unset:
`reasoning_content` (an assistant's reasoning), `tool_calls` (list of
`{id, type, function: {name, arguments}}`, arguments as JSON text: calls
differ in their arguments' shape), `tool_call_id` (a tool result) and `name`
(a tool result's function, or a participant's name on any message).
ROW_MESSAGE, what prepared rows store, adds `weight` (int8, null when unset):
an assistant turn's weight from the data, 0 (context only, never trained) or 1
(trained whatever `train_on` says); null leaves it to `train_on`. Prompts and
predictions use MESSAGE: inference has no use for weights.

Compatibility: shards written before `tools`, `weight` and the optional message
fields existed have none of them; readers treat a missing field or column as null
(`read_split` fills a missing optional column), so old prepare runs still
train and infer. `REQUIRED` lists the columns every shard has.

Predictions (what infer writes, one Parquet part per shard, and evaluate reads): `PREDICTIONS`.

| column            | type                        | notes                                              |
|-------------------|-----------------------------|----------------------------------------------------|
| id                | string                      | the prompt row's id                                |
| sample            | int32                       | 0..n-1 with sampling.n > 1                          |
| prompt            | list<MESSAGE>               | the conversation the model continued               |
| tools             | string (nullable)           | JSON text: the tool schemas the prompt offered     |
| completion        | string                      | the generated text (empty on an error row)         |
| reference         | string (nullable)           | the held-out answer, when the prompts had one      |
| finish_reason     | string                      | stop, length, or error                             |
| prompt_tokens     | int32                       |                                                    |
| completion_tokens | int32                       |                                                    |
| model, adapter    | string (adapter nullable)   | what answered                                      |
| sampling          | string                      | the sampling settings, JSON                        |
| error             | string (nullable)           | why this row has no completion                     |

A prepare manifest lists its shards as artifacts named `<split>/part-NNNNN`
(path `data/<split>/part-NNNNN.parquet`) and records, when tokenized,
`model.tokenizer` (see `common.chat.tokenizer_identity`), `model.template_hash`
and `model.chat_template` (the template text itself).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common import manifest as mf
from common.errors import InputError

TOOL_CALL = pa.struct([
    ("id", pa.string()), ("type", pa.string()),
    ("function", pa.struct([("name", pa.string()), ("arguments", pa.string())])),
])
MESSAGE_FIELDS = [
    ("role", pa.string()), ("content", pa.string()), ("reasoning_content", pa.string()),
    ("tool_calls", pa.list_(TOOL_CALL)), ("tool_call_id", pa.string()), ("name", pa.string()),
]
MESSAGE = pa.struct(MESSAGE_FIELDS)
ROW_MESSAGE = pa.struct([*MESSAGE_FIELDS, ("weight", pa.int8())])
BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("messages", pa.list_(ROW_MESSAGE), nullable=False),
    pa.field("tools", pa.string()),
    pa.field("split", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
]
REQUIRED = ("id", "messages", "split", "source")
TOKEN_FIELDS = [
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("num_tokens", pa.int32()),
    pa.field("num_trainable", pa.int32()),
]
SPLITS = ("train", "eval")
# Columns a shard may lack (written before they existed), by name.
OPTIONAL = {f.name: f for f in BASE_FIELDS if f.name not in REQUIRED}

PREDICTIONS = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("prompt", pa.list_(MESSAGE), nullable=False),
    pa.field("tools", pa.string()),
    pa.field("completion", pa.string(), nullable=False),
    pa.field("reference", pa.string()),
    pa.field("finish_reason", pa.string(), nullable=False),
    pa.field("prompt_tokens", pa.int32(), nullable=False),
    pa.field("completion_tokens", pa.int32(), nullable=False),
    pa.field("model", pa.string(), nullable=False),
    pa.field("adapter", pa.string()),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("error", pa.string()),
])
# What scoring a predictions set needs; the other columns are for people reading the predictions.
SCORED_COLUMNS = ("id", "completion", "reference")


def schema(tokenized: bool) -> pa.Schema:
    return pa.schema(BASE_FIELDS + (TOKEN_FIELDS if tokenized else []))


def split_artifacts(loaded: mf.Loaded, split: str) -> list[mf.Artifact]:
    """The Parquet shards of one split in a prepare manifest, in order."""
    arts = sorted(loaded.manifest.artifacts_named(f"{split}/part-"), key=lambda a: a.name)
    return arts


def read_split(loaded: mf.Loaded, split: str, columns: list[str] | None = None,
               cache_dir: str | Path | None = None) -> pa.Table:
    """Download (checksum-verified) and concatenate one split's shards."""
    arts = split_artifacts(loaded, split)
    if not arts:
        empty = schema(tokenized=True).empty_table()
        return empty.select(columns) if columns else empty
    tables = []
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        for i, art in enumerate(arts):
            local = mf.fetch_artifact(loaded, art, Path(tmp) / f"{i:05d}.parquet")
            tables.append(_with_optional(pq.read_table(local, columns=_present(local, columns)), columns))
    return pa.concat_tables(tables, promote_options="permissive")


def _present(local: Path, columns: list[str] | None) -> list[str] | None:
    """The requested columns this shard has (older shards lack the optional ones)."""
    if columns is None:
        return None
    names = set(pq.ParquetFile(local).schema_arrow.names)
    return [c for c in columns if c in names or c not in OPTIONAL]


def _with_optional(table: pa.Table, columns: list[str] | None) -> pa.Table:
    for name in columns or [f.name for f in schema(tokenized=False)]:
        if name in OPTIONAL and name not in table.column_names:
            table = table.append_column(OPTIONAL[name], pa.nulls(table.num_rows, OPTIONAL[name].type))
    return table.select(columns) if columns else table


def tools_json(tools: list[dict] | None) -> str | None:
    """A row's tools as the `tools` column stores them."""
    return json.dumps(tools, ensure_ascii=False) if tools else None


def tools_of(value: str | None) -> list[dict] | None:
    """The `tools` column back as schemas (None when the row has none)."""
    return json.loads(value) if value else None



# The longest line (or table row) any reader holds whole; prepare's max_line_bytes defaults to it.
MAX_LINE_BYTES = 64 << 20


def json_lines(local: Path, where: str, what: str, max_line_bytes: int = MAX_LINE_BYTES) -> list[tuple[int, Any]]:
    """(line number, value) for every non-blank line of a small JSON Lines file (seeds, prompts).

    Read as bytes and decoded line by line, so a bad byte names its line, as prepare does; a UTF-8 BOM on
    the first line is dropped. A line that is not JSON, nests too deep, or holds escapes that are not text
    (lone surrogates such as \\ud800) is an InputError naming `where`, the line and what to do with `what`.
    """
    out = []
    with open(local, "rb") as f:
        for n, raw in enumerate(iter(lambda: f.readline(max_line_bytes + 1), b""), 1):
            if len(raw) > max_line_bytes:  # refused before it is read whole
                raise InputError(f"{where} line {n}: longer than {max_line_bytes:,} bytes; split the record or fix "
                                 f"the {what} file")
            try:
                # Without its line break, so json's column of an error at the end stays on this line.
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8").rstrip("\r\n")
            except UnicodeDecodeError as exc:
                raise InputError(f"{where} line {n}: invalid UTF-8 at byte {exc.start} ({exc.reason}); save the "
                                 f"{what} as UTF-8") from None
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                json.dumps(obj, ensure_ascii=False).encode("utf-8")  # lone surrogates are not text
            except json.JSONDecodeError as exc:
                # Some of json's messages end in "at" ("Invalid control character at"): the column completes them.
                raise InputError(f"{where} line {n}: not valid JSON ({exc.msg.removesuffix(' at')} at column "
                                 f"{exc.colno})") from None
            except Exception as exc:  # noqa: BLE001 - too deep, not encodable text...: this line's data
                raise InputError(f"{where} line {n}: cannot be read ({type(exc).__name__}: {str(exc)[:200]}); fix "
                                 f"the {what} file") from None
            out.append((n, obj))
    return out


def read_predictions(loaded: mf.Loaded, tmp: Path) -> list[dict[str, Any]]:
    """All rows of an infer manifest's prediction shards, checksum-verified (what evaluate and pairs read);
    each row's id made unique per sample (`id#sample` when infer drew several)."""
    shards = sorted(loaded.manifest.artifacts_named("predictions/part-"), key=lambda a: a.name)
    if not shards:
        raise InputError(f"{loaded.uri} lists no predictions/part-NNNNN artifacts: is it an infer manifest "
                         "that finished with rows?")
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for i, art in enumerate(shards):
        local = mf.fetch_artifact(loaded, art, tmp / f"{i:05d}.parquet")
        try:
            table = pq.read_table(local)
        except Exception as exc:
            raise InputError(f"{loaded.resolve(art)} is not readable Parquet: {exc}") from None
        missing = [c for c in SCORED_COLUMNS if c not in table.column_names]
        if missing:
            raise InputError(f"{loaded.resolve(art)} has no column(s) {', '.join(missing)} (has: "
                             f"{', '.join(table.column_names)}); evaluate needs {', '.join(SCORED_COLUMNS)}. "
                             "Re-run infer with this version of ftjobs.")
        for n, row in enumerate(table.to_pylist()):
            if row["id"] is None or not isinstance(row["id"], str):
                raise InputError(f"{loaded.resolve(art)} row {n}: id is {row['id']!r}; every prediction needs a "
                                 "string id")
            # With sampling.n > 1 infer writes one row per sample: each (id, sample) is its own example.
            rid = row["id"] if not row.get("sample") else f"{row['id']}#{row['sample']}"
            row["id"] = rid
            if rid in seen:
                raise InputError(f"{loaded.resolve(art)} row {n}: id {rid!r} already appeared in {seen[rid]}; "
                                 "each example must be predicted once (were shards from two runs mixed?)")
            seen[rid] = loaded.resolve(art)
            rows.append(row)
    return rows
