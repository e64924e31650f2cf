"""The prepare job: config, `run(config)`, and the `ftjobs prepare` command."""

from __future__ import annotations

import heapq
import json
import logging
import tempfile
import time
from array import array
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from common import chat, data, stage, storage
from common import config as cfg
from common import manifest as mf
from common.errors import ConfigError, InputError
from common.logs import Progress
from common.runner import config_options, execute
from jobs.prepare import batch as B
from jobs.prepare import decontam, keys, listing, mixing
from jobs.prepare import rows as R
from jobs.prepare import sources as S
from jobs.prepare import tally as T
from jobs.prepare import windows as W
from jobs.prepare.config import Columns, Config, Format, Source  # noqa: F401 (handed on by the package)
from jobs.prepare.pref_layouts import kto_error

STAGE = "prepare"
LOG = logging.getLogger(__name__)


# --------------------------------------------------------------------------- the job


def run(config: Config) -> mf.Loaded:
    t_start = time.monotonic()
    timings: dict[str, float] = {}
    output = storage.normalize(config.output)
    with tempfile.TemporaryDirectory(prefix="ftjobs-prepare-") as tmp:
        work = Path(tmp)
        # What the inputs are: expand sources, fetch S3 objects, hash everything. Their bytes are the run's
        # identity beside the config, so this comes before the "already done" check.
        files: list[S.RawFile] = []
        shape = mixing.Inputs(source_of={})
        for k, spec in enumerate(config.source_specs()):
            expanded = S.expand(spec.path, spec.split, spec.format)
            shape.source_of.update({f.uri: k for f in expanded})
            files += expanded
        S.fetch(files, work)
        shape.guards = decontam.fetch_guards(config.guard_suites, work)
        timings["fetch_and_hash_inputs"] = time.monotonic() - t_start
        inputs, shape.listing = listing.refs(files, shape.source_of, config.source_specs())
        inputs += [g.ref() for g in shape.guards]
        identity = stage.Identity(STAGE, output, cfg.dump(config), inputs)
        result = stage.run(identity, lambda attempt: _prepare(config, files, work, attempt, timings, shape))
    assert isinstance(result, mf.Loaded)  # prepare has no partial attempts
    return result


def _prepare(config: Config, files: list[S.RawFile], work: Path, attempt: stage.Attempt,
             timings: dict[str, float], shape: mixing.Inputs | None = None) -> stage.Outcome:
    """Read -> normalize -> validate -> dedup -> tokenize -> split -> write; refuse when too much was dropped."""
    from jobs.prepare import preference
    from jobs.prepare.encode import Encoder

    if preference.first_is_pair(files, config.max_line_bytes):  # preference pairs: their own path
        return preference.prepare(config, files, attempt, timings)

    rules = B.Rules(columns=config.columns.model_dump(), roles={**R.DEFAULT_ROLES, **config.roles},
                    max_chars=config.max_chars, dedup=config.dedup, seed=config.seed, train_on=config.train_on,
                    max_length=config.max_length, on_too_long=config.on_too_long, max_messages=config.max_messages,
                    long_documents=config.long_documents, window_overlap=config.window_overlap,
                    last_window=config.last_window, special_tokens_in_text=config.special_tokens_in_text,
                    signatures=config.decontaminate == "near" and mixing.TrainSet.checks_overlap(config, shape))
    model_info: dict[str, Any] = {}
    if config.tokenizer:
        encoder, model_info = _tokenizer(config, rules)
    else:
        encoder = Encoder(None, None, None, rules, workers=1)
    writer = attempt.writer
    if shape is not None and shape.listing is not None:  # many raw files: their list, digested in the manifest
        writer.add_bytes(shape.listing, "inputs.jsonl", name="inputs", rows=shape.listing.count(b"\n"))
    try:
        tally, split_counts, lengths, trainable = _process(config, files, encoder, writer, work, timings, shape)
    except BaseException:
        _remove(writer)
        raise
    finally:
        encoder.close()

    # Loud statistics; nothing is published when too much was dropped.
    rows_out = sum(split_counts.values())
    # Rows removed because they near-duplicate a held-out row are protection, not bad data: they are counted
    # and reported (eval_overlap), but do not count against max_drop_fraction, which guards against broken
    # files and mappings. Templated data can overlap its own eval split heavily; say so loudly instead.
    overlap = tally.dropped.get(decontam.REASON, 0)
    n_dropped = sum(tally.dropped.values()) - overlap
    drop_fraction = n_dropped / tally.rows_in if tally.rows_in else 0.0
    if overlap and tally.rows_in and overlap / tally.rows_in > config.max_drop_fraction:
        LOG.warning("%d of %d rows (%.1f%%) were removed from training as near-duplicates of held-out rows "
                    "(eval_overlap): the eval split says little about unseen data here; raise "
                    "decontam_threshold or set decontaminate: exact if the rows are templated on purpose",
                    overlap, tally.rows_in, 100 * overlap / tally.rows_in)
    if drop_fraction > config.max_drop_fraction or rows_out == 0:
        _remove(writer)
        raise InputError(T.too_many_drops(tally, rows_out, drop_fraction, config.max_drop_fraction))
    if split_counts["train"] == 0:
        if all(s.split == "eval" for s in config.source_specs()):
            LOG.info("every source is marked split: eval: publishing an eval set only (%d rows, no train rows)",
                     split_counts["eval"])
        else:
            _remove(writer)
            raise T.no_train(config, tally, rows_out)
    stats = T.stats_section(config, tally, split_counts, lengths, trainable, rows_out, drop_fraction)
    if tally.named and model_info and not chat.features(model_info["chat_template"]).names:
        LOG.warning("%d messages carry a participant's name, which this chat template never reads: the names are "
                    "kept in the rows but are not in the training text", tally.named)
    drops = "".join(json.dumps(e, ensure_ascii=False) + "\n" for r in R.REASONS for e in tally.examples.get(r, []))
    writer.add_bytes(drops.encode(), "drops.jsonl", name="drops", rows=drops.count("\n"))
    writer.add_bytes(storage.json_bytes(stats), "stats.json", name="stats")
    T.log_summary(tally, stats)
    timings["total"] = time.monotonic() - attempt.started + timings["fetch_and_hash_inputs"]
    if shape is not None and shape.listing is not None:
        stats = listing.compact(stats, shape.source_of, config.source_specs())
    return stage.Outcome(stats=stats, timings=timings, model=model_info, run_id=config.run_id)


def _tokenizer(config: Config, rules: B.Rules) -> tuple[Any, dict[str, Any]]:
    from common import models
    from jobs.prepare.encode import Encoder, default_workers, load_tokenizer

    assert config.tokenizer
    ref = models.resolve(config.tokenizer, tokenizer_only=True)
    try:
        tok = load_tokenizer(str(ref.path))
    except Exception as exc:
        raise InputError(f"Could not load a tokenizer from {config.tokenizer} ({type(exc).__name__}: {exc})") from None
    if not getattr(tok, "is_fast", False):
        raise ConfigError(f"The tokenizer at {config.tokenizer} is not a fast (Rust) tokenizer; ftjobs needs token "
                          "offsets to build loss masks. Provide tokenizer.json.")
    fmt = chat.chat_format(tok, config.chat_template)
    chat.render(fmt, [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}])  # compiles or fails
    encoder = Encoder(tok, str(ref.path), fmt, rules, workers=config.workers or default_workers())
    info = mf.PrepareModel(tokenizer=chat.tokenizer_identity(tok), tokenizer_source=config.tokenizer,
                           tokenizer_revision=ref.revision, template_hash=fmt.hash, chat_template=fmt.template,
                           train_on=config.train_on, max_length=config.max_length).model_dump(mode="json")
    LOG.info("tokenizing with %s (template sha256 %s, train_on=%s, max_length=%s)", config.tokenizer,
             fmt.hash[:12], config.train_on, config.max_length)
    return encoder, info


def _process(config: Config, files: list[S.RawFile], encoder: Any, writer: mf.ArtifactWriter, work: Path,
             timings: dict[str, float], shape: mixing.Inputs | None = None
             ) -> tuple[T.Tally, dict[str, int], array[int], int]:
    """Read every file into batches for the encoder (batch.process), then, batch by batch in row order, decide
    what the order of the rows decides: errors, duplicates, repeats' ids, the split; and write (the training
    rows through mixing.TrainSet when something shapes or filters them)."""
    t0 = time.monotonic()
    writers = {s: T.SplitWriter(s, encoder.encode is not None, writer, work, config) for s in data.SPLITS}
    train_set = mixing.TrainSet.maybe(config, shape, writers, work)
    order = RowOrder(config, encoder, train_set.writers if train_set else writers)
    progress = Progress("prepare", unit="rows")
    total_bytes, done_bytes = sum(f.size for f in files) or 1, 0
    for f in files:
        order.read_file(f, progress, done_bytes, total_bytes)
        done_bytes += f.size
    encoder.drain(order.finish)
    order.close_eval()
    if order.windows:
        order.tally.sections["windows"] = W.stats(order.windows, config.window_overlap, config.max_length,
                                                  config.last_window)
    if train_set is not None:
        train_set.finish(order.tally)
    progress.done = order.tally.rows_in
    progress.close()
    timings["process"] = time.monotonic() - t0
    t = time.monotonic()
    for w in writers.values():
        w.close()
    timings["write_last_shards"] = time.monotonic() - t
    return order.tally, {s: w.rows for s, w in writers.items()}, order.lengths, order.trainable


@dataclass
class _Batch:
    """One finished chunk on its way to the split writers: its table and which of its rows go where."""

    table: Any
    kept: int = -1  # the row of `table` of the latest KEPT verdict
    out: dict[str, list[int]] = field(default_factory=lambda: {"train": [], "eval": []})  # rows, in order
    renamed: dict[int, str] = field(default_factory=dict)  # rows whose id a repeat changes

    def apply_renames(self) -> None:
        if self.renamed:
            self.table = _renamed(self.table, self.renamed)
            self.renamed.clear()

    def flush(self, writers: dict[str, T.SplitWriter]) -> None:
        for name, rows in self.out.items():
            if rows:
                writers[name].add(_take(self.table, rows))
                rows.clear()


class RowOrder:
    """What prepare decides in row order, in the job's process, as the workers' batches come back:
    errors and drops (named and counted), duplicates, the ids of repeated rows, and the split."""

    def __init__(self, config: Config, encoder: Any, writers: dict[str, T.SplitWriter]) -> None:
        self.config, self.encoder, self.writers = config, encoder, writers
        self.columns = config.columns.model_dump()
        self.tally = T.Tally()
        self.tokenized = encoder.encode is not None
        self.seen_exact, self.seen_norm = keys.KeySet(), keys.KeySet()  # 8 bytes a row, not ~90 (keys.py)
        self.repeats = keys.Repeats()
        self.windows: Counter[int] = Counter()  # documents cut into windows, by their number of windows
        self.lengths: array[int] = array("l")
        self.trainable = 0
        self.fraction = config.effective_eval_fraction()
        self.eval_heap: list[tuple[float, int, Any]] = []  # max-heap by -point: the eval_size lowest, 1-row tables
        self.seq = 0
        # An explicitly mapped tools column that a file never has would drop every row's tools without a word.
        self.tools_mapped = "tools" in config.columns.model_fields_set

    # ---- reading: one file's records into batches for the workers

    def read_file(self, f: S.RawFile, progress: Progress, done_bytes: int, total_bytes: int) -> None:
        config, tally = self.config, self.tally
        tally.per_source.setdefault(f.uri, Counter())
        fmt: str | None = f.format or config.format
        if fmt == "auto":
            # None: no record to detect from. The file is empty, or (with skip_bad_lines) no line of it could
            # be read: every line is then counted as dropped, so max_drop_fraction sees them.
            fmt = _detect(f, self.columns, config)
        if fmt is not None:
            tally.formats[f.uri] = fmt
            _check_table_columns(f, fmt, self.columns)
        st = T.FileState(f, fmt)
        lines: list[int] = []
        items: list[Any] = []
        for line, rec in S.records(f, max_line_bytes=config.max_line_bytes, undecoded=True):
            st.rows += 1
            tally.rows_in += 1
            lines.append(line)
            items.append(rec)
            if len(items) >= config.batch_size:
                st.submitted += 1
                self.encoder.submit(fmt, items, T.Chunk(st, lines, items), self.finish)
                lines, items = [], []
                progress.total = _estimate(tally.rows_in, done_bytes, f, total_bytes)
                progress.update(config.batch_size, dropped=sum(tally.dropped.values()))
        tally.per_source[f.uri]["rows_in"] += st.rows
        if items:
            st.submitted += 1
            self.encoder.submit(fmt, items, T.Chunk(st, lines, items), self.finish)
        st.read = True
        if st.finished == st.submitted:
            self.end_of_file(st)

    def end_of_file(self, st: T.FileState) -> None:
        f, tally = st.file, self.tally
        if self.tools_mapped and st.rows and st.format is not None and not st.saw_tools:
            raise InputError(f"{f.uri}: no record has the tools column {self.columns['tools']!r} that columns.tools "
                             "names, so every row's tools would be dropped. Fix the mapping or the file.")
        if st.ignored:  # named once per file: neither silently dropped nor a reason to refuse the file
            LOG.warning("%s: keys that ftjobs does not read were ignored: %s", f.uri,
                        ", ".join(f"{k} ({n:,} row{'s' * (n != 1)})" for k, n in sorted(st.ignored.items())),
                        extra={"source": f.uri, "ignored_keys": dict(st.ignored)})
            tally.ignored.update(st.ignored)
        if st.rows == 0:
            tally.empty_files.append(f.uri)
            _empty(f, self.config)
        elif st.format is None:
            LOG.warning("%s: none of its %d lines could be read; all are counted as dropped", f.uri, st.rows,
                        extra={"source": f.uri})

    # ---- a batch back from the workers: every verdict in row order

    def finish(self, chunk: T.Chunk, result: tuple[list[tuple[Any, ...]], Any]) -> None:
        import pyarrow as pa

        verdicts, table = result
        st = chunk.state
        uri = st.file.uri
        b = _Batch(table.append_column("source", pa.array([uri] * table.num_rows, type=pa.string())))
        for i, v in enumerate(verdicts):
            if v[0] == B.KEPT:
                b.kept += max(len(v[11]), 1)  # a document cut into windows is that many rows
            occurrence = self._admit(chunk, i, v)
            if occurrence is not None:
                self._place(chunk, i, v, occurrence, b)
        b.apply_renames()
        b.flush(self.writers)
        st.finished += 1
        if st.read and st.finished == st.submitted:
            self.end_of_file(st)

    def _admit(self, chunk: T.Chunk, i: int, v: tuple[Any, ...]) -> int | None:
        """Errors, drops and duplicates: None when the row goes no further, else its repeat number."""
        config, tally, st = self.config, self.tally, chunk.state
        kind, line, uri, skip, keep = v[0], chunk.lines[i], st.file.uri, config.skip_bad_lines, config.drop_examples

        def preview() -> Any:
            return lambda: B.preview(B.record(chunk.items[i]))

        if kind == B.BAD:
            if not skip:
                raise InputError(f"{uri} line {line}: {v[2]}. Fix the file, or set skip_bad_lines: true to drop "
                                 "such lines (they are counted in the manifest).")
            tally.drop(v[1], uri, line, v[2], v[3], keep)
            return None
        if kind == B.PREFERENCE:  # whatever the format says: read as one, a pair loses an answer
            raise InputError(_preference(uri, f"line {line}") if v[1] == "pair" else kto_error(uri, f"line {line}"))
        if v[1]:
            st.ignored.update(v[1])
        st.saw_tools = st.saw_tools or v[2]
        if kind == B.DROP:
            reason, detail, fatal = v[3], v[4], v[5]
            if fatal and not skip:
                raise InputError(f"{uri} line {line}: {detail}. Fix the file, or set skip_bad_lines: true to drop "
                                 "such rows (they are counted in the manifest).")
            tally.drop(reason, uri, line, detail, preview(), keep)
            return None
        key = v[3]
        if config.dedup != "none":
            if key in self.seen_exact:
                tally.drop("duplicate_exact", uri, line, "an identical row came earlier", preview(), keep)
                return None
            self.seen_exact.add(key)
            if config.dedup == "normalized":
                if v[4] in self.seen_norm:
                    tally.drop("duplicate_normalized", uri, line,
                               "an earlier row differs only in case or whitespace", preview(), keep)
                    return None
                self.seen_norm.add(v[4])
        occurrence = 0
        if config.dedup == "none":  # identical rows are kept: number their repeats so ids stay unique
            occurrence = self.repeats.seen(key)
        if kind == B.TEMPLATE_ERROR:  # the template refused the row, or a turn of it cannot be located
            raise ConfigError(f"{uri} line {line}: {v[5]}")
        if kind == B.ENCODE_DROP:
            tally.drop(v[5], uri, line, v[6], v[7], keep)
            return None
        return occurrence

    def _place(self, chunk: T.Chunk, i: int, v: tuple[Any, ...], occurrence: int, b: _Batch) -> None:
        """A kept row: counted, its id renumbered if it repeats, and sent to its split."""
        config, tally, st = self.config, self.tally, chunk.state
        point, truncated, turns, named, n_tokens, n_trainable, parts = v[5:12]
        rows = list(range(b.kept - len(parts) + 1, b.kept + 1)) if parts else [b.kept]
        tally.per_source[st.file.uri]["rows_out"] += 1
        if occurrence:
            canon = B.normalize(B.record(chunk.items[i]), st.format or "", self.encoder.rules)[2]  # type: ignore[arg-type]
            doc_id = R.row_id(canon, occurrence)
            point = R.split_point(doc_id, config.seed)
            for k, row in enumerate(rows):
                b.renamed[row] = W.window_id(doc_id, k)
        if truncated:
            tally.truncated += 1
        if parts:
            self.windows[len(parts)] += 1
        if self.tokenized:
            self.lengths.extend(parts or (n_tokens,))
            self.trainable += n_trainable
        for rule, n in zip(chat.TURN_RULES, turns, strict=True):
            if n:
                tally.turns[rule] += n
        tally.named += named
        split = st.file.split
        if split != "auto":
            b.out[split] += rows
        elif config.eval_size is not None:
            self._eval_size_split(point, b, rows)
        else:
            b.out["eval" if point < self.fraction else "train"] += rows

    def _eval_size_split(self, point: float, b: _Batch, rows: list[int]) -> None:
        """eval_size: the rows with the lowest split points are held out, kept in a bounded heap until the end."""
        self.seq += 1
        heap, size = self.eval_heap, self.config.eval_size
        assert size is not None
        if len(heap) < size or point < -heap[0][0]:
            b.apply_renames()
            item = (-point, self.seq, _take(b.table, rows))
            if len(heap) < size:
                heapq.heappush(heap, item)
            else:
                b.flush(self.writers)  # rows before this one first: the row it displaces comes after them
                self.writers["train"].add(heapq.heapreplace(heap, item)[2])
        else:
            b.out["train"] += rows

    def close_eval(self) -> None:
        for _, _, row in sorted(self.eval_heap, key=lambda it: -it[0]):  # lowest split point first
            self.writers["eval"].add(row)


def _take(table: Any, rows: list[int]) -> Any:
    """Those rows of a table, in that order: a slice when they are one run (no copy)."""
    if rows[-1] - rows[0] == len(rows) - 1:
        return table.slice(rows[0], len(rows))
    import pyarrow as pa

    return table.take(pa.array(rows, type=pa.int64()))


def _renamed(table: Any, ids: dict[int, str]) -> Any:
    """The table with those rows' ids replaced."""
    import pyarrow as pa

    column = table.column("id").to_pylist()
    for row, new in ids.items():
        column[row] = new
    return table.set_column(table.schema.get_field_index("id"), "id", pa.array(column, type=pa.string()))


def _preference(uri: str, where: str) -> str:
    return (f"{uri} {where}: a preference pair (chosen / rejected, or preferred_output / non_preferred_output) "
            "among supervised rows (the sources start with a supervised row). A run holds one kind of data: "
            "prepare the pairs separately (docs/preference.md), or write them as supervised rows.")


def _estimate(rows_in: int, done_bytes: int, f: S.RawFile, total_bytes: int) -> int | None:
    """Rows expected in all, from the bytes read so far (for the progress ETA)."""
    read = done_bytes + f.pos
    return max(rows_in, int(rows_in * total_bytes / read)) if read else None


HINTS = {"jsonl": "is it UTF-8 JSON lines, one object per line?",
         "json": "is it UTF-8, a JSON array of objects or JSON lines?",
         "csv": "is it UTF-8 CSV with a header line?", "tsv": "is it UTF-8 TSV with a header line?"}


def _detect(f: S.RawFile, columns: dict[str, Any], config: Config) -> str | None:
    """Detect a file's format from its columns or first readable record.

    None when there is no record to detect from: an empty file, or one where no line can be read and
    skip_bad_lines is set. Without skip_bad_lines an unreadable file fails here, naming its first bad line.
    """
    cols = S.table_columns(f)
    where = "its columns"
    if cols is None:
        first_bad: tuple[int, S.Bad] | None = None
        for line, rec in S.records(f, max_line_bytes=config.max_line_bytes):
            if isinstance(rec, dict):
                cols, where = list(rec), f"line {line}"
                break
            assert isinstance(rec, S.Bad)  # records come decoded here
            first_bad = first_bad or (line, rec)
        else:
            if first_bad is not None and not config.skip_bad_lines:
                line, bad = first_bad
                raise InputError(
                    f"{f.uri} line {line}: {bad.detail} (no line of this file could be read: "
                    f"{HINTS.get(f.kind, 'is it in a supported format?')}). Fix the file, or set skip_bad_lines: "
                    "true to drop such lines (they are counted in the manifest).")
            return None
    if R.is_preference(cols):
        raise InputError(_preference(f.uri, where))
    fmt = R.detect(cols, columns)
    if fmt is None:
        raise InputError(
            f"{f.uri}: cannot detect the format from its fields ({', '.join(map(str, cols[:12]))}). Set format: "
            f"{'|'.join(R.FORMATS)} and map fields with columns: {{output: answer, ...}}.")
    LOG.info("%s: detected format %s", f.uri, fmt, extra={"source": f.uri, "format": fmt})
    return fmt


def _check_table_columns(f: S.RawFile, fmt: str, columns: dict[str, Any]) -> None:
    cols = S.table_columns(f)
    if cols is None:
        return
    if R.is_preference(cols):
        raise InputError(_preference(f.uri, "its columns"))
    missing = [c for c in R.required_columns(fmt, columns) if c not in cols]
    if missing:
        raise InputError(f"{f.uri} has no column {missing[0]!r} needed for format {fmt} (columns: "
                         f"{', '.join(cols[:20])}). Map it with columns: {{...: {missing[0]}}} or fix the file.")


def _empty(f: S.RawFile, config: Config) -> None:
    if f.manifest is not None:  # a synth run that kept nothing (min_rows: 0): its manifest said so
        LOG.warning("%s kept no examples (%s); nothing to read from it", f.manifest.uri, f.uri)
        return
    if not config.skip_bad_lines:
        raise InputError(f"{f.uri} holds no records (empty file). Remove it from the sources, or set "
                         "skip_bad_lines: true to skip empty files (they are listed in the manifest).")
    LOG.warning("%s holds no records; skipped", f.uri)


def _remove(writer: mf.ArtifactWriter) -> None:
    """Best effort: take back what this attempt uploaded (no manifest was written), so a refused run leaves
    no data behind; its attempt folder keeps only its record, and the next run at the prefix removes that."""
    for art in writer.artifacts:
        try:
            storage.delete(art.uri)
        except Exception:  # noqa: BLE001 - the original error matters more
            LOG.warning("could not remove %s after the failure", art.uri)


# --------------------------------------------------------------------------- CLI


def source_flag(value: str) -> str | dict[str, Any]:
    """A --source value: a path or URI, or a JSON object with per-source settings (what a pipeline's `data`
    mapping becomes): --source '{"path": "synth.jsonl", "weight": 0.25, "repeat": true}'."""
    if not value.lstrip().startswith("{"):
        return value
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise click.BadParameter(f"{value!r} starts like a JSON object but is not one ({e.msg} at column {e.colno}); "
                                 "give a path, or a JSON object such as '{\"path\": \"a.jsonl\", \"weight\": 0.5}'",
                                 param_hint="--source") from None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"{value!r}: expected a JSON object with a path", param_hint="--source")
    return parsed


@click.command("prepare")
@click.option("--source", "sources", multiple=True, metavar="PATH_OR_URI_OR_JSON",
              help="Raw data: file, folder, glob, s3:// object or prefix, hf://id; or a JSON object with per-source "
                   "settings ({\"path\": ..., \"weight\": ...}). Repeatable.")
@click.option("--format", "format_", type=click.Choice(["auto", *R.FORMATS]), default=None,
              help="Input format (default auto: detected per file).")
@click.option("--tokenizer", metavar="MODEL_SRC", help="Tokenize with this model's tokenizer (folder, s3://, HF id).")
@click.option("--output", metavar="URI", help="Output prefix (local path or s3://bucket/prefix).")
@config_options(example="eval_size=500")
def command(sources: tuple[str, ...], format_: str | None, tokenizer: str | None, output: str | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """Validate, split and tokenize raw data into Parquet shards plus a manifest.

    Exit 3 with a reason table when more rows are dropped than max_drop_fraction allows, or naming the
    file and line of a structurally broken file.
    """
    import sys

    flags = {"sources": [source_flag(s) for s in sources] or None, "format": format_, "tokenizer": tokenizer,
             "output": output}
    execute(sys.modules["jobs.prepare"], config_file, sets, flags)
