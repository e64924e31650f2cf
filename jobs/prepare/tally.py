"""What a prepare run counts and writes while its rows stream through, and the stats it publishes from them.

`job.py` drives the run; this module holds its state (a file's progress, a submitted batch, the drop
counts and examples, the Parquet shards of each split) and turns the counts into the manifest's stats
section, the drop table of a refused run and the log's summary.
"""

from __future__ import annotations

import logging
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import chat, data
from common import manifest as mf
from common.errors import ConfigError, InputError
from jobs.prepare import batch as B
from jobs.prepare import rows as R
from jobs.prepare import sources as S
from jobs.prepare.config import Config

LOG = logging.getLogger(__name__)


@dataclass
class FileState:
    """One file while its batches are read and processed: what is checked once all its rows are in."""

    file: S.RawFile
    format: str | None
    rows: int = 0
    submitted: int = 0  # batches
    finished: int = 0
    read: bool = False  # every line of it is in a submitted batch
    saw_tools: bool = False
    ignored: Counter[str] = field(default_factory=Counter)


@dataclass
class Chunk:
    """A submitted batch: where its items came from, and the items (for previews and repeated rows)."""

    state: FileState
    lines: list[int]
    items: list[Any]


@dataclass
class Tally:
    rows_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    per_source: dict[str, Counter[str]] = field(default_factory=dict)
    formats: dict[str, str] = field(default_factory=dict)
    truncated: int = 0
    empty_files: list[str] = field(default_factory=list)
    # Assistant turns of the rows kept, by the rule that decided their labels (chat.TURN_RULES).
    turns: Counter[str] = field(default_factory=Counter)
    # Keys of messages records that nothing reads (R.ignored_keys), by the number of rows holding them.
    ignored: Counter[str] = field(default_factory=Counter)
    named: int = 0  # messages other than tool results that carry a participant's `name`
    sections: dict[str, Any] = field(default_factory=dict)  # stats sections of mixing.TrainSet

    def drop(self, reason: str, source: str, line: int, detail: str, preview: Any, keep: int) -> None:
        self.dropped[reason] += 1
        self.per_source[source]["dropped"] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < keep:
            if callable(preview):  # built only when kept: most drops are counted, not shown
                preview = preview()
            text = preview if isinstance(preview, str) else B.preview(preview)
            ex.append({"reason": reason, "source": source, "line": line, "detail": detail,
                       "row": text[:2000] + ("..." if len(text) > 2000 else "")})


class SplitWriter:
    """Parquet shards of one split: buffered into row groups, uploaded as each shard closes."""

    def __init__(self, split: str, tokenized: bool, writer: mf.ArtifactWriter, workdir: Path, conf: Config):
        self.split, self.tokenized, self.writer, self.workdir, self.conf = split, tokenized, writer, workdir, conf
        self.schema = data.schema(tokenized)
        self.parts: list[Any] = []  # tables of rows (every column but split), to be one row group
        self.buffered = 0
        self.shard = 0
        self.shard_rows = 0
        self.rows = 0
        self.pq_writer: Any = None
        self.local: Path | None = None

    def add(self, table: Any) -> None:
        """Rows (a pyarrow Table with the schema's columns but `split`), in order."""
        table = unpinned(table)
        start, n = 0, table.num_rows
        while start < n:
            take = min(n - start, self.conf.row_group_rows - self.buffered,
                       self.conf.rows_per_shard - self.shard_rows)
            self.parts.append(table.slice(start, take))
            start += take
            self.buffered += take
            self.rows += take
            self.shard_rows += take
            if self.buffered >= self.conf.row_group_rows:
                self._flush()
            if self.shard_rows >= self.conf.rows_per_shard:
                self._close_shard()

    def _flush(self) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if not self.parts:
            return
        rows = pa.concat_tables(self.parts).combine_chunks()
        split = pa.array([self.split] * rows.num_rows, type=pa.string())
        table = pa.Table.from_arrays([split if f.name == "split" else rows.column(f.name) for f in self.schema],
                                     schema=self.schema)
        if self.pq_writer is None:
            self.local = self.workdir / f"{self.split}-{self.shard:05d}.parquet"
            self.pq_writer = pq.ParquetWriter(self.local, self.schema, compression="zstd")
        self.pq_writer.write_table(table, row_group_size=self.conf.row_group_rows)
        self.parts, self.buffered = [], 0

    def _close_shard(self) -> None:
        self._flush()
        if self.pq_writer is None:
            return
        self.pq_writer.close()
        assert self.local is not None
        name = f"{self.split}/part-{self.shard:05d}"
        self.writer.add_file(self.local, f"data/{name}.parquet", name=name, rows=self.shard_rows)
        self.local.unlink()
        self.pq_writer, self.local = None, None
        self.shard += 1
        self.shard_rows = 0

    def close(self) -> None:
        self._close_shard()


def unpinned(table: Any) -> Any:
    """A copy of a small slice of a large batch: a slice shares its batch's buffers, and the eval split's few
    rows per batch, buffered until a row group fills (8,192 rows: about 160,000 rows read at 5% eval), kept
    every batch they came from in memory (issue 28: peak RSS grew with the rows read)."""
    if table.num_rows and table.get_total_buffer_size() > 4 * table.nbytes + (1 << 16):
        import pyarrow as pa

        return table.take(pa.array(range(table.num_rows), type=pa.int64()))
    return table


def too_many_drops(tally: Tally, rows_out: int, fraction: float, limit: float) -> str:
    return R.drop_table(tally.dropped, tally.examples, tally.rows_in, rows_out, fraction, limit, "rows",
                        "Fix the data or the mapping (format, columns, roles), or raise max_drop_fraction if these "
                        "drops are expected.")


def no_train(config: Config, tally: Tally, rows_out: int) -> ConfigError | InputError:
    """Why every kept row went to eval, when the sources did not ask for an eval set only."""
    counts = f"({tally.rows_in:,} rows in, {rows_out:,} kept)"
    only_eval = "To publish an eval set only, mark every source split: eval."
    if config.eval_size is not None:
        return ConfigError(f"eval_size {config.eval_size:,} leaves no train rows {counts}; lower eval_size. "
                           + only_eval)
    fraction = config.effective_eval_fraction()
    if fraction > 0:
        return ConfigError(f"eval_fraction {fraction} put every row in eval and none in train {counts}: the split "
                           "hashes each row, and with this few rows that can happen. Set eval_size to the number "
                           "of eval rows you want, or lower eval_fraction. " + only_eval)
    return InputError(f"No train rows {counts}: every kept row comes from a source marked split: eval, and the "
                      "other sources kept none (see the drop counts above). Fix those sources. " + only_eval)


def tokenstats_section(lengths: array[int], trainable: int) -> dict[str, Any]:
    import numpy as np

    if not lengths:
        return {"rows": 0}
    a = np.frombuffer(lengths, dtype=np.int64) if lengths.itemsize == 8 else np.asarray(lengths, dtype=np.int64)
    total = int(a.sum())
    return {
        "rows": int(a.size), "total": total, "trainable": trainable,
        "trainable_ratio": round(trainable / total, 4) if total else 0.0,
        "mean": round(float(a.mean()), 1), "min": int(a.min()), "max": int(a.max()),
        "percentiles": {f"p{q}": int(np.percentile(a, q)) for q in (50, 90, 95, 99)},
        "histogram": histogram(a),
    }


def histogram(a: Any, bins: int = 20) -> dict[str, list[int]]:
    """Token lengths (a numpy array) binned from the shortest row to the longest, not from 0: the bins resolve
    where the rows are (chat rows of 80-120 tokens got 6 of 20 bins from 0); at least `bins` tokens wide, so
    each bin is a token or more. The manifest's stats and `ftjobs inspect` of a lone shard bin alike."""
    import numpy as np

    lo = int(a.min())
    counts, edges = np.histogram(a, bins=bins, range=(lo, max(int(a.max()), lo + bins)))
    return {"edges": [int(round(e)) for e in edges], "counts": [int(c) for c in counts]}


def stats_section(config: Config, tally: Tally, split_counts: dict[str, int], lengths: array[int], trainable: int,
           rows_out: int, drop_fraction: float) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "rows_in": tally.rows_in, "rows_out": rows_out, **split_counts,
        "splits": dict(split_counts), "dropped": {r: tally.dropped[r] for r in R.REASONS if tally.dropped[r]},
        "drop_fraction": round(drop_fraction, 6), "truncated": tally.truncated,
        "formats": dict(tally.formats), "empty_files": tally.empty_files,
        "sources": {uri: {"rows_in": c["rows_in"], "rows_out": c["rows_out"], "dropped": c["dropped"]}
                    for uri, c in tally.per_source.items()},
        "eval_fraction": config.effective_eval_fraction() if config.eval_size is None else None,
        # Assistant turns of the rows kept: trained, or which rule excluded them (a weight-0 turn in the data;
        # train_on, e.g. last_assistant). Untokenized runs count them as train_on here would.
        "turns": {rule: tally.turns[rule] for rule in chat.TURN_RULES},
        "ignored_keys": dict(sorted(tally.ignored.items())),
        "named_messages": tally.named,
        **tally.sections,
    }
    if config.tokenizer:
        tokens = tokenstats_section(lengths, trainable)
        tokens["dropped_for_length"] = tally.dropped["too_long_tokens"] + tally.dropped["too_long_chars"]
        tokens["truncated"] = tally.truncated
        stats["tokens"] = tokens
        stats["trainable_ratio"] = tokens.get("trainable_ratio", 0.0)
    return stats


def log_summary(tally: Tally, stats: dict[str, Any]) -> None:
    LOG.info("rows in %d, out %d (train %d, eval %d), dropped %d%s", stats["rows_in"], stats["rows_out"],
             stats.get("train", 0), stats.get("eval", 0), sum(tally.dropped.values()),
             "".join(f"\n  {r:<24} {n:>8,}" for r, n in tally.dropped.most_common()),
             extra={"stats": {k: v for k, v in stats.items() if k != "sources"}})
    turns = stats["turns"]
    LOG.info("assistant turns: %d trained, %d weight 0 (context only), %d excluded by train_on", turns["trained"],
             turns["weight_0"], turns["train_on_excluded"])
    tok = stats.get("tokens")
    if tok and tok.get("rows"):
        LOG.info("tokens: p50 %d, p95 %d, max %d, trainable ratio %.3f, truncated %d",
                 tok["percentiles"]["p50"], tok["percentiles"]["p95"], tok["max"], tok["trainable_ratio"],
                 tok["truncated"])
