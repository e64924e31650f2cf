"""`make gpu-check` / `ftjobs gpu-check` where it can run here (no CUDA): it prints the versions and says
plainly that it needs a GPU, exit 1; and its parts' plumbing (commands, verdicts, what a part needs) on CPU,
where a QLoRA train that ran on the CPU must be judged a failure, not a pass."""

from __future__ import annotations

import json
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


@pytest.mark.unit
def test_a_train_part_passes_only_on_cuda_4_bit_with_a_falling_loss(tmp_path):
    w = gpucheck.Work(root=tmp_path, model=tmp_path, data=tmp_path, env={})

    def publish(part: str, device: str, mode: str, losses: tuple[float, float], world: int = 1) -> str:
        out = Path(w.out(part))
        out.mkdir(parents=True, exist_ok=True)
        (out / "manifest.json").write_text(json.dumps({
            "stats": {"device": device, "world_size": world},
            "model": {"quantization": {"mode": mode}, "strategy": "fsdp" if world > 1 else "ddp"},
            "metrics": {"first_train_loss": losses[0], "final_train_loss": losses[1], "peak_memory_bytes": 2**30}}))
        return gpucheck.judge(w, part)

    assert publish("train", "NVIDIA H100 80GB HBM3", "nf4", (7.0, 6.0)) == ""
    assert "not 4-bit on CUDA" in publish("train", "cpu", "nf4", (7.0, 6.0))
    assert "not 4-bit on CUDA" in publish("train", "NVIDIA H100 80GB HBM3", "none", (7.0, 6.0))
    assert "loss did not fall" in publish("train", "NVIDIA H100 80GB HBM3", "nf4", (7.0, 7.1))
    assert "ran as ddp on 1" in publish("fsdp", "NVIDIA H100 80GB HBM3", "nf4", (7.0, 6.0))
    assert publish("fsdp", "NVIDIA H100 80GB HBM3", "nf4", (7.0, 6.0), world=2) == ""


@pytest.mark.e2e  # the real commands as subprocesses: prepare and a 2-step train, ~1 min on a quiet machine
@pytest.mark.timeout(600)
def test_parts_run_the_real_commands_and_a_cpu_train_is_judged_a_failure(tmp_path, monkeypatch):
    monkeypatch.setattr(gpucheck, "TRAIN_SETS", [*gpucheck.TRAIN_SETS, "max_steps=2", "optimizer=adamw_torch"])
    verdicts = {v.part: v for v in gpucheck.check(["prepare", "train", "fsdp", "merge"], keep=tmp_path)}
    assert verdicts["prepare"].status == "PASS"
    assert verdicts["train"].status == "FAIL" and "not 4-bit on CUDA" in verdicts["train"].detail
    assert verdicts["fsdp"].status == "SKIP" and "FSDP needs 2" in verdicts["fsdp"].detail
    assert verdicts["merge"].status == "NOT RUN"
