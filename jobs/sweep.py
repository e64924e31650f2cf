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

Steps run as the subprocesses their containers would be, up to `--max-parallel` at once (each gets
cores / max_parallel threads). A failed step fails the cells that need it and no others; the sweep exits
non-zero only when no cell finished (the failing steps' code) or when the gate fails (4: with
`evaluate.fail_if_worse`, the best cell did not beat its own base). `<sweep>/sweep.json` records every
cell and step (status, manifest, exit code, log). SIGTERM or Ctrl-C stops every running step the way the
pipeline stops one (train checkpoints), then exits 1; the same sweep id resumes.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
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
    ConfigError,
    FtjobsError,
    GateFailed,
    InputError,
    Preempted,
)
from common.runner import config_options, execute, exit_code
from jobs import chain
from jobs.pipeline import STOP_MARGIN_S, absolute, step_result

STAGE = "sweep"
LOG = logging.getLogger(__name__)
NOT_IN_MATRIX = ("root", "run_id", "stop_after", "labels", "baseline", "evaluate")
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")


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
    max_parallel: int = Field(2, ge=1, description="Steps run at once (each gets cores / max_parallel threads).")
    metric: str | None = Field(None, description="The leaderboard's metric. Default: evaluate.fail_if_worse, "
                                                 "else exact_match.")
    serve_adapters: bool = Field(True, description="Cells that are plain LoRA (no modules_to_save) on the same "
                                 "base and prompts share one inference engine that serves every adapter (no merge, "
                                 "one engine start); false: every cell merges and infers on its own, as the "
                                 "pipeline does.")

    @field_validator("sweep_id")
    @classmethod
    def _sweep_id(cls, value: str | None) -> str | None:
        if value is not None and not mf.RUN_ID_RE.match(value):
            raise ValueError(f"{value!r} is not a sweep id: use 1-63 letters, digits, '.', '_' or '-', starting "
                             "and ending with a letter or digit (it names the folder <root>/sweeps/<sweep_id>/)")
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


# --------------------------------------------------------------------------- cells and steps


@dataclass
class Cell:
    id: str
    values: dict[str, Any]
    label: str
    run: chain.Config
    keys: dict[str, str] = field(default_factory=dict)  # step name -> the key of the step instance it uses


@dataclass
class Instance:
    """One step of the chain as the sweep runs it: shared by every cell whose recipe for it is equal."""

    step: chain.Step
    key: str
    output: str
    run: chain.Config  # the first cell's: the arguments are the same for every cell sharing the instance
    needs: dict[str, str]  # step name -> key
    cells: list[str] = field(default_factory=list)
    # A served inference: (cell id, train key, that cell's output), one engine for every adapter.
    served: list[tuple[str, str, str]] = field(default_factory=list)
    status: str = "pending"
    manifest: str | None = None
    exit_code: int | None = None
    log: str | None = None
    seconds: float | None = None


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


def short(value: Any) -> str:
    if isinstance(value, list):
        return "+".join(short(v) for v in value) or "none"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return value.rstrip("/").split("/")[-1].removesuffix(".jsonl").removesuffix(".json")
    return str(value)


def cell_label(values: dict[str, Any]) -> str:
    return ",".join(f"{key.split('.')[-1]}={short(v)}" for key, v in values.items())


def make_cells(config: Config) -> list[Cell]:
    base = config.model_dump(mode="json", include=set(chain.Config.model_fields))
    cells = []
    for i, values in enumerate(expand(config)):
        data = json.loads(json.dumps(base))
        for key, value in values.items():
            cfg.set_path(data, key.split("."), value)
        cell_id = f"c{i:02d}"
        try:
            run = cfg.validate(chain.Config, data)
        except ConfigError as exc:
            raise ConfigError(f"sweep cell {cell_id} ({cell_label(values)}): {exc}") from None
        cells.append(Cell(id=cell_id, values=values, label=cell_label(values), run=run))
    labels = [c.label for c in cells]
    for c in cells:
        if labels.count(c.label) > 1:  # two cells differ only in what the short label leaves out
            c.label = f"{c.id}:{c.label}"
    return cells


def run_values(run: chain.Config) -> dict[str, Any]:
    """The run values steps take, local paths made absolute (a cell's manifests name them unambiguously)."""
    return {"base_model": absolute(run.base_model), "data": [absolute(d) for d in run.data]}


def plan(config: Config, cells: list[Cell], prefix: str) -> dict[str, Instance]:
    """Every step instance the cells need, shared where their recipes are equal, in chain order."""
    instances: dict[str, Instance] = {}
    for cell in cells:
        values = run_values(cell.run)
        for step in chain.steps(cell.run):
            if step.stage == "evaluate":
                continue
            needs = {n: cell.keys[n] for n in step.needs() if n in cell.keys}
            takes = {t.key: values[t.source] for t in step.takes if t.source in chain.RUN_VALUES
                     and (t.when is None or getattr(cell.run, t.when))}
            recipe = {"step": step.name, "section": cell.run.section(step), "takes": takes, "needs": needs}
            key = hashlib.sha256(mf.canonical_json(recipe)).hexdigest()[:12]
            cell.keys[step.name] = key
            inst = instances.setdefault(key, Instance(step=step, key=key, run=cell.run, needs=needs,
                                                      output=storage.join(prefix, step.name, key)))
            inst.cells.append(cell.id)
    if config.serve_adapters:
        serve(cells, instances, prefix)
    order = {s.name: i for i, s in enumerate(chain.CHAIN)}
    return dict(sorted(instances.items(), key=lambda kv: order[kv[1].step.name]))


def servable(run: chain.Config) -> bool:
    """Plain LoRA: the adapter alone is the finetune (modules_to_save needs a merge; vLLM serves only LoRA;
    method full has no adapter at all)."""
    return not (run.train.get("lora") or {}).get("modules_to_save") and run.train.get("method") != "full"


def serve(cells: list[Cell], instances: dict[str, Instance], prefix: str) -> None:
    """Replace merge + infer-finetuned of plain-LoRA cells by one served inference per base, prompts and infer
    section: one engine for all their adapters. Each cell keeps an output (and manifest) of its own."""
    groups: dict[str, list[Cell]] = {}
    for cell in cells:
        if not servable(cell.run):
            continue
        step = chain.BY_NAME["infer-finetuned"]
        recipe = {"served": True, "base": run_values(cell.run)["base_model"], "prepare": cell.keys["prepare"],
                  "section": cell.run.section(step)}
        groups.setdefault(hashlib.sha256(mf.canonical_json(recipe)).hexdigest()[:12], []).append(cell)
    for group_key, members in groups.items():
        inst = Instance(step=chain.BY_NAME["infer-finetuned"], key=group_key, run=members[0].run,
                        needs={"prepare": members[0].keys["prepare"]}, output="")
        for cell in members:
            for name in ("merge", "infer-finetuned"):
                old = instances[cell.keys[name]]
                old.cells.remove(cell.id)
                if not old.cells:
                    del instances[cell.keys[name]]
            del cell.keys["merge"]
            own = hashlib.sha256(mf.canonical_json({"served": group_key, "train": cell.keys["train"]})).hexdigest()[:12]
            inst.served.append((cell.id, cell.keys["train"], storage.join(prefix, "infer-finetuned", own)))
            inst.cells.append(cell.id)
            cell.keys["infer-finetuned"] = group_key
        inst.output = inst.served[0][2]
        instances[group_key] = inst


def describe(config: Config, cells: list[Cell], instances: dict[str, Instance], sweep_id: str,
             prefix: str) -> str:
    """What the sweep is about to do, before it does any of it."""
    lines = [f"sweep {sweep_id} under {prefix}: {len(cells)} cells over {', '.join(config.matrix)}; "
             f"leaderboard by {config.leaderboard_metric()}"]
    width = max(len(c.label) for c in cells)
    for c in cells:
        shared = []
        for step_name, key in c.keys.items():
            n = len(instances[key].cells)
            shared.append(f"{step_name}#{key[:6]}" + (f" (shared by {n})" if n > 1 else ""))
        lines.append(f"  {c.id}  {c.label:<{width}}  {'  '.join(shared)}")
    counts: dict[str, int] = {}
    for inst in instances.values():
        counts[inst.step.name] = counts.get(inst.step.name, 0) + 1
    lines.append("steps to run: " + ", ".join(f"{name} {n}" for name, n in counts.items()) + ", evaluate 1 "
                 f"({counts.get('train', 0)} train runs for {len(cells)} cells)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- running


def arguments(inst: Instance, done: dict[str, str], instances: dict[str, Instance], conf_dir: str) -> list[str]:
    """The instance's stage arguments (its section written to `<sweep>/config/<step>-<key>.yaml` once)."""
    conf_uri = storage.join(conf_dir, f"{inst.step.name}-{inst.key}.yaml")
    if not storage.exists(conf_uri):
        storage.write_bytes(conf_uri, yaml.safe_dump(inst.run.section(inst.step), sort_keys=True).encode())
    if inst.served:  # the base model with every trained adapter, one output each
        pairs = [a for _, train, output in inst.served if instances[train].status == "done"
                 for a in ("--adapter", str(instances[train].manifest), "--output", output)]
        return ["--model", run_values(inst.run)["base_model"], "--prompts", done["prepare"], *pairs,
                "--config", conf_uri]
    return [*chain.arguments(inst.step, inst.run, done, run_values(inst.run)), "--output", inst.output,
            "--config", conf_uri]


def ready(pending: list[Instance], instances: dict[str, Instance]) -> list[Instance]:
    """The pending instances whose inputs are all published, in order; those that can never run are marked
    blocked (and dropped from `pending`), naming what they needed."""
    out = []
    for inst in list(pending):
        if inst.served:
            trains = [instances[t] for _, t, _ in inst.served]
            if any(t.status in ("pending", "running") for t in trains):
                continue  # the engine starts once, with every adapter of the group
            if not any(t.status == "done" for t in trains):
                inst.status, inst.exit_code, inst.log = "blocked", trains[0].exit_code, \
                    "every adapter it serves failed to train"
                pending.remove(inst)
                continue
        deps = [instances[k] for k in inst.needs.values()]
        failed = next((d for d in deps if d.status in ("failed", "blocked")), None)
        if failed is not None:
            inst.status, inst.exit_code = "blocked", failed.exit_code
            inst.log = f"needs {failed.step.name}#{failed.key[:6]}, which {failed.status}"
            pending.remove(inst)
        elif all(d.status == "done" for d in deps):
            out.append(inst)
    return out


def inputs_of(inst: Instance, instances: dict[str, Instance]) -> dict[str, str]:
    """{step name: manifest URI} of what the instance takes."""
    return {instances[k].step.name: str(instances[k].manifest) for k in inst.needs.values()}


@dataclass
class Proc:
    inst: Instance
    popen: subprocess.Popen[str]
    log_path: Path
    started: float
    grace: float


class Runner:
    """Steps as subprocesses, up to max_parallel at once; signals are passed on to every running step."""

    def __init__(self, config: Config, prefix: str, conf_dir: str, logs: Path, resolved: dict[str, Any]):
        self.config, self.prefix, self.conf_dir, self.logs = config, prefix, conf_dir, logs
        self.resolved = resolved  # (cell id, step name) -> the step's resolved stage config
        self.received: list[int] = []
        self.threads = max(1, (os.cpu_count() or 1) // config.max_parallel)

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        for var in THREAD_VARS:  # the cores split between the steps that run at once
            env.setdefault(var, str(self.threads))
        env.setdefault("FTJOBS_LOG_FORMAT", "json")
        return env

    def start(self, inst: Instance, args: list[str], name: str) -> Proc:
        log_path = self.logs / f"{name}.log"
        LOG.info("start %s: ftjobs %s %s", name, inst.step.stage, " ".join(args))
        popen = subprocess.Popen([sys.executable, "-m", "jobs.cli", inst.step.stage, *args], env=self.env(),
                                 stdout=subprocess.PIPE, stderr=log_path.open("w"), text=True)
        grace = STOP_MARGIN_S
        if inst.step.stage == "train":
            resolved = self.resolved.get(inst.cells[0], {}).get("train")
            grace += resolved.checkpoint.grace_seconds if resolved is not None else 120.0
        inst.status, inst.log = "running", str(log_path)
        return Proc(inst, popen, log_path, time.monotonic(), grace)

    def finish(self, proc: Proc, name: str) -> None:
        stdout = proc.popen.stdout.read() if proc.popen.stdout else ""
        proc.popen.wait()
        inst = proc.inst
        inst.seconds = round(time.monotonic() - proc.started, 1)
        inst.log = self.keep_log(proc.log_path, name)
        try:
            inst.manifest = step_result(name, proc.popen.returncode, stdout, f"(log: {inst.log})")
            inst.status, inst.exit_code = "done", 0
            LOG.info("%s done in %.0fs: %s", name, inst.seconds, inst.manifest)
        except FtjobsError as exc:
            inst.status, inst.exit_code = "failed", exit_code(exc)
            LOG.error("%s failed (exit %s) after %.0fs: cells %s stop here; log %s", name, inst.exit_code,
                      inst.seconds, ", ".join(inst.cells), inst.log)

    def keep_log(self, path: Path, name: str) -> str:
        """Where the step's log stays: an s3:// sweep's go to the store beside its steps once a step ends."""
        if not storage.is_s3(self.prefix):
            return str(path)
        uri = storage.join(self.prefix, "logs", f"{name}.log")
        storage.upload_file(path, uri)
        return uri

    def run(self, instances: dict[str, Instance], cells: list[Cell]) -> None:
        """Run every instance once its inputs are published; a failure blocks only what needs it."""
        by_key = instances
        running: list[Proc] = []
        pending = [inst for inst in instances.values() if inst.status == "pending"]
        previous = self.install()
        try:
            while pending or running:
                if self.received:
                    self.stop(running)
                for inst in ready(pending, by_key)[:max(0, self.config.max_parallel - len(running))]:
                    args = arguments(inst, inputs_of(inst, by_key), by_key, self.conf_dir)
                    running.append(self.start(inst, args, f"{inst.step.name}-{inst.key}"))
                    pending.remove(inst)
                for proc in list(running):
                    if proc.popen.poll() is not None:
                        self.finish(proc, f"{proc.inst.step.name}-{proc.inst.key}")
                        running.remove(proc)
                time.sleep(0.2)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def install(self) -> dict[int, Any]:
        def forward(signum: int, frame: Any) -> None:
            if not self.received:
                self.received.append(signum)
                LOG.warning("received %s: passing SIGTERM to every running step and waiting for them to save "
                            "their state", signal.Signals(signum).name)

        return {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}

    def stop(self, running: list[Proc]) -> None:
        for proc in running:
            if proc.popen.poll() is None:
                proc.popen.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + max((p.grace for p in running), default=0.0)
        for proc in running:
            while proc.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.2)
            if proc.popen.poll() is None:
                proc.popen.kill()
            self.finish(proc, f"{proc.inst.step.name}-{proc.inst.key}")
        raise Preempted(f"{signal.Signals(self.received[0]).name} during the sweep: the running steps were "
                        "stopped (train checkpoints). Re-run with the same --sweep-id to resume: finished steps "
                        "are skipped.")


# --------------------------------------------------------------------------- the leaderboard


def leaderboard_step(config: Config, cells: list[Cell], instances: dict[str, Instance], prefix: str,
                     conf_dir: str) -> tuple[Instance, list[str], list[Cell]]:
    """One evaluate over every base model's predictions and every finished cell, each against its own base."""
    finished = [c for c in cells if finetuned(c, instances) and instances[c.keys["infer-base"]].status == "done"]
    bases: dict[str, str] = {}  # infer-base key -> label
    for c in finished:
        key = c.keys["infer-base"]
        if key not in bases:
            label = f"base:{short(c.run.base_model)}"
            bases[key] = label if label not in bases.values() else f"{label}#{key[:6]}"  # same base, other prompts
    predictions = [instances[k].manifest for k in bases] + [finetuned(c, instances) for c in finished]
    labels = list(bases.values()) + [c.label for c in finished]
    board = {"metric": config.leaderboard_metric(),
             "cells": [{"label": c.label, "values": c.values,
                        "train": instances[c.keys["train"]].manifest} for c in finished]}
    section = {**config.evaluate, "baseline_of": {c.label: bases[c.keys["infer-base"]] for c in finished},
               "leaderboard": board}
    key = hashlib.sha256(mf.canonical_json({"section": section, "predictions": predictions,
                                            "labels": labels})).hexdigest()[:12]
    step = chain.BY_NAME["evaluate"]
    inst = Instance(step=step, key=key, run=config, needs={}, output=storage.join(prefix, "evaluate", key),
                    cells=[c.id for c in finished])
    conf_uri = storage.join(conf_dir, f"evaluate-{key}.yaml")
    storage.write_bytes(conf_uri, yaml.safe_dump(section, sort_keys=True).encode())
    args = [a for p, label in zip(predictions, labels, strict=True)
            for a in ("--predictions", str(p), "--label", label)]
    return inst, [*args, "--output", inst.output, "--config", conf_uri], finished


def finetuned(cell: Cell, instances: dict[str, Instance]) -> str | None:
    """The cell's finetuned predictions manifest, when its inference finished."""
    inst = instances[cell.keys["infer-finetuned"]]
    if inst.status != "done" or instances[cell.keys["train"]].status != "done":
        return None
    if not inst.served:
        return inst.manifest
    output = next(out for cell_id, _, out in inst.served if cell_id == cell.id)
    return mf.manifest_uri(output) if storage.exists(mf.manifest_uri(output)) else None


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


def record(prefix: str, sweep_id: str, cells: list[Cell], instances: dict[str, Instance],
           evaluate: Instance | None, code: int) -> None:
    steps = {k: {"step": i.step.name, "status": i.status, "output": i.output, "manifest": i.manifest,
                 "exit_code": i.exit_code, "log": i.log, "seconds": i.seconds, "cells": i.cells}
             for k, i in instances.items()}
    body = {"sweep_id": sweep_id, "prefix": prefix, "exit_code": code,
            "cells": [{"id": c.id, "label": c.label, "values": c.values, "steps": c.keys,
                       "status": next((instances[k].status for k in c.keys.values()
                                       if instances[k].status != "done"), "done")} for c in cells],
            "steps": steps,
            "evaluate": None if evaluate is None else {"status": evaluate.status, "manifest": evaluate.manifest,
                                                       "exit_code": evaluate.exit_code, "log": evaluate.log}}
    storage.write_bytes(storage.join(prefix, "sweep.json"), json.dumps(body, indent=2, default=str).encode())


def run(config: Config) -> mf.Loaded:
    sweep_id = config.sweep_id or mf.new_run_id()
    prefix = storage.join(absolute(config.root, must_exist=False), "sweeps", sweep_id)
    cells = make_cells(config)
    resolved = {c.id: chain.check(c.run) for c in cells}  # every cell's every step, before any runs
    check_leaderboard(config)
    instances = plan(config, cells, prefix)
    click.echo(describe(config, cells, instances, sweep_id, prefix), err=True)
    conf_dir = storage.join(prefix, "config")
    with tempfile.TemporaryDirectory(prefix="ftjobs-sweep-") as tmp:
        logs = storage.local_path(storage.join(prefix, "logs")) if not storage.is_s3(prefix) else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        runner = Runner(config, prefix, conf_dir, logs, resolved)
        started = time.monotonic()
        evaluate: Instance | None = None
        code = EXIT_RETRYABLE
        try:
            runner.run(instances, cells)
            inst, args, finished = leaderboard_step(config, cells, instances, prefix, conf_dir)
            if not finished:
                error = no_cell_finished(sweep_id, instances)
                code = error.exit_code
                raise error
            evaluate = inst
            proc = runner.start(inst, args, f"evaluate-{inst.key}")
            while proc.popen.poll() is None:
                time.sleep(0.2)
            runner.finish(proc, f"evaluate-{inst.key}")
            loaded = mf.load(inst.output, verify="none") if inst.status == "done" or inst.exit_code == EXIT_GATE \
                else None
            if loaded is None:
                raise FtjobsError(f"the sweep's evaluate failed (exit {inst.exit_code}); its log: {inst.log}")
            summary(loaded, time.monotonic() - started)
            failed = [c for c in cells if c not in finished]
            if failed:
                LOG.warning("%d of %d cells did not finish: %s (see %s)", len(failed), len(cells),
                            ", ".join(c.id for c in failed), storage.join(prefix, "sweep.json"))
            if inst.exit_code == EXIT_GATE:
                code = EXIT_GATE
                gate_failed(config, loaded)
            code = 0
            return loaded
        except BaseException as exc:
            code = code if code != EXIT_RETRYABLE else exit_code(exc)
            raise
        finally:
            record(prefix, sweep_id, cells, instances, evaluate, code)


def summary(loaded: mf.Loaded, seconds: float) -> None:
    """The leaderboard's table and verdict, on stderr so stdout stays one manifest URI."""
    board = json.loads(storage.read_text(loaded.artifact_uri("leaderboard.json")))
    from jobs.evaluate.leaderboard import table  # the rendering every leaderboard uses

    header, rows = table(board)
    keep = [i for i, h in enumerate(header) if h not in ("tokens trained", "peak memory", "trainable params")]
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in keep]
    lines = [f"leaderboard: {loaded.artifact_uri('leaderboard.html')}  (and leaderboard.md)  sweep {seconds:.0f}s"]
    lines += ["  " + "  ".join(str(r[i]).ljust(w) for i, w in zip(keep, widths, strict=True)) for r in [header, *rows]]
    lines.append(board["verdict"])
    click.echo("\n".join(lines), err=True)


def no_cell_finished(sweep_id: str, instances: dict[str, Instance]) -> FtjobsError:
    """The error when every cell failed: the failing steps' exit code when they agree (2, 3), else retryable."""
    failures = [i for i in instances.values() if i.status == "failed"]
    codes = {i.exit_code for i in failures if i.exit_code is not None}
    code = codes.pop() if len(codes) == 1 else EXIT_RETRYABLE
    message = f"no cell of sweep {sweep_id} finished; the failing steps: " + "; ".join(
        f"{i.step.name}#{i.key[:6]} exit {i.exit_code} (log {i.log})" for i in failures)
    return ConfigError(message) if code == EXIT_CONFIG else InputError(message) if code == EXIT_INPUT \
        else FtjobsError(message)


def gate_failed(config: Config, loaded: mf.Loaded) -> None:
    """The leaderboard's evaluate exited 4: its manifest stays the stdout line, and the sweep exits 4."""
    click.echo(loaded.uri)
    raise GateFailed(f"the best cell did not beat its own base on {config.leaderboard_metric()}; the "
                     f"leaderboard is at {loaded.artifact_uri('leaderboard.html')}")


@click.command("sweep")
@click.option("--sweep-id", "sweep_id", metavar="ID", help="Sweep id; the same id resumes. Default: a new one.")
@click.option("--max-parallel", "max_parallel", type=int, metavar="N", help="Steps run at once (default 2).")
@click.option("--root", metavar="URI", help="Store root; the sweep goes under <root>/sweeps/<sweep_id>/.")
@config_options(example="train.max_steps=100")
def command(sweep_id: str | None, max_parallel: int | None, root: str | None, config_file: str | None,
            sets: tuple[str, ...]) -> None:
    """Run every cell of a matrix of finetunes, sharing equal steps, and rank them on one leaderboard.

    The last stdout line is the evaluate manifest that holds the leaderboard (also on exit 4, the gate).
    """
    execute(sys.modules[__name__], config_file, sets, {"sweep_id": sweep_id, "max_parallel": max_parallel,
                                                      "root": root})
