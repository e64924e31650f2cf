"""Stopping `ftjobs pipeline` the way Kubernetes or Ctrl-C does: the running stage gets SIGTERM, not SIGKILL.

A SIGTERM to the pipeline goes on to the stage it is running; train then finishes its step, checkpoints
and exits 1, the pipeline exits 1 and records the step as interrupted, and the re-run resumes from that
checkpoint. The demo config has no periodic checkpoints, so that one is all there is.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from common import config as cfg
from common import manifest as mf
from common import storage
from common.errors import Preempted
from jobs import chain, plan
from jobs.executors.local import LocalExecutor
from jobs.train import checkpoints

REPO = Path(__file__).resolve().parents[2]
# Enough steps that the SIGTERM (sent once step 2 is logged; train's log reaches the test line by line) finds
# train mid-run with steps to spare; every step after the resume is paid for again (an eval each, the demo's
# 512-token rows), so not the 40 it once was.
STEPS = 10


def demo_config(tmp_path: Path) -> Path:
    """demo/pipeline.yaml, made small: 40 tickets, short generations, up to train."""
    config = yaml.safe_load((REPO / "demo" / "pipeline.yaml").read_text())
    data = tmp_path / "tickets.jsonl"
    data.write_text("".join((REPO / "demo" / "data" / "tickets.jsonl").read_text().splitlines(keepends=True)[:40]))
    config |= {"root": str(tmp_path / "store"), "run_id": "sig", "base_model": str(REPO / config["base_model"]),
               "data": [str(data)], "stop_after": "train",
               # one step at a time: the signal must find train running alone (infer-base may run beside it)
               "max_parallel": 1}
    config["prepare"] |= {"eval_size": 4}
    # eval_every: 1 logs every step, which tells the test that the training loop is running.
    config["train"] |= {"max_steps": STEPS, "epochs": 1, "eval_every": 1}
    assert config["train"]["checkpoint"] == {"every_steps": None}
    config["infer"] |= {"engine": "transformers", "sampling": {"temperature": 0, "max_tokens": 4}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_sigterm_to_the_pipeline_lets_train_checkpoint_and_the_rerun_resumes_from_it(
        tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    cmd = [sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(demo_config(tmp_path))]
    prefix = tmp_path / "store" / "runs" / "sig"
    train_out = str(prefix / "train")
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    lines = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "step 2 eval loss" in line:
                proc.send_signal(signal.SIGTERM)  # the pipeline's PID only, as kubelet signals PID 1
                break
        else:
            pytest.fail("train never reached step 2:\n" + "".join(lines[-30:]))
        out, rest = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = "".join(lines) + rest
    assert proc.returncode == 1, log[-4000:]
    assert "SIGTERM: finishing the current step, then checkpointing" in log
    assert "Stopped by SIGTERM after step" in log
    assert "SIGTERM while stage train ran; it exited 1. Re-run the same command with --run-id sig" in log
    saved = {step for step, files in checkpoints.present(train_out).values() if checkpoints.MARKER in files}
    assert len(saved) == 1 and min(saved) >= 2, saved
    assert not storage.exists(mf.manifest_uri(train_out))
    record = json.loads((prefix / "pipeline.json").read_text())
    assert record["exit_code"] == 1
    assert [(k, v["status"], v["exit_code"]) for k, v in record["steps"].items()] == [
        ("prepare", "done", 0), ("infer-base", "done", 0), ("train", "interrupted", 1)]

    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert again.returncode == 0, again.stderr[-4000:]
    step = saved.pop()
    assert f"resuming from {train_out}/checkpoints/{checkpoints.folder_name(step)}-" in again.stderr
    assert f"(step {step} of {STEPS})" in again.stderr
    stats = mf.load(again.stdout.strip().splitlines()[-1], expect_stage="train").manifest.stats
    assert stats["resumed_from_step"] == step and stats["attempts"] == 2
    # the run, found in a local store by its id alone: every step's manifest records it
    shown = subprocess.run([sys.executable, "-m", "jobs.cli", "runs", "show", "sig", "--root", str(tmp_path / "store")],
                           cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=60)
    assert shown.returncode == 0, shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].startswith(f"run sig  ({prefix})")
    assert sorted(line.split()[0] for line in lines[1:]) == ["infer-base", "prepare", "train"]
    assert "records run" not in shown.stdout
    record = json.loads((prefix / "pipeline.json").read_text())
    assert record["exit_code"] == 0
    assert [(k, v["status"]) for k, v in record["steps"].items()] == [
        ("prepare", "already done"), ("infer-base", "already done"), ("train", "done")]


# The stage side of the same contract, with a real child process standing in for a stage: what reaches it,
# and what the pipeline does when it does not stop in time.
STAGE = """
import os, pathlib, signal, sys, time
ready, got = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def on_term(signum, frame):
    got.write_text("SIGTERM")
    sys.exit(1)
if sys.argv[3] == "stops":
    signal.signal(signal.SIGTERM, on_term)
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
ready.with_suffix(".tmp").write_text(f"{os.getpid()} {signal.getsignal(signal.SIGINT) == signal.SIG_IGN}")
ready.with_suffix(".tmp").rename(ready)
time.sleep(60)
"""


def run_one(tmp_path: Path, name: str, argv: list[str], grace: float) -> None:
    """A plan of one step whose process is `argv`, run by the local executor of run r7."""
    step = chain.Step(name, name, (), (name,))
    config = cfg.validate(chain.Config, {"base_model": "m", "data": ["d"]})
    inst = plan.Instance(step=step, key=name, name=name, tag=None, output=str(tmp_path / name), config=config,
                         needs={}, grace_s=grace)
    one = plan.Plan(kind="run", id="r7", prefix=str(tmp_path), cells=[], instances={name: inst}, local=True)
    LocalExecutor(1, command=lambda stage, args: argv).run(one)


def interrupt_when_ready(ready: Path, child_first: bool) -> threading.Thread:
    """Ctrl-C as a terminal sends it: to the stage and to the pipeline (this process)."""
    def send() -> None:
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        if child_first:
            os.kill(int(ready.read_text().split()[0]), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=send, daemon=True)
    thread.start()
    return thread


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_ctrl_c_reaches_the_stage_as_sigterm_and_the_pipeline_exits_retryable(tmp_path: Path) -> None:
    ready, got = tmp_path / "ready", tmp_path / "got"
    argv = [sys.executable, "-c", STAGE, str(ready), str(got), "stops"]
    thread = interrupt_when_ready(ready, child_first=True)
    with pytest.raises(Preempted, match=r"SIGINT while stage train ran; it exited 1\. Re-run the same command "
                                        r"with --run-id r7 to resume"):
        run_one(tmp_path, "train", argv, 20.0)
    thread.join()
    assert got.read_text() == "SIGTERM"
    # The stage ignores SIGINT itself: a Ctrl-C on the terminal cannot stop train mid-step without its checkpoint.
    assert ready.read_text().split()[1] == "True"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the pipeline's own handlers are back


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_a_stage_that_ignores_sigterm_is_killed_after_its_grace_period(tmp_path: Path) -> None:
    ready, got = tmp_path / "ready", tmp_path / "got"
    argv = [sys.executable, "-c", STAGE, str(ready), str(got), "hangs"]
    thread = interrupt_when_ready(ready, child_first=False)
    t0 = time.monotonic()
    with pytest.raises(Preempted, match="SIGINT while stage merge ran; it was killed"):
        run_one(tmp_path, "merge", argv, 1.0)
    thread.join()
    assert 1.0 <= time.monotonic() - t0 < 20
    assert not got.exists()
