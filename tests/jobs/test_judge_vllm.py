"""evaluate's judge through the real vLLM CPU engine, end to end through the CLI: a tiny random judge model
(guided to the verdict JSON) compares two infer-shaped prediction sets pairwise, in both orders, and the
`--fail-if-worse judge` gate reads its win rate. One engine start.

A random judge's verdicts say nothing about the answers; the test shows the plumbing: prompts rendered with
the judge's template, both orders asked, verdicts read and counted, the gate and the report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from common import manifest as mf
from common import storage
from tests.jobs.test_evaluate import BASE, TUNED, publish_predictions

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def test_pairwise_judge_on_vllm_asks_both_orders_and_gates_on_its_win_rate(tmp_path: Path, tiny_model: Path) -> None:
    base = publish_predictions(str(tmp_path / "infer-base"), BASE)
    tuned = publish_predictions(str(tmp_path / "infer-ft"), TUNED)
    conf = tmp_path / "evaluate.yaml"
    conf.write_text(yaml.safe_dump({"bootstrap": 200, "judge": {
        "model": str(tiny_model), "mode": "pairwise", "guided": True, "chunk_rows": 3,
        "sampling": {"max_tokens": 256, "temperature": 0}, "engine_args": {"max_model_len": 1024}}}))
    out = str(tmp_path / "evaluate")
    env = dict(os.environ) | {"FTJOBS_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "FTJOBS_CACHE": str(tmp_path / "c")}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "evaluate", "--predictions", base, "--predictions", tuned,
                           "--label", "base", "--label", "finetuned", "--output", out, "--config", str(conf),
                           "--fail-if-worse", "judge"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode in (0, 4), proc.stderr[-4000:]
    loaded = mf.load(proc.stdout.strip().splitlines()[-1], verify="full", expect_stage="evaluate")
    m = loaded.manifest
    judge = m.stats["judge"]
    counts = judge["counts"]["finetuned"]
    assert counts["pairs"] == 4 and judge["completions"] == 8 and judge["engines"][0].startswith("0.")
    assert counts["wins"] + counts["losses"] + counts["ties"] + counts["inconsistent"] + counts["unparseable"] == 4
    assert counts["unparseable"] == 0  # guided: every verdict is the schema's JSON
    verdicts = [json.loads(x) for x in storage.read_text(loaded.artifact_uri("judge.jsonl")).splitlines()]
    assert sorted((v["id"], v["order"]) for v in verdicts) == sorted((r, o) for r in BASE for o in ("ab", "ba"))
    assert all(v["value"] in ("A", "B", "tie") and isinstance(v["reason"], str) for v in verdicts)
    win_rate = m.metrics["sets"]["finetuned"]["judge"]
    assert m.metrics["sets"]["base"]["judge"] == 0.5 and 0.0 <= win_rate <= 1.0
    # The gate: exit 4 exactly when the finetune does not win more than half.
    assert (proc.returncode == 4) == (win_rate <= 0.5)
    assert '"msg": "judge (pairwise): about to run 8 prompts x 1 = 8 completions' in proc.stderr
    assert m.model["judge"] == str(tiny_model)
    assert "## LLM judge (pairwise)" in storage.read_text(loaded.artifact_uri("report.md"))
