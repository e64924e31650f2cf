"""select: score a train run's checkpoints as candidates and carry the best forward.

Reads: a train manifest trained with `select:` (its `candidates/step-NNNNNNNN/` adapters, see
jobs/train/selection.py), the held-out prompts (a prepare manifest: its eval split; or a prompts file), and
optionally the base model's predictions on them (`--baseline`, an infer manifest: the chain's infer-base).

Does, in order, each part a normal stage run of its own (published, resumable, "already done" on a re-run):
1. infer: every candidate as a LoRA adapter of one engine (vLLM LoRARequests, or peft adapters with
   `engine: transformers`), each to `<output>/infer/step-NNNNNNNN/`; without --baseline the base model too,
   to `<output>/infer/base/`;
2. evaluate: base vs every candidate, to `<output>/evaluate/` (report, and the leaderboard with every
   candidate's metric and its bootstrap 95% interval);
3. the selection manifest (stage "select"): `adapter/` and `tokenizer/` of the chosen candidate, the train
   run's model block plus `selected_step`, and `metrics.selection`: the chosen step and score beside the last
   step's and every candidate's. merge and infer (--adapter) take it where they take a train manifest.
The best is the highest metric; a tie goes to the earlier step (less training, same score).

Cells with `modules_to_save` are not LoRA-only: vLLM cannot serve them, so with `engine: vllm` select refuses
(exit 2) and says to use `engine: transformers`, which loads each candidate as a peft adapter (whole saved
modules included) on one base in memory. No merge per candidate.

select runs infer's and evaluate's `run` in its own process (one Job with the engine; the chain declares
no per-candidate fan-out): their outputs are exactly what `ftjobs infer --adapter-step` and `ftjobs
evaluate` write, so a separate evaluate of any candidate gives the same numbers.

    ftjobs select --train runs/r1/train --prompts runs/r1/prepare --baseline runs/r1/infer-base \\
        --output runs/r1/select --set infer.engine=transformers

See docs/selection.md.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
from pydantic import Field

from common import manifest as mf
from common import stage, storage
from common.config import JobConfig, dump
from common.errors import ConfigError, InputError
from common.runner import config_options, execute

STAGE = "select"
LOG = logging.getLogger(__name__)
BASE_LABEL = "base"


class Config(JobConfig):
    """Which train run's candidates, scored on which prompts, and how."""

    train: str = Field(description="Train manifest (URI or prefix) of a run trained with `select:`.")
    prompts: str = Field(description="Held-out prompts: a prepare manifest (its eval split) or a prompts file.")
    output: str = Field(description="Output prefix: infer/<candidate>/, evaluate/ and the selection manifest.")
    baseline: str | None = Field(None, description="The base model's predictions on the same prompts (an infer "
                                                   "manifest); None: select infers the base model itself.")
    base_model: str | None = Field(None, description="The base model the adapters go on; None: the one the "
                                                     "train manifest names.")
    metric: str | None = Field(None, description="Rank by this metric; None: the train run's select.metric.")
    infer: dict[str, Any] = Field(default_factory=dict, description="infer's config section for the candidates "
                                  "(engine, engine_args, sampling, ...); sampling.temperature defaults to 0 here.")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="evaluate's config section (checks, "
                                     "bootstrap, seed, ...).")
    run_id: str | None = Field(None, description="Run id recorded in the manifests. Default: the train run's.")


def run(config: Config) -> stage.Result:
    """Score the candidates of `config.train` and publish the selection (or return the finished one)."""
    train = mf.load(config.train, verify="size", expect_stage="train")
    steps = candidate_steps(train)
    metric = choose_metric(config, train)
    infer_section = infer_config(config, train)
    inputs = [train.ref("train")]
    if config.baseline:
        inputs.append(mf.load(config.baseline, verify="size", expect_stage="infer").ref("baseline"))
    recorded = dump(config) | {"metric": metric}
    identity = stage.Identity(STAGE, config.output, recorded, inputs)
    return stage.run(identity, lambda attempt: select(config, train, steps, metric, infer_section, attempt))


def candidate_steps(train: mf.Loaded) -> list[int]:
    """The steps whose adapters the train run kept as candidates (refused when it kept none)."""
    steps = sorted({int(a.name.split("/")[1].removeprefix("step-"))
                    for a in train.manifest.artifacts_named("candidates/step-")})
    if not steps:
        raise InputError(f"{train.uri} keeps no candidate adapters: train it with `select: {{metric: "
                         "exact_match}` (or early_stopping) so its checkpoints' adapters are published")
    return steps


def choose_metric(config: Config, train: mf.Loaded) -> str:
    from common import metrics

    metric = config.metric or (train.manifest.config.get("select") or {}).get("metric") or "exact_match"
    known = metrics.computed(metrics.Checks.model_validate((config.evaluate or {}).get("checks") or {}),
                             judge=bool(config.evaluate.get("judge")))
    if metric not in known:
        raise ConfigError(f"select metric {metric!r} is not one evaluate computes; choose one of {', '.join(known)}")
    return metric


def infer_config(config: Config, train: mf.Loaded) -> dict[str, Any]:
    """infer's section for the candidates: greedy unless said otherwise; vLLM refused for modules_to_save."""
    section = dict(config.infer)
    section["sampling"] = {"temperature": 0.0} | dict(section.get("sampling") or {})
    lora = mf.model_block(train).lora
    if lora.modules_to_save and section.get("engine", "vllm") == "vllm":
        raise ConfigError(f"{train.uri} trains whole modules beside LoRA (modules_to_save: {lora.modules_to_save}); "
                          "vLLM serves LoRA matrices only, so its candidates cannot be served as adapters. Set "
                          "infer.engine: transformers (select's section) to score each candidate as a peft adapter "
                          "on one base in memory.")
    return section


def select(config: Config, train: mf.Loaded, steps: list[int], metric: str, infer_section: dict[str, Any],
           attempt: stage.Attempt) -> stage.Outcome:
    """infer every candidate -> evaluate them against the base -> the chosen adapter as this stage's output."""
    t0 = time.monotonic()
    run_id = config.run_id or train.manifest.run_id
    labels = {step: f"step-{step:08d}" for step in steps}
    predictions = infer_candidates(config, train, labels, infer_section)
    baseline = config.baseline or infer_base(config, train, infer_section)
    t_infer = time.monotonic()
    evaluated = evaluate_candidates(config, train, labels, predictions, baseline, metric, run_id)
    board = evaluated.manifest.metrics["leaderboard"]
    if board["best"] is None:
        raise InputError(f"no candidate has a value for {metric} ({evaluated.uri}): do the prompts have references?")
    chosen = int(board["best"].removeprefix("step-"))
    t_eval = time.monotonic()
    publish_chosen(attempt.writer, train, chosen)
    cells = {c["label"]: c for c in board["cells"]}
    last = steps[-1]
    result = {
        "metric": metric, "chosen_step": chosen, "last_step": last,
        "chosen": _cell(cells[labels[chosen]], chosen), "last": _cell(cells[labels[last]], last),
        "candidates": [_cell(cells[labels[s]], s) for s in steps], "evaluate": evaluated.uri,
        "verdict": board["verdict"]}
    LOG.info("selected step %d (%s %.4f) of %d candidates; the last step %d scored %.4f", chosen, metric,
             result["chosen"]["score"], len(steps), last, result["last"]["score"] or 0.0)
    return stage.Outcome(
        run_id=run_id, metrics={"selection": result, f"{metric}/chosen": result["chosen"]["score"]},
        stats={"candidates": len(steps), "predictions": {labels[s]: predictions[s] for s in steps},
               "baseline": baseline},
        timings={"infer_s": t_infer - t0, "evaluate_s": t_eval - t_infer, "publish_s": time.monotonic() - t_eval},
        model=train.manifest.model | {"selected_step": chosen, "train": train.uri})


def _cell(cell: dict[str, Any], step: int) -> dict[str, Any]:
    return {"step": step, "score": cell["metric"], "ci95": cell["ci95"], "delta_vs_base": cell["delta_vs_base"],
            "delta_ci95": cell["delta_ci95"]}


def infer_candidates(config: Config, train: mf.Loaded, labels: dict[int, str],
                     section: dict[str, Any]) -> dict[int, str]:
    """Every candidate through one engine (infer's `also`); returns each candidate's infer manifest URI."""
    from common import config as cfg
    from jobs.infer import job as infer

    outputs = {step: storage.join(config.output, "infer", label) for step, label in labels.items()}
    first, *rest = list(labels)
    conf = cfg.validate(infer.Config, section | {
        "model": config.base_model or mf.model_block(train).base_model, "adapter": train.uri,
        "adapter_step": first, "prompts": config.prompts, "output": outputs[first],
        "also": [{"adapter": train.uri, "adapter_step": s, "output": outputs[s]} for s in rest]},
        source="select's infer section")
    infer.run(conf)
    return {step: mf.manifest_uri(out) for step, out in outputs.items()}


def infer_base(config: Config, train: mf.Loaded, section: dict[str, Any]) -> str:
    from common import config as cfg
    from jobs.infer import job as infer

    out = storage.join(config.output, "infer", BASE_LABEL)
    conf = cfg.validate(infer.Config, section | {"model": config.base_model or mf.model_block(train).base_model,
                                                 "prompts": config.prompts, "output": out},
                        source="select's infer section")
    infer.run(conf)
    return mf.manifest_uri(out)


def evaluate_candidates(config: Config, train: mf.Loaded, labels: dict[int, str], predictions: dict[int, str],
                        baseline: str, metric: str, run_id: str) -> mf.Loaded:
    """evaluate: the base and every candidate, with a leaderboard of the candidates (each with its CI)."""
    from common import config as cfg
    from jobs.evaluate import job as evaluate

    cells = [{"label": labels[s], "values": {"step": s}, "train": train.uri} for s in labels]
    conf = cfg.validate(evaluate.Config, dict(config.evaluate) | {
        "predictions": [baseline, *(predictions[s] for s in labels)], "labels": [BASE_LABEL, *labels.values()],
        "output": storage.join(config.output, "evaluate"), "run_id": run_id,
        "leaderboard": {"metric": metric, "cells": cells}}, source="select's evaluate section")
    return evaluate.run(conf)


def publish_chosen(writer: mf.ArtifactWriter, train: mf.Loaded, step: int) -> None:
    """The chosen candidate as `adapter/`, and the train run's tokenizer, copied (sha256-checked) into this output."""
    from common.generate import download_named

    with tempfile.TemporaryDirectory(prefix="ftjobs-select-") as tmp:
        adapter = download_named(train, f"candidates/step-{step:08d}/", Path(tmp) / "adapter")
        tokenizer = download_named(train, "tokenizer/", Path(tmp) / "tokenizer")
        for marker in (adapter / ".ftjobs-complete", tokenizer / ".ftjobs-complete"):
            marker.unlink()
        writer.add_dir(adapter, "adapter")
        writer.add_dir(tokenizer, "tokenizer")


@click.command("select")
@click.option("--train", "train", metavar="TRAIN_MANIFEST", help="Train manifest of a run trained with select:.")
@click.option("--prompts", metavar="PREPARE_MANIFEST_OR_FILE", help="Held-out prompts (prepare manifest or file).")
@click.option("--baseline", metavar="INFER_MANIFEST", help="The base model's predictions on the same prompts.")
@click.option("--output", metavar="URI", help="Output prefix for the candidates' runs and the selection manifest.")
@config_options(example="infer.engine=transformers")
def command(train: str | None, prompts: str | None, baseline: str | None, output: str | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """Score a train run's checkpoints on held-out prompts and publish the best one's adapter."""
    execute(sys.modules[__name__], config_file, sets,
            {"train": train, "prompts": prompts, "baseline": baseline, "output": output})
