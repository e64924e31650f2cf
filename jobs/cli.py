"""The `ftjobs` command line: a thin layer that loads config, calls a job's
`run(config) -> Manifest`, and maps errors to exit codes.

Exit codes (the contract Kubernetes `podFailurePolicy` relies on, declared in
`common.errors`; `common.runner.Commands` is the one place errors become them):
0 done (or already done); 1 anything else, worth retrying (SIGTERM included);
2 bad config or usage; 3 bad or missing input data; 4 the evaluate gate
(`--fail-if-worse`: the report is published); 130 Ctrl-C.

Heavy libraries (torch, transformers, vllm) are imported inside the jobs, so
`ftjobs --help` and config validation stay instant.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

import click

from common import heap, logs
from common.errors import EXIT_INPUT, FtjobsError
from common.manifest import package_version
from common.runner import Commands, fail

LOG = logging.getLogger(__name__)


# The stages' commands come from the registry (common/stages.py, FTJOBS_EXTRA_STAGES included: a stage's
# command carries its name); the orchestration commands beside them, and a module's extra commands, by the
# name their command carries. `ftjobs NAME` imports only NAME's module: importing all of them (every stage's
# config, synth's row builders, pyarrow's pandas check) was 0.4 s of every command's start, a pipeline's steps
# and a test's subprocesses included. `ftjobs --help` imports them all.
COMMANDS = {"pipeline": "jobs.pipeline", "sweep": "jobs.sweep", "k8s": "jobs.k8s_cli", "runs": "jobs.runs",
            "launch": "jobs.launch", "try": "jobs.tryout", "estimate": "jobs.estimate", "gpu-check": "jobs.gpucheck",
            "inspect": "jobs.prepare", "models": "jobs.models"}


def command_modules() -> dict[str, str]:
    """Every command's name and the module that declares it (`command`, or one of its `extra_commands`)."""
    from common import stages

    return {**{s.name: s.module for s in stages.all_stages().values()}, **COMMANDS}


class _Lazy(Commands):
    """The `ftjobs` group, its commands imported when they are asked for."""

    def main(self, args: Any = None, *rest: Any, **kwargs: Any) -> Any:
        if args is None:  # the process's own command line (`ftjobs`, `python -m jobs.cli`), not a caller's
            heap.own_process()
        return super().main(args, *rest, **kwargs)

    def get_command(self, ctx: click.Context | None, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and (module := command_modules().get(cmd_name)):
            _add_commands(self, module)
        return self.commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        try:  # `ftjobs --help` lists them outside any command's invoke: a bad FTJOBS_EXTRA_STAGES is said here
            modules = command_modules()
        except FtjobsError as exc:
            fail(exc)
        for module in dict.fromkeys(modules.values()):
            _add_commands(self, module)
        return sorted(self.commands)


def _add_commands(group: click.Group, modname: str) -> None:
    import importlib

    module = importlib.import_module(modname)
    for command in (getattr(module, "command", None), *getattr(module, "extra_commands", ())):
        if command is not None and command.name not in group.commands:
            group.add_command(command)


@click.group(cls=_Lazy, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_version(), "--version", prog_name="ftjobs")
@click.option("--log-format", type=click.Choice(["auto", "text", "json"]), default="auto", show_default=True,
              envvar="FTJOBS_LOG_FORMAT", help="auto: text on a terminal, JSON lines otherwise.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True, envvar="FTJOBS_LOG_LEVEL")
def main(log_format: str, log_level: str) -> None:
    """ftjobs: finetune LLMs as batch jobs linked by manifests in an object store.

    Stages: (synth ->) prepare -> train -> merge -> infer -> evaluate. Each reads the previous
    stage's manifest URI and writes its own output prefix, locally or on S3/MinIO.
    """
    logs.setup(log_format, log_level)


# --------------------------------------------------------------------------- show


@main.command()
@click.argument("uri")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object: manifest + lineage tree.")
@click.option("--verify", type=click.Choice(["none", "size", "full"]), default="size", show_default=True,
              help="size: artifacts exist with recorded sizes; full: re-hash every artifact (slow on big models).")
def show(uri: str, as_json: bool, verify: str) -> None:
    """Print a manifest, verify it, and print its lineage as a tree.

    URI is a manifest.json or the output prefix that holds one.
    Exit 3 when the manifest or anything it descends from fails verification.
    """
    from common import lineage as lin
    from common import manifest as mf

    loaded = mf.load(uri, verify="none")
    tree = lin.lineage(loaded.uri, verify=verify)  # type: ignore[arg-type]
    m = loaded.manifest
    ok = lin.all_ok(tree)
    if as_json:
        click.echo(json.dumps({"manifest": m.model_dump(mode="json"), "sha256": loaded.sha256,
                               "verified": ok, "lineage": lin.tree_dict(tree)}, indent=2))
    else:
        click.echo(f"{m.stage} run {m.run_id}  ({loaded.uri})")
        if m.cells:
            click.echo(f"  cells      {', '.join(m.cells)}   (ftjobs runs show {m.run_id} --root ROOT lists the run)")
        click.echo(f"  created    {m.created_at}   ftjobs {m.code.package}"
                   + (f" @ {m.code.git_sha[:10]}" if m.code.git_sha else "")
                   + (f"  image {m.code.image}" if m.code.image else ""))
        click.echo(f"  config     sha256 {m.config_hash[:16]}")
        if m.model:
            shown = {k: v for k, v in m.model.items()  # the template text and nested dicts stay in --json
                     if not isinstance(v, dict | list) and not (isinstance(v, str) and ("\n" in v or len(v) > 80))}
            click.echo("  model      " + ", ".join(f"{k}={_short(v)}" for k, v in shown.items()))
        click.echo(f"  artifacts  {len(m.artifacts)}, {sum(a.bytes for a in m.artifacts):,} bytes")
        for a in m.artifacts[:20]:
            rows = f", {a.rows:,} rows" if a.rows is not None else ""
            click.echo(f"    {a.name:<40} {a.bytes:>14,} B{rows}  sha256 {a.sha256[:12]}")
        if len(m.artifacts) > 20:
            click.echo(f"    ... {len(m.artifacts) - 20} more")
        for title, data in (("stats", m.stats), ("metrics", m.metrics), ("timings", m.timings)):
            if data:
                flat = {k: v for k, v in data.items() if not isinstance(v, dict | list)}
                if flat:
                    click.echo(f"  {title:<10} " + ", ".join(f"{k}={_short(v)}" for k, v in flat.items()))
        click.echo("lineage:")
        click.echo(lin.render_tree(tree))
    if not ok:
        bad = lin.first_failure(tree)
        LOG.error("verification failed at %s: %s (every FAILED entry is in the lineage)", bad.uri if bad else uri,
                  bad.note if bad else "")
        sys.exit(EXIT_INPUT)


@main.command()
@click.argument("prefix")
@click.option("--apply", is_flag=True, help="Remove the files (without it: only list them).")
@click.option("--unpublish-broken", is_flag=True,
              help="Instead: move aside a manifest that names files that are not there (an output stuck with "
                   "exit 3), so the next run publishes there. A manifest whose files are all there is never moved. "
                   "See docs/attempts.md.")
def gc(prefix: str, apply: bool, unpublish_broken: bool) -> None:
    """List (or, with --apply, remove) what no manifest at PREFIX names: earlier attempts' files.

    PREFIX is a stage's output. With a manifest there, whatever it does not name in the folders ftjobs
    writes (attempts/, checkpoints/, shards/) goes: losers', zombies' and resume files. Without one, only
    the folders of attempts that are over (ended, their process gone, or silent for
    FTJOBS_ATTEMPT_REMOVE_AFTER_S, 4x the staleness limit); other attempts' files and resume files stay.
    A published file is never removed. Every later run at the prefix does the same on its own.
    """
    from common import attempts, storage

    if unpublish_broken:
        click.echo(attempts.unpublish_broken(storage.normalize(prefix).rstrip("/"), dry_run=not apply)
                   + ("" if apply else "; --apply does it"), err=True)
        return
    found = attempts.collect(storage.normalize(prefix).rstrip("/"), dry_run=not apply)
    for obj in found.removed:
        click.echo(f"{'removed' if apply else 'would remove'}  {obj.size:>12,} B  {obj.rel}")
    what = "published run: keeping what its manifest names" if found.published else "no manifest yet"
    live = f"; attempts that may still publish left alone: {', '.join(found.kept_live)}" if found.kept_live else ""
    click.echo(f"{len(found.removed)} file(s), {found.bytes:,} bytes {'removed' if apply else 'to remove'} "
               f"({what}{live}){'' if apply or not found.removed else '; --apply removes them'}", err=True)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


if __name__ == "__main__":
    main()
