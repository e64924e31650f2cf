"""The chain with checkpoint selection, through the CLI as the containers run it: `train.select` adds the select
step after train, and merge (then infer-finetuned) takes the chosen adapter. The transformers engine keeps it
cheap (no vLLM start); the select stage's own tests cover the scoring (tests/jobs/test_select.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

from common import manifest as mf
from tests.e2e.test_pipeline import REPO, run

pytestmark = pytest.mark.e2e


def test_pipeline_selects_a_checkpoint_and_merges_it(s3_root: str, tiny_model: Path, tmp_path: Path,
                                                     subprocess_env: dict[str, str]) -> None:
    data = REPO / "demo" / "data" / "tickets.jsonl"
    small = tmp_path / "tickets.jsonl"
    small.write_text("".join(data.read_text().splitlines(keepends=True)[:16]))
    infer = {"engine": "transformers", "sampling": {"temperature": 0, "max_tokens": 4}}
    config = {
        "root": s3_root, "run_id": "sel", "base_model": str(tiny_model), "data": [str(small)], "baseline": False,
        "prepare": {"eval_size": 3, "workers": 1},
        "train": {"max_steps": 2, "batch_size": 2, "max_seq_length": 256, "lora": {"r": 4, "alpha": 8},
                  "quantization": {"mode": "none"}, "checkpoint": {"every_steps": None},
                  "select": {"metric": "token_f1", "every": 1}},
        "infer": infer,
        "select": {"infer": infer, "evaluate": {"bootstrap": 20}},
        "evaluate": {"bootstrap": 20},
    }
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(yaml.safe_dump(config))
    done = run([sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(conf)], subprocess_env)
    assert done.returncode == 0, done.stderr[-4000:]
    prefix = f"{s3_root}/runs/sel"
    selected = mf.load(f"{prefix}/select")
    sel = selected.manifest.metrics["selection"]
    assert [c["step"] for c in sel["candidates"]] == [1, 2]
    assert sel["chosen"]["score"] == max(c["score"] for c in sel["candidates"])
    merged = mf.load(f"{prefix}/merge")
    assert merged.manifest.inputs[0].uri == selected.uri  # merge took the selection, not train's last step
    chosen = mf.load(f"{prefix}/train").manifest.artifact(
        f"candidates/step-{sel['chosen_step']:08d}/adapter_model.safetensors")
    assert merged.manifest.model["adapter_sha256"] == chosen.sha256
    assert mf.load(f"{prefix}/infer-finetuned").manifest.model["model"] == merged.uri
