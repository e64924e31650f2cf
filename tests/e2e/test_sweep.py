"""`ftjobs sweep` through the CLI against the S3 test server: a two-cell matrix on the tiny model plus one
cell that only fails at train time. Shared steps run once (every cell's lineage reaches the one prepare and
the one base inference), every other cell trains, the leaderboard ranks them with intervals, the failed cell
is reported as failed, and a re-run is "already done" throughout.

The smallest sweep that shows all of that: two finished cells to rank (of two LoRA ranks, so the one engine
serves adapters of different shapes) and the failed one. How a matrix of several axes expands into cells and
shares their steps is the plan's (tests/jobs/test_plan.py runs a 2x2 sweep on both executors); each train run
here is a process of its own, the sweep's largest cost."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import lineage as lin
from common import manifest as mf
from common import storage
from common.tinymodel import WORDS

pytestmark = pytest.mark.e2e


def sweep_config(tmp_path: Path, root: str, model: Path) -> Path:
    rows = []
    for i in range(48):
        word = WORDS[i % len(WORDS)]
        rows.append({"messages": [{"role": "user", "content": f"echo {word} {i}"},
                                  {"role": "assistant", "content": f"{word} {i}"}]})
    data = tmp_path / "echo.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = {
        "root": root, "base_model": str(model), "data": [str(data)], "max_parallel": 2,
        "prepare": {"eval_size": 8, "max_length": 64},
        "train": {"quantization": {"mode": "none"}, "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                  "max_seq_length": 128, "batch_size": 2, "max_steps": 3, "gradient_checkpointing": False,
                  "checkpoint": {"every_steps": None}},
        "infer": {"engine": "transformers", "sampling": {"temperature": 0, "max_tokens": 6}},
        "evaluate": {"bootstrap": 200},
        "matrix": {"train.lora.r": [4, 8]},
        # valid as a config, refused by peft when train builds the adapter: exit 2 at train time only (a value
        # of the axis no cell has makes it a cell of its own; without one it would extend every cell)
        "include": [{"train.lora.r": 2, "train.lora.target_modules": ["no_such_module"]}],
    }
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(conf))
    return path


def run_sweep(conf: Path, env: dict[str, str], *extra: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "jobs.cli", "--log-format", "text", "sweep", "--config", str(conf),
                           "--sweep-id", "s1", *extra], env=env, capture_output=True, text=True, timeout=1500)


def test_a_sweep_shares_steps_ranks_cells_and_resumes(tmp_path: Path, s3_root: str, tiny_model: Path,
                                                          subprocess_env: dict[str, str]) -> None:
    conf = sweep_config(tmp_path, s3_root, tiny_model)
    first = run_sweep(conf, subprocess_env)
    # one cell failed, four finished: exit 5 (EXIT_PARTIAL), the leaderboard still published and listed last
    assert first.returncode == 5, first.stderr[-6000:]
    assert "1 of 3 cells failed" in first.stderr
    prefix = f"{s3_root}/sweeps/s1"
    # The plan came first: the cells, what they share, how many train runs.
    assert "3 cells over train.lora.r" in first.stderr
    assert "prepare#" in first.stderr and "(shared by 3)" in first.stderr
    # Plain LoRA cells on one base: one inference engine serves every adapter, no merges.
    assert "steps to run: prepare 1, infer-base 1, train 3, infer-finetuned 1, evaluate 1" in first.stderr

    record = json.loads(storage.read_text(f"{prefix}/sweep.json"))
    assert record["exit_code"] == 5
    by_step: dict[str, list[dict]] = {}
    for step in record["steps"].values():
        by_step.setdefault(step["step"], []).append(step)
    assert len(by_step["prepare"]) == 1 and len(by_step["infer-base"]) == 1 and len(by_step["train"]) == 3
    status = {c["values"].get("train.lora.target_modules") is not None: c["status"] for c in record["cells"]}
    assert status == {False: "done", True: "failed"}
    failed = next(s for s in by_step["train"] if s["status"] == "failed")
    assert failed["exit_code"] == 2 and "no_such_module" in storage.read_text(failed["log"])
    assert "merge" not in by_step

    # Every finished cell's predictions descend from the one prepare; the leaderboard compares them with
    # the one base inference.
    (prep,) = by_step["prepare"]
    (base,) = by_step["infer-base"]
    (served,) = by_step["infer-finetuned"]
    assert served["status"] == "done" and len(served["cells"]) == 3
    evaluated = mf.load(record["evaluate"]["manifest"])
    finished = [r.uri for r in evaluated.manifest.inputs if r.role.startswith("candidate")]
    assert len(finished) == 2  # the failed cell's adapter was never served
    for uri in finished:
        loaded = mf.load(uri)
        assert {r.stage for r in loaded.manifest.inputs} == {"train", "prepare"}  # base + adapter, no merge
        tree = lin.lineage(uri, verify="size")
        assert lin.all_ok(tree)
        assert prep["manifest"] in {n.uri for n in walk(tree)}
    assert base["manifest"] in {r.uri for r in evaluated.manifest.inputs}
    # the leaderboard's evaluate was told every cell: the failed one with its step, exit code and reason
    (failed_cell,) = evaluated.manifest.config["leaderboard"]["failed"]
    assert (failed_cell["step"], failed_cell["exit_code"]) == ("train", 2) and failed_cell["reason"]
    assert failed_cell["values"]["train.lora.target_modules"] == ["no_such_module"]
    # every step's manifest records the sweep as its run
    assert {mf.load(s["manifest"], verify="none").manifest.run_id for s in record["steps"].values()
            if s["manifest"]} == {"s1"}
    board = json.loads(storage.read_text(evaluated.artifact_uri("leaderboard.json")))
    assert len(board["cells"]) == 2 and all(c["ci95"] is not None and c["base"] == "base:model" for c in board["cells"])
    assert all(c["train_seconds"] is not None and c["total_params"] for c in board["cells"])
    assert board["verdict"].startswith("Best: ")
    assert first.stdout.strip().splitlines()[-1] == evaluated.uri

    again = run_sweep(conf, subprocess_env, "--allow-failed-cells")
    assert again.returncode == 0, again.stderr[-6000:]
    assert again.stdout.strip().splitlines()[-1] == evaluated.uri
    record = json.loads(storage.read_text(f"{prefix}/sweep.json"))
    for step in record["steps"].values():
        if step["status"] == "done":
            assert "already done" in storage.read_text(step["log"]), step


def walk(node: lin.Node) -> list[lin.Node]:
    return [node, *(n for c in node.children for n in walk(c))]


def test_when_every_cell_fails_alike_the_error_names_the_steps_once_with_the_reason(
        tmp_path: Path, tiny_model: Path, subprocess_env: dict[str, str]) -> None:
    """Two prepares (two max_length values), one missing data file: both fail the same way, before any model
    loads. The sweep exits with their code (3) and says it once, naming both steps and where their logs are."""
    conf = tmp_path / "sweep.yaml"
    conf.write_text(yaml.safe_dump({"root": str(tmp_path / "store"), "base_model": str(tiny_model),
                                    "data": [str(tmp_path / "missing.jsonl")],
                                    "matrix": {"prepare.max_length": [64, 128]}}))
    done = run_sweep(conf, subprocess_env)
    assert done.returncode == 3, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.count("does not exist") == 1, last
    assert last.count("prepare-") == 2 and "exit 3: Source" in last
    assert f"(logs under {tmp_path}/store/sweeps/s1/logs/)" in last
