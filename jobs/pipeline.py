"""pipeline: the whole chain in one command, each stage as the subprocess its container would run.

Runs, in order, under one run prefix `<root>/runs/<run_id>/`:

    prepare          -> prepare/          raw data -> canonical Parquet (tokenized with the base's tokenizer)
    infer-base       -> infer-base/       the base model answers the eval prompts
    train            -> train/            LoRA / QLoRA adapter
    merge            -> merge/            adapter folded into the 16-bit base
    infer-finetuned  -> infer-finetuned/  the merged model answers the same prompts
    evaluate         -> evaluate/         report.md / report.html: base vs finetuned

Each stage is `python -m jobs.cli <stage> ...` with exactly the arguments its
Kubernetes Job gets: the previous stages' manifest URIs, its output prefix,
and `--config` pointing at that stage's section of the pipeline config,
written next to the run (`<run prefix>/config/<stage>.yaml`). Nothing else
passes between stages. A stage that already finished (same config, same
inputs) exits 0 at once ("already done"), so re-running with the same
`run_id` resumes after a failure. Ends by printing the report's location and
the headline numbers; the last stdout line is the evaluate manifest URI.

    ftjobs pipeline --config demo/pipeline.yaml                 # the offline demo (make demo)
    ftjobs pipeline --config configs/pipeline.yaml --set run_id=r1 --set root=s3://ml-data/ftjobs

Exit codes are the failing stage's (2 config, 3 input, 1 retryable, 4 the
evaluate gate: the report is published and its manifest URI is still the last
stdout line). `<run prefix>/pipeline.json` records every step attempted (status
done, already done, failed, gate failed or interrupted; its exit code and
seconds) and the pipeline's own exit code.

SIGTERM or SIGINT (Ctrl-C) while a stage runs is passed to that stage as SIGTERM,
and the pipeline waits for it to stop the way it does alone (train: finish the
step, checkpoint, exit), then exits 1; re-running with the same run_id resumes.
"""

from __future__ import annotations

import datetime as dt
import importlib
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
import yaml
from pydantic import Field, field_validator, model_validator

from common import config as cfg
from common import manifest as mf
from common import storage
from common.config import JobConfig
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

STAGE = "pipeline"
LOG = logging.getLogger("ftjobs.pipeline")
STEPS = ("prepare", "infer-base", "train", "merge", "infer-finetuned", "evaluate")
# How long a stage may take to stop after SIGTERM, on top of its own grace period (train's
# checkpoint.grace_seconds): the exit itself (closing files, an engine's processes) takes a few seconds.
STOP_MARGIN_S = 30.0
HEADLINE = ("exact_match", "normalized_exact_match", "token_f1", "rouge_l", "json_valid", "json_schema_valid",
            "regex_match")


class Config(JobConfig):
    """The run: where, which model, which data, and each stage's own config section."""

    root: str = Field(".", description="Store root (local folder or s3://bucket/prefix); the run writes under "
                                       "<root>/runs/<run_id>/.")
    run_id: str | None = Field(None, description="Run id; the same id resumes a run (finished stages are "
                                                 "skipped). Default: a new one.")
    base_model: str = Field(description="Base model source: Hugging Face id, s3:// prefix or local folder.")
    data: list[str] = Field(description="Raw data files or URIs for prepare (JSONL, CSV, Parquet, ...).")
    tokenize: bool = Field(True, description="Let prepare tokenize with the base model's tokenizer (train then "
                                             "reads the token ids as they are).")
    labels: tuple[str, str] = Field(("base", "finetuned"), description="Report labels for the two infer runs.")
    prepare: dict[str, Any] = Field(default_factory=dict, description="prepare's config section.")
    train: dict[str, Any] = Field(default_factory=dict, description="train's config section.")
    merge: dict[str, Any] = Field(default_factory=dict, description="merge's config section.")
    infer: dict[str, Any] = Field(default_factory=dict, description="infer's config section, for both runs.")
    infer_base: dict[str, Any] = Field(default_factory=dict, description="Overrides of `infer` for the base run.")
    infer_finetuned: dict[str, Any] = Field(default_factory=dict,
                                            description="Overrides of `infer` for the finetuned run.")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="evaluate's config section.")
    stop_after: str | None = Field(None, description=f"Stop after this step (one of {', '.join(STEPS)}).")

    @field_validator("run_id", mode="before")
    @classmethod
    def _run_id_text(cls, value: Any) -> Any:
        # `--set run_id=42` and `run_id: 2024-05-01` reach here as YAML int and date; as typed, they are names.
        if isinstance(value, int | dt.date) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        # It becomes a folder under <root>/runs/: a '/' or '..' would write outside the root.
        if value is not None and not mf.RUN_ID_RE.match(value):
            raise ValueError(f"{value!r} is not a run id: use 1-63 letters, digits, '.', '_' or '-', starting "
                             "and ending with a letter or digit (it names the folder <root>/runs/<run_id>/ and, "
                             "on Kubernetes, the Jobs)")
        return value

    @field_validator("data")
    @classmethod
    def _data(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one data file")
        return value

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.stop_after is not None and self.stop_after not in STEPS:
            raise ValueError(f"stop_after={self.stop_after!r}: expected one of {', '.join(STEPS)}")
        if self.labels[0] == self.labels[1]:
            raise ValueError(f"labels must differ, got {list(self.labels)}")
        for step, section in self.sections().items():
            owned = {"prepare": ("source", "output", "tokenizer"), "train": ("input", "base_model", "output"),
                     "merge": ("input", "output"), "evaluate": ("predictions", "output", "labels"),
                     "infer": ("model", "adapter", "prompts", "output")}[step.split("-")[0]]
            taken = sorted(set(section) & set(owned))
            if taken:
                raise ValueError(f"{step} section sets {', '.join(taken)}: the pipeline wires those itself")
        return self

    def sections(self) -> dict[str, dict[str, Any]]:
        return {"prepare": self.prepare, "infer-base": {**self.infer, **self.infer_base}, "train": self.train,
                "merge": self.merge, "infer-finetuned": {**self.infer, **self.infer_finetuned},
                "evaluate": self.evaluate}


# What the pipeline wires into each stage itself (placeholders here, to validate a section up front).
WIRED: dict[str, dict[str, Any]] = {
    "prepare": {"sources": ["<data>"], "output": "<out>"},
    "train": {"input": "<prepare>", "base_model": "<base>", "output": "<out>"},
    "merge": {"input": "<train>", "output": "<out>"},
    "infer": {"model": "<model>", "prompts": "<prepare>", "output": "<out>"},
    "evaluate": {"predictions": ["<base>", "<finetuned>"], "labels": ["base", "finetuned"], "output": "<out>"},
}


def check_sections(config: Config) -> None:
    """Validate every stage's section now (unknown keys, bad values), not after an hour of training."""
    for step, section in config.sections().items():
        stage = step.split("-")[0]
        try:
            job = importlib.import_module(f"jobs.{stage}")
        except ModuleNotFoundError as exc:
            if exc.name == f"jobs.{stage}":
                raise ConfigError(f"this ftjobs has no `{stage}` job (jobs/{stage}.py); the pipeline needs it") \
                    from None
            raise
        try:
            cfg.validate(job.Config, {**section, **WIRED[stage]})
        except ConfigError as exc:
            raise ConfigError(f"pipeline config, section `{step.replace('-', '_')}`: {exc}") from None


def absolute(src: str, *, must_exist: bool = True) -> str:
    """Local paths become absolute, so manifests name raw data, models and outputs unambiguously."""
    if storage.is_s3(src) or src.startswith("file://") or (must_exist and not Path(src).exists()):
        return src
    return str(Path(src).resolve())


def run(config: Config) -> mf.Loaded:
    check_sections(config)
    run_id = config.run_id or mf.new_run_id()
    prefix = storage.join(absolute(config.root, must_exist=False), "runs", run_id)
    LOG.info("run %s under %s (resume with --set run_id=%s)", run_id, prefix, run_id)
    base_model = absolute(config.base_model)
    out = {step: storage.join(prefix, step) for step in STEPS}
    conf_uri = {}
    for step, section in config.sections().items():
        conf_uri[step] = storage.join(prefix, "config", f"{step}.yaml")
        storage.write_bytes(conf_uri[step], yaml.safe_dump(section, sort_keys=True).encode())

    started = time.monotonic()
    manifests: dict[str, str] = {}
    timings: dict[str, dict[str, Any]] = {}
    grace = stop_grace(config)

    def step(name: str, args: list[str]) -> str:
        stage = name.split("-")[0]
        before = storage.exists(mf.manifest_uri(out[name]))
        argv = [sys.executable, "-m", "jobs.cli", stage, *args, "--output", out[name], "--config", conf_uri[name]]
        shown = " ".join(["ftjobs", stage, *args, "--output", out[name], "--config", conf_uri[name]])
        LOG.info("[%d/%d] %s: %s", STEPS.index(name) + 1, len(STEPS), name, shown)
        t = time.monotonic()
        try:
            uri = call(name, argv, grace[name], run_id)
        except BaseException as exc:
            # The failed step is the one a reader of pipeline.json most needs to find.
            code = exit_code(exc)
            status = ("interrupted" if isinstance(exc, Preempted | KeyboardInterrupt | SystemExit)
                      else "gate failed" if code == EXIT_GATE else "failed")
            timings[name] = {"seconds": round(time.monotonic() - t, 1), "status": status, "exit_code": code}
            if code == EXIT_GATE:
                timings[name]["manifest"] = mf.manifest_uri(out[name])
            raise
        seconds = time.monotonic() - t
        timings[name] = {"seconds": round(seconds, 1), "status": "already done" if before else "done",
                         "exit_code": 0, "manifest": uri}
        LOG.info("%s %s in %.1fs: %s", name, timings[name]["status"], seconds, uri)
        manifests[name] = uri
        return uri

    sources = [a for src in config.data for a in ("--source", absolute(src))]
    plan = [
        ("prepare", lambda: sources + (["--tokenizer", base_model] if config.tokenize else [])),
        ("infer-base", lambda: ["--model", base_model, "--prompts", manifests["prepare"]]),
        ("train", lambda: ["--input", manifests["prepare"], "--base-model", base_model]),
        ("merge", lambda: ["--input", manifests["train"]]),
        ("infer-finetuned", lambda: ["--model", manifests["merge"], "--prompts", manifests["prepare"]]),
        ("evaluate", lambda: ["--predictions", manifests["infer-base"], "--predictions", manifests["infer-finetuned"],
                              "--label", config.labels[0], "--label", config.labels[1]]),
    ]
    code = EXIT_RETRYABLE
    try:
        for name, args in plan:
            step(name, args())
            if name == config.stop_after:
                break
        code = 0
    except GateFailed as gate:
        code = EXIT_GATE
        # The gate's verdict comes after evaluate published its report: show the numbers, and keep the
        # manifest URI the last stdout line, as on success (CI reads it to find the report).
        uri = mf.manifest_uri(out["evaluate"])
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
        LOG.info("stages: %s; total %.1fs", summary, time.monotonic() - started)

    loaded = mf.load(list(manifests.values())[-1], verify="none")
    if loaded.manifest.stage == "evaluate":
        headline(loaded, time.monotonic() - started)
    return loaded


def gate_message(config: Config, loaded: mf.Loaded, run_id: str) -> str:
    metric = config.evaluate.get("fail_if_worse")
    metrics = loaded.manifest.metrics
    scores = "; ".join(f"{label} {100 * c['metrics'][metric]['candidate']:.1f}% vs {metrics['baseline']} "
                       f"{100 * c['metrics'][metric]['baseline']:.1f}%"
                       for label, c in metrics.get("comparisons", {}).items()
                       if metric in c.get("metrics", {}) and c["metrics"][metric].get("candidate") is not None)
    return (f"the {config.labels[1]} model did not beat the {config.labels[0]} model on {metric}"
            + (f" ({scores})" if scores else "")
            + f"; the report is at {storage.join(loaded.prefix, 'report.html')} (and report.md). Every stage "
            f"finished, so re-running run {run_id} will not change the verdict: change the training (data, "
            "steps, learning rate) in a new run, or the gate (evaluate.fail_if_worse).")


def stop_grace(config: Config) -> dict[str, float]:
    """Seconds each stage gets to stop after SIGTERM before it is killed."""
    from jobs import train

    section = cfg.validate(train.Config, {**config.train, **WIRED["train"]})
    return {step: STOP_MARGIN_S + (section.checkpoint.grace_seconds if step == "train" else 0.0) for step in STEPS}


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
    lines = [line for line in stdout.splitlines() if line.strip()]
    if proc.returncode == 0 and lines:
        return lines[-1].strip()
    hint = " Fix it, then re-run the same command with the same run_id: finished stages are skipped."
    message = f"stage {name} failed with exit {proc.returncode} (its log is above).{hint}"
    if proc.returncode == 0:
        raise FtjobsError(f"stage {name} exited 0 but printed no manifest URI")
    if proc.returncode == EXIT_CONFIG:
        raise ConfigError(message)
    if proc.returncode == EXIT_INPUT:
        raise InputError(message)
    if proc.returncode == EXIT_GATE:
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


def headline(loaded: mf.Loaded, total: float) -> None:
    """The report's location and numbers, on stderr so stdout stays one manifest URI."""
    metrics = loaded.manifest.metrics
    baseline = metrics["baseline"]
    lines = [f"report: {storage.join(loaded.prefix, 'report.html')}  (and report.md)  pipeline {total:.0f}s"]
    for label, comp in metrics["comparisons"].items():
        for name, d in comp["metrics"].items():
            if name in HEADLINE and d["delta"] is not None:
                lines.append(f"  {name:<24} {baseline} {100 * d['baseline']:5.1f}%  ->  {label} "
                             f"{100 * d['candidate']:5.1f}%   ({100 * d['delta']:+.1f} pts)")
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
