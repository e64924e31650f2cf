"""A run with checkpoint selection and a `promote:` section through `ftjobs pipeline` on the S3 test server.

Select: `train.select` adds the select step after train, and merge (then infer-finetuned) takes the chosen
adapter, not train's last step; the select stage's own tests cover the scoring (tests/jobs/test_select.py).
Promote: the registry's champion answers the run's held-out prompts as its own step, evaluate gates the
finetuned model against it, and the promote step makes the finetuned model the champion; a re-run is already
done and compares with the same (pinned) champion, although the champion has moved since.

One run shows both (each step is a process that loads torch and the tiny model; two runs of the same chain
cost twice that). The transformers engine keeps it cheap (no vLLM start).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from common import manifest as mf
from common import registry, storage
from tests.e2e.test_pipeline import REPO, run
from tests.jobs.builders import publish_merged

pytestmark = pytest.mark.e2e


def test_a_run_selects_a_checkpoint_merges_it_is_gated_against_the_champion_and_promoted(
        s3_root: str, tiny_model: Path, tmp_path: Path, subprocess_env: dict[str, str]) -> None:
    champion = publish_merged(f"{s3_root}/runs/old/merge", tiny_model).uri
    registry.promote(champion, "tickets", s3_root, verify="size")
    data = REPO / "demo" / "data" / "tickets.jsonl"
    small = tmp_path / "tickets.jsonl"
    small.write_text("".join(data.read_text().splitlines(keepends=True)[:16]))
    infer = {"engine": "transformers", "sampling": {"temperature": 0, "max_tokens": 4}}
    config = {
        "root": s3_root, "run_id": "e2e-promote", "base_model": str(tiny_model), "data": [str(small)],
        "prepare": {"eval_size": 3, "workers": 1},
        "train": {"max_steps": 2, "batch_size": 2, "max_seq_length": 256, "lora": {"r": 4, "alpha": 8},
                  "quantization": {"mode": "none"}, "checkpoint": {"every_steps": None},
                  "select": {"metric": "token_f1", "every": 1}},
        "infer": infer,
        "select": {"infer": infer, "evaluate": {"bootstrap": 20}},
        "evaluate": {"bootstrap": 20},
        # Two steps of training cannot beat anything: a margin of 100 points lets it through the gate.
        "promote": {"name": "tickets", "metric": "token_f1", "margin": 1.0},
    }
    conf = tmp_path / "pipeline.yaml"
    conf.write_text(yaml.safe_dump(config))
    cmd = [sys.executable, "-m", "jobs.cli", "pipeline", "--config", str(conf)]
    first = run(cmd, subprocess_env)
    assert first.returncode == 0, first.stderr[-4000:]
    prefix = f"{s3_root}/runs/e2e-promote"
    assert first.stdout.strip().splitlines()[-1] == mf.manifest_uri(f"{prefix}/promote")

    # Select: every kept checkpoint was scored, the best one chosen, and merge took it.
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

    # Promote: the champion answered as its own step, the gate compared with it, the merged model is promoted.
    assert json.loads(storage.read_text(f"{prefix}/champion.json"))["champion"] == "models:/tickets/1"
    answered = mf.load(f"{prefix}/infer-champion")
    assert answered.manifest.model["model"] == champion  # the champion's own files answered
    verdict = mf.load(f"{prefix}/evaluate").manifest.metrics["promotion"]
    assert (verdict["decision"], verdict["champion"], verdict["champion_model"]) == ("promote", "champion", champion)
    assert "promotion to models:/tickets: PROMOTE" in first.stderr
    now = registry.resolve("models:/tickets", s3_root)
    assert (now.version, now.manifest, now.evaluation) == (2, mf.manifest_uri(f"{prefix}/merge"),
                                                           mf.manifest_uri(f"{prefix}/evaluate"))

    again = run(cmd, subprocess_env)
    assert again.returncode == 0, again.stderr[-4000:]
    record = json.loads(storage.read_text(f"{prefix}/pipeline.json"))
    assert set(record["steps"]) >= {"select", "infer-champion", "evaluate", "promote"}
    assert {s["status"] for s in record["steps"].values()} == {"already done"}
    assert len(registry.history("tickets", s3_root)) == 2
