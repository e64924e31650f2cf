"""The preference steps of the chain: SFT, then pairs from its mistakes on training prompts and/or preference
files, then DPO from the SFT adapter, evaluated beside base and SFT (demo/pipeline-dpo.yaml)."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import config as cfg
from common.errors import ConfigError
from jobs import chain

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
BASE = {"base_model": "m", "data": ["d.jsonl"]}


def test_the_dpo_demo_config_wires_sft_pairs_and_dpo_and_every_section_validates() -> None:
    config = cfg.load_config(chain.Config, file=str(REPO / "demo/pipeline-dpo.yaml"))
    assert [s.name for s in chain.steps(config)] == [
        "prepare", "infer-base", "train", "merge", "infer-finetuned", "infer-train", "pairs", "train-dpo",
        "merge-dpo", "infer-dpo", "evaluate"]
    resolved = chain.check(config)
    assert resolved["infer-train"].split == "train" and resolved["infer-finetuned"].split == "eval"
    dpo = resolved["train-dpo"]
    assert (dpo.objective, dpo.init_adapter, dpo.input) == ("dpo", "<train manifest>", "<pairs manifest>")
    assert dpo.lora == resolved["train"].lora  # `dpo` is merged over `train`: the SFT adapter's LoRA shape
    done = {s.name: f"<{s.name}>" for s in chain.CHAIN}
    assert chain.arguments(chain.BY_NAME["evaluate"], config, done)[-4:] == [
        "--predictions", "<infer-dpo>", "--label", "dpo"]


def test_without_preference_sections_the_chain_is_unchanged_and_bad_combinations_are_refused() -> None:
    plain = cfg.validate(chain.Config, BASE)
    assert [s.name for s in chain.steps(plain)] == ["prepare", "infer-base", "train", "merge", "infer-finetuned",
                                                     "evaluate"]
    files = cfg.validate(chain.Config, {**BASE, "preference_data": ["p.jsonl"], "dpo": {"objective": "orpo"}})
    assert "prepare-preference" in [s.name for s in chain.steps(files)]
    assert chain.arguments(chain.BY_NAME["train-dpo"], files, {s.name: f"<{s.name}>" for s in chain.CHAIN})[:2] == [
        "--input", "<prepare-preference>"]
    with pytest.raises(ConfigError, match="set `pairs`.*or `preference_data`"):
        cfg.validate(chain.Config, {**BASE, "dpo": {"objective": "dpo"}})
    with pytest.raises(ConfigError, match="not both"):
        cfg.validate(chain.Config, {**BASE, "dpo": {"objective": "dpo"}, "pairs": {"metric": "exact_match"},
                                    "preference_data": ["p.jsonl"]})
    # infer-train answers the training prompts: a section cannot point it at the held-out ones.
    with pytest.raises(ConfigError, match="section `infer_train` sets split"):
        cfg.validate(chain.Config, {**BASE, "pairs": {"metric": "exact_match"}, "infer_train": {"split": "eval"}})
