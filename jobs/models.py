"""The model registry's commands: `ftjobs promote` and `ftjobs models list|show|rollback` (common/registry.py).

    ftjobs promote runs/r1/merge --name tickets --root .               # by hand: record it, make it champion
    ftjobs promote runs/r1/merge --evaluation runs/r1/evaluate         # through the gate (what the chain runs)
    ftjobs models list
    ftjobs models show tickets
    ftjobs models rollback tickets --to 1

Every command takes `--root` (default $FTJOBS_ROOT, else "."): the store root whose `models/` folder holds the
registry, the same root runs are written under. `models:/NAME` (the champion) and `models:/NAME/VERSION`
name a registered model wherever a model is taken (infer --model, ftjobs try --model, a judge or teacher).

promote: the manifest must be a finished merge (or train) whose files pass `--verify full`, else exit 3
naming it. With `--evaluation` (an evaluate manifest run with a `promote:` section) it promotes only when that
evaluation's verdict is promote and the champion is still the one it compared with; otherwise exit 4. Two
promotions racing for the same champion: one moves it, the other exits 4 naming the winner. With `--output`
it also publishes a `promote` manifest there (the chain's step; a re-run is "already done"); stdout is that
manifest, or the version record.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any, Literal

import click
from pydantic import Field

from common import manifest as mf
from common import registry, stage, storage
from common.config import JobConfig, dump
from common.errors import ConfigError, GateFailed, InputError
from common.runner import config_options, execute

STAGE = "promote"
LOG = logging.getLogger(__name__)
ROOT_HELP = "Store root holding models/ (local folder or s3://bucket/prefix); default $FTJOBS_ROOT, else '.'."


class Config(JobConfig):
    """ftjobs promote: record a model under a name and make it the champion."""

    manifest: str = Field(description="The merge (or train) manifest of the model, or its output prefix.")
    name: str | None = Field(None, description="Registry name (models:/NAME). Default with `evaluation`: the name "
                                               "its promote section gave.")
    root: str = Field(default_factory=registry.default_root, description="Store root holding models/; default "
                                                                         "$FTJOBS_ROOT, else '.'.")
    evaluation: str | None = Field(None, description="The evaluate manifest that admitted the model (run with a "
                                                     "`promote:` section): promotion only on its verdict promote.")
    note: str | None = Field(None, description="Free text recorded with the version.")
    verify: Literal["size", "full"] = Field("full", description="How the model's files are checked before they "
                                                                "are recorded: full re-hashes every file.")
    output: str | None = Field(None, description="Where to publish a `promote` manifest (the chain's step; a "
                                                 "re-run is already done). None: only the registry is written.")


def run(config: Config) -> mf.Loaded | str:
    verdict, admitted = read_verdict(config)
    name = registry.check_name(config.name or (verdict or {}).get("name") or "")
    if verdict is not None and verdict["name"] != name:
        raise ConfigError(f"--name {name}: the evaluation {config.evaluation} gated a promotion to "
                          f"models:/{verdict['name']}; promote under that name or re-run evaluate with "
                          f"promote.name: {name}")
    loaded = registry.check_promotable(config.manifest, verify=config.verify)
    if verdict is not None:
        check_challenger(verdict, loaded, config.evaluation or "")
    expect: str | None | Literal[False] = verdict["champion_model"] if verdict is not None else False

    def promote() -> tuple[registry.Version, registry.Pointer | None]:
        return registry.promote(loaded.uri, name, config.root, evaluation=admitted.uri if admitted else None,
                                note=config.note, expect_champion=expect, verify="size")

    if config.output is None:
        version, _ = promote()
        return storage.join(registry.folder(config.root, name), "versions", f"{version.version}.json")
    inputs = [loaded.ref("model")] + ([admitted.ref("evaluation")] if admitted else [])
    recorded = {k: v for k, v in dump(config).items() if k not in ("output", "verify")} | {"name": name}

    def work(attempt: stage.Attempt) -> stage.Outcome:
        version, pointer = promote()
        return stage.Outcome(run_id=loaded.manifest.run_id, stats={
            "name": name, "version": version.version, "champion_seq": pointer.seq if pointer else None,
            "previous": pointer.previous if pointer else None, "ref": f"{registry.SCHEME}{name}/{version.version}"},
            model={"registry": f"{registry.SCHEME}{name}", "version": version.version, "model": loaded.uri})

    result = stage.run(stage.Identity(STAGE, config.output, recorded, inputs), work)
    assert isinstance(result, mf.Loaded)
    return result


def read_verdict(config: Config) -> tuple[dict[str, Any] | None, mf.Loaded | None]:
    """The evaluation's promotion verdict; refused (exit 4) unless it says promote."""
    if config.evaluation is None:
        return None, None
    admitted = mf.load(config.evaluation, verify="size", expect_stage="evaluate")
    verdict = admitted.manifest.metrics.get("promotion")
    if not verdict:
        raise ConfigError(f"{admitted.uri} holds no promotion verdict: run evaluate with a `promote:` section "
                          "(name, metric, margin), or promote by hand without --evaluation")
    if verdict["decision"] != "promote":
        raise GateFailed(f"{admitted.uri} refused the promotion to models:/{verdict['name']}: "
                         + "; ".join(verdict["failed"]) + ". Nothing was promoted.")
    return verdict, admitted


def check_challenger(verdict: dict[str, Any], loaded: mf.Loaded, evaluation: str) -> None:
    """The evaluation must have judged this very model."""
    judged = verdict.get("challenger_model")
    if judged is None or storage.normalize(mf.as_manifest_uri(judged)) != storage.normalize(loaded.uri):
        raise InputError(f"{evaluation} evaluated {judged or 'another model'} as the challenger, not {loaded.uri}: "
                         "promote the model it evaluated, or evaluate this one")


# --------------------------------------------------------------------------- commands


@click.command("promote")
@click.argument("manifest", required=False)
@click.option("--name", help="Registry name (models:/NAME).")
@click.option("--root", help=ROOT_HELP)
@click.option("--evaluation", metavar="EVALUATE_MANIFEST",
              help="The evaluate manifest whose promotion verdict admits the model (exit 4 when it refused).")
@click.option("--note", help="Free text recorded with the version.")
@click.option("--output", metavar="URI", help="Also publish a `promote` manifest here (the chain's step).")
@config_options(example="verify=size")
def command(manifest: str | None, name: str | None, root: str | None, evaluation: str | None, note: str | None,
            output: str | None, config_file: str | None, sets: tuple[str, ...]) -> None:
    """Record MANIFEST (a merge or train manifest) as a version of NAME and make it the champion.

    Exit 3: not a finished merge/train, or its files fail verification. Exit 4: the evaluation refused it,
    or another promotion moved the champion first. stdout: the version record (or the promote manifest).
    """
    execute(sys.modules[__name__], config_file, sets, {"manifest": manifest, "name": name, "root": root,
                                                       "evaluation": evaluation, "note": note, "output": output})


@click.group("models")
def models() -> None:
    """The model registry under <root>/models/: list, show, rollback (see also `ftjobs promote`)."""


root_option = click.option("--root", envvar=registry.ROOT_ENV, default=".", show_default=True, help=ROOT_HELP)


@models.command("list")
@root_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object per name.")
def list_models(root: str, as_json: bool) -> None:
    """Every registered name, its champion and how many versions it has."""
    found = registry.names(root)
    rows = []
    for name in found:
        all_versions = registry.versions(name, root)
        current = registry.champion(name, root)
        rows.append({"name": name, "versions": len(all_versions),
                     "champion": current.version.version if current else None,
                     "since": current.pointer.at if current else None,
                     "model": current.version.manifest if current else None})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo(f"no models under {storage.join(root, 'models')}", err=True)
        return
    click.echo(f"{'name':<20} {'champion':>8} {'versions':>8}  {'since':<26} model")
    for r in rows:
        champ = f"v{r['champion']}" if r["champion"] else "-"
        click.echo(f"{r['name']:<20} {champ:>8} {r['versions']:>8}  {r['since'] or '-':<26} {r['model'] or ''}")


@models.command("show")
@click.argument("name")
@root_option
@click.option("--json", "as_json", is_flag=True, help="Print the versions and the pointer history as JSON.")
def show(name: str, root: str, as_json: bool) -> None:
    """NAME's versions (the champion marked), who promoted each and why, and the champion's history.

    Exit 3 when the champion's files are gone or changed (it is reported, never replaced silently).
    """
    info = registry.describe(name, root)
    if as_json:
        click.echo(json.dumps(info, indent=2))
    else:
        click.echo(f"models:/{name}  ({registry.folder(root, name)})")
        for v in info["versions"]:
            mark = "*" if v["version"] == info["champion"] else " "
            by = v["promoted_by"]
            ci = f" ci {by['ci'].get('GITHUB_RUN_ID')}" if by["ci"].get("GITHUB_RUN_ID") else ""
            click.echo(f" {mark} v{v['version']:<4} {v['promoted_at']}  run {v['run_id']}  by {by['user']}@"
                       f"{by['host']}{ci}")
            click.echo(f"         model      {v['manifest']}")
            click.echo(f"         admitted   {v['evaluation'] or '(by hand, no evaluation)'}")
        click.echo("champion history:")
        for p in info["history"]:
            click.echo(f"   #{p['seq']:<4} {p['at']}  {p['action']:<8} -> v{p['version']}"
                       + (f" (was v{p['previous']})" if p["previous"] else ""))
    if info["champion_problem"]:
        raise InputError(info["champion_problem"])


@models.command("rollback")
@click.argument("name")
@click.option("--to", "to", type=int, required=True, metavar="VERSION", help="The version to make champion again.")
@root_option
def rollback(name: str, to: int, root: str) -> None:
    """Make an earlier version of NAME the champion again (a new pointer: the history keeps every move)."""
    pointer = registry.rollback(name, to, root)
    click.echo(f"{name}: champion is v{pointer.version} again (was v{pointer.previous}; pointer #{pointer.seq})",
               err=True)
    click.echo(storage.join(registry.folder(root, name), "champion", f"{pointer.seq:0{registry.SEQ_WIDTH}d}.json"))


extra_commands = (models,)
