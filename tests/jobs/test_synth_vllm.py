"""synth on vLLM's CPU build, through the CLI as subprocesses: a tiny random teacher guided to the messages
schema (vLLM structured outputs), a tiny random judge, prepare taking the result, and a run killed between
chunks that resumes to exactly the rows of an uninterrupted one. Three runs, two engine starts each.

What a random teacher can show: every stage of the filter, counted; what it writes is noise in the shape of
the format. What it cannot: that anything it writes is worth training on."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import config as cfg
from common import lineage, storage
from common import manifest as mf
from jobs import prepare
from jobs.synth import rows as R
from tests.jobs.test_synth import write_seeds

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def settings(tiny_model: Path) -> dict[str, Any]:
    return {"num_prompts": 8, "chunk_rows": 2, "guided": True,
            # max_tokens cuts some of the teacher's rows short (about 80-100 tokens here): truncated rejects
            "sampling": {"n": 2, "max_tokens": 92, "temperature": 1.0, "seed": 0},
            "limits": {"max_chars": 60, "max_turns": 2}, "engine_args": {"max_model_len": 1024},
            "judge": {"model": str(tiny_model), "guided": True, "min_score": 8,
                      "sampling": {"max_tokens": 256, "temperature": 0}, "engine_args": {"max_model_len": 1024}}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> dict[str, Any]:
    tmp = tmp_path_factory.mktemp("synth-vllm")
    conf = tmp / "synth.yaml"
    conf.write_text(yaml.safe_dump(settings(tiny_model)))
    env = dict(os.environ) | {"FTJOBS_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "FTJOBS_CACHE": str(tmp / "cache")}
    return {"tmp": tmp, "seeds": write_seeds(tmp / "seeds.jsonl"), "config": conf, "env": env}


def command(setup: dict[str, Any], tiny_model: Path, out: str) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", "synth", "--seeds", str(setup["seeds"]), "--teacher", str(tiny_model),
            "--output", out, "--config", str(setup["config"])]


def run_cli(setup: dict[str, Any], tiny_model: Path, out: str) -> tuple[mf.Loaded, str]:
    proc = subprocess.run(command(setup, tiny_model, out), cwd=REPO, env=setup["env"], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return mf.load(proc.stdout.strip().splitlines()[-1], verify="full", expect_stage="synth"), proc.stderr


def data_rows(loaded: mf.Loaded) -> list[str]:
    return storage.read_text(loaded.artifact_uri("data")).splitlines()


@pytest.fixture(scope="module")
def uninterrupted(setup: dict[str, Any], tiny_model: Path) -> tuple[mf.Loaded, str]:
    return run_cli(setup, tiny_model, str(setup["tmp"] / "synth-a"))


def test_a_guided_random_teacher_is_filtered_by_reason_and_prepare_takes_the_result(
        uninterrupted: tuple[mf.Loaded, str], setup: dict[str, Any], tiny_model: Path, tiny_tokenizer: Any) -> None:
    loaded, log = uninterrupted
    m = loaded.manifest
    kept, rejected = m.stats["kept"], m.stats["rejected"]
    assert m.stats["completions"] == 16 and kept + sum(rejected.values()) == 16
    assert kept > 0 and rejected and set(rejected) <= set(R.REASONS)
    # Guided decoding: every completion that was not cut off is a row of the format; none is not_json.
    assert "not_json" not in rejected and "wrong_format" not in rejected and rejected.get("truncated", 0) > 0
    assert m.stats["teacher"]["finish_reasons"].get("length", 0) == rejected.get("truncated", 0)
    judged = 16 - rejected.get("truncated", 0) - rejected.get("near_duplicate_of_seed", 0)
    assert m.stats["judge"]["judged"] == judged
    assert m.stats["judge"]["completions"] == judged and m.stats["judge"]["engines"][0].startswith("0.")
    assert sum(m.stats["judge"]["scores"].values()) + rejected.get("judge_unparseable", 0) == judged
    # The cost was said before it was spent, and the manifest holds what was spent.
    assert '"msg": "synth teacher: about to run 8 prompts x 2 = 16 completions' in log
    assert m.stats["teacher"]["announced"]["max_new_tokens"] == 16 * 92
    assert 0 < m.stats["teacher"]["completion_tokens"] <= 16 * 92
    rows = [R.to_row(json.loads(line), "messages") for line in data_rows(loaded)]
    assert len(rows) == kept and all([t["role"] for t in r["messages"]] == ["user", "assistant"] for r in rows)
    assert m.model["teacher"] == str(tiny_model) and m.model["judge"] == str(tiny_model)

    prep = prepare.run(cfg.validate(prepare.Config, {"sources": [loaded.uri], "tokenizer": str(tiny_model),
                                                     "output": str(setup["tmp"] / "prepare"), "max_drop_fraction": 0}))
    assert prep.manifest.stats["rows_out"] == kept and prep.manifest.stats["train"] == kept  # all train
    tree = lineage.lineage(prep.uri, verify="full")
    assert lineage.all_ok(tree) and tree.children[0].stage == "synth"
    assert tree.children[0].children[0].uri == str(setup["seeds"])


def test_a_run_killed_between_chunks_resumes_to_the_same_rows_without_duplicates(
        uninterrupted: tuple[mf.Loaded, str], setup: dict[str, Any], tiny_model: Path) -> None:
    out = str(setup["tmp"] / "synth-b")
    first = Path(out) / "shards" / "teacher" / "chunk-00000.parquet"
    proc = subprocess.Popen(command(setup, tiny_model, out), cwd=REPO, start_new_session=True,
                            env=setup["env"] | {"FTJOBS_GENERATE_CHUNK_PAUSE_S": "60"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 300
        while not first.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.5)
        assert first.exists(), "the first chunk never appeared"
        os.killpg(proc.pid, signal.SIGKILL)  # a pod lost mid-run: no cleanup, no manifest
    finally:
        proc.wait(timeout=60)
    written = first.read_bytes()
    assert not storage.exists(mf.manifest_uri(out))

    resumed, _ = run_cli(setup, tiny_model, out)
    reference, _ = uninterrupted
    assert first.read_bytes() == written  # the killed run's chunk was reused, not generated again
    assert resumed.manifest.stats["teacher"]["generated_by_this_attempt"] == 16 - 4
    assert resumed.manifest.stats["teacher"]["announced"]["done_prompts_before"] == 2
    rows = data_rows(resumed)
    assert rows == data_rows(reference)  # each kept row once, the same as without the kill
    assert len({json.loads(r)["id"] for r in rows}) == len(rows)
    assert resumed.manifest.stats["rejected"] == reference.manifest.stats["rejected"]
