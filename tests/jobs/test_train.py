"""The train job on the tiny real model: real bitsandbytes 4-bit on CPU, data and outputs in the S3 test server."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from common import config as cfg
from common import manifest as mf
from common import storage
from common.errors import ConfigError, InputError
from jobs.train import checkpoints, data, packing
from jobs.train import job as train
from jobs.train import model as train_model
from tests.jobs.helpers import publish_prepare

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
# Small enough for CI (2 cores), enough steps for the loss to clearly fall. The tiny model's random output
# head caps what adapters on the inner layers alone can learn, so the head is trained in full (modules_to_save).
TINY = {"max_seq_length": 96, "batch_size": 2, "max_steps": 16, "learning_rate": 1e-2, "eval_every": 8,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "modules_to_save": ["lm_head"]},
        "checkpoint": {"every_steps": 4, "keep": 2}}


@pytest.fixture(scope="module")
def prepared(s3_endpoint, tiny_tokenizer) -> mf.Loaded:
    import uuid

    return publish_prepare(f"s3://ftjobs-test/t/{uuid.uuid4().hex[:12]}/prepare", tokenizer=tiny_tokenizer,
                           n_train=96, n_eval=16)


@pytest.fixture(scope="module")
def tensorboard_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("tensorboard")


@pytest.fixture(scope="module")
def trained(prepared, tiny_model, tensorboard_dir) -> tuple[train.Config, mf.Loaded]:
    config = train.Config(input=prepared.uri, base_model=str(tiny_model), output=storage.join(prepared.prefix,
                          "..", "train").replace("/prepare/../", "/"), report_to="tensorboard",
                          run_name="tb-run", **TINY)
    old = os.environ.get("TENSORBOARD_LOGGING_DIR")
    os.environ["TENSORBOARD_LOGGING_DIR"] = str(tensorboard_dir)
    try:
        return config, train.run(config)
    finally:
        if old is None:
            del os.environ["TENSORBOARD_LOGGING_DIR"]
        else:
            os.environ["TENSORBOARD_LOGGING_DIR"] = old


def test_loss_falls_and_the_manifest_records_the_run(trained, prepared, tiny_model):
    config, loaded = trained
    m = loaded.manifest
    assert m.stage == "train"
    assert m.inputs == [prepared.ref("data")]
    assert m.metrics["steps"] == 16
    curve = json.loads(storage.read_bytes(loaded.resolve(m.artifact("loss_curve.json"))))
    first, last = curve["train"][0]["loss"], sum(p["loss"] for p in curve["train"][-4:]) / 4
    assert last < first * 0.7, f"loss did not fall enough: {first:.3f} -> {last:.3f}"
    assert [p["step"] for p in curve["eval"]] == [8, 16]
    assert curve["eval"][-1]["loss"] < curve["eval"][0]["loss"]
    assert m.metrics["tokens_trained"] > 0 and m.metrics["effective_tokens_per_s"] > 0
    assert m.metrics["peak_memory_bytes"] > 0 and m.metrics["wall_s"] > 0
    assert m.stats["packing"]["mode"] == "position_ids" and m.stats["data_source"] == "pretokenized"
    assert m.stats["packing"]["per_example_attention"]  # CPU, sdpa, a plain Llama: jobs/train/segments.py
    assert m.model["quantization"]["mode"] == "nf4" and m.model["quantization"]["bits"] == 4
    assert m.model["lora"] == {"r": 8, "alpha": 16.0, "dropout": 0.0, "target_modules": "all-linear",
                               "modules_to_save": ["lm_head"]}
    assert m.model["template_hash"] == prepared.manifest.model["template_hash"]
    assert m.model["base_model"] == str(tiny_model) and m.model["base_revision"]
    names = {a.name for a in m.artifacts}
    assert {"adapter/adapter_model.safetensors", "adapter/adapter_config.json", "tokenizer/tokenizer_config.json",
            "loss_curve.json", "loss_curve.png"} <= names
    # Checkpoints are removed once the manifest is published.
    assert not storage.list_objects(checkpoints.root(config.output))
    mf.verify_artifacts(loaded, full=True)


def test_every_step_reaches_tensorboard(trained, tensorboard_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, loaded = trained
    events = EventAccumulator(str(tensorboard_dir / "tb-run"))
    events.Reload()
    curve = json.loads(storage.read_bytes(loaded.resolve(loaded.manifest.artifact("loss_curve.json"))))
    logged = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert [step for step, _ in logged] == [p["step"] for p in curve["train"]] == list(range(1, 17))
    assert [v for _, v in logged] == pytest.approx([p["loss"] for p in curve["train"]], abs=1e-5)
    assert [e.step for e in events.Scalars("eval/loss")] == [8, 16]


def test_adapter_loads_with_peft_and_changes_the_model(trained, tiny_model, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, loaded = trained
    for art in loaded.manifest.artifacts_named("adapter/") + loaded.manifest.artifacts_named("tokenizer/"):
        mf.fetch_artifact(loaded, art, tmp_path / art.name)
    base = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    ids = torch.tensor([[1, 5, 9, 13, 40]])
    with torch.no_grad():
        before = base(input_ids=ids).logits
        model = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
        after = model(input_ids=ids).logits
    assert (after - before).abs().max() > 1e-3
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "tokenizer"))
    assert tok.chat_template == loaded.manifest.model["chat_template"]


def test_rerun_is_already_done_and_another_config_is_refused(trained):
    from common.errors import OutputTakenError

    config, loaded = trained
    again = train.run(config)
    assert again.uri == loaded.uri and again.sha256 == loaded.sha256
    with pytest.raises(OutputTakenError, match="learning_rate"):
        train.run(config.model_copy(update={"learning_rate": 1e-3}))


def test_a_max_seq_length_that_drops_most_rows_is_refused_before_training(prepared, tiny_model, tmp_path):
    lengths = sorted(n for n in canonical_lengths(prepared))
    short = lengths[len(lengths) // 2]  # half the rows are longer than this
    config = train.Config(input=prepared.uri, base_model=str(tiny_model), output=str(tmp_path / "train"),
                          **{**TINY, "max_seq_length": max(16, short)})
    with pytest.raises(InputError, match=r"train would drop \d+ of 96 rows .*longer_than_max_seq_length.*"
                                         r"Raise max_seq_length") as err:
        train.run(config)
    assert err.value.exit_code == 3
    assert not (tmp_path / "train").exists() or not any((tmp_path / "train").rglob("*.safetensors"))
    # The same run with the check turned off trains on what is left.
    loose = config.model_copy(update={"max_drop_fraction": 1.0, "max_steps": 1, "eval_every": 0})
    assert train.run(loose).manifest.stats["train"]["dropped"]["longer_than_max_seq_length"] > 0


def test_packing_a_hybrid_model_is_refused_and_packing_none_trains(prepared, tiny_model, tiny_tokenizer, tmp_path):
    from tests.jobs.test_train_packing import tiny_hybrid

    hybrid = tmp_path / "qwen3-next"
    tiny_hybrid("qwen3_next").save_pretrained(str(hybrid))
    tiny_tokenizer.save_pretrained(str(hybrid))
    config = train.Config(input=prepared.uri, base_model=str(hybrid), output=str(tmp_path / "refused"), **TINY)
    with pytest.raises(ConfigError, match=r"packing: position_ids cannot keep packed examples apart in model type "
                                          r"'qwen3_next': its linear_attention layers .*Set packing: none") as err:
        train.run(config)
    assert err.value.exit_code == 2 and not list((tmp_path / "refused").rglob("*.safetensors"))
    assert not (tmp_path / "refused" / "manifest.json").exists()
    # One example per row: the accepted setting, trained here on the tiny Llama (same code path for any model).
    done = train.run(train.Config(input=prepared.uri, base_model=str(tiny_model), output=str(tmp_path / "none"),
                                  **{**TINY, "max_steps": 2, "eval_every": None, "packing": "none"}))
    assert done.manifest.stats["packing"]["rows"] == done.manifest.stats["train"]["examples"] == 96


def canonical_lengths(prep: mf.Loaded) -> list[int]:
    from common import data as canonical

    return canonical.read_split(prep, "train", columns=["num_tokens"]).column("num_tokens").to_pylist()


def test_different_template_is_refused_naming_the_stage_to_rerun(s3_root, tiny_tokenizer, tiny_model):
    prep = publish_prepare(f"{s3_root}/prepare", tokenizer=tiny_tokenizer, n_train=8, n_eval=0,
                           chat_template="{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    config = train.Config(input=prep.uri, base_model=str(tiny_model), output=f"{s3_root}/train", **TINY)
    with pytest.raises(InputError, match=r"chat template .*`ftjobs prepare .*--tokenizer") as err:
        train.run(config)
    assert prep.uri in str(err.value)
    assert not storage.exists(mf.manifest_uri(f"{s3_root}/train"))


def test_untokenized_data_is_tokenized_with_the_shared_encoder(s3_root, tiny_tokenizer):
    from common import chat

    fmt = chat.chat_format(tiny_tokenizer)
    tokenized = publish_prepare(f"{s3_root}/a", tokenizer=tiny_tokenizer, n_train=12, n_eval=0, seed=3)
    raw = publish_prepare(f"{s3_root}/b", tokenizer=None, n_train=12, n_eval=0, seed=3)
    args = {"tokenizer": tiny_tokenizer, "fmt": fmt, "max_seq_length": 96, "train_on": "assistant"}
    assert data.choose_source(tokenized, tiny_tokenizer, fmt, base_model="m", retokenize=False) == "pretokenized"
    assert data.choose_source(raw, tiny_tokenizer, fmt, base_model="m", retokenize=False) == "tokenized_here"
    pre, _ = data.load(tokenized, "train", source="pretokenized", **args)
    here, stats = data.load(raw, "train", source="tokenized_here", **args)
    assert [list(e.input_ids) for e in pre] == [list(e.input_ids) for e in here]
    assert [list(e.labels) for e in pre] == [list(e.labels) for e in here]
    short, stats = data.load(raw, "train", source="tokenized_here", **{**args, "max_seq_length": 16})
    assert stats["dropped"] == {"too_long_tokens": 12} and short == []


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["position_ids", "mask"])
def test_packed_examples_do_not_attend_to_each_other(tiny_model, attention, mode):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32,
                                                 attn_implementation=attention).eval()
    g = torch.Generator().manual_seed(0)
    exs = [packing.example(torch.randint(5, 1000, (n,), generator=g).tolist(), [-100] * n) for n in (9, 14, 6)]
    batch = packing.collate([[0, 1, 2]], exs, pad_id=0, with_mask=mode == "mask")
    inputs = {k: v for k, v in batch.items() if k != "targets"}
    with torch.no_grad():
        packed = model(**inputs, use_cache=False).logits[0]
        for at, ex in ((0, exs[0]), (9, exs[1]), (23, exs[2])):
            alone = model(input_ids=torch.tensor([ex.input_ids]), use_cache=False).logits[0]
            assert torch.allclose(packed[at:at + len(ex)], alone, atol=1e-4), f"example at {at} leaked"
        # The check can fail: without restarted positions the same row does leak.
        leaky = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
    assert not torch.allclose(leaky[9:23], model(input_ids=torch.tensor([exs[1].input_ids])).logits[0], atol=1e-2)


def test_packed_loss_equals_the_models_own_loss(tiny_model):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32).eval()
    ids = list(range(3, 40))
    labels = [-100] * 10 + ids[10:]
    batch = packing.collate([[0]], [packing.example(ids, labels)], pad_id=0)
    with torch.no_grad():
        total, n = packing.loss_sum(model, batch, chunk=7)
        ref = model(input_ids=torch.tensor([ids]), labels=torch.tensor([labels])).loss
    assert n == len(ids) - 10
    assert torch.allclose(total / n, ref, atol=1e-5)


def test_the_lora_settings_reach_the_adapter(tiny_model):
    # lora.dropout once fell into a comment and the adapter quietly trained with peft's default (0.0).
    config = train.Config(input="unused", base_model=str(tiny_model), output="unused", quantization={"mode": "none"},
                          lora={"r": 4, "alpha": 8, "dropout": 0.1, "target_modules": ["q_proj", "v_proj"]})
    model, _, _ = train_model.load_model(config, tiny_model, torch.device("cpu"), cuda=False)
    lora = model.peft_config["default"]
    assert (lora.r, lora.lora_alpha, lora.lora_dropout) == (4, 8, 0.1)
    assert lora.target_modules == {"q_proj", "v_proj"}


def test_resume_skips_checkpoints_without_marker_or_with_bad_checksum(s3_root, tmp_path, caplog):
    out = f"{s3_root}/train"
    # Two attempts saved checkpoints (a preempted one, then its replacement): resume takes the newest usable
    # one whichever attempt wrote it.
    for step, attempt in ((2, "a1"), (4, "a1"), (6, "a2"), (8, "a2")):
        local = tmp_path / f"src{step}"
        local.mkdir()
        (local / "state.json").write_text(json.dumps({"step": step}))
        (local / "optimizer.pt").write_bytes(bytes([step]) * 100)
        checkpoints.save(out, step, local, identity="run-a", attempt=attempt)
    folder = {step: storage.join(checkpoints.root(out), checkpoints.folder_name(step, a))
              for step, a in ((2, "a1"), (4, "a1"), (6, "a2"), (8, "a2"))}
    storage.delete(storage.join(folder[8], checkpoints.MARKER))       # killed mid-save
    storage.write_bytes(storage.join(folder[6], "optimizer.pt"), b"x" * 100)  # corrupted
    ckpt = checkpoints.latest(out, tmp_path / "dl", identity="run-a")
    assert ckpt is not None and ckpt.step == 4 and ckpt.uri == folder[4]
    assert json.loads((ckpt.local / "state.json").read_text()) == {"step": 4}
    assert "step-00000008-a2 has no COMPLETE.json" in caplog.text and "optimizer.pt has sha256" in caplog.text
    assert checkpoints.latest(out, tmp_path / "dl2", identity="run-b") is None  # another run's checkpoints
    # Pruning keeps the newest K with a marker; an unfinished folder newer than those is left alone.
    assert checkpoints.prune(out, keep=1) == ["step-00000002-a1", "step-00000004-a1"]
    assert sorted(checkpoints.present(out)) == ["step-00000006-a2", "step-00000008-a2"]


def test_shipped_config_and_validation_messages():
    config = cfg.load_config(train.Config, file=str(REPO / "configs" / "train.yaml"),
                             flags={"input": "s3://b/p/manifest.json", "base_model": "org/model", "output": "s3://b/t"})
    assert config.quantization.mode == "nf4" and config.lora.target_modules == "all-linear"
    with pytest.raises(ConfigError, match="warmup_ratio or warmup_steps"):
        cfg.load_config(train.Config, flags={"input": "i", "base_model": "m", "output": "o"},
                        sets=("warmup_ratio=0.1", "warmup_steps=5"))
    with pytest.raises(ConfigError, match=r"unknown key 'lora.rank' \(from --set lora.rank=4\) "
                                          r"\(allowed: alpha, dropout, modules_to_save, r,"):
        cfg.load_config(train.Config, flags={"input": "i", "base_model": "m", "output": "o"}, sets=("lora.rank=4",))
    with pytest.raises(ConfigError, match="flash_attention_2"):
        cfg.load_config(train.Config, flags={"input": "i", "base_model": "m", "output": "o"},
                        sets=("packing=mask", "attention=flash_attention_2"))


def test_cli_help_lists_the_options():
    from click.testing import CliRunner

    from jobs.cli import main

    result = CliRunner().invoke(main, ["train", "--help"])
    assert result.exit_code == 0
    assert "--base-model" in result.output and "--set" in result.output
