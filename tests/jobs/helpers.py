"""A small prepare manifest for downstream stage tests, written without the prepare job.

`publish_prepare` writes what prepare publishes (canonical Parquet rows in
`data/<split>/part-NNNNN.parquet`, artifacts `<split>/part-NNNNN`, and with a
tokenizer the `input_ids`/`labels` columns plus `model.tokenizer`,
`model.template_hash` and `model.chat_template`) using the shared
`common.data` schema and `common.chat` encoder.
"""

from __future__ import annotations

import random
import tempfile
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from common import chat, chat_encode, data
from common import manifest as mf

WORDS = ["red", "green", "blue", "cat", "dog", "bird", "fish", "tree", "sun", "moon", "star", "car"]


def conversations(n: int, seed: int = 0, max_words: int = 6) -> list[list[dict[str, str]]]:
    """Learnable chats of uneven length: 'reverse: a b c' -> 'c b a'."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, max_words))]
        out.append([{"role": "user", "content": "reverse: " + " ".join(words)},
                    {"role": "assistant", "content": " ".join(reversed(words))}])
    return out


def publish_prepare(prefix: str, *, tokenizer: Any = None, n_train: int = 64, n_eval: int = 16, seed: int = 0,
                    chat_template: str | None = None, max_words: int = 6, shards: int = 2) -> mf.Loaded:
    """Publish a prepare manifest under `prefix`; tokenized when a tokenizer is given."""
    fmt = chat.chat_format(tokenizer, chat_template) if tokenizer is not None else None
    convs = conversations(n_train + n_eval, seed=seed, max_words=max_words)
    writer = mf.ArtifactWriter(prefix)
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for split, rows in (("train", convs[:n_train]), ("eval", convs[n_train:])):
            counts[split] = len(rows)
            table: dict[str, list[Any]] = {
                "id": [f"{split}-{i}" for i in range(len(rows))], "messages": rows, "tools": [None] * len(rows),
                "split": [split] * len(rows), "source": ["generated"] * len(rows)}
            if fmt is not None:
                enc = chat_encode.encode_many(tokenizer, fmt, rows)
                table["input_ids"] = [e.input_ids for e in enc]
                table["labels"] = [e.labels for e in enc]
                table["num_tokens"] = [len(e.input_ids) for e in enc]
                table["num_trainable"] = [e.num_trainable for e in enc]
            t = pa.Table.from_pydict(table, schema=data.schema(tokenized=fmt is not None))
            per = max(1, -(-len(rows) // shards))
            for k, start in enumerate(range(0, len(rows), per)):
                local = Path(tmp) / f"{split}-{k}.parquet"
                part = t.slice(start, per)
                pq.write_table(part, local, compression="zstd")
                writer.add_file(local, f"data/{split}/part-{k:05d}.parquet", name=f"{split}/part-{k:05d}",
                                rows=part.num_rows)
    model: dict[str, Any] = {}
    if fmt is not None:
        model = {"tokenizer": chat.tokenizer_identity(tokenizer), "template_hash": fmt.hash,
                 "chat_template": fmt.template}
    m = mf.build(stage="prepare", run_id=mf.new_run_id(), config={"builder": "tests.jobs.helpers", "seed": seed},
                 inputs=[], artifacts=writer.artifacts, stats={"rows": counts}, model=model)
    mf.publish(prefix, m)
    return mf.load(prefix)
