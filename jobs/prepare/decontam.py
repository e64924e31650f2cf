"""Train and eval kept apart: training rows that near-duplicate a held-out row, or a prompt of a guard suite
the run names, are removed from training and counted (drop reason `eval_overlap`).

The comparison is common.neardup's (synth uses the same): Jaccard similarity of character 5-grams of the
normalized text, candidates from MinHash LSH, every hit verified exactly, so a removal is always a real
near-duplicate at or above `decontam_threshold` (default 0.8). Exact duplicates are near-duplicates with
similarity 1.

- Eval rows: a training row's whole text (every message's content, in order) against each eval row's.
- Guard suites (`guard_suites`: JSON Lines files of prompts, e.g. the prompts a benchmark or an evaluate
  suite asks): a training row's user text against each prompt. A guard line gives its prompt as `prompt`
  (a string), `messages` (its user messages' content) or `text`.

Only training rows are removed: the eval set and guard suites are what the score is about. The cost is one
MinHash signature per row (about 0.3-1 ms for a few hundred characters). The tokenizer workers compute it
for every kept row (batch.Rules.signatures: a `minhash` column, which the writers drop), in parallel with
the tokenizing, so the check in the job's process only looks up the signature's bands, and reads a row's
text only when a band matches. (It was computed after the fact in the job's process, on one core: a 20k-row
prepare went from 47 s to 73 s.) Guard suites check the user text, a second signature, still computed here
when a run names guards. `decontaminate: exact` (exact text after normalization, a hash per row) or `off`
are there for large sets.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import data, neardup, storage
from common import manifest as mf
from common.errors import InputError

LOG = logging.getLogger(__name__)
REASON = "eval_overlap"
SIGNATURE = "minhash"  # the column of the workers' tables holding each row's neardup.text_signature


@dataclass
class Guard:
    uri: str
    local: Path
    sha256: str

    def ref(self) -> mf.InputRef:
        return mf.InputRef(uri=self.uri, sha256=self.sha256, stage=None, role="guard")


def fetch_guards(uris: list[str], work: Path) -> list[Guard]:
    """The guard suites, local and hashed (they are inputs of the run: a changed suite is a new run)."""
    out = []
    for i, uri in enumerate(uris):
        if storage.is_s3(uri):
            t = storage.download_file(uri, work / f"guard-{i:03d}.jsonl")
            out.append(Guard(uri, Path(t.path), t.sha256))
        else:
            p = storage.local_path(uri).expanduser()
            if not p.is_file():
                raise InputError(f"guard suite {uri} does not exist (guard_suites lists JSON Lines files of prompts)")
            out.append(Guard(str(p.resolve()), p, storage.sha256_file(p)))
    return out


def signatures(rows: list[list[dict[str, Any]]]) -> Any:
    """The `minhash` column for rows' messages (in a tokenizer worker)."""
    import pyarrow as pa

    return pa.array([neardup.text_signature(row_text(m)) for m in rows],
                    type=pa.binary(4 * neardup.PERMUTATIONS))


def row_text(messages: list[dict[str, Any]], roles: tuple[str, ...] | None = None) -> str:
    return "\n".join(m.get("content") or "" for m in messages if roles is None or m.get("role") in roles)


def _prompt(obj: Any, where: str) -> str:
    if isinstance(obj, dict):
        if isinstance(obj.get("prompt"), str):
            return str(obj["prompt"])
        if isinstance(obj.get("messages"), list):
            return row_text([m for m in obj["messages"] if isinstance(m, dict)], ("user",))
        if isinstance(obj.get("text"), str):
            return str(obj["text"])
    raise InputError(f"{where}: a guard prompt is an object with `prompt` (text), `messages` or `text`; fix the "
                     "guard suite")


@dataclass
class Overlap:
    """Eval rows and guard prompts seen so far; `check` names the training rows to remove."""

    mode: str                      # near | exact
    threshold: float
    tally: Any                     # prepare's Tally: removals are drops
    keep: int                      # examples kept per reason
    eval_index: Any = None
    guard_index: Any = None
    eval_exact: set[bytes] = field(default_factory=set)
    guard_exact: set[bytes] = field(default_factory=set)
    removed: Counter[str] = field(default_factory=Counter)  # by what they overlapped: eval, or a guard file
    eval_rows: int = 0
    guard_prompts: int = 0

    def __post_init__(self) -> None:
        if self.mode == "near":
            self.eval_index = neardup.Index(self.threshold)
            self.guard_index = neardup.Index(self.threshold)

    def add_eval(self, table: Any) -> None:
        for row_id, msgs in zip(table.column("id").to_pylist(), table.column("messages").to_pylist(), strict=True):
            self._add(self.eval_index, self.eval_exact, f"eval:{row_id}", row_text(msgs))
            self.eval_rows += 1

    def add_guards(self, guards: list[Guard]) -> None:
        for g in guards:
            for line, obj in data.json_lines(g.local, g.uri, "guard suite"):
                self._add(self.guard_index, self.guard_exact, f"{g.uri}:{line}", _prompt(obj, f"{g.uri} line {line}"))
                self.guard_prompts += 1

    def _add(self, index: Any, exact: set[bytes], key: str, text: str) -> None:
        if index is not None:
            index.add(key, text)
        else:
            exact.add(_digest(text))

    def columns(self, names: list[str]) -> list[str]:
        """The spool's columns `check` reads: the signatures, when the workers computed them."""
        return ["id", "source", "messages"] + ([SIGNATURE] if SIGNATURE in names and self.mode == "near" else [])

    def check(self, batch: Any) -> list[int]:
        """Rows of a spooled batch (columns id, source, messages[, minhash]) to remove; each is counted as a drop."""
        out: list[int] = []
        column = batch.column(2)
        sigs = batch.column(3).to_pylist() if batch.num_columns > 3 else None
        guards = self.guard_index is not None and len(self.guard_index)
        if sigs is not None and not len(self.eval_index) and not guards:
            return out
        ids: list[str] = []
        sources: list[str] = []
        for k in range(batch.num_rows):
            msgs: Any = None
            if sigs is None:
                msgs = column[k].as_py()
                hit = self._hit(msgs)
            else:  # near mode, signatures from the workers: the text is read on a band match only
                hit = self.eval_index.nearest_signed(sigs[k], lambda k=k: row_text(column[k].as_py())) \
                    if len(self.eval_index) else None
                if hit is None and guards:
                    msgs = column[k].as_py()
                    hit = self.guard_index.nearest(row_text(msgs, ("user",)))
            if hit is None:
                continue
            if msgs is None:
                msgs = column[k].as_py()
            if not ids:
                ids, sources = batch.column(0).to_pylist(), batch.column(1).to_pylist()
            key, sim = hit
            what = "eval" if key.startswith("eval:") else key.rsplit(":", 1)[0]
            self.removed[what] += 1
            detail = (f"training row {ids[k][:12]} is a near-duplicate (Jaccard {sim:.2f} >= {self.threshold}) of "
                      + (f"eval row {key[5:17]}" if what == "eval" else f"guard prompt {key}"))
            self.tally.drop(REASON, sources[k], 0, detail, lambda m=msgs: row_text(m), self.keep)
            self.tally.per_source[sources[k]]["rows_out"] -= 1
            out.append(k)
        return out

    def _hit(self, msgs: list[dict[str, Any]]) -> tuple[str, float] | None:
        full = row_text(msgs)
        if self.mode == "exact":
            if _digest(full) in self.eval_exact:
                return "eval:", 1.0
            return ("guard:", 1.0) if self.guard_exact and _digest(row_text(msgs, ("user",))) in self.guard_exact \
                else None
        if len(self.eval_index):
            hit = self.eval_index.nearest(full)
            if hit is not None:
                return hit
        if len(self.guard_index):
            hit = self.guard_index.nearest(row_text(msgs, ("user",)))
            if hit is not None:
                return hit
        return None

    def stats(self) -> dict[str, Any]:
        return {"mode": self.mode, "threshold": self.threshold, "eval_rows": self.eval_rows,
                "guard_prompts": self.guard_prompts, "removed": sum(self.removed.values()),
                "removed_by": dict(self.removed)}


def _digest(text: str) -> bytes:
    return hashlib.blake2b(neardup.normalize(text).encode(), digest_size=16).digest()


class EvalTee:
    """The eval SplitWriter, with every eval row also indexed for the overlap check."""

    def __init__(self, writer: Any, overlap: Overlap):
        self.writer, self.overlap = writer, overlap

    def add(self, table: Any) -> None:
        self.overlap.add_eval(table)
        self.writer.add(table)

    @property
    def rows(self) -> int:
        return int(self.writer.rows)

    def close(self) -> None:
        self.writer.close()
