"""The plan: every step instance a run or a sweep takes, built once from its config and `CHAIN`, before any work.

A plan is cells (a run is a plan of one cell; a sweep's cells come from its matrix), their step instances and
the dependencies between them. An instance is keyed by its identity: a hash of the step, its config section,
the run values it takes and the keys of the steps it takes from. Cells whose recipe for a step is equal share
the instance (one prepare for every cell with the same data and tokenizer). In a sweep, plain-LoRA cells on
the same base and prompts are served by one inference instance (one engine, every adapter), and a final
instance, the leaderboard's evaluate, depends on every other instance and ranks the cells that finished.

Outputs: a run writes `<prefix>/<step>/` (prefix `<root>/runs/<run_id>`), a sweep `<prefix>/<step>/<key>/`
(prefix `<root>/sweeps/<sweep_id>`); each step's config section goes to `<prefix>/config/<name>.yaml`.

Executors (`jobs/executors/`) only execute a plan: they start each instance once `ready()` says its inputs
are published, with `arguments()` and `env()`, and record what happened on the instance (status, manifest,
exit code, reason). A new `Step` in `CHAIN` is planned, run and rendered with no change here or there.

Words: the "run" is the chain's run (its id, `Plan.id`, is in every step's manifest); a step instance's
"key" is its identity hash, which with the stage's "already done" rule decides what is skipped; a cell's
run config is `cell.config`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from common import manifest as mf
from common import storage
from jobs import chain
from jobs.prepare import config as prepare_config

# How long a step may take to stop after SIGTERM, on top of its own grace period (a stage config's
# checkpoint.grace_seconds, train's): the exit itself (closing files, an engine's processes) takes a few seconds.
STOP_MARGIN_S = 30.0
LEADERBOARD = "evaluate"  # the chain step a sweep replaces by its one leaderboard over every cell
PREDICTIONS = "infer-finetuned"  # the finetuned model's predictions (what `serve` replaces for plain-LoRA cells)
# The step whose predictions of a cell the leaderboard ranks: the cell's last model, the DPO model when the cell
# trains one (a `dpo` section), else the finetuned model.
RANKED = ("infer-dpo", PREDICTIONS)
SETTLED = ("done", "failed", "blocked", "interrupted")
# Steps that read only the prepare run's held-out split: cells whose prepare runs differ only in settings that
# cut the training split (prepare's TRAIN_ONLY: a learning curve) share one of each, so the base is scored once.
HELD_OUT_STEPS = ("infer-base", "infer-champion")


def grace_s(resolved: Any) -> float:
    """Seconds a step gets between SIGTERM and SIGKILL: its config's checkpoint.grace_seconds plus the margin."""
    checkpoint = getattr(resolved, "checkpoint", None)
    return STOP_MARGIN_S + float(getattr(checkpoint, "grace_seconds", 0) or 0)


def absolute(src: str, *, must_exist: bool = True) -> str:
    """Local paths become absolute, so manifests name raw data, models and outputs unambiguously."""
    if storage.is_s3(src) or src.startswith("file://") or (must_exist and not Path(src).exists()):
        return src
    return str(Path(src).resolve())


def short_hash(obj: Any) -> str:
    return hashlib.sha256(mf.canonical_json(obj)).hexdigest()[:12]


@dataclass
class Cell:
    """One run config of the plan (a sweep's matrix point), and the key of each step instance it uses."""

    id: str
    values: dict[str, Any]
    label: str
    config: chain.Config
    keys: dict[str, str] = field(default_factory=dict)  # step name -> instance key


@dataclass(frozen=True)
class Served:
    """One adapter a served inference answers with: the cell, its train (or select) instance's key, the cell's own
    output."""

    cell: str
    train: str
    output: str


@dataclass
class Instance:
    """One step as the plan runs it, shared by every cell whose recipe for it is equal."""

    step: chain.Step
    key: str
    name: str  # `<step>` in a run, `<step>-<key>` in a sweep: its log, config file and record entry
    tag: str | None  # what tells its Job apart from the run's other Jobs of the same stage
    output: str
    config: chain.Config  # the first cell's: the arguments are the same for every cell sharing the instance
    needs: dict[str, str]  # step name -> key
    cells: list[str] = field(default_factory=list)
    served: list[Served] = field(default_factory=list)
    final: bool = False  # the leaderboard: runs once every other instance settled, over the cells that finished
    grace_s: float = STOP_MARGIN_S
    # what an executor records
    status: str = "pending"  # pending, running, done, failed, blocked, interrupted
    already_done: bool = False
    manifest: str | None = None
    exit_code: int | None = None
    reason: str | None = None
    said: str | None = None  # the step's own words within `reason` (executors.Finished.said)
    log: str | None = None
    seconds: float | None = None


@dataclass
class Plan:
    kind: Literal["run", "sweep"]
    id: str
    prefix: str
    cells: list[Cell]
    instances: dict[str, Instance]  # by key, in the order they may start (chain order; the final one last)
    local: bool  # run values as local absolute paths (the local executor) or as given (a cluster)
    metric: str | None = None  # the leaderboard's
    axes: list[str] = field(default_factory=list)  # what the cells vary (a sweep's matrix keys)
    evaluate: dict[str, Any] = field(default_factory=dict)  # the leaderboard's evaluate section
    # prepare instance -> the first prepare instance with the same held-out split (HELD_OUT_STEPS take that one),
    # and that first instance by the recipe of its held-out split
    held_out: dict[str, str] = field(default_factory=dict)
    held_out_first: dict[str, str] = field(default_factory=dict)

    @property
    def record_name(self) -> str:
        return "pipeline.json" if self.kind == "run" else "sweep.json"

    @property
    def resume_hint(self) -> str:
        return f"--{self.kind}-id {self.id}"

    @property
    def final(self) -> Instance | None:
        return next((i for i in self.instances.values() if i.final), None)

    def env(self, inst: Instance) -> dict[str, str]:
        """What every step is told about the run it belongs to (its manifest records it)."""
        env = {mf.RUN_ID_ENV: self.id}
        if self.kind == "sweep":
            env[mf.CELLS_ENV] = ",".join(inst.cells)
        return env

    def values(self, config: chain.Config) -> dict[str, Any]:
        """The run values steps take; local paths made absolute when the steps run here."""
        values = config.run_values()  # the champion is pinned by then (chain.pin_champion)
        if not self.local:
            return values
        data = [{**d, "path": absolute(d["path"])} if isinstance(d, dict) else absolute(d) for d in config.data]
        return {**values, "base_model": absolute(config.base_model), "data": data,
                "preference_data": [absolute(d) for d in config.preference_data],
                "root": absolute(config.root, must_exist=False)}

    def conf_uri(self, inst: Instance) -> str:
        return storage.join(self.prefix, "config", f"{inst.name}.yaml")

    def write_sections(self) -> None:
        """Each instance's config section, where its `--config` points (a sweep's are content-addressed)."""
        for inst in self.instances.values():
            if not inst.final:
                data = yaml.safe_dump(inst.config.section(inst.step), sort_keys=True).encode()
                storage.write_bytes(self.conf_uri(inst), data)

    # ----------------------------------------------------------------------- what a step is started with

    def arguments(self, inst: Instance, *, stand_in: bool = False) -> list[str]:
        """The instance's stage arguments. `stand_in`: as they will be once what it takes from published
        (to check every step before the first starts)."""
        if inst.final:
            return self.leaderboard_arguments(inst)
        done = {self.instances[k].step.name: (mf.manifest_uri(self.instances[k].output) if stand_in
                                              else str(self.instances[k].manifest)) for k in inst.needs.values()}
        if inst.served:  # the base model with every trained adapter, one output each
            trains = [(s, self.instances[s.train]) for s in inst.served]
            pairs = [a for s, t in trains if stand_in or t.status == "done"
                     for a in ("--adapter", mf.manifest_uri(t.output) if stand_in else str(t.manifest),
                               "--output", s.output)]
            return ["--model", self.values(inst.config)["base_model"], "--prompts", done["prepare"], *pairs,
                    "--config", self.conf_uri(inst)]
        return [*chain.arguments(inst.step, inst.config, done, self.values(inst.config)), "--output", inst.output,
                "--config", self.conf_uri(inst)]

    def ready(self, pending: list[Instance]) -> list[Instance]:
        """The pending instances whose inputs are all published, in order. Those that never can run are
        marked blocked (and dropped from `pending`), naming what they needed."""
        out = []
        for inst in list(pending):
            if inst.final:
                if all(i.status in SETTLED for i in self.instances.values() if not i.final):
                    if self.finished_cells():
                        out.append(inst)
                    else:
                        self._block(pending, inst, None, "no cell finished")
                continue
            if inst.served:
                trains = [self.instances[s.train] for s in inst.served]
                if any(t.status not in SETTLED for t in trains):
                    continue  # the engine starts once, with every adapter of the group
                if not any(t.status == "done" for t in trains):
                    self._block(pending, inst, trains[0].exit_code, "every adapter it serves failed to train")
                    continue
            deps = [self.instances[k] for k in inst.needs.values()]
            failed = next((d for d in deps if d.status in ("failed", "blocked", "interrupted")), None)
            if failed is not None:
                self._block(pending, inst, failed.exit_code, f"needs {failed.name}, which {failed.status}")
            elif all(d.status == "done" for d in deps):
                out.append(inst)
        return out

    @staticmethod
    def _block(pending: list[Instance], inst: Instance, code: int | None, why: str) -> None:
        inst.status, inst.exit_code, inst.reason = "blocked", code, why
        pending.remove(inst)

    # ----------------------------------------------------------------------- the cells' outcome

    def finetuned(self, cell: Cell) -> str | None:
        """The predictions manifest the leaderboard ranks for the cell (its last model's: RANKED), once every step
        of the cell finished."""
        ranked = next((name for name in RANKED if name in cell.keys), None)
        if ranked is None or any(self.instances[k].status != "done" for k in cell.keys.values()):
            return None
        inst = self.instances[cell.keys[ranked]]
        if not inst.served:
            return inst.manifest
        output = next(s.output for s in inst.served if s.cell == cell.id)
        return mf.manifest_uri(output) if storage.exists(mf.manifest_uri(output)) else None

    def finished_cells(self) -> list[Cell]:
        return [c for c in self.cells if self.finetuned(c)]

    def failed_step(self, cell: Cell) -> Instance | None:
        """The step that stopped the cell: its first instance, in chain order, that did not finish."""
        insts = [self.instances[k] for k in cell.keys.values() if k in self.instances]
        return next((i for i in insts if i.status == "failed"), None) or next(
            (i for i in insts if i.status != "done"), None)

    def failed_cells(self) -> list[dict[str, Any]]:
        """Every cell that did not finish: its label and values, the step that failed, its exit code and why."""
        out = []
        for cell in self.cells:
            if self.finetuned(cell):
                continue
            inst = self.failed_step(cell)
            out.append({"label": cell.label, "values": cell.values, "step": inst.step.name if inst else None,
                        "exit_code": inst.exit_code if inst else None,
                        "reason": one_line(inst.reason if inst else None) or (inst.status if inst else "")})
        return out

    # ----------------------------------------------------------------------- the leaderboard

    def leaderboard_arguments(self, inst: Instance) -> list[str]:
        """One evaluate over every base model's predictions and every finished cell, each against its own base;
        the cells that did not finish are listed with why. Fixes the instance's key and output."""
        finished = self.finished_cells()
        bases: dict[str, str] = {}  # infer-base key -> label
        for c in finished:
            key = c.keys["infer-base"]
            if key not in bases:
                label = f"base:{short(c.config.base_model)}"
                bases[key] = label if label not in bases.values() else f"{label}#{key[:6]}"  # other prompts
        predictions = [str(self.instances[k].manifest) for k in bases] + [str(self.finetuned(c)) for c in finished]
        labels = list(bases.values()) + [c.label for c in finished]
        board = {"metric": self.metric,
                 "cells": [{"label": c.label, "values": c.values,
                            "train": self.instances[c.keys["train"]].manifest} for c in finished],
                 "failed": self.failed_cells()}
        section = {**self.evaluate, "baseline_of": {c.label: bases[c.keys["infer-base"]] for c in finished},
                   "leaderboard": board}
        inst.key = short_hash({"section": section, "predictions": predictions, "labels": labels})
        inst.name = f"{LEADERBOARD}-{inst.key}"
        inst.output = storage.join(self.prefix, LEADERBOARD, inst.key)
        inst.cells = [c.id for c in finished]
        conf_uri = self.conf_uri(inst)
        storage.write_bytes(conf_uri, yaml.safe_dump(section, sort_keys=True).encode())
        args = [a for p, label in zip(predictions, labels, strict=True) for a in ("--predictions", p, "--label", label)]
        return [*args, "--output", inst.output, "--config", conf_uri]

    # ----------------------------------------------------------------------- printed and recorded

    def describe(self) -> str:
        """What the plan is about to do, before it does any of it."""
        regular = [i for i in self.instances.values() if not i.final]
        if self.kind == "run":
            steps = ", ".join(i.step.name for i in regular)
            return f"run {self.id} under {self.prefix} (resume with --run-id {self.id}): {steps}"
        lines = [f"sweep {self.id} under {self.prefix}: {len(self.cells)} cells over "
                 f"{', '.join(self.axes)}; leaderboard by {self.metric}"]
        width = max(len(c.label) for c in self.cells)
        for c in self.cells:
            shared = []
            for step_name, key in c.keys.items():
                n = len(self.instances[key].cells)
                shared.append(f"{step_name}#{key[:6]}" + (f" (shared by {n})" if n > 1 else ""))
            lines.append(f"  {c.id}  {c.label:<{width}}  {'  '.join(shared)}")
        counts: dict[str, int] = {}
        for inst in self.instances.values():
            counts[inst.step.name] = counts.get(inst.step.name, 0) + 1
        lines.append("steps to run: " + ", ".join(f"{name} {n}" for name, n in counts.items())
                     + f" ({counts.get('train', 0)} train runs for {len(self.cells)} cells)")
        return "\n".join(lines)

    def record(self, code: int) -> None:
        """`<prefix>/pipeline.json` (a run) or `<prefix>/sweep.json` (a sweep): every step and the exit code."""
        body = self._run_record(code) if self.kind == "run" else self._sweep_record(code)
        storage.write_bytes(storage.join(self.prefix, self.record_name),
                            json.dumps(body, indent=2, default=str).encode())

    def _run_record(self, code: int) -> dict[str, Any]:
        steps = {}
        for i in self.instances.values():
            if i.status in ("pending", "blocked"):
                continue
            status = ("already done" if i.already_done else "done") if i.status == "done" else \
                "gate failed" if i.exit_code == 4 and i.status == "failed" else i.status
            steps[i.step.name] = {"seconds": i.seconds, "status": status, "exit_code": i.exit_code,
                                  **({"manifest": i.manifest} if i.manifest else {})}
        return {"run_id": self.id, "prefix": self.prefix, "steps": steps, "exit_code": code}

    def _sweep_record(self, code: int) -> dict[str, Any]:
        regular = {k: i for k, i in self.instances.items() if not i.final}
        steps = {k: {"step": i.step.name, "status": i.status, "output": i.output, "manifest": i.manifest,
                     "exit_code": i.exit_code, "reason": i.reason, "log": i.log, "seconds": i.seconds,
                     "cells": i.cells} for k, i in regular.items()}
        final = self.final
        evaluate = None if final is None or final.status in ("pending", "blocked") else {
            "status": final.status, "manifest": final.manifest, "exit_code": final.exit_code, "log": final.log}
        return {"sweep_id": self.id, "prefix": self.prefix, "exit_code": code,
                "cells": [{"id": c.id, "label": c.label, "values": c.values, "steps": c.keys,
                           "status": next((regular[k].status for k in c.keys.values()
                                           if regular[k].status != "done"), "done")} for c in self.cells],
                "failed": self.failed_cells(), "steps": steps, "evaluate": evaluate}


def one_line(text: str | None, limit: int = 240) -> str | None:
    if not text:
        return None
    first = next((line.strip() for line in text.splitlines() if line.strip()), "")
    return first if len(first) <= limit else first[:limit - 3] + "..."


def short(value: Any) -> str:
    """A value as a cell label shows it: a path's last part, a list joined with '+'."""
    if isinstance(value, list):
        return "+".join(short(v) for v in value) or "none"
    if isinstance(value, str) and ("/" in value or "\\" in value):
        return value.rstrip("/").split("/")[-1].removesuffix(".jsonl").removesuffix(".json")
    return str(value)


# --------------------------------------------------------------------------- building


def build(kind: Literal["run", "sweep"], plan_id: str, prefix: str, cells: list[Cell], *, local: bool,
          serve: bool = False, metric: str | None = None, evaluate: dict[str, Any] | None = None,
          axes: list[str] | None = None) -> Plan:
    """Every step instance the cells take, shared where their recipes are equal, checked before any runs.

    A sweep (`kind="sweep"`) leaves the chain's own comparison out of each cell and ends with one leaderboard
    instead; `serve` replaces merge + infer-finetuned of plain-LoRA cells by one served inference per group.
    """
    plan = Plan(kind=kind, id=plan_id, prefix=prefix, cells=cells, instances={}, local=local, metric=metric,
                evaluate=dict(evaluate or {}), axes=list(axes or []))
    for cell in cells:
        resolved = chain.check(cell.config)  # every step's config, before any step runs
        left_out = {LEADERBOARD} if kind == "sweep" else set()
        for step in chain.steps(cell.config):
            if step.name in left_out or left_out & set(step.needs()):
                left_out.add(step.name)  # a sweep's cells stop before the comparison and what takes from it
                continue
            _add(plan, cell, step, resolved.get(step.name))
    if serve:
        _serve(plan)
    order = {s.name: i for i, s in enumerate(chain.CHAIN)}
    plan.instances = dict(sorted(plan.instances.items(), key=lambda kv: order[kv[1].step.name]))
    if kind == "sweep":
        final = Instance(step=chain.BY_NAME[LEADERBOARD], key=LEADERBOARD, name=LEADERBOARD, tag=None, output="",
                         config=cells[0].config, needs={}, final=True)
        plan.instances[LEADERBOARD] = final
    return plan


def _add(plan: Plan, cell: Cell, step: chain.Step, resolved: Any) -> None:
    values = plan.values(cell.config)
    needs = {n: cell.keys[n] for n in step.needs() if n in cell.keys}
    if step.name in HELD_OUT_STEPS and "prepare" in needs:
        needs["prepare"] = plan.held_out[needs["prepare"]]
    takes = {t.key: values[t.source] for t in step.takes if t.source in chain.RUN_VALUES
             and (t.when is None or getattr(cell.config, t.when))}
    section = cell.config.section(step)
    key = short_hash({"step": step.name, "section": section, "takes": takes, "needs": needs})
    if step.stage == "prepare":
        held_out = {k: v for k, v in section.items() if k not in prepare_config.TRAIN_ONLY}
        recipe = short_hash({"step": step.name, "section": held_out, "takes": takes, "needs": needs})
        plan.held_out[key] = plan.held_out_first.setdefault(recipe, key)
    cell.keys[step.name] = key
    step_tag = step.name.removeprefix(step.stage).strip("-") or None  # infer-base: stage infer, tag base
    if plan.kind == "run":
        name, tag, output = step.name, step_tag, storage.join(plan.prefix, step.name)
    else:
        name = f"{step.name}-{key}"
        tag, output = "-".join(p for p in (step_tag, key[:8]) if p), storage.join(plan.prefix, step.name, key)
    inst = plan.instances.setdefault(key, Instance(step=step, key=key, name=name, tag=tag, output=output,
                                                   config=cell.config, needs=needs, grace_s=grace_s(resolved)))
    inst.cells.append(cell.id)


def servable(config: chain.Config) -> bool:
    """Plain LoRA: the adapter alone is the finetune (modules_to_save needs a merge; vLLM serves only LoRA;
    method full has no adapter at all)."""
    return not (config.train.get("lora") or {}).get("modules_to_save") and config.train.get("method") != "full"


def _serve(plan: Plan) -> None:
    """Replace merge + infer-finetuned of plain-LoRA cells by one served inference per base, prompts and infer
    section: one engine for all their adapters. Each cell keeps an output (and manifest) of its own."""
    step = chain.BY_NAME[PREDICTIONS]
    groups: dict[str, list[Cell]] = {}
    for cell in plan.cells:
        if servable(cell.config) and PREDICTIONS in cell.keys:
            recipe = {"served": True, "base": plan.values(cell.config)["base_model"], "prepare": cell.keys["prepare"],
                      "section": cell.config.section(step)}
            groups.setdefault(short_hash(recipe), []).append(cell)
    for group_key, members in groups.items():
        inst = Instance(step=step, key=group_key, name=f"{step.name}-{group_key}", tag=f"finetuned-{group_key[:8]}",
                        output="", config=members[0].config, needs={"prepare": members[0].keys["prepare"]})
        for cell in members:
            for name in ("merge", PREDICTIONS):
                old = plan.instances[cell.keys[name]]
                old.cells.remove(cell.id)
                if not old.cells:
                    del plan.instances[cell.keys[name]]
            del cell.keys["merge"]
            adapter = cell.keys.get("select", cell.keys["train"])  # train.select: the chosen checkpoint's adapter
            own = short_hash({"served": group_key, "train": adapter})
            inst.served.append(Served(cell.id, adapter, storage.join(plan.prefix, PREDICTIONS, own)))
            inst.cells.append(cell.id)
            cell.keys[PREDICTIONS] = group_key
        inst.output = inst.served[0].output
        plan.instances[group_key] = inst
