"""synth with a tiny random teacher on the transformers engine: what it writes is garbage, and every
completion is rejected by a named reason, never crashed on; prepare still takes the (empty) result as a source
and the lineage runs through it. vLLM, guided decoding, a judge and a kill are in test_synth_vllm.py."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from common import config as cfg
from common import lineage, storage
from common import manifest as mf
from jobs import prepare
from jobs.cli import main
from jobs.synth import job as synth
from jobs.synth import rows as R

pytestmark = pytest.mark.integration


def write_seeds(path: Path, n: int = 12) -> Path:
    """Seed examples shaped like a small task data set (arithmetic questions in OpenAI `messages` form)."""
    rng = random.Random(0)
    lines = []
    for _ in range(n):
        a, b = rng.randint(1, 50), rng.randint(1, 50)
        lines.append(json.dumps({"messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                              {"role": "assistant", "content": str(a + b)}]}))
    path.write_text("\n".join(lines) + "\n")
    return path


def args(seeds: Path, teacher: Path, out: str, *extra: str) -> list[str]:
    return ["--log-format", "text", "synth", "--seeds", str(seeds), "--teacher", str(teacher), "--output", out,
            "--engine", "transformers", "--set", "num_prompts=4", "--set", "sampling.n=2",
            "--set", "sampling.max_tokens=24", "--set", "chunk_rows=2", *extra]


def test_a_random_teachers_garbage_is_rejected_by_reason_not_crashed_on(tmp_path: Path, store_root: str,
                                                                         tiny_model: Path, tiny_tokenizer: Any) -> None:
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    out = f"{store_root}/synth"
    result = CliRunner().invoke(main, args(seeds, tiny_model, out))
    # Nothing kept: exit 3 with the reason table, and nothing published.
    assert result.exit_code == 3, result.output
    assert "synth kept 0 of 8 completions; min_rows is 1. Nothing was published." in result.output
    assert "truncated" in result.output or "not_json" in result.output
    assert "synth teacher: about to run 4 prompts x 2 = 8 completions" in result.output  # the cost, before
    assert not storage.exists(mf.manifest_uri(out))

    # min_rows 0 publishes what was kept (nothing) with every completion counted; the chunks are reused.
    conf = cfg.load_config(synth.Config, sets=["min_rows=0", "num_prompts=4", "sampling.n=2",
                                               "sampling.max_tokens=24", "chunk_rows=2"],
                           flags={"seeds": [str(seeds)], "teacher": str(tiny_model), "output": out,
                                  "engine": "transformers"})
    m = synth.run(conf).manifest
    assert m.stats["kept"] == 0 and m.stats["completions"] == 8
    assert sum(m.stats["rejected"].values()) == 8 and set(m.stats["rejected"]) <= set(R.REASONS)
    assert m.stats["teacher"]["generated_by_this_attempt"] == 0  # the refused run's chunks, not generated again
    assert m.stats["teacher"]["announced"]["done_prompts_before"] == 4
    assert m.stats["teacher"]["completion_tokens"] > 0 and m.stats["teacher"]["prompt_tokens"] > 0
    loaded = mf.load(out)
    rejects = [json.loads(x) for x in storage.read_text(loaded.artifact_uri("rejects")).splitlines()]
    assert rejects and all(r["reason"] in m.stats["rejected"] and r["completion"] is not None for r in rejects)
    assert loaded.manifest.artifact("data").rows == 0
    assert {(r.role, r.stage) for r in m.inputs} == {("seeds", None)}
    assert m.model["teacher"] == str(tiny_model) and m.model["format"] == "messages"

    # prepare takes the synth manifest as a source as it is; its lineage runs through synth to the seeds.
    prep = prepare.run(cfg.validate(prepare.Config, {"sources": [out, str(seeds)], "output": f"{store_root}/prep"}))
    assert {(r.role, r.stage) for r in prep.manifest.inputs} == {("data", "synth"), ("data", None)}
    assert prep.manifest.stats["rows_out"] == 12
    tree = lineage.lineage(prep.uri, verify="full")
    assert lineage.all_ok(tree)
    assert [c.stage for c in tree.children] == ["synth", None] and tree.children[0].children[0].uri == str(seeds)


def test_prepare_refuses_another_stages_manifest_as_a_source(tmp_path: Path, tiny_model: Path) -> None:
    seeds = write_seeds(tmp_path / "seeds.jsonl")
    prep = prepare.run(cfg.validate(prepare.Config, {"sources": [str(seeds)], "output": str(tmp_path / "prep")}))
    result = CliRunner().invoke(main, ["--log-format", "text", "prepare", "--source", prep.uri, "--output",
                                       str(tmp_path / "prep2")])
    assert result.exit_code == 3, result.output
    assert "is the output of `ftjobs prepare`; prepare reads raw data, or a synth manifest" in result.output
