"""Checkpoint selection on the tiny real model: train keeps candidate adapters, `select` scores them through one
engine and evaluate, and carries the best forward; early stopping keeps the best held-out loss step.

Data and outputs live in the S3 test server. The training runs past its best on purpose (a high learning rate
on a small learnable task), so the candidates' scores differ."""

from __future__ import annotations

import json
import uuid

import pytest

from common import manifest as mf
from common import storage
from common.errors import ConfigError, InputError
from jobs.evaluate import job as evaluate
from jobs.select import job as select
from jobs.train import job as train
from jobs.train import selection
from tests.jobs.builders import publish_adapter
from tests.jobs.helpers import publish_prepare

pytestmark = pytest.mark.integration

# Plain LoRA cannot move the tiny model's random output head much, so (as in test_train) the head is trained in
# full: that also makes the cell one vLLM cannot serve, which is the modules_to_save path (engine transformers).
FAST = {"max_seq_length": 96, "batch_size": 4, "max_steps": 12, "learning_rate": 3e-2, "warmup_steps": 0,
        "lr_scheduler": "constant", "eval_every": 3, "lora": {"r": 8, "alpha": 16, "dropout": 0.0,
                                                               "modules_to_save": ["lm_head"]},
        "checkpoint": {"every_steps": 100, "keep": 1}, "quantization": {"mode": "none"},
        "gradient_checkpointing": False}
INFER = {"engine": "transformers", "sampling": {"max_tokens": 12}, "chunk_rows": 64}
EVALUATE = {"bootstrap": 200}


@pytest.fixture(scope="module")
def root(s3_endpoint) -> str:
    return f"s3://ftjobs-test/sel/{uuid.uuid4().hex[:12]}"


@pytest.fixture(scope="module")
def prepared(root, tiny_tokenizer) -> mf.Loaded:
    return publish_prepare(storage.join(root, "prepare"), tokenizer=tiny_tokenizer, n_train=48, n_eval=12,
                           max_words=3)


@pytest.fixture(scope="module")
def trained(root, prepared, tiny_model) -> mf.Loaded:
    config = train.Config(input=prepared.uri, base_model=str(tiny_model), output=storage.join(root, "train"),
                          select={"metric": "token_f1", "every": 3}, **FAST)
    return train.run(config)


@pytest.fixture(scope="module")
def selected(root, prepared, trained) -> mf.Loaded:
    config = select.Config(train=trained.uri, prompts=prepared.uri, output=storage.join(root, "select"),
                           infer=INFER, evaluate=EVALUATE)
    result = select.run(config)
    assert isinstance(result, mf.Loaded)
    return result


def weights(loaded: mf.Loaded, name: str) -> dict[str, list[float]]:
    """An adapter file's tensors, as lists (the bytes differ between peft's save_pretrained and save_file)."""
    from safetensors.torch import load

    tensors = load(storage.read_bytes(loaded.artifact_uri(name)))
    return {k: v.flatten().tolist() for k, v in tensors.items()}


def test_train_keeps_every_candidate_adapter(trained):
    m = trained.manifest
    steps = [c["step"] for c in m.metrics["selection"]["candidates"]]
    assert steps == [3, 6, 9, 12]
    assert m.metrics["selection"]["last_step"] == 12 == m.metrics["selection"]["adapter_step"]
    names = {a.name for a in m.artifacts}
    for step in steps:
        assert {f"candidates/step-{step:08d}/adapter_model.safetensors",
                f"candidates/step-{step:08d}/adapter_config.json"} <= names
    # the last candidate holds the published adapter's weights
    assert weights(trained, "candidates/step-00000012/adapter_model.safetensors") == \
        weights(trained, "adapter/adapter_model.safetensors")
    assert mf.load(trained.uri, verify="full")  # every named candidate is there with its bytes


def test_select_picks_the_best_candidate_and_its_scores_match_a_separate_evaluate(selected, trained):
    sel = selected.manifest.metrics["selection"]
    scores = {c["step"]: c["score"] for c in sel["candidates"]}
    assert sorted(scores) == [3, 6, 9, 12]
    print("candidate scores", scores)
    assert len(set(scores.values())) > 1, f"the candidates should differ after training past the best: {scores}"
    assert sel["chosen"]["score"] == max(scores.values())
    assert sel["chosen_step"] == min(s for s, v in scores.items() if v == max(scores.values()))
    assert sel["last"] == next(c for c in sel["candidates"] if c["step"] == 12)
    assert all(c["ci95"] is not None for c in sel["candidates"])
    # A separate evaluate of each checkpoint's predictions gives the score the selection reports.
    for step, want in scores.items():
        pred = selected.manifest.stats["predictions"][f"step-{step:08d}"]
        alone = evaluate.run(evaluate.Config(predictions=[selected.manifest.stats["baseline"], pred],
                                             output=storage.join(selected.prefix, "check", str(step)),
                                             bootstrap=0))
        assert alone.manifest.metrics["sets"][evaluate.default_label(mf.load(pred), 1)]["token_f1"] == \
            pytest.approx(want)
    # The leaderboard shows every candidate with its interval.
    # (the matrix value `step` names each row; the label column is left out when the values tell cells apart)
    shown = mf.load(sel["evaluate"])
    board = json.loads(storage.read_bytes(shown.artifact_uri("leaderboard.json")))
    assert sorted(c["values"]["step"] for c in board["cells"]) == sorted(scores)
    assert all(c["ci95"] is not None for c in board["cells"])
    table = storage.read_bytes(shown.artifact_uri("leaderboard.md")).decode()
    assert all(f"| {s} |" in table for s in scores), table


def test_the_selection_carries_the_chosen_adapter_forward(selected, trained, tmp_path):
    m = selected.manifest
    step = m.metrics["selection"]["chosen_step"]
    chosen = trained.manifest.artifact(f"candidates/step-{step:08d}/adapter_model.safetensors")
    assert m.artifact("adapter/adapter_model.safetensors").sha256 == chosen.sha256
    assert m.model["selected_step"] == step and m.model["base_model"] == trained.manifest.model["base_model"]
    assert m.stage == "select" and m.inputs[0] == trained.ref("train")
    assert {"adapter/adapter_config.json", "tokenizer/tokenizer_config.json"} <= {a.name for a in m.artifacts}
    # merge takes it where it takes a train manifest, and merges the chosen step's weights.
    from jobs.merge import job as merge

    merged = merge.run(merge.Config(input=selected.uri, output=storage.join(selected.prefix, "..", "merge")
                                    .replace("/select/../", "/")))
    assert merged.manifest.inputs[0].uri == selected.uri
    assert merged.manifest.model["adapter_sha256"] == chosen.sha256


def test_a_rerun_is_already_done(selected, prepared, trained):
    again = select.run(select.Config(train=trained.uri, prompts=prepared.uri, output=selected.prefix, infer=INFER,
                                     evaluate=EVALUATE))
    assert isinstance(again, mf.Loaded) and again.sha256 == selected.sha256


def test_early_stopping_publishes_the_best_loss_step(root, prepared, tiny_model):
    config = train.Config(input=prepared.uri, base_model=str(tiny_model), output=storage.join(root, "train-es"),
                          early_stopping={"patience": 1, "min_delta": 0.0},
                          **(FAST | {"learning_rate": 0.3, "max_steps": 30}))
    loaded = train.run(config)
    m = loaded.manifest
    sel = m.metrics["selection"]
    evals = {p["step"]: p["loss"] for p in m.metrics["eval_loss_series"]}
    assert sel["stopped_early"] and m.metrics["steps"] < 30
    assert sel["best_step"] < sel["last_step"] == m.metrics["steps"]
    assert sel["best_eval_loss"] == min(evals.values()) == evals[sel["best_step"]]
    assert sel["last_eval_loss"] == evals[sel["last_step"]] > sel["best_eval_loss"]
    best = weights(loaded, f"candidates/step-{sel['best_step']:08d}/adapter_model.safetensors")
    assert weights(loaded, "adapter/adapter_model.safetensors") == best
    assert best != weights(loaded, f"candidates/step-{sel['last_step']:08d}/adapter_model.safetensors")


@pytest.mark.unit
def test_early_stopping_counts_evaluations_since_the_best():
    evals = [{"step": s, "loss": v} for s, v in ((2, 1.0), (4, 0.8), (6, 0.79), (8, 0.9))]
    assert selection.best(evals, 0.0) == (6, 0.79)
    assert selection.best(evals, 0.05) == (4, 0.8)  # 0.79 is not lower by more than min_delta
    assert selection.since_best(evals, 0.05) == 2
    assert selection.should_stop(selection.EarlyStopping(patience=2, min_delta=0.05), evals)
    assert not selection.should_stop(selection.EarlyStopping(patience=2), evals)


@pytest.mark.unit
def test_bad_settings_are_refused_with_the_fix():
    with pytest.raises(ValueError, match="early_stopping needs eval_every"):
        train.Config(input="x", base_model="y", output="z", early_stopping={"patience": 2})


def test_a_train_run_without_candidates_or_with_saved_modules_on_vllm_is_refused(root, prepared, tiny_model,
                                                                                 trained):
    plain = publish_adapter(storage.join(root, "plain-train"), tiny_model)
    with pytest.raises(InputError, match="keeps no candidate adapters"):
        select.run(select.Config(train=plain.uri, prompts=prepared.uri, output=storage.join(root, "s1")))
    with pytest.raises(ConfigError, match="modules_to_save.*engine: transformers"):
        select.run(select.Config(train=trained.uri, prompts=prepared.uri, output=storage.join(root, "s2")))
    with pytest.raises(ConfigError, match="not one evaluate computes"):
        select.run(select.Config(train=trained.uri, prompts=prepared.uri, output=storage.join(root, "s3"),
                                 metric="bleu", infer=INFER))
