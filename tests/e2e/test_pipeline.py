"""The whole chain through the CLI, as the containers run it: `ftjobs pipeline` against the
real S3 test server with the tiny test model, gated as the demo is (the untrained tiny model cannot
pass it: exit 4), then again without the gate (everything already done, exit 0)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from common import lineage as lin
from common import manifest as mf
from common import storage
from jobs.chain import CHAIN
from jobs.cli import main

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
STEPS = [s.name for s in CHAIN if not s.optional]  # synth runs only with a synth section (test_pipeline_synth.py)


def stages_in(node: lin.Node) -> list[str]:
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
        # Six tokens never match a whole reference: 0% against 0%, so the gate fails.
        "evaluate": {"checks": {"json_valid": True}, "bootstrap": 100, "fail_if_worse": "exact_match"},
    }
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(conf)]
    first = run(cmd, subprocess_env)
    assert first.returncode == 4, first.stderr[-4000:]
    # A verdict, not a failure to run: the published evaluate manifest is still the last stdout line.
    prefix = f"{s3_root}/runs/e2e"
    uri = mf.manifest_uri(f"{prefix}/evaluate")
    assert first.stdout.splitlines() == [uri]
    report = mf.load(uri).artifact_uri("report.html")  # in the winning attempt's folder, as the manifest says
    assert report.startswith(f"{prefix}/evaluate/attempts/")
    assert f"report: {report}" in first.stderr
    verdict = first.stderr.strip().splitlines()[-1]
    assert "the finetuned model did not beat the base model on exact_match (finetuned 0.0% vs base 0.0%)" in verdict
    assert f"the report is at {report}" in verdict
    assert "will not change the verdict" in verdict and "Fix it" not in verdict
    record = json.loads(storage.read_text(f"{prefix}/pipeline.json"))
    assert record["exit_code"] == 4
    assert {k: v["status"] for k, v in record["steps"].items()} == {s: "done" for s in STEPS} | {
        "evaluate": "gate failed"}
    assert record["steps"]["evaluate"]["exit_code"] == 4 and record["steps"]["evaluate"]["manifest"] == uri
    for step in STEPS:
        assert storage.exists(mf.manifest_uri(f"{prefix}/{step}")), step
        # what each stage wrote in its model section is what the stages downstream parse it as
        block = mf.model_block(mf.load(f"{prefix}/{step}", verify="none"))
        assert block.template_hash, step

    # Every step's manifest records the run, and `ftjobs runs show` finds them by the run id alone.
    assert {mf.load(f"{prefix}/{step}", verify="none").manifest.run_id for step in STEPS} == {"e2e"}
    shown = CliRunner().invoke(main, ["runs", "show", "e2e", "--root", s3_root, "--json"], catch_exceptions=False)
    assert shown.exit_code == 0, shown.output
    listed = json.loads(shown.stdout)
    assert sorted(s["step"] for s in listed["steps"]) == sorted(STEPS)
    assert {s["run_id"] for s in listed["steps"]} == {"e2e"} and listed["record"]["exit_code"] == 4
    assert next(s for s in listed["steps"] if s["step"] == "evaluate")["manifest"] == uri

    tree = lin.lineage(uri, verify="full")
    assert lin.all_ok(tree), lin.render_tree(tree)
    # evaluate <- infer-base, infer-finetuned; infer-finetuned <- merge <- train <- prepare <- raw data
    assert [c.stage for c in tree.children] == ["infer", "infer"]
    assert set(stages_in(tree)) == {"evaluate", "infer", "merge", "train", "prepare", "raw"}, lin.render_tree(tree)
    prepares = [n for n in _walk(tree) if n.stage == "prepare"]
    assert len(prepares) >= 2  # reached through both infer runs
    for node in prepares:
        assert [c.uri for c in node.children if c.stage is None] == [str(small)]
    evaluated = mf.load(uri)
    for name in ("report.md", "report.html", "chart.png", "metrics.json"):
        assert storage.exists(evaluated.artifact_uri(name))
    metrics = mf.load(uri).manifest.metrics
    assert set(metrics["sets"]) == {"base", "finetuned"} and metrics["sets"]["base"]["rows"] == 4

    again = run([*cmd, "--set", "evaluate.fail_if_worse=null"], subprocess_env)
    assert again.returncode == 0, again.stderr[-4000:]
    assert again.stdout.strip().splitlines()[-1] == uri
    record = json.loads(storage.read_text(f"{prefix}/pipeline.json"))
    assert {s["status"] for s in record["steps"].values()} == {"already done"} and record["exit_code"] == 0


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


def _walk(node: lin.Node) -> list[lin.Node]:
    return [node] + [n for child in node.children for n in _walk(child)]


def test_the_failed_stage_and_its_exit_code_are_in_pipeline_json(tmp_path: Path,
                                                                  subprocess_env: dict[str, str]) -> None:
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(yaml.safe_dump({"root": str(tmp_path / "store"), "run_id": "bad", "base_model": "demo/base-model",
                                    "data": [str(tmp_path / "missing.jsonl")]}))
    result = run([sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(conf)], subprocess_env, timeout=120)
    assert result.returncode == 3, result.stderr[-4000:]
    assert "stage prepare failed with exit 3" in result.stderr
    record = json.loads((tmp_path / "store" / "runs" / "bad" / "pipeline.json").read_text())
    assert record["exit_code"] == 3
    assert list(record["steps"]) == ["prepare"]
    assert record["steps"]["prepare"]["status"] == "failed" and record["steps"]["prepare"]["exit_code"] == 3
