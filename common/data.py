"""The canonical row format that prepare writes and train/infer/evaluate read.

Rows (one Parquet table per split, zstd, written in shards):

| column          | type                               | notes                                      |
|-----------------|------------------------------------|--------------------------------------------|
| id              | string                             | stable: sha256 of the normalized row       |
| messages        | list<struct<role, content>>        | roles: system, user, assistant, tool; or a |
|                 |                                    | single {"role": "text"} for plain text     |
| split           | string                             | "train" or "eval"                          |
| source          | string                             | the raw input URI the row came from        |
| input_ids       | list<int32>  (with a tokenizer)    | exactly one BOS                            |
| labels          | list<int32>  (with a tokenizer)    | -100 where not trained on                  |
| num_tokens      | int32        (with a tokenizer)    |                                            |
| num_trainable   | int32        (with a tokenizer)    |                                            |

Predictions (what infer writes, one Parquet part per shard, and evaluate reads): `PREDICTIONS`.

| column            | type                        | notes                                              |
|-------------------|-----------------------------|----------------------------------------------------|
| id                | string                      | the prompt row's id                                |
| sample            | int32                       | 0..n-1 with sampling.n > 1                          |
| prompt            | list<struct<role, content>> | the conversation the model continued               |
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

import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from common import manifest as mf

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
BASE_FIELDS = [
    pa.field("id", pa.string(), nullable=False),
    pa.field("messages", pa.list_(MESSAGE), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
]
TOKEN_FIELDS = [
    pa.field("input_ids", pa.list_(pa.int32())),
    pa.field("labels", pa.list_(pa.int32())),
    pa.field("num_tokens", pa.int32()),
    pa.field("num_trainable", pa.int32()),
]
SPLITS = ("train", "eval")

PREDICTIONS = pa.schema([
    pa.field("id", pa.string(), nullable=False),
    pa.field("sample", pa.int32(), nullable=False),
    pa.field("prompt", pa.list_(MESSAGE), nullable=False),
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
            tables.append(pq.read_table(local, columns=columns))
    return pa.concat_tables(tables)

