"""pipeline: the whole chain in one command, each step as the subprocess its container would run.

Runs the steps of `jobs/chain.py` in order, under one run prefix `<root>/runs/<run_id>/<step>/`:
prepare, infer-base, train, merge, infer-finetuned, evaluate (`baseline: false` leaves out infer-base).

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

SIGTERM or SIGINT (Ctrl-C) while a step runs is passed to that step as SIGTERM,
and the pipeline waits for it to stop the way it does alone (train: finish the
step, checkpoint, exit), then exits 1; re-running with the same run_id resumes.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import click

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

STAGE = "pipeline"
LOG = logging.getLogger(__name__)
# How long a stage may take to stop after SIGTERM, on top of its own grace period (train's
# checkpoint.grace_seconds): the exit itself (closing files, an engine's processes) takes a few seconds.
STOP_MARGIN_S = 30.0
Config = chain.Config


def check_sections(config: Config) -> dict[str, Any]:
    """Validate every step's section now (unknown keys, bad values), not after an hour of training."""
    return chain.check(config)


def absolute(src: str, *, must_exist: bool = True) -> str:
    """Local paths become absolute, so manifests name raw data, models and outputs unambiguously."""
    if storage.is_s3(src) or src.startswith("file://") or (must_exist and not Path(src).exists()):
        return src
    return str(Path(src).resolve())


def run(config: Config) -> mf.Loaded:
    run_id = config.run_id or mf.new_run_id()
    prefix = storage.join(absolute(config.root, must_exist=False), "runs", run_id)
    config = chain.pin_champion(config, prefix)
    resolved = check_sections(config)
    LOG.info("run %s under %s (resume with --set run_id=%s)", run_id, prefix, run_id)
    chosen = chain.steps(config)
    conf_uri = chain.write_sections(config, prefix, chosen)
    values = {"base_model": absolute(config.base_model), "data": [absolute(d) for d in config.data]}
    grace = {step.name: STOP_MARGIN_S + (resolved[step.name].checkpoint.grace_seconds if step.stage == "train" else 0)
             for step in chosen}
    started = time.monotonic()
    manifests: dict[str, str] = {}
    timings: dict[str, dict[str, Any]] = {}
    code = EXIT_RETRYABLE
    try:
        for i, step in enumerate(chosen):
            output = storage.join(prefix, step.name)
            args = [*chain.arguments(step, config, manifests, values), "--output", output, "--config",
                    conf_uri[step.name]]
            LOG.info("[%d/%d] %s: %s", i + 1, len(chosen), step.name, " ".join(["ftjobs", step.stage, *args]))
            manifests[step.name] = run_step(step, args, output, grace[step.name], run_id, timings)
        code = 0
    except GateFailed as gate:
        code = EXIT_GATE
        # The gate's verdict comes after evaluate published its report: show the numbers, and keep the
        # manifest URI the last stdout line, as on success (CI reads it to find the report).
        uri = mf.manifest_uri(storage.join(prefix, "evaluate"))
        try:
            loaded = mf.load(uri, verify="none")
        except FtjobsError:  # no report after all: evaluate's own message (above) is all there is
            raise gate from None
        headline(loaded, time.monotonic() - started)
        click.echo(uri)
        raise GateFailed(gate_message(config, loaded, run_id)) from None
    except BaseException as exc:
        code = exit_code(exc)
        raise
    finally:
        storage.write_bytes(storage.join(prefix, "pipeline.json"), json.dumps(
            {"run_id": run_id, "prefix": prefix, "steps": timings, "exit_code": code}, indent=2).encode())
        summary = "  ".join(f"{k} {v['seconds']}s" + (f" ({v['status']})" if v["status"] != "done" else "")
                            for k, v in timings.items())
        LOG.info("steps: %s; total %.1fs", summary, time.monotonic() - started)

    loaded = mf.load(list(manifests.values())[-1], verify="none")
    if "evaluate" in manifests:  # the report's numbers, also when promote ran after it
        headline(mf.load(manifests["evaluate"], verify="none"), time.monotonic() - started)
    return loaded


def run_step(step: chain.Step, args: list[str], output: str, grace: float, run_id: str,
             timings: dict[str, dict[str, Any]]) -> str:
    """One step as a subprocess; its outcome (also a failure: the step a reader most needs) goes into timings."""
    before = storage.exists(mf.manifest_uri(output))
    argv = [sys.executable, "-m", "jobs.cli", step.stage, *args]
    t = time.monotonic()
    try:
        uri = call(step.name, argv, grace, run_id)
    except BaseException as exc:
        code = exit_code(exc)
        status = ("interrupted" if isinstance(exc, Preempted | KeyboardInterrupt | SystemExit)
                  else "gate failed" if code == EXIT_GATE else "failed")
        timings[step.name] = {"seconds": round(time.monotonic() - t, 1), "status": status, "exit_code": code}
        if code == EXIT_GATE:
            timings[step.name]["manifest"] = mf.manifest_uri(output)
        raise
    seconds = time.monotonic() - t
    timings[step.name] = {"seconds": round(seconds, 1), "status": "already done" if before else "done",
                          "exit_code": 0, "manifest": uri}
    LOG.info("%s %s in %.1fs: %s", step.name, timings[step.name]["status"], seconds, uri)
    return uri


def gate_message(config: Config, loaded: mf.Loaded, run_id: str) -> str:
    metric = config.evaluate.get("fail_if_worse")
    metrics = loaded.manifest.metrics
    promotion = metrics.get("promotion")
    if promotion and (promotion["decision"] != "promote" or not metric):
        # The champion gate (evaluate's verdict), or the promote step refused by a champion that moved.
        said = ("; ".join(promotion["failed"]) if promotion["decision"] != "promote" else
                "the champion moved before this run's promotion (see the promote step's message above)")
        return (f"the {config.labels[1]} model was not promoted to models:/{promotion['name']}: {said}; the report "
                f"is at {report_uri(loaded)} (and report.md); the champion is unchanged. Every stage finished, so "
                f"re-running run {run_id} will not change the verdict: change the training in a new run, or the "
                "gate (promote.metric, promote.margin, promote.guards).")
    scores = "; ".join(f"{label} {100 * c['metrics'][metric]['candidate']:.1f}% vs {metrics['baseline']} "
                       f"{100 * c['metrics'][metric]['baseline']:.1f}%"
                       for label, c in metrics.get("comparisons", {}).items()
                       if metric in c.get("metrics", {}) and c["metrics"][metric].get("candidate") is not None)
    return (f"the {config.labels[1]} model did not beat the {config.labels[0]} model on {metric}"
            + (f" ({scores})" if scores else "")
            + f"; the report is at {report_uri(loaded)} (and report.md). Every stage "
            f"finished, so re-running run {run_id} will not change the verdict: change the training (data, "
            "steps, learning rate) in a new run, or the gate (evaluate.fail_if_worse).")


def call(name: str, argv: list[str], grace: float, run_id: str) -> str:
    """Run one stage; its logs stream through, its last stdout line is its manifest URI.

    Not `subprocess.run`: on any exception in the parent (the SIGTERM handler raises one) it SIGKILLs the
    child, and train would lose the steps since its last checkpoint. Here a SIGTERM or SIGINT to the
    pipeline is passed on to the stage as SIGTERM, the stage gets `grace` seconds to save its state and
    exit, and only then is the pipeline interrupted.
    """
    env = dict(os.environ)
    if sys.stderr.isatty():  # a child's stderr is a pipe only when ours is: keep a terminal readable
        env.setdefault("FTJOBS_LOG_FORMAT", "text")
    received: list[int] = []
    proc: subprocess.Popen[str] | None = None

    def forward(signum: int, frame: Any) -> None:
        if received:  # already passed on (a group kill also reaches the stage itself)
            return
        received.append(signum)
        LOG.warning("received %s: passing SIGTERM to stage %s and waiting up to %.0fs for it to save its state "
                    "and exit", signal.Signals(signum).name, name, grace)
        if proc is not None:
            proc.send_signal(signal.SIGTERM)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {}
    if main_thread:
        previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        # The stage ignores SIGINT: Ctrl-C reaches the whole terminal process group, and a KeyboardInterrupt
        # would stop train without its checkpoint. The pipeline passes it on as SIGTERM instead.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True, env=env)
        finally:
            if main_thread:
                signal.signal(signal.SIGINT, forward)
        if received:  # arrived while the stage was starting
            proc.send_signal(signal.SIGTERM)
        stdout = wait(proc, received, grace, name)
    except BaseException:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        raise
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        how = "was killed" if proc.returncode == -signal.SIGKILL else f"exited {proc.returncode}"
        raise Preempted(f"{signal.Signals(received[0]).name} while stage {name} ran; it {how}. Re-run the same "
                        f"command with --run-id {run_id} to resume: finished stages are skipped, and train "
                        "continues from its last checkpoint.")
    hint = " Fix it, then re-run the same command with the same run_id: finished stages are skipped."
    return step_result(name, proc.returncode, stdout, f"(its log is above).{hint}")


def step_result(name: str, returncode: int, stdout: str, hint: str) -> str:
    """A finished step's manifest URI (its last stdout line), or the error its exit code stands for."""
    lines = [line for line in stdout.splitlines() if line.strip()]
    if returncode == 0 and lines:
        return lines[-1].strip()
    message = f"stage {name} failed with exit {returncode} {hint}"
    if returncode == 0:
        raise FtjobsError(f"stage {name} exited 0 but printed no manifest URI")
    if returncode == EXIT_CONFIG:
        raise ConfigError(message)
    if returncode == EXIT_INPUT:
        raise InputError(message)
    if returncode == EXIT_GATE:
        raise GateFailed(message)
    raise FtjobsError(message)


def wait(proc: subprocess.Popen[str], received: list[int], grace: float, name: str) -> str:
    """The stage's stdout once it exits; killed when it outlives `grace` after a forwarded signal."""
    deadline: float | None = None
    while True:
        try:
            stdout, _ = proc.communicate(timeout=0.5)  # a retry after the timeout loses no output
            return stdout or ""
        except subprocess.TimeoutExpired:
            if not received:
                continue
            deadline = deadline or time.monotonic() + grace
            if time.monotonic() > deadline and proc.poll() is None:
                LOG.error("stage %s did not exit within %.0fs of SIGTERM: killing it", name, grace)
                proc.kill()


def report_uri(loaded: mf.Loaded) -> str:
    """Where the evaluate manifest's report.html is (the manifest says; it may live in an attempt's folder)."""
    return loaded.artifact_uri("report.html")


def headline(loaded: mf.Loaded, total: float) -> None:
    """The report's location and every metric evaluate compared, on stderr so stdout stays one manifest URI."""
    metrics = loaded.manifest.metrics
    baseline = metrics["baseline"]
    lines = [f"report: {report_uri(loaded)}  (and report.md)  pipeline {total:.0f}s"]
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
@config_options(example="train.max_steps=100")
def command(run_id: str | None, root: str | None, config_file: str | None, sets: tuple[str, ...]) -> None:
    """Run prepare, infer (base), train, merge, infer (finetuned) and evaluate as subprocesses.

    Prints the report location and the headline numbers; the last stdout line is the evaluate manifest,
    also on exit 4 (the gate). SIGTERM or Ctrl-C is passed to the running stage, which stops cleanly (train
    checkpoints); then exit 1, and the same run_id resumes. <run>/pipeline.json records every step.
    """
    execute(sys.modules[__name__], config_file, sets, {"run_id": run_id, "root": root})
