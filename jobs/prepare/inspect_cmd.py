"""`ftjobs inspect URI`: look at prepared rows exactly as the model will see them.

URI is a prepare manifest (or its prefix) or one Parquet file. A row's tool
schemas are listed under its header; a manifest's assistant turns are
counted by what decided their labels (trained, a weight of 0 in the data,
train_on) and the keys its sources held that nothing reads are named. For
tokenized rows the token ids are
decoded back to text (the tools as the template rendered them included); trained tokens (labels not -100)
are highlighted (green on a terminal, «guillemets» elsewhere), `--tokens`
shows token boundaries, and the length histogram follows. `--html FILE`
writes one self-contained page (no scripts, no external files).

    ftjobs inspect s3://ml/runs/r1/prepare --split train --rows 3 --tokens
    ftjobs inspect out/prepare --html rows.html
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

import click

from common.chat import IGNORE_INDEX as IGNORE
from common.errors import ConfigError, InputError
from jobs.prepare.mixing import describe

GREEN, DIM, RESET, UNDER = "\x1b[32m", "\x1b[2m", "\x1b[0m", "\x1b[4m"


def load_rows(uri: str, split: str, n: int, tmp: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str | None]:
    """The first n rows of a split, the manifest's stats, and its tokenizer source."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from common import data, storage
    from common import manifest as mf

    if uri.rstrip("/").endswith(".parquet"):
        local = storage.open_local(uri, tmp)
        if not local.is_file():
            raise InputError(f"{uri} does not exist; give a prepare manifest, its output prefix, or one of its "
                             "data/<split>/part-NNNNN.parquet files")
        try:
            pf = pq.ParquetFile(local)
            names = pf.schema_arrow.names
            missing = [c for c in data.REQUIRED if c not in names]
            if all(c in names for c in PAIR_COLUMNS):  # a preference shard (docs/preference.md)
                missing = []
            if missing:
                raise InputError(f"{uri} is not a prepare shard (missing column{'s' * (len(missing) > 1)} "
                                 f"{', '.join(missing)}; columns: "
                                 f"{', '.join(names[:20])}). Inspect what `ftjobs prepare` wrote: its manifest, "
                                 "its output prefix, or one of its data/<split>/part-NNNNN.parquet files.")
            table = pf.read_row_groups([0]) if pf.num_row_groups else None
            rows = table.slice(0, n).to_pylist() if table is not None else []
            lengths = pq.read_table(local, columns=["num_tokens"]).column(0).to_pylist() \
                if "num_tokens" in names else []
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{uri}: not a readable Parquet file ({exc}). Is it truncated, or not Parquet at all? "
                             "Re-create it, or inspect the prepare manifest it came from.") from None
        return rows, {"tokens": _histogram(lengths)} if lengths else {}, None
    loaded = mf.load(uri, expect_stage="prepare")
    arts = data.split_artifacts(loaded, split)
    if not arts:
        have = sorted({a.name.split("/")[0] for a in loaded.manifest.artifacts_named("") if "/part-" in a.name})
        raise InputError(f"{loaded.uri} has no {split!r} split (has: {', '.join(have) or 'none'}); use --split")
    rows = []
    for i, art in enumerate(arts):
        local = mf.fetch_artifact(loaded, art, tmp / f"{i:05d}.parquet")
        pf = pq.ParquetFile(local)
        for batch in pf.iter_batches(batch_size=max(n, 1)):
            rows += batch.to_pylist()[: n - len(rows)]
            break
        if len(rows) >= n:
            break
    # The manifest's token statistics cover every split; say so rather than read every shard of this one.
    return rows, {**loaded.manifest.stats, "scope": "all splits"}, loaded.manifest.model.get("tokenizer_source")


# What marks a preference pair row (common.preference.schema); inspect shows each pair as its two sequences.
PAIR_COLUMNS = ("id", "prompt", "chosen", "rejected", "split", "source")


def pair_views(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Preference rows as the two sequences train sees (prompt + chosen, prompt + rejected), each shown like a
    supervised row with its `answer` named; supervised rows as they are."""
    from common.preference import conversation

    out = []
    for row in rows:
        if not all(c in row for c in PAIR_COLUMNS):
            out.append(row)
            continue
        for side in ("chosen", "rejected"):
            view = {k: row.get(k) for k in ("id", "split", "source", "tools")}
            view |= {"answer": side, "messages": conversation(row["prompt"], row[side])}
            if row.get("prompt_ids") is not None:
                labels = [IGNORE] * len(row["prompt_ids"]) + row[f"{side}_labels"]
                view |= {"input_ids": row["prompt_ids"] + row[f"{side}_ids"], "labels": labels,
                         "num_tokens": len(labels), "num_trainable": sum(x != IGNORE for x in labels)}
            out.append(view)
    return out


def _histogram(lengths: list[int]) -> dict[str, Any]:
    import numpy as np

    from jobs.prepare.tally import histogram

    return {"rows": len(lengths), "max": max(lengths), "histogram": histogram(np.asarray(lengths))}


def token_pieces(tokenizer: Any, ids: list[int]) -> list[str]:
    """Each token's text, so that the pieces join to the decoded sequence.

    Decoding a token alone breaks multi-byte characters and leading spaces, so
    each piece is the difference of two decodes over a few tokens of context;
    a token that ends inside a character gets "" and the next one carries it.
    """
    def dec(x: list[int]) -> str:
        return str(tokenizer.decode(x, skip_special_tokens=False, clean_up_tokenization_spaces=False))

    out: list[str] = []
    start = 0
    for i in range(len(ids)):
        ctx = max(0, start - 4)
        before = dec(ids[ctx:start])
        through = dec(ids[ctx: i + 1])
        if through.endswith("\ufffd") and i + 1 < len(ids) and i - start < 4:
            out.append("")
            continue
        out.append(through[len(before):] if through.startswith(before) else dec(ids[start: i + 1]))
        start = i + 1
    return out


def segments(row: dict[str, Any], tokenizer: Any) -> list[tuple[str, bool, int | None]]:
    """(text, trained, token id) per token; untokenized rows give one segment per message."""
    ids = row.get("input_ids")
    if ids is None or tokenizer is None:
        from common.chat import turn_rules

        out: list[tuple[str, bool, int | None]] = []
        rules = iter(turn_rules(row["messages"], "assistant"))  # untokenized: train applies its own train_on
        for m in row["messages"]:
            weight = f" weight={m['weight']}" if m.get("weight") is not None else ""
            out.append((f"[{m['role']}{weight}]\n", False, None))
            trained = m["role"] == "assistant" and next(rules) == "trained"
            if m.get("reasoning_content"):
                out.append((f"<think>{m['reasoning_content']}</think>\n", trained, None))
            out.append((m["content"] + "\n", trained, None))
            for call in m.get("tool_calls") or []:
                out.append((f"call {call['function']['name']}({call['function']['arguments']})\n", trained, None))
        return out
    labels = row.get("labels") or [IGNORE] * len(ids)
    return [(p, lab != IGNORE, t) for p, lab, t in zip(token_pieces(tokenizer, ids), labels, ids, strict=True)]


# What row text must not send to a terminal: C0 controls but newline and tab (ESC starts colour, cursor and
# title sequences; CR and BS overwrite what was shown), DEL, C1 controls (0x9b is a one-byte CSI) and the
# bidirectional overrides that make text read other than it is.
_UNSAFE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def terminal_safe(text: Any) -> str:
    """Row text for a terminal: every control character shown as a visible escape (`\\x1b`), never obeyed."""
    return _UNSAFE.sub(lambda m: f"\\x{ord(m[0]):02x}" if ord(m[0]) < 0x100 else f"\\u{ord(m[0]):04x}",
                       "" if text is None else str(text))


def render_text(row: dict[str, Any], segs: list[tuple[str, bool, int | None]], *, tokens: bool, color: bool) -> str:
    """One row for the terminal; its text made terminal_safe before any colour of ours is added."""
    head = terminal_safe(f"── row {row.get('id', '')[:12]}  split={row.get('split')}  source={row.get('source')}")
    if row.get("answer"):
        head += f"  answer={row['answer']}"
    if row.get("num_tokens") is not None:
        head += f"  tokens={row['num_tokens']} trainable={row['num_trainable']}"
    out = [head, *tool_lines(row), ""]
    body = []
    prev_trained = False
    for i, (text, trained, _) in enumerate(segs):
        text = terminal_safe(text)
        shown = text.replace("\n", "↵\n") if tokens else text
        if color:
            style = GREEN if trained else DIM
            if tokens and i % 2:
                style += UNDER
            body.append(f"{style}{shown}{RESET}")
        else:
            if trained and not prev_trained:
                body.append("«")
            if not trained and prev_trained:
                body.append("»")
            body.append(shown + ("│" if tokens else ""))
        prev_trained = trained
    if prev_trained and not color:
        body.append("»")
    out.append("".join(body))
    return "\n".join(out)


def tool_lines(row: dict[str, Any]) -> list[str]:
    """One line per tool schema the row offers: name, parameters and description."""
    from common.data import tools_of

    out = []
    for tool in tools_of(row.get("tools")) or []:
        fn = tool.get("function", {})
        params = ", ".join((fn.get("parameters") or {}).get("properties") or {})
        out.append(terminal_safe(f"   tool {fn.get('name')}({params})"
                                 + (f": {fn['description']}" if fn.get("description") else "")))
    return out


def count_lines(stats: dict[str, Any]) -> list[str]:
    """The manifest's turn counts and ignored keys, one line each (none for a lone Parquet file)."""
    out = []
    if stats.get("kind") == "preference":
        dropped = ", ".join(f"{k} {v:,}" for k, v in (stats.get("dropped") or {}).items()) or "none"
        out.append(f"preference pairs: {stats['pairs']:,} (train {stats['train']:,}, eval {stats['eval']:,}) of "
                   f"{stats['rows_in']:,} read; dropped: {dropped}; truncated: {stats.get('truncated', 0):,}")
        out += [f"layout of {src}: {name}" for src, name in (stats.get("layouts") or {}).items()]
    turns = stats.get("turns")
    if turns:
        out.append(f"assistant turns: {turns['trained']:,} trained, {turns['weight_0']:,} weight 0 (context only), "
                   f"{turns['train_on_excluded']:,} excluded by train_on")
    if stats.get("ignored_keys"):
        keys = stats["ignored_keys"].items()
        out.append("ignored keys: " + ", ".join(f"{k} ({n:,} row{'s' * (n != 1)})" for k, n in keys))
    return out + [f"{label}: {value}" for label, value in describe(stats)]


def render_histogram(stats: dict[str, Any], width: int = 40) -> str:
    tok = stats.get("tokens") or {}
    hist = tok.get("histogram")
    if not hist:
        return ""
    counts, edges = hist["counts"], hist["edges"]
    peak = max(counts) or 1
    scope = f", {stats['scope']}" if stats.get("scope") else ""
    lines = [f"token length histogram{scope}" + (f" (p50 {tok['percentiles']['p50']}, p95 {tok['percentiles']['p95']}, "
                                          f"max {tok['max']}, trainable ratio {tok.get('trainable_ratio')})"
                                          if "percentiles" in tok else "")]
    for lo, hi, c in zip(edges, edges[1:], counts, strict=False):
        lines.append(f"  {lo:>6}-{hi:<6} {'█' * round(width * c / peak):<{width}} {c:,}")
    return "\n".join(lines)


def render_html(title: str, rows: list[dict[str, Any]], all_segs: list[list[tuple[str, bool, int | None]]],
                stats: dict[str, Any]) -> str:
    """One self-contained page (jobs/prepare/templates/inspect.html.jinja); every value is escaped."""
    import jinja2

    hist = (stats.get("tokens") or {}).get("histogram")
    bins = []
    if hist:
        peak = max(hist["counts"]) or 1
        bins = [(lo, hi, c, round(400 * c / peak))
                for lo, hi, c in zip(hist["edges"], hist["edges"][1:], hist["counts"], strict=False)]
    shown = []
    for row, segs in zip(rows, all_segs, strict=True):
        meta = f"id {row.get('id', '')[:16]} · split {row.get('split')} · source {row.get('source')}"
        if row.get("answer"):
            meta += f" · answer {row['answer']}"
        if row.get("num_tokens") is not None:
            meta += f" · {row['num_tokens']} tokens, {row['num_trainable']} trained"
        shown.append({"meta": meta, "segments": segs,
                      "tools": [t.strip().removeprefix("tool ") for t in tool_lines(row)]})
    env = jinja2.Environment(loader=jinja2.PackageLoader("jobs.prepare", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    counts: dict[str, Any] = {k: stats[k] for k in ("rows_in", "rows_out", "train", "eval", "truncated") if k in stats}
    for rule, label in (("trained", "trained"), ("weight_0", "weight 0 (context only)"),
                        ("train_on_excluded", "excluded by train_on")):
        if "turns" in stats:
            counts[f"assistant turns: {label}"] = stats["turns"][rule]
    counts |= {f"ignored key: {k}": n for k, n in (stats.get("ignored_keys") or {}).items()}
    counts |= dict(describe(stats))
    return env.get_template("inspect.html.jinja").render(
        title=title, rows=shown, bins=bins, dropped=stats.get("dropped") or {}, counts=counts)


def check_writable(path: str) -> None:
    """Refuse an --html path that cannot be written (a usage error: exit 2)."""
    from common import storage

    if storage.is_s3(path):
        raise ConfigError(f"--html {path}: the page is written to a local file; give a local path and copy it")
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"--html {path} is a folder; give a file name, e.g. {p / 'rows.html'}")
    if not p.parent.is_dir():
        raise ConfigError(f"--html {path}: the folder {p.parent} does not exist; create it or give another path")
    if not os.access(p.parent, os.W_OK) or (p.exists() and not os.access(p, os.W_OK)):
        raise ConfigError(f"--html {path}: not writable (permission denied or a read-only file system); "
                          "give a writable path")


@click.command("inspect")
@click.argument("uri")
@click.option("--split", default="train", show_default=True, help="Which split of a manifest to show.")
@click.option("--rows", "n", type=click.IntRange(min=0), default=3, show_default=True,
              help="How many rows (0: only the counts and the length histogram).")
@click.option("--tokens", is_flag=True, help="Show token boundaries.")
@click.option("--tokenizer", metavar="MODEL_SRC", help="Tokenizer to decode with (default: the manifest's).")
@click.option("--html", "html_file", metavar="FILE", help="Also write a self-contained HTML page here.")
@click.option("--color", type=click.Choice(["auto", "always", "never"]), default="auto", show_default=True)
def command(uri: str, split: str, n: int, tokens: bool, tokenizer: str | None, html_file: str | None,
            color: str) -> None:
    """Show prepared rows as the model sees them: trained tokens highlighted, plus the length histogram.

    URI is a prepare manifest, its output prefix, or one Parquet file.
    """
    if html_file:  # before any work, and before rows are printed that the failure would then follow
        check_writable(html_file)
    with tempfile.TemporaryDirectory(prefix="ftjobs-inspect-") as tmp:
        rows, stats, source = load_rows(uri, split, n, Path(tmp))
        rows = pair_views(rows)
        tok = None
        src = tokenizer or source
        if src and any(r.get("input_ids") is not None for r in rows):
            from common import models
            from jobs.prepare.encode import load_tokenizer

            tok = load_tokenizer(str(models.resolve(src, tokenizer_only=True).path))
        all_segs = [segments(r, tok) for r in rows]
    use_color = color == "always" or (color == "auto" and sys.stdout.isatty())
    if any(r.get("input_ids") is not None for r in rows) and tok is None:
        click.echo("(rows are tokenized but no tokenizer is known: pass --tokenizer to decode them)", err=True)
    for row, segs in zip(rows, all_segs, strict=True):
        click.echo(render_text(row, segs, tokens=tokens, color=use_color))
        click.echo()
    hist = render_histogram(stats)
    if hist:
        click.echo(hist)
    for line in count_lines(stats):
        click.echo(terminal_safe(line))  # ignored keys are the data's own names
    if html_file:
        try:
            Path(html_file).write_text(render_html(f"ftjobs inspect {uri} ({split})", rows, all_segs, stats),
                                       encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"--html {html_file}: cannot write it ({exc.strerror or exc}); give a writable path") \
                from None
        click.echo(f"wrote {html_file}", err=True)
