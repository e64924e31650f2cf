"""sweep: many finetunes in one command, and one leaderboard that says which is best and how small it can be.

    ftjobs sweep --config demo/sweep.yaml                          # the offline demo (make demo-sweep)
    ftjobs sweep --config sweep.yaml --sweep-id s1 --max-parallel 2 --set train.max_steps=200

The file is a run config (what `ftjobs pipeline` reads: base_model, data, each step's section) plus
`matrix:`, dotted keys to lists of values, e.g.

    matrix:
      base_model: [models/small, models/large]
      train.learning_rate: [0.001, 0.002]
      data: [[a.jsonl], [a.jsonl, b.jsonl]]
    exclude: [{base_model: models/large, train.learning_rate: 0.001}]
    include: [{base_model: models/large, train.lora.r: 32}]   # as CI matrices: extends or adds cells

Every cell runs the chain of `jobs/chain.py` up to infer-finetuned; then one evaluate scores the base
model(s) and every finished cell, each cell against its own base, and writes the leaderboard
(`jobs/evaluate/leaderboard.py`). Cells share every step whose identity is equal: a step's output is
`<root>/sweeps/<sweep_id>/<step>/<key>/`, where the key hashes the step's config section, the run values it
takes and the keys of the steps it takes from, so one prepare serves every cell with the same data and
tokenizer, one base-model inference every cell with the same base; the ordinary "already done" rule does the
rest, and re-running the same sweep id resumes (finished steps are skipped). Printed before any work: the
cells, what each shares, and how many train runs there are.

The sweep is a plan (jobs/plan.py) run by the local executor (jobs/executors/local.py): steps run as the
subprocesses their containers would be, up to `--max-parallel` at once (each gets cores / max_parallel
threads), and every step's manifest records the sweep id as its run id and the cells it served
(`ftjobs runs show SWEEP_ID`). A failed step fails the cells that need it and no others, and the leaderboard
lists every cell: the failed ones with the step that failed, its exit code and a one-line reason.

Exit codes: 0 every cell finished; 5 (EXIT_PARTIAL) some but not all cells failed: the leaderboard is published
and its manifest URI is still the last stdout line (`--allow-failed-cells` / `allow_failed_cells: true`: 0);
when no cell finished, the failing steps' code (2, 3; else 1); 4 when the gate fails (with
`evaluate.fail_if_worse`, the best cell did not beat its own base). `<sweep>/sweep.json` records every cell
and step (status, manifest, exit code, reason, log) and the failed cells. SIGTERM or Ctrl-C stops every
running step the way the pipeline stops one (train checkpoints), then exits 1; the same sweep id resumes.
"""

from __future__ import annotations

import itertools
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import Field, field_validator, model_validator

from common import config as cfg
from common import manifest as mf
from common import storage
from common.errors import (
    EXIT_CONFIG,
    EXIT_GATE,
    EXIT_INPUT,
    EXIT_RETRYABLE,
    CellsFailed,
    ConfigError,
    FtjobsError,
    GateFailed,
    InputError,
)
from common.runner import config_options, execute
from jobs import chain, plan
from jobs.executors import Executor
from jobs.executors.local import LocalExecutor

STAGE = "sweep"
LOG = logging.getLogger(__name__)
NOT_IN_MATRIX = ("root", "run_id", "stop_after", "labels", "baseline", "evaluate", "max_parallel")
Cell = plan.Cell


class Config(chain.Config):
    """A run config plus the matrix of its cells."""

    sweep_id: str | None = Field(None, description="Sweep id; the same id resumes (finished steps are skipped). "
                                                   "Default: a new one.")
    matrix: dict[str, list[Any]] = Field(description="Dotted run-config keys to the values each takes "
                                                     "(base_model, data, train.learning_rate, train.lora.r, ...).")
    include: list[dict[str, Any]] = Field(default_factory=list, description="Cells to add, or keys to add to "
                                          "the cells they match, as CI matrices do.")
    exclude: list[dict[str, Any]] = Field(default_factory=list, description="Cells to leave out: each entry "
                                          "removes the cells that match all its keys.")
    metric: str | None = Field(None, description="The leaderboard's metric. Default: evaluate.fail_if_worse, "
                                                 "else exact_match.")
    serve_adapters: bool = Field(True, description="Cells that are plain LoRA (no modules_to_save) on the same "
                                 "base and prompts share one inference engine that serves every adapter (no merge, "
                                 "one engine start); false: every cell merges and infers on its own, as the "
                                 "pipeline does.")
    allow_failed_cells: bool = Field(False, description="Exit 0 when some cells failed and the others finished "
                                                        "(the leaderboard lists the failed ones either way); "
                                                        "false: exit 5 then.")

    @field_validator("sweep_id")
    @classmethod
    def _sweep_id(cls, value: str | None) -> str | None:
        problem = mf.run_id_problem(value, "sweep id") if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("matrix")
    @classmethod
    def _matrix(cls, value: dict[str, list[Any]]) -> dict[str, list[Any]]:
        if not value:
            raise ValueError("give at least one key with a list of values, e.g. matrix: {train.learning_rate: "
                             "[0.001, 0.002]}")
        for key, values in value.items():
            check_key(key)
            if not isinstance(values, list) or not values:
                raise ValueError(f"matrix.{key}: expected a non-empty list of values, got {values!r}")
        return value

    @model_validator(mode="after")
    def _sweep(self) -> Config:
        for what in ("run_id", "stop_after"):
            if getattr(self, what) is not None:
                raise ValueError(f"{what} is a pipeline setting; a sweep runs every cell to its leaderboard "
                                 "(use sweep_id to name and resume it)")
        if not self.baseline:
            raise ValueError("baseline: false: the leaderboard compares each cell with its own base model")
        for key in ("baseline_of", "leaderboard"):
            if key in self.evaluate:
                raise ValueError(f"section `evaluate` sets {key}: the sweep wires it itself")
        for entry in (*self.include, *self.exclude):
            for key in entry:
                check_key(key)
        return self

    def leaderboard_metric(self) -> str:
        return self.metric or self.evaluate.get("fail_if_worse") or "exact_match"


def check_key(key: str) -> None:
    top = key.split(".")[0]
    if top not in chain.Config.model_fields or top in NOT_IN_MATRIX:
        allowed = sorted(set(chain.Config.model_fields) - set(NOT_IN_MATRIX))
        raise ValueError(f"matrix key {key!r}: expected a run config key (one of {', '.join(allowed)}, or a key "
                         "inside a section such as train.learning_rate)")


# --------------------------------------------------------------------------- cells


def expand(config: Config) -> list[dict[str, Any]]:
    """The matrix's cells: every combination, minus `exclude`, with `include` as CI matrices apply it."""
    keys = list(config.matrix)
    combos = [dict(zip(keys, values, strict=True)) for values in itertools.product(*config.matrix.values())]
    combos = [c for c in combos if not any(all(c.get(k) == v for k, v in ex.items()) for ex in config.exclude)]
    originals = [dict(c) for c in combos]
    for inc in config.include:
        # An entry extends every cell whose original matrix values it does not overwrite; else it is a cell.
        hits = [i for i, orig in enumerate(originals) if all(orig[k] == v for k, v in inc.items() if k in orig)]
        for i in hits:
            combos[i].update(inc)
        if not hits:
            combos.append(dict(inc))
            originals.append(dict(inc))
    unique: list[dict[str, Any]] = []
    for c in combos:
        if c not in unique:
            unique.append(c)
    if not unique:
        raise ConfigError("the matrix has no cells left after exclude")
    return unique


def cell_label(values: dict[str, Any]) -> str:
    return ",".join(f"{key.split('.')[-1]}={plan.short(v)}" for key, v in values.items())


def make_cells(config: Config) -> list[Cell]:
    """Every cell's own run config, validated (a mistake names the cell)."""
    base = config.model_dump(mode="json", include=set(chain.Config.model_fields))
    cells = []
    for i, values in enumerate(expand(config)):
        data = json.loads(json.dumps(base))
        for key, value in values.items():
            cfg.set_path(data, key.split("."), value)
        cell_id = f"c{i:02d}"
        try:
            cell_config = cfg.validate(chain.Config, data)
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {cell_id} ({cell_label(values)}): {exc}") from None
        cells.append(Cell(id=cell_id, values=values, label=cell_label(values), config=cell_config))
    labels = [c.label for c in cells]
    for c in cells:
        if labels.count(c.label) > 1:  # two cells differ only in what the short label leaves out
            c.label = f"{c.id}:{c.label}"
    return cells


def check_leaderboard(config: Config) -> None:
    """The evaluate section with the sweep's leaderboard, checked now: a metric it cannot rank by fails here."""
    section = {**config.evaluate, "baseline_of": {"cell": "base"},
               "leaderboard": {"metric": config.leaderboard_metric(), "cells": [{"label": "cell"}]}}
    with tempfile.TemporaryDirectory(prefix="ftjobs-check-") as tmp:
        path = Path(tmp) / "evaluate.yaml"
        path.write_text(yaml.safe_dump(section))
        try:
            chain.validate_arguments("evaluate", ["--predictions", "<base>", "--label", "base", "--predictions",
                                                  "<cell>", "--label", "cell", "--output", "<out>", "--config",
                                                  str(path)])
        except ConfigError as exc:
            raise ConfigError(f"sweep config, section `evaluate` (with the leaderboard by "
                              f"{config.leaderboard_metric()}): {str(exc).replace(f' (in {path})', '')}") from None


def plan_sweep(config: Config, prefix: str, sweep_id: str, *, local: bool) -> plan.Plan:
    """The sweep as a plan: its cells, their shared step instances, served groups and the final leaderboard."""
    cells = make_cells(config)
    check_leaderboard(config)
    return plan.build("sweep", sweep_id, prefix, cells, local=local, serve=config.serve_adapters,
                      metric=config.leaderboard_metric(), evaluate=config.evaluate, axes=list(config.matrix))


# --------------------------------------------------------------------------- running


def run(config: Config) -> mf.Loaded:
    sweep_id = config.sweep_id or mf.new_run_id()
    prefix = storage.join(plan.absolute(config.root, must_exist=False), "sweeps", sweep_id)
    the_plan = plan_sweep(config, prefix, sweep_id, local=True)
    click.echo(the_plan.describe(), err=True)
    the_plan.write_sections()
    with tempfile.TemporaryDirectory(prefix="ftjobs-sweep-") as tmp:
        logs = storage.local_path(storage.join(prefix, "logs")) if not storage.is_s3(prefix) else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        return execute_plan(the_plan, LocalExecutor(config.max_parallel, logs=logs), config)


def execute_plan(the_plan: plan.Plan, executor: Executor, config: Config) -> mf.Loaded:
    """Run the plan, leaderboard included; `<sweep>/sweep.json` records every cell and step, whatever happens."""
    started = time.monotonic()
    return executor.run_recorded(the_plan, lambda: outcome(the_plan, config, started))


def outcome(the_plan: plan.Plan, config: Config, started: float) -> mf.Loaded:
    """The leaderboard's manifest; the gate's verdict (4), failed cells (5) or no finished cell as errors."""
    final = the_plan.final
    assert final is not None
    if final.status == "blocked":
        raise no_cell_finished(the_plan)
    if final.status != "done" and not (final.exit_code == EXIT_GATE and final.manifest):
        raise FtjobsError(f"the sweep's evaluate failed (exit {final.exit_code}): {final.reason}; its log: {final.log}")
    loaded = mf.load(str(final.manifest), verify="none")
    summary(loaded, time.monotonic() - started)
    if final.exit_code == EXIT_GATE:
        click.echo(loaded.uri)
        raise GateFailed(f"the best cell did not beat its own base on {config.leaderboard_metric()}; the "
                         f"leaderboard is at {board_uri(loaded)}")
    failed = the_plan.failed_cells()
    if failed:
        said = "; ".join(f"{f['label']}: {f['step']} exit {f['exit_code']}" for f in failed)
        message = (f"{len(failed)} of {len(the_plan.cells)} cells failed ({said}); the leaderboard lists them: "
                   f"{board_uri(loaded)}. Details in {storage.join(the_plan.prefix, 'sweep.json')}")
        if not config.allow_failed_cells:
            raise CellsFailed(message + ". --allow-failed-cells (allow_failed_cells: true) makes this exit 0.",
                              manifest=loaded.uri)
        LOG.warning("%s", message)
    return loaded


def board_uri(loaded: mf.Loaded) -> str:
    try:
        return loaded.artifact_uri("leaderboard.html")
    except InputError:  # a manifest without the leaderboard (a stand-in stage's): where evaluate would put it
        return storage.join(loaded.prefix, "leaderboard.html")


def summary(loaded: mf.Loaded, seconds: float) -> None:
    """The leaderboard's table and verdict, on stderr so stdout stays one manifest URI."""
    try:
        board = json.loads(storage.read_text(loaded.artifact_uri("leaderboard.json")))
    except InputError:  # no leaderboard file: the verdict the manifest keeps, if any
        verdict = (loaded.manifest.metrics.get("leaderboard") or {}).get("verdict")
        if verdict:
            click.echo(verdict, err=True)
        return
    from jobs.evaluate.leaderboard import table  # the rendering every leaderboard uses

    header, rows = table(board)
    keep = [i for i, h in enumerate(header) if h not in ("tokens trained", "peak memory", "trainable params")]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in keep]
    lines = [f"leaderboard: {loaded.artifact_uri('leaderboard.html')}  (and leaderboard.md)  sweep {seconds:.0f}s"]
    lines += ["  " + "  ".join(str(r[i]).ljust(w) for i, w in zip(keep, widths, strict=True)) for r in [header, *rows]]
    lines.append(board["verdict"])
    click.echo("\n".join(lines), err=True)


def no_cell_finished(the_plan: plan.Plan) -> FtjobsError:
    """The error when every cell failed: the failing steps' exit code when they agree (2, 3), else retryable."""
    failures = [i for i in the_plan.instances.values() if i.status == "failed"]
    codes = {i.exit_code for i in failures if i.exit_code is not None}
    code = codes.pop() if len(codes) == 1 else EXIT_RETRYABLE
    # Steps that failed alike are named once together (three bases' prepares missing one data file: one line)
    same: dict[tuple[int | None, str], list[str]] = {}
    for i in failures:  # the step's own words, else the executor's reason, which names the step
        why = plan.one_line(i.said or i.reason) or "no reason recorded"
        same.setdefault((i.exit_code, why), []).append(i.name)
    logs = list(dict.fromkeys(i.log.rsplit("/", 1)[0] + "/" for i in failures if i.log))
    message = f"no cell of sweep {the_plan.id} finished: " + "; ".join(
        f"{', '.join(names)} exit {exit_code}: {why}" for (exit_code, why), names in same.items()) + (
        f" (logs under {', '.join(logs)})" if logs else "")
    return ConfigError(message) if code == EXIT_CONFIG else InputError(message) if code == EXIT_INPUT \
        else FtjobsError(message)


@click.command("sweep")
@click.option("--sweep-id", "sweep_id", metavar="ID", help="Sweep id; the same id resumes. Default: a new one.")
@click.option("--max-parallel", "max_parallel", type=int, metavar="N", help="Steps run at once (default 2).")
@click.option("--root", metavar="URI", help="Store root; the sweep goes under <root>/sweeps/<sweep_id>/.")
@click.option("--allow-failed-cells", "allow_failed_cells", is_flag=True, default=None,
              help="Exit 0 when some cells failed and the others finished (default: exit 5).")
@config_options(example="train.max_steps=100")
def command(sweep_id: str | None, max_parallel: int | None, root: str | None, allow_failed_cells: bool | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """Run every cell of a matrix of finetunes, sharing equal steps, and rank them on one leaderboard.

    The last stdout line is the evaluate manifest that holds the leaderboard, which lists every cell (a failed
    one with the step that failed, its exit code and why). Exit 0: every cell finished; 5: some cells failed
    (0 with --allow-failed-cells); 4: the gate failed; when no cell finished, the failing steps' code.
    """
    execute(sys.modules[__name__], config_file, sets, {"sweep_id": sweep_id, "max_parallel": max_parallel,
                                                      "root": root, "allow_failed_cells": allow_failed_cells})
