"""The pipeline with a `synth:` section, through the CLI as subprocesses: synth runs before prepare with the
run's data as seeds, and prepare reads the data and synth's manifest; stop_after keeps it to those two steps.
The teacher is the tiny random model on the transformers engine: it keeps nothing (min_rows: 0 publishes
that), which is what such a teacher can show here: the wiring, the counting and the lineage."""

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
from tests.jobs.test_synth import write_seeds

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]


def test_a_synth_section_runs_synth_before_prepare_and_prepare_reads_its_manifest(
        tmp_path: Path, tiny_model: Path, subprocess_env: dict[str, str]) -> None:
    data = write_seeds(tmp_path / "data.jsonl")
    config = {"root": str(tmp_path / "store"), "run_id": "syn", "base_model": str(tiny_model), "data": [str(data)],
              "stop_after": "prepare", "prepare": {"workers": 1},
              "synth": {"teacher": str(tiny_model), "engine": "transformers", "num_prompts": 3, "min_rows": 0,
                        "sampling": {"n": 2, "max_tokens": 16, "temperature": 1.0, "seed": 0}}}
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(yaml.safe_dump(config))
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(conf)], cwd=REPO,
                          env=subprocess_env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    prefix = tmp_path / "store" / "runs" / "syn"
    record = json.loads((prefix / "pipeline.json").read_text())
    assert list(record["steps"]) == ["synth", "prepare"]
    assert all(v["status"] == "done" for v in record["steps"].values())
    synth = mf.load(str(prefix / "synth"), expect_stage="synth").manifest
    assert synth.stats["completions"] == 6 and synth.stats["kept"] + sum(synth.stats["rejected"].values()) == 6
    prep = mf.load(str(prefix / "prepare"), expect_stage="prepare")
    assert {(r.role, r.stage) for r in prep.manifest.inputs} == {("data", "synth"), ("data", None)}
    tree = lin.lineage(prep.uri, verify="full")
    assert lin.all_ok(tree), lin.render_tree(tree)
    assert tree.children[1].children[0].uri == str(data)  # prepare <- synth <- the run's data as seeds
    assert yaml.safe_load(storage.read_text(str(prefix / "config" / "synth.yaml")))["num_prompts"] == 3
