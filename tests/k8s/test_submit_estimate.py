"""`ftjobs k8s submit --gpu NAME`: each train step's memory estimate (jobs/estimate.py) is printed before any
Job exists, and a step that cannot fit its GPU is refused with exit 2 and the numbers, unless --go-anyway.
kubectl is tests/k8s/fake_kubectl.py (see test_submit.py); the base model is a folder holding only the
config.json of Llama-3.1-70B (the estimate reads no weights)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from jobs.cli import main
from tests.jobs.test_estimate import LLAMA_70B
from tests.k8s.test_submit import cluster, created  # noqa: F401

pytestmark = pytest.mark.integration


def submit(cluster: dict[str, Any], model: Path, *extra: str) -> Any:  # noqa: F811
    args = ["--log-format", "text", "k8s", "submit", "--run-id", "r1", "--kubectl", cluster["kubectl"],
            "--kustomize-dir", cluster["overlay"], "--source", "s3://data/chats.jsonl", "--base-model", str(model),
            "--poll-s", "0.01", "--images", cluster["images"], "--no-baseline", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def model_dir(tmp_path: Path, cfg: dict[str, Any]) -> Path:
    path = tmp_path / "model"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_a_train_step_that_cannot_fit_its_gpu_is_refused_before_any_job(cluster, tmp_path):  # noqa: F811
    model = model_dir(tmp_path, LLAMA_70B)
    result = submit(cluster, model, "--gpu", "H100-80GB", "--stage-args", "train=--set method=full")
    assert result.exit_code == 2, result.output
    assert "step train: train cannot fit 1 x H100-80GB" in result.stderr
    assert "GiB per GPU needed" in result.stderr and "--go-anyway" in result.stderr
    assert created(cluster) == []


def test_go_anyway_submits_it(cluster, tmp_path):  # noqa: F811
    model = model_dir(tmp_path, LLAMA_70B)
    forced = submit(cluster, model, "--gpu", "H100-80GB", "--stage-args", "train=--set method=full", "--go-anyway")
    assert forced.exit_code == 0, forced.output
    assert "--go-anyway: submitting it regardless" in forced.stderr
    assert "ftjobs-train-r1" in created(cluster)
