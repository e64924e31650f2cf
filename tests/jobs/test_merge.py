"""merge on the tiny model: the published folder is the adapted model, in transformers and in vLLM's CPU build.

A real peft LoRA (random, non-zero B) is published in the train contract on the S3 server; merges run
in memory and shard by shard, original and NF4-roundtrip; bad inputs are refused before anything is
published. vLLM starts once, in a subprocess.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from common import chat, storage
from common import manifest as mf
from common.config import validate
from common.errors import ChecksumError, ConfigError, InputError, OutputTakenError
from jobs.merge import job as merge
from jobs.merge import sources
from jobs.merge.checks import DEFAULT_PROMPTS
from tests.conftest import REPO, TEST_BUCKET
from tests.jobs.builders import publish_adapter

pytestmark = pytest.mark.integration

NF4 = {"mode": "nf4", "double_quant": True, "blocksize": 64, "compute_dtype": "float32"}


def do_merge(**values: Any) -> mf.Loaded:
    return merge.run(validate(merge.Config, values))


def weights(folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    out: dict[str, Any] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def greedy(model: Any, ids: list[int], n: int) -> list[int]:
    """n argmax steps, EOS or not: what vLLM does with ignore_eos and temperature 0."""
    import torch

    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(input_ids=torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


@pytest.fixture(scope="module")
def s3_prefix(s3_endpoint: str) -> str:
    return f"s3://{TEST_BUCKET}/merge-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def adapter(s3_prefix: str, tiny_model: Path) -> mf.Loaded:
    """The train output on S3; lm_head is a modules_to_save copy, so replacement is exercised too."""
    return publish_adapter(f"{s3_prefix}/train", tiny_model, modules_to_save=["lm_head"])


@pytest.fixture(scope="module")
def merged(adapter: mf.Loaded, s3_prefix: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[mf.Loaded, Path]:
    """In-memory merge onto S3, three shards; and the folder as a reader downloads it."""
    loaded = do_merge(input=adapter.uri, output=f"{s3_prefix}/merge", mode="in_memory", max_shard_size="1MB")
    folder = tmp_path_factory.mktemp("merged") / "model"
    storage.download_dir(model_dir(loaded), folder)
    return loaded, folder


def model_dir(loaded: mf.Loaded) -> str:
    """The merged model's folder, as its manifest names it (in the attempt's own folder)."""
    return storage.parent(loaded.artifact_uri("model/config.json"))


def test_merged_model_on_s3_is_the_adapted_model_and_loads_in_transformers(
        merged: tuple[mf.Loaded, Path], adapter: mf.Loaded, tiny_model: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded, folder = merged
    m = loaded.manifest
    assert m.stage == "merge"
    assert [(i.uri, i.sha256, i.role) for i in m.inputs] == [(adapter.uri, adapter.sha256, "adapter")]
    assert m.model["adapter_sha256"] == adapter.manifest.artifact("adapter/adapter_model.safetensors").sha256
    assert m.model["base_weights"] == "original" and m.model["mode"] == "in_memory" and m.model["dtype"] == "float32"
    assert m.model["tokenizer"]["name"] == adapter.manifest.model.get("tokenizer", {}).get("name", "")
    assert "ftjobs-merge-" not in m.model["tokenizer"]["name"]  # not the job's temporary folder
    assert m.model["base_revision"] == adapter.manifest.model["base_revision"]
    assert m.model["base_source"] == str(tiny_model)
    assert m.model["template_hash"] == adapter.manifest.model["template_hash"]
    assert m.metrics["checks_passed"] and m.metrics["generation"]["tokens_equal"]
    assert m.metrics["generation"]["max_logit_diff"] <= m.metrics["generation"]["logit_atol"]
    assert m.metrics["param_count"] == m.metrics["base_param_count"]
    assert {"load", "merge", "check", "save", "upload"} <= set(m.timings)
    assert m.stats["mode"] == "in_memory" and m.stats["shards"] == 3
    names = {a.name for a in m.artifacts}
    assert {"model/config.json", "model/generation_config.json", "model/model.safetensors.index.json",
            "model/tokenizer.json", "model/model-00003-of-00003.safetensors"} <= names
    assert all(a.path == f"attempts/{m.attempt}/{a.name}" for a in m.artifacts)  # in its attempt's own folder
    mf.load(loaded.uri, verify="full")  # every artifact's bytes match their recorded sha256

    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert chat.chat_format(tok).hash == adapter.manifest.model["template_hash"]
    eos = json.loads((folder / "generation_config.json").read_text())["eos_token_id"]
    assert tok.convert_tokens_to_ids("<|im_end|>") in (eos if isinstance(eos, list) else [eos])

    # The folder as published generates exactly what base + unmerged adapter generates.
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    adapter_dir = folder.parent / "adapter"
    for art in adapter.manifest.artifacts_named("adapter/"):
        mf.fetch_artifact(adapter, art, folder.parent / art.name)
    unmerged = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    plain = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    ids = merge.encode_prompts(tok, ["Say hello to the world."])[0]
    assert greedy(model, ids, 8) == greedy(unmerged, ids, 8)
    with torch.no_grad():
        x = torch.tensor([ids])
        assert torch.allclose(model(input_ids=x).logits, unmerged(input_ids=x).logits, atol=1e-4)
        assert not torch.allclose(model(input_ids=x).logits, plain(input_ids=x).logits, atol=1e-2)


def test_rerun_is_a_noop_and_a_different_config_is_refused(merged: tuple[mf.Loaded, Path],
                                                           adapter: mf.Loaded) -> None:
    loaded, _ = merged
    again = do_merge(input=adapter.uri, output=loaded.prefix, mode="in_memory", max_shard_size="1MB")
    assert again.uri == loaded.uri and again.manifest.run_id == loaded.manifest.run_id
    with pytest.raises(OutputTakenError, match="max_shard_size"):
        do_merge(input=adapter.uri, output=loaded.prefix, mode="in_memory", max_shard_size="2MB")


def test_shard_by_shard_gives_the_same_weights_as_in_memory(merged: tuple[mf.Loaded, Path], adapter: mf.Loaded,
                                                            tmp_path: Path) -> None:
    import torch

    loaded = do_merge(input=adapter.uri, output=str(tmp_path / "out"), mode="sharded", max_shard_size="1MB")
    m = loaded.manifest
    assert m.stats["mode"] == "sharded" and m.metrics["checks_passed"]
    assert m.metrics["generation"]["tokens_equal"] and m.metrics["probe_tensors"] == 14
    a, b = weights(merged[1]), weights(Path(model_dir(loaded)))
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    index = json.loads((Path(model_dir(loaded)) / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == json.loads((merged[1] / "model.safetensors.index.json").read_text())["weight_map"]


def test_auto_mode_streams_when_the_model_exceeds_the_memory_budget(adapter: mf.Loaded, tmp_path: Path) -> None:
    m = do_merge(input=adapter.uri, output=str(tmp_path / "out"), max_memory="1MB").manifest
    assert m.stats["mode"] == "sharded" and m.stats["shards"] == 1
    assert "budget" in m.metrics["generation"]["skipped"]  # recorded, not silently dropped
    assert m.metrics["probe_max_rel_error"] < m.metrics["probe_rtol"]
    assert [a.name for a in m.artifacts if a.name.endswith(".safetensors")] == ["model/model.safetensors"]


def test_auto_mode_streams_plain_lora_and_gives_peft_what_only_peft_can_merge(
        adapter: mf.Loaded, tiny_model: Path, tmp_path: Path) -> None:
    m = do_merge(input=adapter.uri, output=str(tmp_path / "plain")).manifest
    assert m.stats["mode"] == "sharded" and m.metrics["probe_tensors"] > 0
    assert m.metrics["generation"]["tokens_equal"] and len(m.metrics["generation"]["prompts"]) == 4
    dora = publish_adapter(str(tmp_path / "dora-train"), tiny_model, use_dora=True)
    m = do_merge(input=dora.uri, output=str(tmp_path / "dora")).manifest
    assert m.stats["mode"] == "in_memory" and m.metrics["generation"]["tokens_equal"]
    with pytest.raises(ConfigError, match="use_dora.*mode: in_memory needs the model in memory"):
        do_merge(input=dora.uri, output=str(tmp_path / "dora-big"), max_memory="1MB")


def test_folder_that_transformers_loads_with_missing_weights_fails_the_check(
        adapter: mf.Loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write = merge.write_folder_files

    def one_layer_more(out_dir: Path, *args: Any, **kwargs: Any) -> None:  # a config.json that is not the model's
        write(out_dir, *args, **kwargs)
        cfg = json.loads((out_dir / "config.json").read_text())
        cfg["num_hidden_layers"] += 1
        (out_dir / "config.json").write_text(json.dumps(cfg))

    monkeypatch.setattr(merge, "write_folder_files", one_layer_more)
    with pytest.raises(merge.MergeCheckError, match="reports missing keys: .*model.layers.2"):
        do_merge(input=adapter.uri, output=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.fixture(scope="module")
def nf4_adapter(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> mf.Loaded:
    # Same seed: the same LoRA weights as `adapter`, recorded as trained on an NF4 double-quant base.
    return publish_adapter(str(tmp_path_factory.mktemp("nf4") / "train"), tiny_model, modules_to_save=["lm_head"],
                           quantization=NF4)


def test_nf4_roundtrip_merges_into_the_weights_training_saw(nf4_adapter: mf.Loaded, merged: tuple[mf.Loaded, Path],
                                                            tiny_model: Path, tmp_path: Path) -> None:
    import torch

    # The generation check runs once (in memory); the sharded run must then give identical weights.
    runs = {mode: do_merge(input=nf4_adapter.uri, output=str(tmp_path / mode), mode=mode,
                           base_weights="nf4_roundtrip", checks={"generation": mode == "in_memory"})
            for mode in ("in_memory", "sharded")}
    for loaded in runs.values():
        assert loaded.manifest.model["base_weights"] == "nf4_roundtrip"
        assert loaded.manifest.model["quantization"]["mode"] == "nf4"
        assert loaded.manifest.metrics["checks_passed"]
    nf4, nf4_sharded, original = (weights(Path(model_dir(runs["in_memory"]))),
                                  weights(Path(model_dir(runs["sharded"]))), weights(merged[1]))
    assert all(torch.equal(nf4[k], nf4_sharded[k]) for k in nf4)
    base = weights(tiny_model)
    q = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(nf4[q], original[q])
    # nf4 - (original - W) is dequantize(quantize(W)): at most 16 levels in each block of 64 weights.
    rt = (nf4[q] - (original[q] - base[q])).reshape(-1, 64)
    assert max(len(torch.unique(torch.round(block, decimals=5))) for block in rt) <= 16
    assert (rt.flatten() - base[q].flatten()).abs().max() > 1e-4
    for kept in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"):  # never 4-bit in QLoRA
        assert torch.equal(nf4[kept], original[kept]), kept


def test_nf4_roundtrip_of_an_unquantized_adapter_is_a_config_error(adapter: mf.Loaded, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no 4-bit roundtrip"):
        do_merge(input=adapter.uri, output=str(tmp_path / "out"), base_weights="nf4_roundtrip")


def test_quantized_base_is_refused_with_the_reason(adapter: mf.Loaded, tiny_model: Path, tmp_path: Path) -> None:
    quantized = tmp_path / "base-4bit"
    shutil.copytree(tiny_model, quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="quantized \\(bitsandbytes\\).*16-bit base"):
        do_merge(input=adapter.uri, output=str(tmp_path / "out"), base_model=str(quantized))
    assert not (tmp_path / "out").exists()


def test_nan_in_the_adapter_fails_the_checks_and_publishes_nothing(tiny_model: Path, tmp_path: Path) -> None:
    bad = publish_adapter(str(tmp_path / "train"), tiny_model, scale=float("nan"))
    with pytest.raises(merge.MergeCheckError, match="NaN/Inf") as err:
        do_merge(input=bad.uri, output=str(tmp_path / "out"), mode="sharded")
    assert err.value.exit_code == 3
    assert "model.layers.0" in str(err.value) and "Nothing was published" in str(err.value)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_wrong_merge_fails_the_equivalence_check_and_names_the_first_difference(
        adapter: mf.Loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    right = sources.lora_merge

    def doubled_scale(src: Any, up: merge.LoraUpdate, device: str) -> Any:  # a plausible bug: scale applied twice
        return right(src, merge.LoraUpdate(a=up.a, b=up.b, scale=up.scale * 2, replace=up.replace), device)

    monkeypatch.setattr(sources, "lora_merge", doubled_scale)
    with pytest.raises(merge.MergeCheckError, match="relative error"):
        do_merge(input=adapter.uri, output=str(tmp_path / "out"), mode="sharded")
    assert re.search(r"greedy generation differs: prompt 0, (prompt position|generated token) \d+: "
                     r"base\+adapter chose \d+", caplog.text)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_cli_refuses_a_corrupted_adapter_by_checksum(tiny_model: Path, tmp_path: Path,
                                                    subprocess_env: dict[str, str]) -> None:
    train = publish_adapter(str(tmp_path / "train"), tiny_model)
    weights_file = tmp_path / "train/adapter/adapter_model.safetensors"
    data = bytearray(weights_file.read_bytes())
    data[-100:] = bytes(100)  # same size: only the checksum can tell
    weights_file.write_bytes(bytes(data))
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "merge", "--input", train.uri, "--output",
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO, env=subprocess_env,
                          timeout=300)
    assert proc.returncode == 3, proc.stderr
    assert "adapter/adapter_model.safetensors" in proc.stderr and "sha256" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ChecksumError):
        do_merge(input=train.uri, output=str(tmp_path / "out"))


VLLM_SCRIPT = """
import json, sys

if __name__ == "__main__":  # the engine spawns a process
    from vllm import LLM, SamplingParams

    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256, seed=0)
    prompts = json.loads(sys.argv[2])
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    print("RESULT " + json.dumps([list(o.outputs[0].token_ids) for o in outs]))
"""


def test_merged_folder_generates_in_vllm_cpu_as_in_transformers(merged: tuple[mf.Loaded, Path],
                                                                 tmp_path: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = merged[1]
    tok = AutoTokenizer.from_pretrained(str(folder))
    prompts = merge.encode_prompts(tok, list(DEFAULT_PROMPTS[:2]))
    script = tmp_path / "vllm_generate.py"
    script.write_text(VLLM_SCRIPT)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(script), str(folder), json.dumps(prompts)], capture_output=True,
                          text=True, env=env, timeout=420)
    result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and result, proc.stderr[-3000:]
    from_vllm = json.loads(result[0].removeprefix("RESULT "))
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    assert from_vllm == [greedy(model, p, 8) for p in prompts]


@pytest.mark.parametrize("how", ["modules_to_save", "lora"])
def test_head_trained_on_a_tied_base_is_untied_alike_by_both_modes(tiny_model: Path, tmp_path: Path,
                                                                   how: str) -> None:
    from transformers import AutoModelForCausalLM

    tied = tmp_path / "tied"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    model.config.tie_word_embeddings = True
    model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(str(tied))
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tiny_model / f, tied / f)
    assert "lm_head.weight" not in weights(tied)
    head: dict[str, Any] = ({"modules_to_save": ["lm_head"], "saved_noise": 0.05} if how == "modules_to_save"
                            else {"target_modules": ["q_proj", "v_proj", "lm_head"], "scale": 5.0})
    train = publish_adapter(str(tmp_path / "train"), tied, **head)
    merged = {}
    for mode in ("in_memory", "sharded"):
        out = do_merge(input=train.uri, output=str(tmp_path / mode), mode=mode)
        assert out.manifest.metrics["checks_passed"] and out.manifest.stats["mode"] == mode
        cfg = json.loads((Path(model_dir(out)) / "config.json").read_text())
        assert cfg.get("tie_word_embeddings") is False, mode
        merged[mode] = weights(Path(model_dir(out)))
    assert merged["in_memory"].keys() == merged["sharded"].keys()
    for name, tensor in merged["in_memory"].items():
        torch.testing.assert_close(merged["sharded"][name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    base = weights(tied)["model.embed_tokens.weight"]
    assert merged["sharded"]["model.embed_tokens.weight"].equal(base)  # the input embedding is untouched
    assert not merged["sharded"]["lm_head.weight"].equal(base)


def test_another_base_of_the_same_shape_is_refused(adapter: mf.Loaded, tiny_model: Path, tmp_path: Path) -> None:
    """A fine-tuned copy, a perturbed or a partly re-downloaded base has the adapter's config and file
    sizes; its content revision differs, so the merge refuses it instead of merging into the wrong weights."""
    import torch
    from safetensors.torch import load_file, save_file

    other = tmp_path / "other-base"
    shutil.copytree(tiny_model, other)
    w = load_file(str(other / "model.safetensors"))
    save_file({k: v + 0.05 * torch.randn_like(v) for k, v in w.items()}, str(other / "model.safetensors"),
              metadata={"format": "pt"})
    with pytest.raises(InputError, match=r"is revision sha256:\w+; the adapter was trained on sha256:\w+"):
        do_merge(input=adapter.uri, output=str(tmp_path / "merge"), base_model=str(other))
    assert not (tmp_path / "merge" / "manifest.json").exists()
