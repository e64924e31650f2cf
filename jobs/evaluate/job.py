"""evaluate: score predictions against references and compare models side by side.

Reads one or more infer manifests (`--predictions`, repeatable; the FIRST is
the baseline, e.g. the base model, the others are candidates, e.g. finetunes).
Each holds Parquet shards `predictions/part-NNNNN` with at least `id`,
`completion` and `reference` (plus `prompt`, `finish_reason`,
`completion_tokens` when infer wrote them). A row's `error` (e.g. a prompt too
long for the model) is counted and scored as a wrong answer; with `sample`
(sampling.n > 1) each (id, sample) pair is its own example.

Scores every row with exact match, normalized exact match (lower case,
punctuation as spaces, no articles, collapsed spaces), token F1 and ROUGE-L (the
`rouge-score` library), plus the optional checks from config (valid JSON,
JSON schema, regex). Rows without a reference are counted and skipped by the
reference metrics; the checks still apply to them. Sets are compared on the
ids they share, with a paired bootstrap 95% interval on each difference.

Writes under `--output`: `report.md`, `report.html` (self-contained, the chart
embedded), `chart.png`, `metrics.json`, `scores.parquet` (one row per example
and set) and `differences.jsonl` (examples where the sets disagree), then
`manifest.json` last; the manifest's metrics hold every set's numbers.

`--fail-if-worse METRIC` is a CI gate: after publishing, exit 4 when a
candidate does not beat the baseline on METRIC (strictly higher). Exit 4 is
a verdict, not a failure to retry; a re-run of a finished evaluation gives
the same verdict. A set with no value for METRIC (e.g. no row has a
reference) exits 3: there is nothing to compare.

Sets whose rows lack references are named in a warning and in the report. When
no set has a single reference and no checks are configured there is nothing
to score: exit 3, before anything is written.

    ftjobs evaluate --predictions runs/r1/infer-base --predictions runs/r1/infer-finetuned \\
        --output runs/r1/evaluate --fail-if-worse exact_match

`judge:` adds an LLM judge (jobs/evaluate/judge.py): `score` grades each answer against the reference,
`pairwise` picks between the baseline's and each candidate's answer, asked in both orders; its metric is
`judge` (the report, the comparison and `--fail-if-worse judge` treat it like any other).

Without a judge it imports neither torch nor transformers and runs in the prepare image; with one it runs
the judge model through infer's engines (the infer image; `ftjobs k8s` picks it).
"""

from __future__ import annotations

import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from pydantic import Field, field_validator, model_validator

from common import data, metrics, stage, storage
from common import manifest as mf
from common.config import JobConfig, dump
from common.errors import InputError
from common.metrics import Checks
from common.runner import config_options, execute
from jobs.evaluate import champion, comparison, guards, leaderboard, report
from jobs.evaluate import judge as judging
from jobs.evaluate.guards import Guard, GuardEngine

STAGE = "evaluate"
LOG = logging.getLogger(__name__)


class Cell(JobConfig):
    """One cell of a sweep on the leaderboard."""

    label: str = Field(description="The cell's finetuned predictions set (one of `labels`).")
    values: dict[str, Any] = Field(default_factory=dict, description="The matrix values that made the cell.")
    train: str | None = Field(None, description="The cell's train manifest: its cost (wall time, tokens, memory, "
                                                "parameters) on the leaderboard.")


class FailedCell(JobConfig):
    """A cell of a sweep that did not finish: listed on the leaderboard with why, not ranked."""

    label: str = Field(description="The cell's label, as the sweep names it.")
    values: dict[str, Any] = Field(default_factory=dict, description="The matrix values that made the cell.")
    step: str = Field(description="The step that failed (e.g. train, merge, infer-finetuned).")
    exit_code: int | None = Field(None, description="The failed step's exit code (2 config, 3 input, 1 other); "
                                                    "None when it never ran to an exit (e.g. lost).")
    reason: str = Field(description="One line: what failed, from the step's error.")


class Leaderboard(JobConfig):
    """A sweep's ranking of its cells (leaderboard.md/.html/.json and its plots)."""

    metric: str = Field(description="The metric the cells are ranked by.")
    cells: list[Cell] = Field(description="Every finished cell, in matrix order.")
    failed: list[FailedCell] = Field(default_factory=list, description="The cells that did not finish, in "
                                     "matrix order: each gets a row (step, exit code, reason), unranked.")

    @model_validator(mode="after")
    def _distinct(self) -> Leaderboard:
        both = {c.label for c in self.cells} & {f.label for f in self.failed}
        if both:
            raise ValueError(f"leaderboard cells {sorted(both)} are listed as finished and as failed; a cell is "
                             "one or the other")
        return self


class Config(JobConfig):
    """What to compare and what to write."""

    predictions: list[str] = Field(
        description="Infer manifest URIs (or their prefixes). The first is the baseline; the rest are candidates.")
    output: str = Field(description="Output prefix (local path or s3://) for the report and manifest.")
    labels: list[str] | None = Field(
        None, description="A display label per predictions set, same order. Default: the infer manifest's "
                          "model.label, else derived from its model and adapter.")
    fail_if_worse: str | None = Field(
        None, description="Gate: exit 4 after publishing when a candidate does not beat the baseline on this "
                          "metric. Not part of the run's identity, so a finished evaluation can be re-gated.")
    checks: Checks = Field(default_factory=Checks, description="Optional checks on each completion.")
    examples: int = Field(20, ge=0, le=1000, description="How many differing examples the report shows.")
    bootstrap: int = Field(1000, ge=0, le=100_000,
                           description="Paired bootstrap resamples for the 95% interval of each difference "
                                       "(0: off).")
    seed: int = Field(0, description="Seed for the bootstrap (and the judge's sample of reasons).")
    judge: judging.Judge | None = Field(None, description="Optional LLM judge: a model that grades each answer "
                                                          "(mode score) or picks between baseline and candidate "
                                                          "(mode pairwise); adds the metric `judge`.")
    cache_dir: str | None = Field(None, description="Where the judge model is downloaded; None: $FTJOBS_CACHE or "
                                                    "~/.cache/ftjobs.")
    run_id: str | None = Field(None, description="Run id recorded in the manifest. Default: a new one.")
    baseline_of: dict[str, str] = Field(
        default_factory=dict, description="Per candidate label, the label of its own baseline (a sweep: each "
        "finetuned cell against the base model it came from). Default: every set against the first.")
    leaderboard: Leaderboard | None = Field(None, description="Rank the cells of a sweep (see jobs/sweep.py); "
                                            "with fail_if_worse, the best cell must beat its own base.")
    guards: list[Guard] = Field(default_factory=list, description="Extra suites scored for every set's "
                                       "model: prompt files or lm-evaluation-harness tasks (docs/guards.md).")
    guard_engine: GuardEngine = Field(default_factory=GuardEngine,
                                             description="How the guards' models run.")
    promote: champion.Promotion | None = Field(None, description="The champion gate (jobs/evaluate/champion.py): "
                                               "compare the challenger with the registry's champion (the set "
                                               "labelled promote.champion) and publish a verdict; exit 4 on "
                                               "refuse.")

    @field_validator("predictions")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one --predictions manifest")
        if len(set(value)) != len(value):
            raise ValueError("the same predictions manifest is listed twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.labels is not None:
            if len(self.labels) != len(self.predictions):
                raise ValueError(f"labels has {len(self.labels)} entries for {len(self.predictions)} predictions "
                                 "sets; give one label per --predictions, in the same order")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be unique, got {self.labels}")
        named = set(self.labels or [])
        if (self.baseline_of or self.leaderboard) and not self.labels:
            raise ValueError("baseline_of and leaderboard refer to sets by label: give labels (one per --predictions)")
        for cand, base in self.baseline_of.items():
            if cand not in named or base not in named:
                raise ValueError(f"baseline_of {cand!r}: {base!r}: both must be labels ({', '.join(sorted(named))})")
            if cand == (self.labels or [""])[0] or cand == base:
                raise ValueError(f"baseline_of {cand!r}: {base!r}: the first set is every other set's baseline and "
                                 "has none itself, and a set is not its own baseline")
            seen, at = {cand}, base
            while at in self.baseline_of:  # a chain (DPO against SFT against the base) ends at a set without one
                if at in seen:
                    raise ValueError(f"baseline_of goes round in a circle through {cand!r} and {at!r}")
                seen.add(at)
                at = self.baseline_of[at]
        if self.leaderboard is not None:
            if self.leaderboard.metric not in self.metric_names():
                raise ValueError(f"leaderboard.metric={self.leaderboard.metric!r} is not a metric this config "
                                 f"computes; choose one of {', '.join(self.metric_names())}")
            bases = {self.labels[0], *self.baseline_of.values()} if self.labels else set()
            for cell in self.leaderboard.cells:
                if cell.label not in named or cell.label in bases:
                    raise ValueError(f"leaderboard cell {cell.label!r} must be a candidate's label, not a baseline "
                                     "or an unknown set")
        guards.check_unique(self.guards)
        if self.judge is not None and self.judge.mode == "pairwise" and len(self.predictions) < 2:
            raise ValueError("judge mode pairwise compares a baseline with candidates: give two or more "
                             "--predictions, or use mode: score")
        if self.promote is not None:
            champion.check_config(self.promote, self.metric_names(), list(self.labels or []))
        if self.fail_if_worse is not None:
            known = self.metric_names()
            if self.fail_if_worse not in known:
                raise ValueError(f"fail_if_worse={self.fail_if_worse!r} is not a metric this config computes; "
                                 f"choose one of {', '.join(known)}")
            if len(self.predictions) < 2:
                raise ValueError("fail_if_worse needs a baseline and at least one candidate: give two or more "
                                 "--predictions")
        return self

    def metric_names(self) -> list[str]:
        return metrics.computed(self.checks, judge=self.judge is not None)


def run(config: Config, *, judge_engine: Any = None) -> mf.Loaded:
    """`judge_engine`: a started engine for the judge instead of its model (tests: a scripted stand-in)."""
    loaded = [mf.load(uri, verify="size", expect_stage="infer") for uri in config.predictions]
    inputs = [lo.ref(role="baseline" if i == 0 else f"candidate{i}") for i, lo in enumerate(loaded)]
    trains = {c.label: mf.load(c.train, verify="none", expect_stage="train")
              for c in (config.leaderboard.cells if config.leaderboard else []) if c.train}
    inputs += [t.ref(role=f"train:{label}") for label, t in trains.items()]
    judge_in = None
    if config.judge is not None:
        from common.generate import model_input

        judge_in = model_input(config.judge.model)
        inputs += [judge_in.ref("judge")] if judge_in is not None else []
    inputs += guards.inputs(config.guards)
    # The gate is not part of the run's identity: a finished evaluation can be judged again with another metric.
    recorded = {k: v for k, v in dump(config).items() if k not in ("fail_if_worse", "cache_dir")}
    result = stage.run(stage.Identity(STAGE, config.output, recorded, inputs),
                       lambda attempt: evaluate(config, loaded, trains, attempt, judge_in, judge_engine=judge_engine))
    assert isinstance(result, mf.Loaded)
    LOG.info("report: %s", result.artifact_uri("report.html"))
    champion.gate(result.manifest.metrics.get("promotion"), result.uri)  # first: its message names the champion
    comparison.gate(result.manifest.metrics, config.fail_if_worse, result.uri)
    return result


def evaluate(config: Config, loaded: list[mf.Loaded], trains: dict[str, mf.Loaded], attempt: stage.Attempt,
             judge_in: mf.Loaded | None = None, *, judge_engine: Any = None) -> stage.Outcome:
    """Score every set (and ask the judge), compare each candidate with its baseline, write the report (and the
    leaderboard).

    `judge_engine`: a started engine for the judge instead of its model (tests: a scripted stand-in)."""
    t0 = time.monotonic()
    labels = list(config.labels) if config.labels else unique(
        [default_label(lo, i) for i, lo in enumerate(loaded)])
    validator = metrics.load_schema(config.checks.json_schema) if config.checks.json_schema is not None else None
    sets: list[dict[str, Any]] = []  # {label, loaded, rows, scores}: comparison.py's sets
    with tempfile.TemporaryDirectory() as tmp:
        for i, lo in enumerate(loaded):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            rows = data.read_predictions(lo, folder)
            scores = metrics.score_rows(rows, config.checks, validator)
            sets.append({"label": labels[i], "loaded": lo, "rows": {r["id"]: r for r in rows},
                         "scores": {s["id"]: s for s in scores}})
    judged = None
    if config.judge is not None:
        judged = judging.run(config.judge, sets, config.output, judge_in, config.cache_dir, config.seed,
                             baseline_of=config.baseline_of, engine=judge_engine)
    t_score = time.monotonic()

    names = config.metric_names()
    summary = comparison.summarize(sets, names)
    notes = comparison.reference_notes(summary)
    for note in notes:
        LOG.warning("%s", note)
    if names == list(metrics.REFERENCE_METRICS) and not any(v["rows"] - v["rows_without_reference"]
                                                             for v in summary.values()):
        raise InputError(
            "nothing to score: " + "; ".join(f"{label}: 0 of {v['rows']} rows have a reference"
                                             for label, v in summary.items())
            + "; and no checks are configured. Evaluate predictions made from prompts with references (a "
              "prepare manifest, or a 'reference' column in the prompts file), or configure checks "
              "(checks.json_valid, checks.json_schema, checks.regex).")
    comparisons, differing = comparison.compare(sets, names, config.bootstrap, config.seed, config.baseline_of)
    if judged is not None:
        judging.amend(judged, summary, comparisons, config.bootstrap, config.seed)
    judge_model = (judge_in.uri if judge_in is not None else config.judge.model) if config.judge else None
    judge_report = judging.report(judged, config.judge, judge_model, comparisons)
    guarded = guarding(config, sets)
    t_compare = time.monotonic()

    run_id = config.run_id or mf.current_run_id()
    results = {"baseline": sets[0]["label"], "sets": summary, "comparisons": comparisons,
              **{f"{m}/{label}": by_metric[m] for label, by_metric in summary.items() for m in names}}
    details = [{"label": s["label"], "manifest": s["loaded"].uri, "model": s["loaded"].manifest.model} for s in sets]
    examples = comparison.pick_examples(sets, differing, config.examples, names)
    writer = attempt.writer
    chart = report.render_chart(sets, summary, names)
    writer.add_bytes(chart, "chart.png")
    writer.add_bytes(json.dumps({"run_id": run_id, "sets": details, "metrics": results}, indent=2,
                                default=str).encode(), "metrics.json")
    writer.add_bytes(report.scores_parquet(sets, names), "scores.parquet", rows=sum(len(s["scores"]) for s in sets))
    writer.add_bytes("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode(),
                     "differences.jsonl", rows=len(examples))
    if judged is not None:
        writer.add_bytes("".join(json.dumps(v, ensure_ascii=False) + "\n" for v in judged.verdicts).encode(),
                         "judge.jsonl", rows=len(judged.verdicts))
    content = {"run_id": run_id, "sets": details, "summary": summary, "comparisons": comparisons, "names": names,
               "examples": examples, "differing": len(differing), "checks": config.checks, "notes": notes,
               "judge": judge_report}
    md, page = report.render_markdown(content), report.render_html(content, chart)
    if guarded is not None:
        md, page = md + guards.markdown(guarded), guards.add_to_html(page, guarded)
        results |= {"guards": guarded.values, "guard_comparisons": guarded.comparisons,
                    "guard_suites": guarded.suites}
    if config.promote is not None:  # last: the verdict reads every result above (the guard suites' too)
        results["promotion"] = champion.decide(config.promote, labels, summary, comparisons, sets, results,
                                               config.bootstrap, config.seed)
        md, page = champion.add_to_report(md, page, results["promotion"])
    writer.add_bytes(md.encode(), "report.md")
    writer.add_bytes(page.encode(), "report.html")
    if config.leaderboard is not None:
        results["leaderboard"] = write_leaderboard(config, sets, comparisons, trains, writer)
    t_write = time.monotonic()

    last_model = mf.model_block(loaded[-1])
    return stage.Outcome(
        run_id=run_id, metrics=results,
        stats={"sets": len(sets), "differing_examples": len(differing),
               "rows": {s["label"]: len(s["rows"]) for s in sets},
               **({"judge": {"mode": judged.mode, "counts": judged.counts, **judged.cost}} if judged else {})},
        timings={"read_and_score_s": t_score - t0, "compare_s": t_compare - t_score, "write_s": t_write - t_compare},
        model={"labels": [s["label"] for s in sets], "sets": details,
               "base_model": last_model.base_model, "template_hash": last_model.template_hash,
               **({"judge": judge_model} if judge_model else {})})


def guarding(config: Config, sets: list[dict[str, Any]]) -> guards.Results | None:
    """The guard suites for every set's model (None: no guards configured)."""
    if not config.guards:
        return None
    from common import models

    cache = Path(config.cache_dir) if config.cache_dir else models.cache_root()
    return guards.run(config.guards, config.guard_engine, sets, cache, config.baseline_of, config.bootstrap,
                      config.seed)


def write_leaderboard(config: Config, sets: list[dict[str, Any]], comparisons: dict[str, Any],
                      trains: dict[str, mf.Loaded], writer: mf.ArtifactWriter) -> dict[str, Any]:
    """leaderboard.json, .md, .html and its two plots; returns what the manifest's metrics keep of it."""
    assert config.leaderboard is not None
    board = leaderboard.build({s["label"]: s for s in sets}, comparisons, config.leaderboard.cells,
                              config.leaderboard.metric, trains, config.bootstrap, config.seed,
                              failed=[f.model_dump() for f in config.leaderboard.failed])
    plots = {"size": leaderboard.plot(board, "total_params", "model size (parameters)"),
             "cost": leaderboard.plot(board, "train_seconds", "train cost (seconds)")}
    writer.add_bytes(plots["size"], "leaderboard_size.png")
    writer.add_bytes(plots["cost"], "leaderboard_cost.png")
    curve = leaderboard.plot_data_size(board, leaderboard.train_rows(trains))  # a data-size axis in the matrix
    if curve is not None:
        plots["rows"] = curve
        writer.add_bytes(curve, "leaderboard_rows.png")
    writer.add_bytes(json.dumps(board, indent=2, default=str).encode(), "leaderboard.json", rows=len(board["cells"]))
    writer.add_bytes(leaderboard.render(board, plots, report.template("leaderboard.md.jinja")).encode(),
                     "leaderboard.md")
    writer.add_bytes(leaderboard.render(board, plots, report.template("leaderboard.html.jinja")).encode(),
                     "leaderboard.html")
    LOG.info("%s", board["verdict"])
    return {k: board[k] for k in ("metric", "best", "runner_up", "verdict")} | {
        "cells": [{k: r[k] for k in ("label", "metric", "ci95", "base", "delta_vs_base", "delta_ci95")}
                  for r in board["cells"]],
        "failed": [{k: f[k] for k in ("label", "step", "exit_code")} for f in board["failed"]]}


# --------------------------------------------------------------------------- reading


def default_label(loaded: mf.Loaded, index: int) -> str:
    info: mf.InferModel = mf.model_block(loaded)
    if info.label:
        return info.label
    model = info.model or info.base_model or f"set{index}"
    if model.rstrip("/").endswith(".json"):
        # A merged model is named by its merge manifest, whose file name says nothing; the folder
        # infer wrote to (e.g. infer-finetuned) is what the user chose to call this set.
        return storage.parent(storage.normalize(loaded.uri)).rstrip("/").split("/")[-1] or f"set{index}"
    name = model.rstrip("/").split("/")[-1] or model
    return f"{name}+adapter" if info.adapter else name


def unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        candidate, n = label, 2
        while candidate in out:
            candidate, n = f"{label}#{n}", n + 1
        out.append(candidate)
    return out


# --------------------------------------------------------------------------- command


@click.command("evaluate")
@click.option("--predictions", "predictions", multiple=True, metavar="INFER_MANIFEST",
              help="Infer manifest URI or prefix. Repeatable; the first is the baseline.")
@click.option("--output", metavar="URI", help="Output prefix for the report and manifest.")
@click.option("--label", "labels", multiple=True, metavar="NAME", help="Display label per --predictions, in order.")
@click.option("--fail-if-worse", "fail_if_worse", metavar="METRIC",
              help="Exit 4 (after publishing) when a candidate does not beat the baseline on METRIC, "
                   "e.g. exact_match.")
@config_options(example="bootstrap=0")
def command(predictions: tuple[str, ...], output: str | None, labels: tuple[str, ...], fail_if_worse: str | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """Score predictions, compare baseline vs candidates, write a Markdown + HTML report.

    Exit 4 means the --fail-if-worse gate failed (the report is still published).
    """
    execute(sys.modules[__name__], config_file, sets,
            {"predictions": predictions, "output": output, "labels": labels, "fail_if_worse": fail_if_worse})
