"""Data parallel training for real: `ftjobs launch` (torchrun, gloo on CPU) runs `ftjobs train` on 2 processes.

One run, preempted twice and resumed on another number of processes each time, the way a Job's pods
come and go: 2 processes (SIGTERM to the launcher's process group) -> 1 process (SIGTERM) -> 2 processes
to the end. Its loss curve must be the curve of one uninterrupted process with the same global batch
(grad_accum 2 x 1 process = grad_accum 1 x 2 processes), step for step: that holds only when every
micro-batch of a step is trained on exactly once across the processes and the gradients are summed over
them (the split itself is checked as a pure function in test_train_packing.py). Dropout is off so the
processes' different dropout streams cannot tell them apart; what remains is float summation order.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from common import attempts, storage
from common import manifest as mf
from jobs.train import checkpoints
from jobs.train import job as train
from tests.jobs.helpers import publish_prepare

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS = 14  # 26 packed rows in micro-batches of 2: 13 per epoch, 7 steps of 2; step 7 has one (rank 1 idles)
SETS = ["max_seq_length=96", "batch_size=2", f"max_steps={STEPS}", "learning_rate=0.01", "lora.r=8",
        "lora.alpha=16", "lora.dropout=0", "lora.modules_to_save=[lm_head]", "checkpoint.every_steps=2",
        "checkpoint.keep=2", "checkpoint.grace_seconds=60", "eval_every=7"]
# Float32 sums in another order (two processes' partial gradients, gloo's all-reduce): ~1e-5 seen.
TOLERANCE = {"rel": 0, "abs": 2e-4}


@pytest.fixture(scope="module")
def prepared(s3_endpoint, tiny_tokenizer) -> mf.Loaded:
    return publish_prepare(f"s3://ftjobs-test/t/{uuid.uuid4().hex[:12]}/prepare", tokenizer=tiny_tokenizer,
                           n_train=96, n_eval=8)


@pytest.fixture(scope="module")
def one_process(prepared, tiny_model) -> mf.Loaded:
    """The reference: one process, grad_accum 2, never interrupted (in-process)."""
    from common import config as cfg

    config = cfg.load_config(train.Config, sets=[*SETS, "grad_accum=2"], flags={
        "input": prepared.uri, "base_model": str(tiny_model), "output": f"{prepared.prefix}-one"})
    return train.run(config)


def _curve(loaded: mf.Loaded) -> dict[str, Any]:
    return json.loads(storage.read_bytes(loaded.resolve(loaded.manifest.artifact("loss_curve.json"))))


def _train_args(prepared: mf.Loaded, tiny_model: Path, output: str) -> list[str]:
    args = ["train", "--input", prepared.uri, "--base-model", str(tiny_model), "--output", output]
    for item in SETS:
        args += ["--set", item]
    return args


def launch_command(processes: int, args: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, "-m", "jobs.cli", *args]
    return [sys.executable, "-m", "jobs.cli", "launch", "--standalone", "--nproc-per-node", str(processes), "--",
            *args]


def records_of(log: str) -> list[dict[str, Any]]:
    """Our JSON log lines (torchrun's agent writes its own few lines in its own format)."""
    out = []
    for line in log.splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _preempt(cmd: list[str], env: dict[str, str]) -> tuple[int, list[dict[str, Any]], int]:
    """Start the command in a process group of its own; at its first checkpoint SIGTERM the group.

    Returns (exit code, its log records, the index of the first record after the signal).
    """
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    lines: list[str] = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "checkpoint saved" in line:
            os.killpg(proc.pid, signal.SIGTERM)
            break
    else:
        proc.wait(timeout=60)
        pytest.fail("train exited before its first checkpoint:\n" + "".join(lines[-30:]))
    signalled = len(records_of("".join(lines)))
    _, rest = proc.communicate(timeout=180)
    return proc.returncode, records_of("".join(lines) + rest), signalled


def _attempt_of(records: list[dict[str, Any]]) -> str:
    (attempt,) = {r["attempt"] for r in records if r["msg"].startswith("attempt ")}  # rank 0's: rank 1 logs errors
    return attempt


def _checkpoints_by(output: str) -> set[str]:
    """The attempts whose checkpoint folders are under the output."""
    return {name.split("-", 2)[2] for name in checkpoints.present(output)}


def _assert_logged_once(records: list[dict[str, Any]], processes: int) -> None:
    """Rank 0 logs; other ranks only their own errors, each line tagged with its rank."""
    if processes > 1:  # records without a rank are the launcher's own
        assert {r.get("rank") for r in records} <= {None, *range(processes)}
        assert {r["level"] for r in records if r.get("rank")} <= {"error"}
    assert sum(r["msg"] == "resolved config" for r in records) == 1
    assert sum(r["msg"].startswith("attempt ") for r in records) == 1


@pytest.mark.timeout(400)
def test_two_processes_train_the_one_process_curve_through_preemptions_and_world_size_changes(
        prepared, tiny_model, subprocess_env, one_process):
    output = f"{prepared.prefix}-dp"
    args = _train_args(prepared, tiny_model, output)
    rank0_attempts = []

    # 1. Two processes; SIGTERM to the launcher's group: the step in flight ends, one checkpoint, exit 1.
    code, records, signalled = _preempt(launch_command(2, args), subprocess_env)
    log = "\n".join(r["msg"] for r in records)
    assert code == 1, log[-3000:]
    _assert_logged_once(records, 2)
    rank0_attempts.append(_attempt_of(records))
    after = records[signalled:]
    assert sum(r["msg"].startswith("checkpoint saved") for r in after) == 1
    (stopped,) = [r for r in records if "Stopped by SIGTERM after step" in r["msg"]]
    assert stopped["rank"] == 0
    first_stop = int(re.search(r"after step (\d+)", stopped["msg"]).group(1))
    assert 2 < first_stop < STEPS
    assert [r["rank"] for r in records if "stopped with the other processes" in r["msg"]] == [1]
    saved = {step for step, files in checkpoints.present(output).values() if checkpoints.MARKER in files}
    assert max(saved) == first_stop
    assert _checkpoints_by(output) == set(rank0_attempts)
    assert not storage.exists(mf.manifest_uri(output))

    # 2. Resumed on one process (the world size changed): the same 2 micro-batches per step; preempted again.
    code, records, _ = _preempt(launch_command(1, args), subprocess_env)
    log = "\n".join(r["msg"] for r in records)
    assert code == 1, log[-3000:]
    assert f"resuming from {output}/checkpoints/{checkpoints.folder_name(first_stop)}-" in log
    assert "saved by 2 process(es) taking 2 micro-batches per step; resuming on 1 process(es)" in log
    rank0_attempts.append(_attempt_of(records))
    second_stop = int(re.search(r"Stopped by SIGTERM after step (\d+)", log).group(1))
    assert first_stop < second_stop < STEPS
    assert _checkpoints_by(output) <= set(rank0_attempts)

    # 3. Back on two processes, to the end.
    done = subprocess.run(launch_command(2, args), cwd=REPO, env=subprocess_env, capture_output=True, text=True,
                          timeout=300)
    records = records_of(done.stderr)
    assert done.returncode == 0, done.stderr[-3000:]
    _assert_logged_once(records, 2)
    rank0_attempts.append(_attempt_of(records))
    assert done.stdout.strip().splitlines() == [mf.manifest_uri(output)]  # rank 0's line only
    loaded = mf.load(mf.manifest_uri(output))
    m = loaded.manifest
    assert m.attempt == rank0_attempts[-1]
    assert (m.stats["resumed_from_step"], m.stats["attempts"], m.stats["world_size"]) == (second_stop, 3, 2)
    assert m.stats["steps"]["micro_batches"] == 2 and m.metrics["steps"] == STEPS

    # Only rank 0 wrote to the store: what the attempts left is rank 0's (checkpoints: checked as they were).
    assert checkpoints.present(output) == {}  # deleted once published
    assert {o.rel.split("/")[0] for o in storage.list_objects(storage.join(output, attempts.ROOT))} == {m.attempt}

    # The same optimizer steps and the same losses as one process with the same global batch.
    ref, got = _curve(one_process), _curve(loaded)
    assert [p["step"] for p in got["train"]] == [p["step"] for p in ref["train"]] == list(range(1, STEPS + 1))
    assert [p["loss"] for p in got["train"]] == pytest.approx([p["loss"] for p in ref["train"]], **TOLERANCE)
    assert [p["step"] for p in got["eval"]] == [p["step"] for p in ref["eval"]] == [7, 14]
    assert [p["loss"] for p in got["eval"]] == pytest.approx([p["loss"] for p in ref["eval"]], **TOLERANCE)
    assert m.metrics["tokens_trained"] == one_process.manifest.metrics["tokens_trained"]
    worst = max(abs(a["loss"] - b["loss"]) for a, b in zip(got["train"], ref["train"], strict=True))
    print(f"1 vs 2 processes, {STEPS} steps: largest train-loss difference {worst:.2e}\n"
          f"  1: {[p['loss'] for p in ref['train']]}\n  2: {[p['loss'] for p in got['train']]}")
