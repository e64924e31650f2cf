"""Infer's prompts and synth's seeds files are read once: the sha256 a run records is of the very bytes it
parses, even when the file changes between the identity check and the work (common/rawinputs.py), on the local
store and the S3 test server."""

from __future__ import annotations

import hashlib
import json

import pytest

from common import storage
from common.config import load_config
from jobs.infer import inputs
from jobs.infer import job as infer
from jobs.synth import rows as synth_rows

pytestmark = pytest.mark.integration


def jsonl(*prompts: str) -> bytes:
    return "".join(json.dumps({"id": str(i), "prompt": p, "completion": p.upper()}) + "\n"
                   for i, p in enumerate(prompts)).encode()


def test_infer_parses_the_prompts_it_hashed(store_root: str) -> None:
    src = storage.join(store_root, "prompts.jsonl")
    first = jsonl("what is two", "what is three")
    storage.write_bytes(src, first)
    ref = inputs.load_prompts_input(src)  # identity: before the "already done" check
    assert ref.sha256 == hashlib.sha256(first).hexdigest()
    storage.write_bytes(src, jsonl("replaced"))  # the file changes before the work reads it
    conf = load_config(infer.Config, flags={"model": "m", "prompts": src, "output": "out"})
    got = inputs.load_rows(conf, ref)
    assert [r["prompt"][-1]["content"] for r in got] == ["what is two", "what is three"]


def test_synth_parses_the_seeds_it_hashed(store_root: str) -> None:
    src = storage.join(store_root, "seeds.jsonl")
    first = jsonl("seed one")
    storage.write_bytes(src, first)
    ref = synth_rows.seed_input(src)
    assert ref.sha256 == hashlib.sha256(first).hexdigest()
    storage.write_bytes(src, jsonl("other", "seeds"))
    seeds = synth_rows.read_seeds([ref], "prompt_completion", None, "train")
    assert [s.row["prompt"] for s in seeds] == ["seed one"]
