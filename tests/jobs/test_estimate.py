"""`ftjobs estimate`: per-GPU memory and time from a model's config.json alone (no weights), train's own
config keys, a run config's train section, and a throughput from earlier train manifests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from common import manifest as mf
from jobs import estimate
from jobs.cli import main

pytestmark = pytest.mark.unit

GIB = 1 << 30
# The published shapes of Llama-3.1-8B and -70B (config.json keys as the Hub has them; no weights).
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_attention_heads": 32, "num_hidden_layers": 32,
            "num_key_value_heads": 8, "vocab_size": 128256, "tie_word_embeddings": False}
LLAMA_70B = {**LLAMA_8B, "hidden_size": 8192, "intermediate_size": 28672, "num_attention_heads": 64,
             "num_hidden_layers": 80}


def model_dir(tmp_path: Path, cfg: dict[str, Any], name: str = "m") -> Path:
    path = tmp_path / name
    path.mkdir()
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def run(*args: str) -> Any:
    return CliRunner().invoke(main, ["--log-format", "text", "estimate", *args], catch_exceptions=False)


def as_json(*args: str) -> dict[str, Any]:
    result = run(*args, "--json")
    assert result.exit_code in (0, 2), result.output
    return json.loads(result.output[:result.output.rindex("}") + 1])


def test_runs_from_a_config_json_alone_and_fsdp_divides_the_sharded_parts(tmp_path):
    model = model_dir(tmp_path, LLAMA_8B)
    result = run("--base-model", str(model / "config.json"), "--gpu", "H100-80GB")
    assert result.exit_code == 0, result.output
    assert "8.03B params" in result.output and "fits" in result.output and "time: unknown" in result.output
    one = as_json("--base-model", str(model), "--gpu", "H100-80GB", "--set", "method=full")
    eight = as_json("--base-model", str(model), "--gpu", "H100-80GB", "--gpus", "8", "--set", "method=full",
                    "--set", "strategy=fsdp")
    # Full finetuning of 8B: float32 weights (32 GB) + grads (32 GB) + 8-bit Adam (16 GB) do not fit one card...
    assert one["parts_bytes"]["weights"] == one["params"] * 4 and one["fits"] is False
    # ... and FSDP over 8 divides each of them by 8, adding the gathered layers, and then it fits.
    for part in ("weights", "trainable (grads)", "optimizer state"):
        assert eight["parts_bytes"][part] == -(-one["parts_bytes"][part] // 8)
    assert eight["parts_bytes"]["gathered layers (fsdp)"] > 0 and eight["fits"] is True
    # Activations are not sharded; checkpointing on (the default) keeps far fewer.
    assert eight["activations_bytes"] == one["activations_bytes"]
    assert one["activations_bytes"]["gradient_checkpointing"] < one["activations_bytes"]["none"] / 4


def test_qlora_weights_are_4_bit_with_the_rest_in_float32():
    shape = estimate.shape_of(LLAMA_8B, "8B")
    train = estimate.train_config("8B", None, ())
    mem = estimate.memory(shape, train, 1)
    per = 0.5 + 1 / 64 + 4 / (64 * 256)  # nf4 + double-quantized absmax
    assert mem.parts["weights"] == int(shape.linear_params * per + 4 * shape.other_params)
    # LoRA r=16 on every linear layer of Llama-3.1-8B: 41.9M parameters (peft's count for that config).
    assert estimate.lora_params(shape, train) == 41_943_040


def test_an_impossible_fit_exits_2_with_the_numbers(tmp_path):
    model = model_dir(tmp_path, LLAMA_70B)
    result = run("--base-model", str(model), "--gpu", "H100-80GB", "--gpus", "1", "--set", "method=full")
    assert result.exit_code == 2
    assert "DOES NOT FIT" in result.output and "GiB usable on H100-80GB" in result.output
    assert "strategy fsdp" in result.output  # the fix it suggests


def test_reads_a_run_config_train_section_and_refuses_unknown_keys(tmp_path):
    model = model_dir(tmp_path, LLAMA_8B)
    run_cfg = tmp_path / "run.yaml"
    run_cfg.write_text(yaml.safe_dump({"base_model": str(model), "data": ["x.jsonl"],
                                       "train": {"method": "lora", "batch_size": 1, "max_seq_length": 1024}}))
    got = as_json("--gpu", "L4-24GB", "--config", str(run_cfg))  # the run config names the base model
    assert got["method"] == "lora" and got["parts_bytes"]["weights"] == got["params"] * 2  # bf16 base
    bad = run("--base-model", str(model), "--gpu", "L4-24GB", "--set", "lora.rank=8")
    assert bad.exit_code == 2 and "rank" in bad.output


def test_time_comes_from_earlier_manifests_of_the_same_model_and_gpu(tmp_path):
    model = model_dir(tmp_path, LLAMA_8B)
    history = tmp_path / "store"
    for run_id, device, tps in (("a", "NVIDIA H100 80GB HBM3", 8000.0), ("b", "NVIDIA H100 80GB HBM3", 12000.0),
                                ("c", "NVIDIA A10G", 100.0)):
        m = mf.build(stage="train", run_id=run_id, config={}, inputs=[], artifacts=[],
                     stats={"device": device, "world_size": 2}, metrics={"effective_tokens_per_s": tps},
                     model={"base_model": str(model), "template_hash": "x", "method": "qlora"})
        mf.publish(str(history / "runs" / run_id / "train"), m)
    got = as_json("--base-model", str(model), "--gpu", "H100-80GB", "--gpus", "2", "--tokens", "10000000",
                  "--history", str(history))
    # median of 4000 and 6000 tokens/s per GPU (the A10G run is another card)
    assert got["tokens_per_s_per_gpu"] == 5000.0 and "2 earlier train manifest(s)" in got["throughput_source"]
    assert got["seconds"] == pytest.approx(10_000_000 / (5000 * 2))
    assumed = as_json("--base-model", str(model), "--gpu", "H100-80GB", "--tokens", "10000000")
    assert assumed["throughput_source"].startswith("assumed")


def test_a_config_without_a_decoder_shape_is_a_clear_error(tmp_path):
    model = model_dir(tmp_path, {"model_type": "t5", "d_model": 512})
    result = run("--base-model", str(model), "--gpu", "H100-80GB")
    assert result.exit_code == 3 and "hidden_size" in result.output


def test_submit_check_of_a_train_step_prints_a_fitting_estimate_and_refuses_one_that_does_not(tmp_path, capsys):
    from common.errors import ConfigError

    args = ["--input", "s3://b/r1/prepare/manifest.json", "--base-model", str(model_dir(tmp_path, LLAMA_8B)),
            "--set", "strategy=fsdp"]
    est = estimate.check_step("train", args, "H100-80GB", 2, go_anyway=False)
    assert est is not None and est.fits and est.strategy == "fsdp"
    assert "step train: estimate:" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"step train: train cannot fit 2 x L4-24GB: \d+\.\d GiB per GPU"):
        estimate.check_step("train", [*args, "--set", "method=full"], "L4-24GB", 2, go_anyway=False)
    assert estimate.check_step("train", [*args, "--set", "method=full"], "L4-24GB", 2, go_anyway=True) is None


@pytest.mark.integration
@pytest.mark.timeout(900)
def test_the_memory_formula_is_within_the_documented_error_of_a_measured_cpu_run(tmp_path):
    """bench/bench_estimate.py's measurement for the default method without checkpointing (activations
    dominate): peak RSS growth of a real 2-step train run, less the floor model's, vs the estimate.
    docs/estimate.md records the error seen for every method; this keeps the formula from drifting."""
    from bench import bench_estimate as be

    model, floor_model, prep = be.prepare(tmp_path)
    sets = [*be.BASE_SETS, *be.CASES["qlora-nogc"]]
    floor = be.measure(floor_model, prep, sets, tmp_path / "floor") - be.estimated(floor_model, sets)["total"]
    measured = be.measure(model, prep, sets, tmp_path / "run") - floor
    ratio = be.estimated(model, sets)["total"] / measured
    assert 0.6 <= ratio <= 1.3, f"estimate/measured {ratio:.2f} ({measured / 2**20:.0f} MiB measured)"
