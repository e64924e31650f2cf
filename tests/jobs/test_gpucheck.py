"""`make gpu-check` / `ftjobs gpu-check` where it can run here (no CUDA): it prints the versions and says
plainly that it needs a GPU, exit 1; and its parts' plumbing (commands, verdicts, what a part needs) on CPU,
where a QLoRA train that ran on the CPU must be judged a failure, not a pass."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from jobs import gpucheck

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.unit
def test_without_cuda_it_prints_the_versions_and_exits_1_saying_why():
    done = subprocess.run(["make", "-s", "gpu-check"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "no CUDA device here" in done.stderr and "nothing was run" in done.stderr
    for name in ("torch", "bitsandbytes", "transformers", "peft", "vllm", "gpus"):
        assert f"  {name}" in done.stderr
    direct = subprocess.run([sys.executable, "-m", "jobs.cli", "gpu-check"], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert direct.returncode == 1 and "no CUDA device here" in direct.stderr


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_parts_run_the_real_commands_and_a_cpu_train_is_judged_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(gpucheck, "TRAIN_SETS", [*gpucheck.TRAIN_SETS, "max_steps=2", "optimizer=adamw_torch"])
    verdicts = {v.part: v for v in gpucheck.check(["prepare", "train", "fsdp", "merge"], keep=tmp_path)}
    assert verdicts["prepare"].status == "PASS"
    assert verdicts["train"].status == "FAIL" and "not 4-bit on CUDA" in verdicts["train"].detail
    assert verdicts["fsdp"].status == "SKIP" and "FSDP needs 2" in verdicts["fsdp"].detail
    assert verdicts["merge"].status == "NOT RUN"
