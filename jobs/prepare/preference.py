"""Preference data in prepare: the layouts users have, read into canonical pairs, validated, split by prompt,
tokenized (common.preference.encode_pairs) and written as Parquet, with stats and a reason per dropped pair.

Prepare takes this path when the first record of its first source is a preference pair (`is_pair`); a file
that then holds a supervised row (or, on the supervised path, a preference pair) is refused with exit 3,
naming the file and line of the first row of the other kind.

The layouts are read by jobs/prepare/pref_layouts.py (docs/preference.md lists them).

Pairs are held in memory (preference sets are small next to SFT corpora); the split hashes the prompt (its
messages and tools), so every pair of one prompt lands on the same side, and duplicates are whole pairs.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common import chat, data, stage, storage
from common import manifest as mf
from common import preference as P
from common.errors import ConfigError, InputError
from jobs.prepare import rows as R
from jobs.prepare import sources as S
from jobs.prepare.pref_layouts import KTO_KEYS, is_kto, is_pair, kto_error, layout, layout_name, to_pair
from jobs.prepare.pref_layouts import Pair as Pair
from jobs.prepare.pref_layouts import keys as keys
from jobs.prepare.pref_layouts import validated as validated

LOG = logging.getLogger(__name__)

# Reasons a pair is dropped for, besides the row reasons of rows.REASONS, in the order the stats print them.
REASONS = ("identical_answers", "empty_completion", "no_prompt", "prompt_too_long", "template_error")
ENCODE_BATCH = 256
# Supervised prepare's settings that pairs do not use (fixed layout keys; answers always trained; no mixing,
# windows or near-duplicate decontamination: the split by prompt keeps a prompt on one side).
NOT_FOR_PAIRS = ("format", "columns", "train_on", "long_documents", "window_overlap", "last_window", "mix_rows",
                 "max_train_rows", "train_fraction", "decontaminate", "decontam_threshold", "guard_suites")


# --------------------------------------------------------------------------- the job's path for pairs


@dataclass
class Kept:
    pair: Pair
    id: str
    prompt_id: str
    source: str
    split: str
    line: int
    enc: P.EncodedPair | None = None


@dataclass
class Tally:
    rows_in: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    layouts: dict[str, str] = field(default_factory=dict)

    def drop(self, reason: str, source: str, line: int, detail: str, rec: Any, keep: int) -> None:
        self.dropped[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < keep:
            ex.append({"reason": reason, "source": source, "line": line, "detail": detail,
                       "row": json.dumps(rec, ensure_ascii=False, default=str)[:2000]})


def first_is_pair(files: list[S.RawFile], max_line_bytes: int) -> bool:
    """Whether the first readable record of the sources is a preference pair, or a KTO row this path refuses
    (prepare's switch to this path)."""
    for f in files:
        cols = S.table_columns(f)
        if cols is not None and (is_pair(cols) or not set(KTO_KEYS) <= set(cols)):
            return is_pair(cols)
        for _, rec in S.records(f, max_line_bytes=max_line_bytes):  # KTO's label is told by its value
            if isinstance(rec, dict):
                return is_pair(rec) or is_kto(rec)
    return False


def prepare(config: Any, files: list[S.RawFile], attempt: stage.Attempt, timings: dict[str, float]
            ) -> stage.Outcome:
    """Read -> pairs -> dedup -> split by prompt -> tokenize -> write; refuse when too much was dropped."""
    try:
        return _prepare(config, files, attempt, timings)
    except BaseException:
        for art in attempt.writer.artifacts:  # a refused run leaves no data behind
            storage.delete(art.uri)
        raise


def _prepare(config: Any, files: list[S.RawFile], attempt: stage.Attempt, timings: dict[str, float]
             ) -> stage.Outcome:
    t0 = time.monotonic()
    _check_settings(config)
    roles = {**R.DEFAULT_ROLES, **config.roles}
    tally = Tally()
    kept = _read(config, files, roles, tally)
    timings["read"] = time.monotonic() - t0
    _split(config, kept)
    model_info: dict[str, Any] = {}
    if config.tokenizer:
        t = time.monotonic()
        model_info = _tokenize(config, kept, tally)
        timings["tokenize"] = time.monotonic() - t
    n_dropped = sum(tally.dropped.values())
    fraction = n_dropped / tally.rows_in if tally.rows_in else 0.0
    out = [k for k in kept if k.enc is None or k.enc.drop_reason is None]
    if fraction > config.max_drop_fraction or not out:
        raise InputError(_too_many(tally, len(out), fraction, config.max_drop_fraction))
    if not any(k.split == "train" for k in out) and not all(s.split == "eval" for s in config.source_specs()):
        raise ConfigError(f"every one of the {len(out)} pairs went to eval (the split hashes prompts; with this "
                          "few prompts that can happen). Set eval_size, or lower eval_fraction.")
    t = time.monotonic()
    counts = _write(config, out, attempt.writer)
    stats = _stats(config, tally, out, counts, fraction)
    drops = "".join(json.dumps(e, ensure_ascii=False) + "\n" for r in (*R.REASONS, *REASONS)
                    for e in tally.examples.get(r, []))
    attempt.writer.add_bytes(drops.encode(), "drops.jsonl", name="drops", rows=drops.count("\n"))
    attempt.writer.add_bytes(storage.json_bytes(stats), "stats.json", name="stats")
    timings["write"] = time.monotonic() - t
    LOG.info("preference pairs in %d, out %d (train %d, eval %d), dropped %d%s", tally.rows_in, len(out),
             counts["train"], counts["eval"], n_dropped,
             "".join(f"\n  {r:<24} {n:>8,}" for r, n in tally.dropped.most_common()))
    return stage.Outcome(stats=stats, timings=timings, model=model_info, run_id=config.run_id)


def _check_settings(config: Any) -> None:
    """Refuse a source's mixing settings (pairs are not mixed: its max_rows would be ignored), and name in the
    log the supervised settings set that pairs do not use. Those are not refused: a pipeline's
    prepare-preference step inherits the SFT step's `prepare` section."""
    mixed = [f"{s.path} {k}" for s in config.source_specs() for k in ("weight", "max_rows", "repeat") if getattr(s, k)]
    if mixed:
        raise ConfigError(f"preference pairs are not mixed or subsampled: {', '.join(mixed)} would be ignored. Remove "
                          "it from the source, and cut the file to the pairs you want instead.")
    fields = type(config).model_fields
    ignored = []
    for k in NOT_FOR_PAIRS:
        value, default = getattr(config, k), fields[k].get_default(call_default_factory=True)
        if hasattr(value, "model_dump"):  # `columns`: the keys that were changed
            now, was = value.model_dump(), default.model_dump()
            ignored += [f"{k}.{c}={v}" for c, v in now.items() if v != was[c]]
        elif value != default:
            ignored.append(f"{k}={value}")
    if ignored:
        LOG.warning("settings that do not apply to preference pairs are ignored: %s (docs/preference.md)",
                    ", ".join(ignored))


def _read(config: Any, files: list[S.RawFile], roles: dict[str, str], tally: Tally) -> list[Kept]:
    seen_exact: set[int] = set()
    seen_norm: set[int] = set()
    kept: list[Kept] = []
    for f in files:
        split = f.split
        n_file = 0
        for line, rec in S.records(f, max_line_bytes=config.max_line_bytes):
            n_file += 1
            tally.rows_in += 1
            if isinstance(rec, S.Bad):
                if not config.skip_bad_lines:
                    raise InputError(f"{f.uri} line {line}: {rec.detail}. Fix the file, or set skip_bad_lines: "
                                     "true to drop such lines (they are counted in the manifest).")
                tally.drop(rec.reason, f.uri, line, rec.detail, rec.preview, config.drop_examples)
                continue
            assert isinstance(rec, dict)  # records come decoded here
            kind = layout(rec)
            if kind is None and is_kto(rec):
                raise InputError(kto_error(f.uri, f"line {line}"))
            if kind is None:
                raise InputError(f"{f.uri} line {line}: a supervised row ({', '.join(list(map(str, rec))[:6])}) "
                                 "among preference pairs (the sources start with a pair). A run holds one kind of "
                                 "data: prepare the supervised rows and the pairs separately.")
            tally.layouts.setdefault(f.uri, layout_name(rec))
            try:
                pair = to_pair(rec, roles, config.max_chars, config.max_messages)
            except R.Drop as d:
                if d.reason in R.FATAL and not config.skip_bad_lines:
                    raise InputError(f"{f.uri} line {line}: {d.detail}. Fix the file, or set skip_bad_lines: true "
                                     "to drop such rows (they are counted in the manifest).") from None
                tally.drop(d.reason, f.uri, line, d.detail, rec, config.drop_examples)
                continue
            pid, prompt_id, exact, norm = keys(pair)
            if config.dedup != "none":
                if exact in seen_exact or (config.dedup == "normalized" and norm in seen_norm):
                    reason = "duplicate_exact" if exact in seen_exact else "duplicate_normalized"
                    tally.drop(reason, f.uri, line, "the same pair came earlier", rec, config.drop_examples)
                    continue
                seen_exact.add(exact)
                seen_norm.add(norm)
            kept.append(Kept(pair, pid, prompt_id, f.uri, split, line))
        if n_file == 0 and not config.skip_bad_lines:
            raise InputError(f"{f.uri} holds no records (empty file). Remove it from the sources, or set "
                             "skip_bad_lines: true to skip empty files.")
    return kept


def _split(config: Any, kept: list[Kept]) -> None:
    """train/eval by the prompt's hash: every pair of one prompt on the same side."""
    auto = [k for k in kept if k.split == "auto"]
    if config.eval_size is not None:
        points = sorted({k.prompt_id: R.split_point(k.prompt_id, config.seed) for k in auto}.items(),
                        key=lambda kv: kv[1])
        per_prompt = Counter(k.prompt_id for k in auto)
        chosen: set[str] = set()
        n = 0
        for pid, _ in points:  # the lowest-hash prompts until eval holds eval_size pairs
            if n >= config.eval_size:
                break
            chosen.add(pid)
            n += per_prompt[pid]
        for k in auto:
            k.split = "eval" if k.prompt_id in chosen else "train"
        return
    fraction = config.effective_eval_fraction()
    for k in auto:
        k.split = "eval" if R.split_point(k.prompt_id, config.seed) < fraction else "train"


def load_tokenizer(source: str, override: str | None) -> tuple[Any, chat.ChatFormat, dict[str, Any]]:
    """The tokenizer, chat format and manifest model block for `source` (a model folder, s3:// prefix, HF id)."""
    from common import models
    from jobs.prepare.encode import load_tokenizer as load

    ref = models.resolve(source, tokenizer_only=True)
    try:
        tok = load(str(ref.path))
    except Exception as exc:
        raise InputError(f"Could not load a tokenizer from {source} ({type(exc).__name__}: {exc})") from None
    fmt = chat.chat_format(tok, override)
    info = {"tokenizer": chat.tokenizer_identity(tok), "tokenizer_source": source, "tokenizer_revision": ref.revision,
            "template_hash": fmt.hash, "chat_template": fmt.template}
    return tok, fmt, info


def _tokenize(config: Any, kept: list[Kept], tally: Tally) -> dict[str, Any]:
    tok, fmt, info = load_tokenizer(config.tokenizer, config.chat_template)
    info = mf.PrepareModel(**info, train_on="completion", max_length=config.max_length).model_dump(mode="json")
    for start in range(0, len(kept), ENCODE_BATCH):
        batch = kept[start:start + ENCODE_BATCH]
        encoded = P.encode_pairs(tok, fmt, [(k.pair.prompt, k.pair.chosen, k.pair.rejected, k.pair.tools)
                                            for k in batch], max_length=config.max_length,
                                   special_tokens=config.special_tokens_in_text)
        for k, e in zip(batch, encoded, strict=True):
            if e.drop_reason is None and e.truncated and config.on_too_long == "drop":
                e.drop_reason, e.detail = "too_long_tokens", f"{e.num_tokens} tokens > max_length {config.max_length}"
            k.enc = e
            if e.drop_reason is not None:
                tally.drop(e.drop_reason, k.source, k.line, e.detail,
                           {"prompt": k.pair.prompt, "chosen": k.pair.chosen, "rejected": k.pair.rejected},
                           config.drop_examples)
    LOG.info("tokenized pairs with %s (template sha256 %s, max_length %s)", config.tokenizer, fmt.hash[:12],
             config.max_length)
    return info


def _write(config: Any, out: list[Kept], writer: mf.ArtifactWriter) -> dict[str, int]:
    return write_pairs(out, writer, tokenized=bool(config.tokenizer), rows_per_shard=config.rows_per_shard,
                       row_group_rows=config.row_group_rows)


def write_pairs(out: list[Kept], writer: mf.ArtifactWriter, *, tokenized: bool, rows_per_shard: int = 100_000,
                row_group_rows: int = 8192) -> dict[str, int]:
    """Pairs as `<split>/part-NNNNN` Parquet shards (common.preference.schema); returns pairs per split."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = P.schema(tokenized)
    counts = {s: 0 for s in data.SPLITS}
    with tempfile.TemporaryDirectory(prefix="ftjobs-prepare-pairs-") as tmp:
        for split in data.SPLITS:
            rows = [k for k in out if k.split == split]
            counts[split] = len(rows)
            for shard, start in enumerate(range(0, len(rows), rows_per_shard)):
                part = rows[start:start + rows_per_shard]
                table = pa.Table.from_pylist([_row(k, split, tokenized) for k in part], schema=schema)
                local = Path(tmp) / f"{split}-{shard:05d}.parquet"
                pq.write_table(table, local, compression="zstd", row_group_size=row_group_rows)
                name = f"{split}/part-{shard:05d}"
                writer.add_file(local, f"data/{name}.parquet", name=name, rows=len(part))
    return counts


def _row(k: Kept, split: str, tokenized: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"id": k.id, "prompt_id": k.prompt_id, "prompt": k.pair.prompt, "chosen": k.pair.chosen,
                           "rejected": k.pair.rejected, "tools": data.tools_json(k.pair.tools), "split": split,
                           "source": k.source}
    if tokenized and k.enc is not None:
        e = k.enc
        row.update(prompt_ids=e.prompt_ids, chosen_ids=e.chosen_ids, chosen_labels=e.chosen_labels,
                   rejected_ids=e.rejected_ids, rejected_labels=e.rejected_labels, num_tokens=e.num_tokens,
                   truncated=e.truncated)
    return row


def _lengths(values: list[int]) -> dict[str, Any]:
    if not values:
        return {"count": 0}
    s = sorted(values)
    return {"count": len(s), "mean": round(sum(s) / len(s), 1), "min": s[0], "max": s[-1],
            "p50": s[len(s) // 2], "p95": s[min(len(s) - 1, int(0.95 * len(s)))]}


def _stats(config: Any, tally: Tally, out: list[Kept], counts: dict[str, int], fraction: float) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "kind": P.KIND, "rows_in": tally.rows_in, "rows_out": len(out), "pairs": len(out), **counts,
        "splits": dict(counts), "prompts": {s: len({k.prompt_id for k in out if k.split == s}) for s in data.SPLITS},
        "dropped": {r: tally.dropped[r] for r in (*R.REASONS, *REASONS) if tally.dropped[r]},
        "drop_fraction": round(fraction, 6), "layouts": dict(tally.layouts),
        "truncated": sum(1 for k in out if k.enc is not None and k.enc.truncated),
        "eval_fraction": config.effective_eval_fraction() if config.eval_size is None else None,
    }
    encs = [k.enc for k in out if k.enc is not None]
    if encs:
        stats["tokens"] = {"prompt": _lengths([len(e.prompt_ids) for e in encs]),
                           "chosen": _lengths([len(e.chosen_ids) for e in encs]),
                           "rejected": _lengths([len(e.rejected_ids) for e in encs]),
                           "truncated_pairs": stats["truncated"]}
    return stats


def _too_many(tally: Tally, kept: int, fraction: float, limit: float) -> str:
    return R.drop_table(tally.dropped, tally.examples, tally.rows_in, kept, fraction, limit, "preference pairs",
                        "Fix the data, or raise max_drop_fraction if these drops are expected.")
