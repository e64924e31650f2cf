"""The training set's make-up: source weights, caps and repeats, decontamination against the held-out rows,
and nested subsets for learning curves.

While prepare runs, training rows go to a local spool (Arrow IPC, one file per source of the config) rather
than straight to the train shards: only once every row is read are the eval rows known (eval_size keeps
its lowest split points to the end), and only then can each source's share be set. `Spool` takes them;
`Mixer.write` then, in two passes over the spool:

1. removes training rows that near-duplicate an eval row or a guard suite prompt (decontam.py), counted
   as the drop reason `eval_overlap`, and ranks every remaining row by a seeded hash of its id;
2. chooses each source's number of rows (`targets`) and writes the chosen rows to the train shards,
   sources interleaved in proportion, so any stretch of the output holds the mixture.

Which rows a source gives is always "the first k in (copy, hash rank) order": copy 0 of every row by rank,
then (with `repeat`) copy 1, and so on. So a source capped by `max_rows`, and the whole set cut by
`max_train_rows` or `train_fraction`, are nested: the rows of a smaller setting are a subset of a larger
one's (the learning-curve axis of a sweep), and the eval rows never change. Repeated copies get their own
ids (sha256 of the id and the copy number), as ids stay unique.

Weights are shares of the training rows: source s gets round(w_s / sum(w) * T) rows, where T is `mix_rows`
or, by default, the rows the sources have (after max_rows); the shares are met to within one row per
source. A source with fewer rows than its share and no `repeat: true` is an error naming it (exit 2).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.errors import ConfigError

LOG = logging.getLogger(__name__)
STRIDE = 64  # rows per round of the interleave


def check_sources(specs: Sequence[Any], mix_rows: int | None = None) -> None:
    """Config rules for weight / max_rows / repeat / mix_rows (raises ValueError, which the config reports)."""
    train = [s for s in specs if s.split != "eval"]
    if mix_rows is not None and not any(s.weight is not None for s in specs):
        raise ValueError(f"mix_rows ({mix_rows}) sets the total of a weighted mixture, and no source has a weight. "
                         "Give the sources weights, or use max_train_rows to cut the training rows.")
    for s in specs:
        if s.split == "eval" and (s.weight is not None or s.repeat or s.max_rows is not None):
            raise ValueError(f"source {s.path!r} is split: eval; weight, max_rows and repeat shape the training "
                             "rows only. Remove them from it.")
        if s.repeat and s.weight is None:
            raise ValueError(f"source {s.path!r} sets repeat without a weight: repeat lets a weight take more rows "
                             "than the source has. Give it a weight, or remove repeat.")
    weighted = [s for s in train if s.weight is not None]
    if weighted and len(weighted) != len(train):
        missing = next(s.path for s in train if s.weight is None)
        raise ValueError(f"source {missing!r} has no weight while others have one; weights are shares of the "
                         "training rows, so give every source that trains one (or none).")


def mix_hash(row_id: str, seed: int, copy: int = 0) -> int:
    """The rank key of a row (and of its repeated copies' ids): seeded, so a seed gives the same choice."""
    return int.from_bytes(hashlib.blake2b(f"mix:{seed}:{row_id}".encode(), digest_size=8).digest(), "big")


def copy_id(row_id: str, copy: int) -> str:
    return row_id if copy == 0 else hashlib.sha256(f"{row_id}\n#copy{copy}".encode()).hexdigest()


@dataclass
class Plan:
    """What the config asks of the training set (from prepare's Config)."""

    specs: list[Any]                      # prepare Source, in config order
    seed: int
    mix_rows: int | None = None
    max_train_rows: int | None = None
    train_fraction: float | None = None

    @property
    def weighted(self) -> bool:
        return any(s.weight is not None for s in self.specs)

    @property
    def shaping(self) -> bool:
        return (self.weighted or any(s.max_rows is not None for s in self.specs) or self.mix_rows is not None
                or self.max_train_rows is not None or self.train_fraction is not None)


class Spool:
    """Training rows by source, in arrival order, in local Arrow IPC files; a SplitWriter to RowOrder."""

    def __init__(self, work: Path, source_of: dict[str, int], n_sources: int):
        self.work, self.source_of = work, source_of
        self.writers: dict[int, Any] = {}
        self.counts = [0] * n_sources
        self.rows = 0
        self.schema: Any = None

    def path(self, s: int) -> Path:
        return self.work / f"spool-{s:04d}.arrow"

    def add(self, table: Any) -> None:
        import pyarrow as pa

        if not table.num_rows:
            return
        s = self.source_of[table.column("source")[0].as_py()]  # a table holds one file's rows
        if s not in self.writers:
            self.schema = table.schema
            self.writers[s] = pa.ipc.new_file(str(self.path(s)), table.schema)
        self.writers[s].write_table(table)
        self.counts[s] += table.num_rows
        self.rows += table.num_rows

    def close(self) -> None:
        for w in self.writers.values():
            w.close()
        self.writers.clear()

    def batches(self, s: int, columns: list[str] | None = None) -> Iterator[Any]:
        import pyarrow as pa

        if not self.counts[s]:
            return
        reader = pa.ipc.open_file(pa.memory_map(str(self.path(s))))
        for i in range(reader.num_record_batches):
            batch = reader.get_batch(i)
            yield batch.select(columns) if columns else batch


@dataclass
class SourceRanks:
    """One source's rows after decontamination: which survive, and their rank in the seeded order."""

    kept: Any                 # bool per spooled row
    rank: Any                 # int64 per spooled row: its place among the kept rows by mix_hash (-1: removed)
    hashes: Any               # uint64 per kept row, in rank order (for the global cut)
    n: int = 0


@dataclass
class Report:
    sources: list[dict[str, Any]] = field(default_factory=list)
    before: int = 0
    after: int = 0
    cut: int | None = None

    def as_stats(self, plan: Plan) -> dict[str, Any]:
        return {"train_rows_before": self.before, "train_rows_after": self.after, "seed": plan.seed,
                "mix_rows": plan.mix_rows, "max_train_rows": plan.max_train_rows,
                "train_fraction": plan.train_fraction, "sources": self.sources}


class Mixer:
    """Decontaminate, rank, choose and write the training rows from the spool."""

    def __init__(self, plan: Plan, spool: Spool, overlap: Any = None):
        self.plan, self.spool, self.overlap = plan, spool, overlap

    # ---- pass 1: what survives, and its rank

    def rank(self, s: int) -> SourceRanks:
        import numpy as np

        n = self.spool.counts[s]
        kept = np.ones(n, dtype=bool)
        hashes = np.zeros(n, dtype=np.uint64)
        at = 0
        names = self.spool.schema.names if self.spool.schema is not None else []
        columns = self.overlap.columns(names) if self.overlap is not None else ["id"]
        for batch in self.spool.batches(s, columns):
            ids = batch.column(0).to_pylist()
            if self.overlap is not None:
                removed = self.overlap.check(batch)
                for k in removed:
                    kept[at + k] = False
            hashes[at:at + len(ids)] = [mix_hash(i, self.plan.seed) for i in ids]
            at += len(ids)
        order = np.argsort(hashes[kept], kind="stable")
        rank = np.full(n, -1, dtype=np.int64)
        kept_at = np.flatnonzero(kept)
        rank[kept_at[order]] = np.arange(len(order))
        return SourceRanks(kept, rank, hashes[kept][order], int(kept.sum()))

    # ---- how many rows each source gives

    def targets(self, ranks: list[SourceRanks]) -> list[int]:
        import numpy as np

        plan = self.plan
        avail = [min(r.n, s.max_rows) if s.max_rows is not None else r.n for r, s in zip(ranks, plan.specs,
                                                                                        strict=True)]
        if not plan.weighted:
            k = list(avail)
            cap = self._cap(sum(k))
            if cap is not None and cap < sum(k):  # one pool: the `cap` lowest hashes over every source
                pooled = np.sort(np.concatenate([r.hashes[:a] for r, a in zip(ranks, avail, strict=True)]))
                if cap == 0:
                    return [0] * len(k)
                limit = pooled[cap - 1]
                k = [int(np.searchsorted(r.hashes[:a], limit, side="right")) for r, a in zip(ranks, avail,
                                                                                           strict=True)]
            return k
        weights = [s.weight or 0.0 for s in plan.specs]
        total = plan.mix_rows if plan.mix_rows is not None else sum(a for a, w in zip(avail, weights, strict=True)
                                                                    if w)
        for s, w, a in zip(plan.specs, weights, avail, strict=True):  # the whole mixture, before any cut
            want = int(round(w / sum(weights) * total)) if w else 0
            if want > a and not s.repeat:
                raise ConfigError(
                    f"source {s.path!r} cannot meet its weight {s.weight}: {want:,} of {total:,} training rows "
                    f"wanted, it has {a:,} (after dedup, decontamination and max_rows). Set repeat: true on it to "
                    "repeat its rows, lower its weight, or set mix_rows (the total) lower.")
        cap = self._cap(total)
        if cap is not None:
            total = min(total, cap)
        return [int(round(w / sum(weights) * total)) if w else 0 for w in weights]

    def _cap(self, total: int) -> int | None:
        plan = self.plan
        caps = [c for c in (plan.max_train_rows,
                            int(plan.train_fraction * total) if plan.train_fraction is not None else None)
                if c is not None]
        return min(caps) if caps else None

    # ---- pass 2: the chosen rows, interleaved

    def chosen(self, s: int, ranks: SourceRanks, k: int) -> Iterator[Any]:
        """Tables of source s's first k rows in (copy, rank) order, each copy a pass over its spool."""
        import pyarrow as pa

        if k == 0 or ranks.n == 0:
            return
        full, part = divmod(k, ranks.n)
        for copy in range(full + (1 if part else 0)):
            limit = ranks.n if copy < full else part
            at = 0
            for batch in self.spool.batches(s):
                r = ranks.rank[at:at + batch.num_rows]
                at += batch.num_rows
                mask = (r >= 0) & (r < limit)
                if not mask.any():
                    continue
                table = pa.Table.from_batches([batch.filter(pa.array(mask))])
                if copy:
                    ids = [copy_id(i, copy) for i in table.column("id").to_pylist()]
                    table = table.set_column(table.schema.get_field_index("id"), "id", pa.array(ids, pa.string()))
                yield table

    def write(self, train: Any) -> Report:
        self.spool.close()
        n = len(self.plan.specs)
        ranks = [self.rank(s) for s in range(n)]
        k = self.targets(ranks)
        total = sum(k) or 1
        # Each step writes a slice of the source furthest behind its share, slices sized by the shares: every
        # STRIDE rows of the output hold the mixture.
        streams = {s: _slices(self.chosen(s, ranks[s], k[s]), max(1, round(STRIDE * k[s] / total)))
                   for s in range(n) if k[s]}
        emitted = dict.fromkeys(streams, 0)
        while streams:
            s = min(streams, key=lambda x: (emitted[x] / k[x], x))
            table = next(streams[s], None)
            if table is None:
                del streams[s]
                continue
            train.add(table)
            emitted[s] += table.num_rows
        return self._report(ranks, k)

    def _report(self, ranks: list[SourceRanks], k: list[int]) -> Report:
        before, after = sum(r.n for r in ranks), sum(k)
        rep = Report(before=before, after=after)
        for spec, r, kk in zip(self.plan.specs, ranks, k, strict=True):
            if spec.split == "eval":
                continue
            rep.sources.append({
                "source": spec.path, "weight": spec.weight, "max_rows": spec.max_rows, "repeat": spec.repeat,
                "rows_before": r.n, "rows_after": kk,
                "share_before": round(r.n / before, 6) if before else 0.0,
                "share_after": round(kk / after, 6) if after else 0.0})
        return rep


def _slices(tables: Iterator[Any], size: int) -> Iterator[Any]:
    for table in tables:
        for start in range(0, table.num_rows, size):
            yield table.slice(start, size)


@dataclass
class Inputs:
    """What prepare's run() learns about the sources before the attempt: each file's source (config index),
    and the guard suites (decontam.Guard), fetched and hashed as inputs."""

    source_of: dict[str, int]
    guards: list[Any] = field(default_factory=list)
    listing: bytes | None = None  # listing.py: the raw files, when the manifest records a digest of them


class TrainSet:
    """The hook in prepare's row loop: the writers RowOrder writes to (train rows spooled, eval rows indexed
    for the overlap check), and `finish`, which writes the training set and records what it did."""

    def __init__(self, config: Any, inputs: Inputs, writers: dict[str, Any], work: Path):
        from jobs.prepare import decontam

        specs = config.source_specs()
        self.plan = Plan(specs, config.seed, config.mix_rows, config.max_train_rows, config.train_fraction)
        self.train = writers["train"]
        self.overlap = None
        self.writers = dict(writers)
        if self.checks_overlap(config, inputs):
            self.overlap = decontam.Overlap(config.decontaminate, config.decontam_threshold, None,
                                            config.drop_examples)
            self.overlap.add_guards(inputs.guards)
            self.writers["eval"] = decontam.EvalTee(writers["eval"], self.overlap)
        self.spool = Spool(work, inputs.source_of, len(specs))
        self.writers["train"] = self.spool

    @staticmethod
    def checks_overlap(config: Any, inputs: Inputs | None) -> bool:
        """Whether training rows are checked against eval rows or guard prompts (decontam.py)."""
        if inputs is None or config.decontaminate == "off":
            return False
        return bool(config.effective_eval_fraction() > 0 or config.eval_size is not None or inputs.guards
                    or any(s.split == "eval" for s in config.source_specs()))

    @classmethod
    def maybe(cls, config: Any, inputs: Inputs | None, writers: dict[str, Any], work: Path) -> TrainSet | None:
        """None when the training rows can go straight to their shards (nothing shapes or filters them)."""
        if inputs is None:
            return None
        ts = cls(config, inputs, writers, work)
        return ts if ts.overlap is not None or ts.plan.shaping else None

    def finish(self, tally: Any) -> None:
        if self.overlap is not None:
            self.overlap.tally = tally
        report = Mixer(self.plan, self.spool, self.overlap).write(self.train)
        if self.plan.shaping:
            tally.sections["mixing"] = report.as_stats(self.plan)
            for src in report.sources:
                LOG.info("source %s: %d training rows before, %d after (share %.3f -> %.3f)", src["source"],
                         src["rows_before"], src["rows_after"], src["share_before"], src["share_after"])
        if self.overlap is not None:
            tally.sections["decontamination"] = self.overlap.stats()
            if self.overlap.removed:
                LOG.info("removed %d training rows that near-duplicate eval rows or guard prompts (%s)",
                         sum(self.overlap.removed.values()),
                         ", ".join(f"{k}: {v}" for k, v in self.overlap.removed.items()))


def describe(stats: dict[str, Any]) -> list[tuple[str, str]]:
    """(label, value) lines for `ftjobs inspect`: the mixture, decontamination and document windows."""
    out = []
    mix = stats.get("mixing")
    if mix:
        cut = [f"{k} {mix[k]}" for k in ("max_train_rows", "train_fraction", "mix_rows") if mix.get(k) is not None]
        out.append(("training rows", f"{mix['train_rows_before']:,} -> {mix['train_rows_after']:,}"
                    + (f" ({', '.join(cut)})" if cut else "")))
        for s in mix["sources"]:
            extra = "".join(f", {k} {s[k]}" for k in ("weight", "max_rows") if s.get(k) is not None)
            out.append((f"source {s['source']}", f"{s['rows_before']:,} -> {s['rows_after']:,} rows, share "
                        f"{s['share_before']:.1%} -> {s['share_after']:.1%}{extra}{', repeat' if s['repeat'] else ''}"))
    dec = stats.get("decontamination")
    if dec:
        by = ", ".join(f"{k}: {v:,}" for k, v in dec["removed_by"].items())
        out.append(("decontamination", f"{dec['removed']:,} training rows removed ({dec['mode']}, threshold "
                    f"{dec['threshold']}; {dec['eval_rows']:,} eval rows, {dec['guard_prompts']:,} guard prompts"
                    + (f"; {by}" if by else "") + ")"))
    win = stats.get("windows")
    if win:
        out.append(("documents", f"{win['documents']:,} split into {win['windows']:,} windows (max "
                    f"{win['max_per_document']:,} per document), stride {win['stride']}"))
    return out
