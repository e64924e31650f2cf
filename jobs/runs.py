"""`ftjobs runs list|show`: the runs and sweeps in a store, and every step of one, read from the store alone.

    ftjobs runs list --root s3://ml-data/ftjobs
    ftjobs runs show 20261206-202955-bc128c --root s3://ml-data/ftjobs      # a run: its steps and manifests
    ftjobs runs show s1 --root s3://ml-data/ftjobs [--json]                 # a sweep: its steps and their cells

Every step an executor starts records the run's id in its manifest (`run_id`; a sweep's steps the sweep id and
the cells they served), so from any manifest (`ftjobs show URI` prints its run) this lists the run it belongs
to, with no path to know: a run's steps are under `<root>/runs/<id>/`, a sweep's under `<root>/sweeps/<id>/`
(on Kubernetes `<FTJOBS_RUNS>/<id>/` and `<FTJOBS_RUNS>/sweeps/<id>/`, with FTJOBS_RUNS = `<root>/runs`).
Manifests written before run ids were recorded (schema 1) are listed too, marked as carrying another id.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import click

from common import manifest as mf
from common import storage
from common.errors import ConfigError, InputError

RECORDS = ("pipeline.json", "sweep.json")


def places(root: str, run_id: str) -> list[str]:
    """Where a run or sweep of this id can live under the store root (local executors, then Kubernetes')."""
    base = storage.normalize(root).rstrip("/")
    return [storage.join(base, "runs", run_id), storage.join(base, "sweeps", run_id),
            storage.join(base, "runs", "sweeps", run_id)]


@dataclass
class Step:
    rel: str  # the step's folder under the run: `<step>` or `<step>/<key>`
    loaded: mf.Loaded


@dataclass
class Found:
    run_id: str
    prefix: str
    record: dict[str, Any] | None
    steps: list[Step]

    @property
    def kind(self) -> str:
        return "sweep" if self.record and "sweep_id" in self.record or "/sweeps/" in self.prefix else "run"


def find(root: str, run_id: str) -> Found:
    """The run's (or sweep's) record and every step manifest under it (not earlier attempts' files)."""
    problem = mf.run_id_problem(run_id)
    if problem:
        raise ConfigError(problem)
    for prefix in places(root, run_id):
        objects = storage.list_objects(prefix)
        if not objects:
            continue
        record = None
        steps = []
        for obj in objects:
            parts = obj.rel.split("/")
            if obj.rel in RECORDS:
                record = json.loads(storage.read_text(obj.uri))
            elif parts[-1] == mf.MANIFEST_NAME and "attempts" not in parts and "config" not in parts:
                steps.append(Step("/".join(parts[:-1]), mf.load(obj.uri, verify="none")))
        steps.sort(key=lambda s: s.loaded.manifest.created_at)
        return Found(run_id, prefix, record, steps)
    raise InputError(f"no run or sweep {run_id} under {root} (looked in {', '.join(places(root, run_id))}): "
                      f"`ftjobs runs list --root {root}` lists those there")


def listing(root: str) -> list[dict[str, Any]]:
    """Every run and sweep under the root: its id, kind, step manifests and recorded exit code."""
    base = storage.normalize(root).rstrip("/")
    out: dict[str, dict[str, Any]] = {}
    for kind, prefix in (("run", storage.join(base, "runs")), ("sweep", storage.join(base, "sweeps")),
                         ("sweep", storage.join(base, "runs", "sweeps"))):
        for obj in storage.iter_objects(prefix):
            parts = obj.rel.split("/")
            if kind == "run" and parts[0] == "sweeps":
                continue
            entry = out.setdefault(f"{kind}:{parts[0]}", {"id": parts[0], "kind": kind, "prefix":
                                                          storage.join(prefix, parts[0]), "steps": 0,
                                                          "exit_code": None})
            if len(parts) == 2 and parts[1] in RECORDS:
                entry["exit_code"] = json.loads(storage.read_text(obj.uri)).get("exit_code")
            elif parts[-1] == mf.MANIFEST_NAME and "attempts" not in parts:
                entry["steps"] += 1
    return sorted(out.values(), key=lambda e: e["id"])


@click.group("runs")
def command() -> None:
    """The runs and sweeps in a store, and each one's steps with their manifests."""


@command.command("list")
@click.option("--root", required=True, metavar="URI", help="Store root (local folder or s3://bucket/prefix).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON array.")
def list_command(root: str, as_json: bool) -> None:
    """Every run and sweep under ROOT: id, kind, how many steps published, the recorded exit code."""
    entries = listing(root)
    if as_json:
        click.echo(json.dumps(entries, indent=2))
        return
    if not entries:  # an empty answer says where it looked: a mistyped root is the usual cause
        click.echo(_nothing_under(root), err=True)
    for e in entries:
        code = "" if e["exit_code"] is None else f"exit {e['exit_code']}"
        click.echo(f"{e['id']:<32} {e['kind']:<6} {e['steps']:>3} steps  {code:<7} {e['prefix']}")


def _nothing_under(root: str) -> str:
    """Why `runs list` printed nothing, and the root to try when ROOT is a runs/ or sweeps/ folder itself."""
    base = storage.normalize(root).rstrip("/")
    looked = [storage.join(base, "runs"), storage.join(base, "sweeps")]
    text = f"no runs or sweeps under {root} (looked in {', '.join(looked)})"
    name = base.rsplit("/", 1)[-1]
    if name in ("runs", "sweeps") and any(o.rel.split("/")[-1] in RECORDS for o in storage.iter_objects(base)):
        parent = base.rsplit("/", 1)[0] or "/"
        text += f": {root} holds runs itself; --root is the folder above it (`--root {parent}`)"
    return text


@command.command("show")
@click.argument("run_id")
@click.option("--root", required=True, metavar="URI", help="Store root (local folder or s3://bucket/prefix).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: the record and every step.")
def show_command(run_id: str, root: str, as_json: bool) -> None:
    """The run's (or sweep's) steps with their manifests, found in the store by the id alone.

    Each line: the step's folder, stage, whether its manifest records this run id, the cells it served, when it
    finished, and its manifest URI (for `ftjobs show`, which follows the lineage).
    """
    found = find(root, run_id)
    steps = [{"step": s.rel, "stage": s.loaded.manifest.stage, "run_id": s.loaded.manifest.run_id,
              "cells": s.loaded.manifest.cells, "created_at": s.loaded.manifest.created_at, "manifest": s.loaded.uri}
             for s in found.steps]
    if as_json:
        click.echo(json.dumps({"run_id": run_id, "kind": found.kind, "prefix": found.prefix,
                               "record": found.record, "steps": steps}, indent=2, default=str))
        return
    code = (found.record or {}).get("exit_code")
    click.echo(f"{found.kind} {run_id}  ({found.prefix})" + ("" if code is None else f"  exit {code}"))
    width = max((len(s["step"]) for s in steps), default=4)
    for s in steps:
        other = "" if s["run_id"] == run_id else f"  (records run {s['run_id']})"
        cells = f"  cells {','.join(s['cells'])}" if s["cells"] else ""
        click.echo(f"  {s['step']:<{width}}  {s['stage']:<9} {s['created_at']}  {s['manifest']}{cells}{other}")
    for failed in (found.record or {}).get("failed", []):
        click.echo(f"  failed cell {failed['label']}: {failed['step']} exit {failed['exit_code']}: {failed['reason']}")
