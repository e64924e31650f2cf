"""The whole chain through the CLI, as the containers run it: `ftjobs pipeline` against the
real S3 test server with the tiny test model, then the same command again (everything already done)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import manifest as mf
from common import storage
from jobs.pipeline import STEPS

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def stages_in(node: mf.Node) -> list[str]:
    return [n.stage or "raw" for n in _walk(node)]


def test_pipeline_on_s3_with_the_tiny_model(s3_root: str, tiny_model: Path, tmp_path: Path,
                                            subprocess_env: dict[str, str]) -> None:
    data = REPO / "demo" / "data" / "tickets.jsonl"
    small = tmp_path / "tickets.jsonl"
    small.write_text("".join(data.read_text().splitlines(keepends=True)[:24]))
    config = {
        "root": s3_root, "run_id": "e2e", "base_model": str(tiny_model), "data": [str(small)],
        "prepare": {"eval_size": 4, "workers": 1},
        "train": {"max_steps": 2, "batch_size": 2, "max_seq_length": 256, "lora": {"r": 4, "alpha": 8},
                  "checkpoint": {"every_steps": None}},
        "infer": {"sampling": {"temperature": 0, "max_tokens": 6},
                  "engine_args": {"dtype": "float32", "max_model_len": 256}},
        "evaluate": {"checks": {"json_valid": True}, "bootstrap": 100},
    }
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(conf)]
    first = run(cmd, subprocess_env)
    assert first.returncode == 0, first.stderr[-4000:]
    uri = first.stdout.strip().splitlines()[-1]
    prefix = f"{s3_root}/runs/e2e"
    assert uri == mf.manifest_uri(f"{prefix}/evaluate")
    assert "report: " + f"{prefix}/evaluate/report.html" in first.stderr
    for step in STEPS:
        assert storage.exists(mf.manifest_uri(f"{prefix}/{step}")), step

    tree = mf.lineage(uri, verify="full")
    assert mf.all_ok(tree), mf.render_tree(tree)
    # evaluate <- infer-base, infer-finetuned; infer-finetuned <- merge <- train <- prepare <- raw data
    assert [c.stage for c in tree.children] == ["infer", "infer"]
    assert set(stages_in(tree)) == {"evaluate", "infer", "merge", "train", "prepare", "raw"}, mf.render_tree(tree)
    prepares = [n for n in _walk(tree) if n.stage == "prepare"]
    assert len(prepares) >= 2  # reached through both infer runs
    for node in prepares:
        assert [c.uri for c in node.children if c.stage is None] == [str(small)]
    for name in ("report.md", "report.html", "chart.png", "metrics.json"):
        assert storage.exists(f"{prefix}/evaluate/{name}")
    metrics = mf.load(uri).manifest.metrics
    assert set(metrics["sets"]) == {"base", "finetuned"} and metrics["sets"]["base"]["rows"] == 4

    again = run(cmd, subprocess_env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.strip().splitlines()[-1] == uri
    steps = json.loads(storage.read_text(f"{prefix}/pipeline.json"))["steps"]
    assert {s["status"] for s in steps.values()} == {"already done"}


def run(cmd: list[str], env: dict[str, str], timeout: float = 420) -> subprocess.CompletedProcess[str]:
    """Run the pipeline in its own process group, so a timeout also ends the stage it is running."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"pipeline still running after {timeout}s; its log ends:\n{err[-4000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _walk(node: mf.Node) -> list[mf.Node]:
    return [node] + [n for child in node.children for n in _walk(child)]
