"""ftjobs try: a few prompts through several models, each one's answer side by side.

    ftjobs try --model demo/base-model --model runs/r1/merge --model models:/tickets \\
        --prompt "My invoice was charged twice" --prompt "The app crashes on login"
    ftjobs try --model models:/tickets/1 --model models:/tickets --prompts tickets.jsonl --html try.html

A model is anything infer takes: a merge manifest, a train manifest (its adapter on its base), `models:/NAME`
or `models:/NAME/VERSION` (resolved under --root), or a model source (Hugging Face id, folder). Each model is
prepared exactly as infer prepares it (files sha256-checked, the chat template recorded upstream, the same
engines from common/generate.py), so a greedy answer here is the answer infer writes. Adapters on the same
base are served by one engine (vLLM LoRA requests, or peft adapters switched in transformers).

Prompts: `--prompt TEXT` (repeatable, one user turn each), or `--prompts FILE`: a .jsonl/.parquet file with a
`prompt` or `messages` column, or a prepare manifest (its eval split), as infer reads them. Greedy by default
(`--temperature`). Prints a table on the terminal (one column per model), or writes a self-contained HTML page
with `--html`. Nothing is written to the store.
"""

from __future__ import annotations

import html
import logging
import shutil
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click

from common import manifest as mf
from common import models
from common.errors import ConfigError

STAGE = "try"
LOG = logging.getLogger(__name__)


@dataclass
class Contender:
    """One --model: what the user named, and the model infer would serve for it."""

    label: str
    model: dict[str, Any]  # infer's prepare_model result: path, adapter_dir, tokenizer, fmt
    answers: list[str]


def infer_config(src: str, *, engine: str, max_tokens: int, temperature: float, root: str | None) -> Any:
    """The infer config this model would run under (its engine, greedy sampling, the registry root)."""
    from jobs import infer

    try:
        return infer.Config(model=src, prompts="<ftjobs try>", output="<ftjobs try output>", engine=engine,
                            root=root, sampling={"temperature": temperature, "max_tokens": max_tokens, "seed": 0})
    except Exception as exc:  # pydantic's ValidationError: a bad value of ours is a usage error
        raise ConfigError(f"ftjobs try: {exc}") from None


def prepare(sources: list[str], configs: list[Any]) -> list[Contender]:
    """Each model's files, tokenizer and template, exactly as infer prepares them."""
    from jobs.infer.inputs import load_model_input, prepare_model, resolve_registered

    out = []
    cache = models.cache_root()
    for src, config in zip(sources, configs, strict=True):
        config = resolve_registered(config)
        model_in = load_model_input(config.model or "")
        adapter_in = mf.load(config.adapter, expect_stage="train") if config.adapter else None
        out.append(Contender(label=src, model=prepare_model(config, model_in, adapter_in, cache), answers=[]))
    return out


def as_adapter(src: str) -> str | None:
    """A train manifest given as --model: its adapter is served on its base."""
    from common import storage

    if models.looks_like_hf_id(src) or not storage.exists(mf.as_manifest_uri(src)):
        return None
    loaded = mf.load(src, verify="none")
    return loaded.uri if loaded.manifest.stage == "train" else None


def engines(contenders: list[Contender]) -> list[list[int]]:
    """Which contenders share an engine: adapters on the same base folder; every other model alone."""
    groups: dict[str, list[int]] = {}
    for i, c in enumerate(contenders):
        key = str(c.model["path"]) if c.model.get("adapter_dir") is not None else f"#{i}"
        groups.setdefault(key, []).append(i)
    return list(groups.values())


def answer(contenders: list[Contender], rows: list[dict[str, Any]], config: Any) -> None:
    """Generate every contender's answers, one engine per group."""
    from common import chat
    from common.generate import start

    for group in engines(contenders):
        first = contenders[group[0]].model
        served = dict(first)
        if first.get("adapter_dir") is not None:
            served["adapter_dirs"] = [contenders[i].model["adapter_dir"] for i in group]
        t0 = time.monotonic()
        generate, max_len, version, close = start(config.engine, config, served)
        try:
            for slot, i in enumerate(group):
                m = contenders[i].model
                ids = [chat.encode_prompt(m["tokenizer"], m["fmt"], r["prompt"], r["tools"]) for r in rows]
                too_long = [n for n, x in enumerate(ids) if len(x) >= max_len]
                live = [n for n in range(len(rows)) if n not in too_long]
                results = dict(zip(live, generate([ids[n] for n in live], adapter=slot), strict=True))
                contenders[i].answers = [results[n][0][0] if n in results else
                                         f"(prompt has {len(ids[n])} tokens; the model takes {max_len})"
                                         for n in range(len(rows))]
        finally:
            close()
        LOG.info("%s %s: %d model(s) in %.1fs", config.engine, version, len(group), time.monotonic() - t0)


def read_prompts(texts: tuple[str, ...], file: str | None, config: Any) -> list[dict[str, Any]]:
    from jobs.infer.inputs import Columns, load_prompts_input, load_rows, normalize_row

    if bool(texts) == bool(file):
        raise ConfigError("give --prompt TEXT (repeatable) or --prompts FILE, one of the two")
    if file:
        return load_rows(config, load_prompts_input(file))
    rows = [normalize_row(f"prompt-{i}", {"prompt": t}, Columns(), i, "--prompt") for i, t in enumerate(texts)]
    empty = [i for i, r in enumerate(rows) if r["error"]]
    if empty:
        raise ConfigError(f"--prompt number {empty[0] + 1} is empty: give the text to send")
    return rows


def prompt_text(row: dict[str, Any]) -> str:
    users = [m["content"] for m in row["prompt"] if m.get("role") == "user"]
    return users[-1] if users else "\n".join(m.get("content") or "" for m in row["prompt"])


def table(contenders: list[Contender], rows: list[dict[str, Any]], width: int) -> str:
    """A plain-text table: per prompt, one column per model, wrapped to the terminal's width."""
    cols = len(contenders)
    col = max(16, (width - 3 * (cols - 1)) // cols)
    rule = "-+-".join("-" * col for _ in range(cols))
    out = []
    for n, row in enumerate(rows):
        out.append(f"[{n + 1}] {prompt_text(row)}" + (f"   (reference: {row['reference']})"
                                                        if row.get("reference") else ""))
        out.append(" | ".join(c.label[-col:].ljust(col) for c in contenders))
        out.append(rule)
        wrapped = [textwrap.wrap(c.answers[n], col) or [""] for c in contenders]
        for line in range(max(len(w) for w in wrapped)):
            out.append(" | ".join((w[line] if line < len(w) else "").ljust(col) for w in wrapped).rstrip())
        out.append("")
    return "\n".join(out)


def page(contenders: list[Contender], rows: list[dict[str, Any]]) -> str:
    """A self-contained HTML page: one row per prompt, one column per model; every text escaped."""
    head = "".join(f"<th>{html.escape(c.label)}</th>" for c in contenders)
    body = []
    for n, row in enumerate(rows):
        ref = f"<br><small>reference: {html.escape(str(row['reference']))}</small>" if row.get("reference") else ""
        cells = "".join(f"<td><pre>{html.escape(c.answers[n])}</pre></td>" for c in contenders)
        body.append(f"<tr><td><pre>{html.escape(prompt_text(row))}</pre>{ref}</td>{cells}</tr>")
    return ("<!doctype html><html><head><meta charset='utf-8'><title>ftjobs try</title><style>"
            "body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:collapse}"
            "td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}"
            "pre{white-space:pre-wrap;margin:0}</style></head><body><h1>ftjobs try</h1>"
            f"<table><tr><th>prompt</th>{head}</tr>{''.join(body)}</table></body></html>\n")


def run(sources: tuple[str, ...], texts: tuple[str, ...], file: str | None, *, engine: str, max_tokens: int,
        temperature: float, root: str | None) -> tuple[list[Contender], list[dict[str, Any]]]:
    """Every model's answer to every prompt (what the command prints)."""
    if not sources:
        raise ConfigError("give at least one --model (a merge or train manifest, models:/NAME, or a model source)")
    plain = [as_adapter(s) for s in sources]
    configs = []
    for src, adapter in zip(sources, plain, strict=True):
        config = infer_config(src, engine=engine, max_tokens=max_tokens, temperature=temperature, root=root)
        if adapter is not None:  # a train manifest: its adapter on the base it was trained on
            base = mf.model_block(mf.load(adapter, verify="none")).base_model
            config = config.model_copy(update={"model": base, "adapter": adapter})
        configs.append(config)
    rows = read_prompts(texts, file, configs[0])
    contenders = prepare(list(sources), configs)
    answer(contenders, rows, configs[0])
    return contenders, rows


def default_engine() -> Literal["vllm", "transformers"]:
    """vLLM where a GPU is (its start pays off), transformers on CPU (it starts in seconds; same greedy text)."""
    from common.generate import on_gpu

    return "vllm" if on_gpu() else "transformers"


@click.command("try")
@click.option("--model", "sources", multiple=True, metavar="MODEL",
              help="Merge or train manifest, models:/NAME[/VERSION], or a model source. Repeatable: one column each.")
@click.option("--prompt", "texts", multiple=True, metavar="TEXT", help="A prompt (one user turn). Repeatable.")
@click.option("--prompts", "file", metavar="FILE", help="A .jsonl/.parquet prompts file, or a prepare manifest.")
@click.option("--html", "html_out", metavar="PATH", help="Write an HTML page here instead of printing a table.")
@click.option("--engine", type=click.Choice(["vllm", "transformers"]),
              help="Generation engine (default: vllm on a GPU, transformers on CPU).")
@click.option("--max-tokens", default=128, show_default=True, type=click.IntRange(1), help="Most new tokens.")
@click.option("--temperature", default=0.0, show_default=True, type=click.FloatRange(0.0),
              help="0 is greedy (what infer's evaluation runs use).")
@click.option("--root", envvar="FTJOBS_ROOT", help="Store root whose models/ resolves models:/ (default '.').")
def command(sources: tuple[str, ...], texts: tuple[str, ...], file: str | None, html_out: str | None,
            engine: str | None, max_tokens: int, temperature: float, root: str | None) -> None:
    """Each model's answer to each prompt, side by side (a terminal table, or --html)."""
    contenders, rows = run(sources, texts, file, engine=engine or default_engine(), max_tokens=max_tokens,
                           temperature=temperature, root=root)
    if html_out:
        Path(html_out).write_text(page(contenders, rows), encoding="utf-8")
        click.echo(html_out)
        return
    click.echo(table(contenders, rows, shutil.get_terminal_size((160, 40)).columns))
