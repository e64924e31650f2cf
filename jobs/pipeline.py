"""pipeline: the whole chain in one command, each step as the subprocess its container would run.

Plans the steps of `jobs/chain.py` (jobs/plan.py: a plan of one cell) under one run prefix
`<root>/runs/<run_id>/<step>/`: prepare, infer-base, train, merge, infer-finetuned, evaluate (`baseline: false`
leaves out infer-base), prints the plan, and hands it to the local executor (jobs/executors/local.py): each
step starts once what it takes from has published, up to `max_parallel` at once (infer-base beside train).
Every step is told the run's id (FTJOBS_RUN_ID) and records it in its manifest: `ftjobs runs show RUN_ID`.

Each step is `python -m jobs.cli <stage> ...` with exactly the arguments its Kubernetes Job gets: the
earlier steps' manifest URIs, its output prefix, and `--config` pointing at its section of the run config,
written next to the run (`<run prefix>/config/<step>.yaml`). Nothing else passes between steps. A step
that already finished (same config, same inputs) exits 0 at once ("already done"), so re-running with
the same `run_id` resumes after a failure. Ends by printing the report's location and the headline
numbers; the last stdout line is the evaluate manifest URI.

    ftjobs pipeline --config demo/pipeline.yaml                 # the offline demo (make demo)
    ftjobs pipeline --config configs/pipeline.yaml --set run_id=r1 --set root=s3://ml-data/ftjobs

Exit codes are the failing step's (2 config, 3 input, 1 retryable, 4 the
evaluate gate: the report is published and its manifest URI is still the last
stdout line). `<run prefix>/pipeline.json` records every step attempted (status
done, already done, failed, gate failed or interrupted; its exit code and
seconds) and the pipeline's own exit code.

SIGTERM or SIGINT (Ctrl-C) while steps run is passed to each as SIGTERM, and the
pipeline waits for them to stop the way they do alone (train: finish the step,
checkpoint, exit), then exits 1; re-running with the same run_id resumes.
"""

from __future__ import annotations

import logging
import os
import sys
import time

import click

from common import manifest as mf
from common import storage
from common.errors import EXIT_GATE, EXIT_RETRYABLE, GateFailed, InputError
from common.runner import config_options, execute
from jobs import chain, plan
from jobs.executors import Executor, error_for
from jobs.executors.local import LocalExecutor

STAGE = "pipeline"
LOG = logging.getLogger(__name__)
Config = chain.Config
absolute = plan.absolute


def check_sections(config: Config) -> dict[str, object]:
    """Validate every step's section now (unknown keys, bad values), not after an hour of training."""
    return chain.check(config)


def plan_run(config: Config, prefix: str, run_id: str, *, local: bool) -> plan.Plan:
    """The run as a plan of one cell (every step's config checked; the champion it is compared with pinned)."""
    config = chain.pin_champion(config, prefix)
    cell = plan.Cell(id=run_id, values={}, label=run_id, config=config)
    return plan.build("run", run_id, prefix, [cell], local=local)


def run(config: Config) -> mf.Loaded:
    run_id = config.run_id or mf.new_run_id()
    prefix = storage.join(absolute(config.root, must_exist=False), "runs", run_id)
    the_plan = plan_run(config, prefix, run_id, local=True)
    click.echo(the_plan.describe(), err=True)
    the_plan.write_sections()
    return execute_plan(the_plan, LocalExecutor(config.max_parallel), config)


def execute_plan(the_plan: plan.Plan, executor: Executor, config: Config) -> mf.Loaded:
    """Run the plan; `<run>/pipeline.json` records every step attempted and the exit code, whatever happens."""
    started = time.monotonic()
    try:
        return executor.run_recorded(the_plan, lambda: outcome(the_plan, config, started))
    finally:
        summary = "  ".join(f"{i.step.name} {i.seconds}s" + (f" ({i.status})" if i.status != "done" else "")
                            for i in the_plan.instances.values() if i.seconds is not None)
        LOG.info("steps: %s; total %.1fs", summary, time.monotonic() - started)


def outcome(the_plan: plan.Plan, config: Config, started: float) -> mf.Loaded:
    """The last step's manifest, or the error of the first step that failed (the gate: its verdict)."""
    insts = list(the_plan.instances.values())
    failed = next((i for i in insts if i.status in ("failed", "blocked")), None)
    if failed is not None and failed.exit_code == EXIT_GATE and failed.manifest:
        # The gate's verdict comes after evaluate published its report: show the numbers, and keep the
        # manifest URI the last stdout line, as on success (CI reads it to find the report).
        loaded = mf.load(failed.manifest, verify="none")
        headline(loaded, time.monotonic() - started)
        click.echo(loaded.uri)
        raise GateFailed(gate_message(config, loaded, the_plan.id))
    if failed is not None:
        raise error_for(failed.exit_code or EXIT_RETRYABLE, f"{failed.reason}. Fix it, then re-run the same command "
                        f"with {the_plan.resume_hint}: finished steps are skipped.")
    loaded = mf.load(str(insts[-1].manifest), verify="none")
    evaluated = next((i for i in insts if i.step.stage == "evaluate" and i.manifest), None)
    if evaluated is not None:  # the report's numbers, also when promote ran after evaluate
        headline(mf.load(str(evaluated.manifest), verify="none"), time.monotonic() - started)
    return loaded


def gate_message(config: Config, loaded: mf.Loaded, run_id: str) -> str:
    metric = config.evaluate.get("fail_if_worse")
    metrics = loaded.manifest.metrics
    promotion = metrics.get("promotion")
    if promotion and promotion["decision"] != "promote":  # the champion gate (evaluate's verdict)
        return (f"the {config.labels[1]} model was not promoted to models:/{promotion['name']}: "
                + "; ".join(promotion["failed"]) + f"; the report is at {report_uri(loaded)} (and report.md); the "
                f"champion is unchanged. Every stage finished, so re-running run {run_id} will not change the "
                "verdict: change the training in a new run, or the gate (promote.metric, promote.margin, "
                "promote.guards).")
    scores = "; ".join(f"{label} {100 * c['metrics'][metric]['candidate']:.1f}% vs {metrics['baseline']} "
                       f"{100 * c['metrics'][metric]['baseline']:.1f}%"
                       for label, c in metrics.get("comparisons", {}).items()
                       if metric in c.get("metrics", {}) and c["metrics"][metric].get("candidate") is not None)
    return (f"the {config.labels[1]} model did not beat the {config.labels[0]} model on {metric}"
            + (f" ({scores})" if scores else "")
            + f"; the report is at {report_uri(loaded)} (and report.md). Every stage "
            f"finished, so re-running run {run_id} will not change the verdict: change the training (data, "
            "steps, learning rate) in a new run, or the gate (evaluate.fail_if_worse).")


def report_uri(loaded: mf.Loaded) -> str:
    """Where the evaluate manifest's report.html is (the manifest says; it may live in an attempt's folder)."""
    try:
        return loaded.artifact_uri("report.html")
    except InputError:  # a manifest without the report (a stand-in stage's): where evaluate would put it
        return storage.join(loaded.prefix, "report.html")


def shown_path(uri: str) -> str:
    """A local path under the working directory as a relative one (what a user typed, and what they can paste);
    anything else as it is. Manifests keep absolute paths: this is only what the terminal shows."""
    if storage.is_s3(uri) or not os.path.isabs(uri):
        return uri
    rel = os.path.relpath(uri)
    return uri if rel.startswith("..") else rel


def headline(loaded: mf.Loaded, total: float) -> None:
    """The report's location and every metric evaluate compared, on stderr so stdout stays one manifest URI."""
    metrics = loaded.manifest.metrics
    if "comparisons" not in metrics:
        return
    baseline = metrics["baseline"]
    lines = [f"report: {shown_path(report_uri(loaded))}  (and report.md)  pipeline {total:.0f}s"]
    for label, comp in metrics["comparisons"].items():
        for name, d in comp["metrics"].items():
            if d["delta"] is not None:
                lines.append(f"  {name:<24} {comp.get('baseline', baseline)} {100 * d['baseline']:5.1f}%  ->  {label} "
                             f"{100 * d['candidate']:5.1f}%   ({100 * d['delta']:+.1f} pts)")
    promotion = metrics.get("promotion")
    if promotion:
        lines.append(f"  promotion to models:/{promotion['name']}: "
                     + ("PROMOTE" if promotion["decision"] == "promote" else "REFUSED") + " ("
                     + "; ".join(f"{c['check']} {'ok' if c['passed'] else 'failed'}: "
                                 + ("n/a" if c["value"] is None else f"{100 * c['value']:+.1f} pts")
                                 + f" vs {c['rule'].split()[0]} {100 * c['threshold'] + 0.0:+.1f}"
                                 for c in promotion["checks"]) + ")")
    if not metrics["comparisons"]:  # no baseline: the one set's own numbers (evaluate's `metric/label` keys)
        for key, value in metrics.items():
            name, _, label = key.partition("/")
            if label and value is not None:
                lines.append(f"  {name:<24} {label} {100 * value:5.1f}%")
    click.echo("\n".join(lines), err=True)


@click.command("pipeline")
@click.option("--run-id", "run_id", metavar="RUN_ID", help="Run id; the same id resumes a run. Default: a new one.")
@click.option("--root", metavar="URI",
              help="Store root (local folder or s3://...); the run goes under <root>/runs/<run_id>/.")
@click.option("--max-parallel", "max_parallel", type=int, metavar="N",
              help="Steps run at once (infer-base beside train); each gets cores / N threads. Default 2.")
@config_options(example="train.max_steps=100")
def command(run_id: str | None, root: str | None, max_parallel: int | None, config_file: str | None,
            sets: tuple[str, ...]) -> None:
    """Run prepare, infer (base), train, merge, infer (finetuned) and evaluate as subprocesses.

    Prints the plan first, then the report location and the headline numbers; the last stdout line is the
    evaluate manifest, also on exit 4 (the gate). Independent steps run at once (--max-parallel). SIGTERM or
    Ctrl-C is passed to the running steps, which stop cleanly (train checkpoints); then exit 1, and the same
    run_id resumes. <run>/pipeline.json records every step; every step's manifest records the run id
    (`ftjobs runs show RUN_ID --root ROOT`).
    """
    execute(sys.modules[__name__], config_file, sets, {"run_id": run_id, "root": root, "max_parallel": max_parallel})

