"""Preemption, the way Kubernetes does it: `ftjobs train` as a subprocess, killed mid-run, then re-run.

SIGTERM: the job finishes its step, checkpoints and exits 1 (retryable).
SIGKILL: no warning; the last complete checkpoint is what survives.
Either way, re-running the same command resumes and ends at the same total
step count, with the same losses an uninterrupted run has.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from common import manifest as mf
from common import storage
from jobs.train import checkpoints
from jobs.train import job as train
from tests.jobs.helpers import publish_prepare

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
STEPS = 16
SETS = ["max_seq_length=96", "batch_size=2", f"max_steps={STEPS}", "learning_rate=0.01", "lora.r=8",
        "lora.alpha=16", "lora.dropout=0.1", "lora.modules_to_save=[lm_head]", "checkpoint.every_steps=4",
        "checkpoint.keep=2", "checkpoint.grace_seconds=60"]


@pytest.fixture(scope="module")
def prepared(s3_endpoint, tiny_tokenizer) -> mf.Loaded:
    return publish_prepare(f"s3://ftjobs-test/t/{uuid.uuid4().hex[:12]}/prepare", tokenizer=tiny_tokenizer,
                           n_train=96, n_eval=8)


@pytest.fixture(scope="module")
def uninterrupted(prepared, tiny_model) -> list[float]:
    """The loss curve of the same training run without interruption (in-process)."""
    from common import config as cfg

    config = cfg.load_config(train.Config, sets=SETS, flags={
        "input": prepared.uri, "base_model": str(tiny_model), "output": f"{prepared.prefix}-reference"})
    loaded = train.run(config)
    return [p["loss"] for p in _curve(loaded)["train"]]


def _curve(loaded: mf.Loaded) -> dict:
    return json.loads(storage.read_bytes(loaded.resolve(loaded.manifest.artifact("loss_curve.json"))))


def _command(prepared: mf.Loaded, tiny_model: Path, output: str) -> list[str]:
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--input", prepared.uri, "--base-model", str(tiny_model),
           "--output", output]
    for item in SETS:
        cmd += ["--set", item]
    return cmd


def _run_until_checkpoint_then(sig: int, cmd: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Start the job, wait for its first checkpoint, send `sig`; returns (exit code, its log)."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    assert proc.stderr is not None
    for line in proc.stderr:
        lines.append(line)
        if "checkpoint saved" in line:
            proc.send_signal(sig)
            break
    else:
        proc.wait(timeout=60)
        pytest.fail("train exited before its first checkpoint:\n" + "".join(lines[-30:]))
    _, rest = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + rest


@pytest.mark.timeout(400)
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_and_ends_like_an_uninterrupted_one(sig, prepared, tiny_model, subprocess_env,
                                                                uninterrupted):
    output = f"{prepared.prefix}-{sig.name.lower()}"
    cmd = _command(prepared, tiny_model, output)
    code, log = _run_until_checkpoint_then(sig, cmd, subprocess_env)
    saved = {step for step, files in checkpoints.present(output).values() if checkpoints.MARKER in files}
    assert saved, "no complete checkpoint survived"
    if sig == signal.SIGTERM:
        assert code == 1, log[-3000:]
        assert "Stopped by SIGTERM after step" in log
        # The job saved its state on the way out, after the step it was in.
        assert max(saved) > 4
    else:
        assert code == -signal.SIGKILL
    assert not storage.exists(mf.manifest_uri(output))

    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    loaded = mf.load(done.stdout.strip().splitlines()[-1])
    m = loaded.manifest
    assert m.stats["resumed_from_step"] == max(saved)
    assert m.stats["attempts"] == 2
    assert m.metrics["steps"] == STEPS
    losses = [p["loss"] for p in _curve(loaded)["train"]]
    assert [p["step"] for p in _curve(loaded)["train"]] == list(range(1, STEPS + 1))
    # Same data position, optimizer, scheduler and RNG state: the resumed steps repeat the uninterrupted run.
    assert losses == pytest.approx(uninterrupted, rel=1e-3, abs=1e-3)
