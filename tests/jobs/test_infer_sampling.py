"""Sampling at temperature > 0: with a seed, each prompt's samples are the same whatever batch, chunk or
shard it lands in (so a resumed or sharded run matches an uninterrupted one); without one, infer says so."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from common import manifest as mf
from common.stage import Pending
from jobs.infer import job as infer
from tests.jobs.test_infer import config, publish_prompts, read_predictions

pytestmark = pytest.mark.integration
UNSEEDED = "without a seed: completions are random, and shards and resumed chunks are not reproducible"


def completions(loaded: mf.Loaded | str) -> dict[tuple[str, int], str]:
    assert isinstance(loaded, mf.Loaded)
    return {(r["id"], r["sample"]): r["completion"] for r in read_predictions(loaded)}


def test_seeded_samples_do_not_depend_on_batch_chunk_or_shard(tmp_path: Path, tiny_model: Path,
                                                             tiny_tokenizer: Any,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "store"
    prompts = publish_prompts(f"{root}/prepare", tiny_tokenizer, 6)
    kw = {"model": str(tiny_model), "prompts": prompts.uri, "cache_dir": str(tmp_path / "cache")}
    sampling = {"temperature": 1.0, "top_k": 50, "top_p": 0.95, "seed": 7, "n": 2, "max_tokens": 8}
    caplog.set_level(logging.WARNING, logger="jobs.infer")

    # One batch of all six prompts, against one prompt per batch and chunk in two shards.
    whole = completions(infer.run(config(**kw, output=f"{root}/whole", sampling=sampling, chunk_rows=6)))
    split = {"output": f"{root}/split", "sampling": sampling, "chunk_rows": 1, "num_shards": 2,
             "engine_args": {"batch_size": 1}}
    assert isinstance(infer.run(config(**kw, **split, shard=1)), Pending)
    pieces = completions(infer.run(config(**kw, **split, shard=0)))
    assert len(whole) == 12 and pieces == whole
    assert UNSEEDED not in caplog.text

    # ... and the samples are samples: they differ between a prompt's two, and with another seed.
    assert any(whole[(f"q{i:03d}", 0)] != whole[(f"q{i:03d}", 1)] for i in range(6))
    other = completions(infer.run(config(**kw, output=f"{root}/other", sampling=sampling | {"seed": 8})))
    assert other != whole

    infer.run(config(**kw, output=f"{root}/unseeded", sampling={"temperature": 0.8, "max_tokens": 4}))
    warnings = [r.getMessage() for r in caplog.records if UNSEEDED in r.getMessage()]
    assert len(warnings) == 1
    assert "sampling.temperature: 0 for greedy" in warnings[0] and "sampling.seed: N" in warnings[0]
