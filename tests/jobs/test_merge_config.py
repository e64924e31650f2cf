"""merge configuration and the pure helpers: sizes, shard plans, LoRA patterns, the shipped config, --help."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from common.config import load_config, validate
from common.errors import ConfigError, InputError
from jobs.cli import main
from jobs.merge import job as merge

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]


def test_shipped_config_loads_and_validates() -> None:
    conf = load_config(merge.Config, file=str(REPO / "configs/merge.yaml"),
                       flags={"input": "s3://b/runs/r/train/", "output": "s3://b/runs/r/merge/"})
    assert conf.mode == "auto" and conf.base_weights == "original" and len(conf.checks.prompts) == 4
    assert merge.parse_size(conf.max_shard_size) == 5 * 10**9


@pytest.mark.parametrize(("text", "size"), [("5GB", 5 * 10**9), ("512MiB", 512 * 2**20), ("1.5 kb", 1500),
                                            ("4096", 4096), (123, 123)])
def test_parse_size(text: str | int, size: int) -> None:
    assert merge.parse_size(text) == size


@pytest.mark.parametrize(("values", "message"), [
    ({"max_shard_size": "five gigs"}, "max_shard_size: expected a size like '5GB'"),
    ({"dtype": "float16", "device": "cpu"}, "CPU float16 matmuls are slow"),
    ({"checks": {"prompts": []}}, "checks.prompts is empty"),
    ({"output": "s3://b/runs/r/train"}, "give merge its own --output"),
    ({"mode": "streaming"}, "mode: Input should be 'auto', 'in_memory' or 'sharded'"),
    ({"max_shard": "1GB"}, "did you mean 'max_shard_size'?"),
])
def test_bad_config_is_refused_with_a_message_naming_the_field(values: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        validate(merge.Config, {"input": "s3://b/runs/r/train/", "output": "s3://b/runs/r/merge/", **values})
    assert message in str(err.value)


def test_shard_plan_respects_the_limit_and_names_files_like_transformers() -> None:
    infos = [merge.TensorInfo(f"t{i}", "a.safetensors", (256, 256), "F32") for i in range(5)]  # 256 KiB each
    shards = merge.plan_shards(infos, "bfloat16", 300_000)  # 128 KiB each in bf16: two per shard
    assert [len(s) for s in shards] == [2, 2, 1]
    assert merge.shard_names(3) == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert merge.shard_names(1) == ["model.safetensors"]
    big = [merge.TensorInfo("emb", "a.safetensors", (1000, 1000), "F32")]
    assert merge.plan_shards(big, "float32", 10) == [big]  # one tensor larger than the limit stays whole


def test_rank_and_alpha_patterns_match_like_peft() -> None:
    patterns = {"q_proj": 16, "layers.1.mlp.down_proj": 4}
    assert merge.pattern_value(patterns, "model.layers.0.self_attn.q_proj", 8) == 16
    assert merge.pattern_value(patterns, "model.layers.1.mlp.down_proj", 8) == 4
    assert merge.pattern_value(patterns, "model.layers.0.mlp.down_proj", 8) == 8
    assert merge.pattern_value(patterns, "model.layers.0.self_attn.xq_proj", 8) == 8


def test_quant_settings_from_the_train_manifest() -> None:
    q = merge.Quant.from_manifest({"mode": "NF4", "double_quant": True})
    assert (q.mode, q.blocksize, q.double_quant) == ("nf4", 64, True)
    assert merge.Quant.from_manifest({}).mode == "none"
    with pytest.raises(InputError, match="model.quantization.mode is 'int8'"):
        merge.Quant.from_manifest({"mode": "int8"})


def test_help_lists_the_options() -> None:
    out = CliRunner().invoke(main, ["merge", "--help"])
    assert out.exit_code == 0
    assert "--input" in out.output and "--output" in out.output and "--set" in out.output
