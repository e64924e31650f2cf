"""DPO and ORPO in the train stage on the tiny model (real 4-bit bitsandbytes on CPU, the moto S3 server):
held-out reward accuracy rises, ORPO runs without a reference, SFT -> DPO from the SFT adapter, a SIGKILLed
run resumes to the adapter an uninterrupted run makes, and what cannot work is refused."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from common import config as cfg
from common import manifest as mf
from common import storage
from common.errors import ConfigError, InputError
from jobs import prepare
from jobs.train import checkpoints, objectives
from jobs.train import job as train
from tests.jobs.helpers import WORDS, publish_prepare

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
STEPS = 8
SETS = {"max_seq_length": 64, "batch_size": 4, "max_steps": STEPS, "learning_rate": 1e-2, "lora.r": 8,
        "lora.alpha": 16, "lora.dropout": 0.0, "checkpoint.every_steps": 2, "checkpoint.keep": 2,
        "warmup_steps": 0}


def pair_rows(n: int, seed: int = 0) -> list[dict[str, Any]]:
    """Pairs with a learnable preference: the chosen answer names the colour the prompt asks about."""
    import random

    rng = random.Random(seed)
    rows = []
    for i in range(n):
        w = rng.choice(WORDS)
        other = rng.choice([x for x in WORDS if x != w])
        rows.append({"prompt": f"say the word {w} please {i}", "chosen": f"{w}", "rejected": f"{other} {other}"})
    return rows


@pytest.fixture(scope="module")
def pairs(s3_endpoint: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> mf.Loaded:
    src = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in pair_rows(48)))
    return prepare.run(cfg.validate(prepare.Config, {
        "sources": [str(src)], "output": f"s3://ftjobs-test/t/{uuid.uuid4().hex[:12]}/pairs",
        "tokenizer": str(tiny_model), "eval_size": 12}))


def config(pairs: mf.Loaded, tiny_model: Path, output: str, **sets: Any) -> train.Config:
    items = [f"{k}={v}" for k, v in {**SETS, **sets}.items()]
    return cfg.load_config(train.Config, sets=items, flags={"input": pairs.uri, "base_model": str(tiny_model),
                                                            "output": output})


@pytest.fixture(scope="module")
def dpo(pairs: mf.Loaded, tiny_model: Path) -> mf.Loaded:
    return train.run(config(pairs, tiny_model, f"{pairs.prefix}-dpo", objective="dpo", eval_every=4))


def test_dpo_raises_held_out_reward_accuracy_and_its_loss_falls(dpo: mf.Loaded) -> None:
    m = dpo.manifest
    assert m.stats["objective"]["name"] == "dpo" and m.stats["objective"]["beta"] == 0.1
    assert m.stats["objective"]["reference"] == "base model, adapter disabled"
    assert m.stats["objective"]["pairs"] == {"train": 36, "eval": 12}
    assert m.metrics["eval_reward_accuracy"] > 0.6  # chance is 0.5; at step 0 every reward is 0 (ties: 0)
    assert m.metrics["eval_reward_margin"] > 0
    series = m.metrics["eval_reward_series"]
    assert [p["step"] for p in series] == [4, 8] and series[-1]["loss"] < 0.6931  # below log 2, DPO's start
    losses = [p["loss"] for p in json.loads(storage.read_bytes(dpo.resolve(m.artifact("loss_curve.json"))))["train"]]
    assert losses[0] == pytest.approx(0.6931, abs=1e-3) and losses[-1] < losses[0] - 0.1
    assert m.stats["packing"]["padding_free"] and m.metrics["effective_tokens_per_s"] > 0


def test_orpo_trains_without_a_reference(pairs: mf.Loaded, tiny_model: Path) -> None:
    orpo = train.run(config(pairs, tiny_model, f"{pairs.prefix}-orpo", objective="orpo", max_steps=2))
    o = orpo.manifest
    assert o.stats["objective"]["name"] == "orpo" and o.stats["objective"]["reference"] is None
    assert "reference_s" not in o.timings and 0 <= o.metrics["eval_reward_accuracy"] <= 1
    assert o.metrics["final_train_loss"] > 0


@pytest.mark.unit
def test_the_losses_are_the_papers_formulas() -> None:
    """Two pairs, by hand: DPO sigmoid (with label smoothing), IPO on per-token means, hinge, ORPO."""
    import math

    import torch

    s_c, s_r, n_c, n_r = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -5.0]), torch.tensor([2.0, 3.0]), \
        torch.tensor([2.0, 1.0])
    ref_c, ref_r = torch.tensor([-5.0, -8.0]), torch.tensor([-5.0, -6.0])
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    h = [0.1 * ((-4 + 5) - (-6 + 5)), 0.1 * ((-9 + 8) - (-5 + 6))]  # beta ((s_c - ref_c) - (s_r - ref_r))

    def run(name: str, **kw: Any) -> list[float]:
        out = objectives.pair_losses(name, objectives.Preference(**kw), s_c, s_r, n_c, n_r, ref_c, ref_r)
        return out[0].tolist()

    assert run("dpo") == pytest.approx([-math.log(sig(x)) for x in h], rel=1e-5)
    assert run("dpo", label_smoothing=0.2) == pytest.approx(
        [-0.8 * math.log(sig(x)) - 0.2 * math.log(sig(-x)) for x in h], rel=1e-5)
    assert run("dpo", loss="hinge") == pytest.approx([max(0.0, 1 - x) for x in h], rel=1e-5)
    # RPO: DPO plus sft_weight times the chosen answer's mean NLL per token (-s_c / n_c).
    assert run("dpo", sft_weight=0.5) == pytest.approx([-math.log(sig(x)) + 0.5 * c for x, c in zip(h, [2.0, 3.0],
                                                                                                      strict=True)],
                                                       rel=1e-5)
    ipo_h = [(-4 / 2 + 5 / 2) - (-6 / 2 + 5 / 2), (-9 / 3 + 8 / 3) - (-5 / 1 + 6 / 1)]
    assert run("dpo", loss="ipo", beta=0.5) == pytest.approx([(x - 1.0) ** 2 for x in ipo_h], rel=1e-5)
    a_c, a_r = [-2.0, -3.0], [-3.0, -5.0]
    odds = [(c - r) - (math.log(1 - math.exp(c)) - math.log(1 - math.exp(r))) for c, r in zip(a_c, a_r, strict=True)]
    assert run("orpo") == pytest.approx([-c - 0.1 * math.log(sig(o)) for c, o in zip(a_c, odds, strict=True)], rel=1e-5)


def test_dpo_from_an_sft_adapter_uses_it_as_the_frozen_reference(pairs, tiny_model, tiny_tokenizer) -> None:
    sft_prep = publish_prepare(f"{pairs.prefix}-sftprep", tokenizer=tiny_tokenizer, n_train=16, n_eval=4)
    sft = train.run(cfg.load_config(train.Config, sets=["max_seq_length=64", "max_steps=2", "lora.r=8",
                                                        "lora.alpha=16"],
                                    flags={"input": sft_prep.uri, "base_model": str(tiny_model),
                                           "output": f"{pairs.prefix}-sft"}))
    m = train.run(config(pairs, tiny_model, f"{pairs.prefix}-dpo-init", objective="dpo", max_steps=2,
                         init_adapter=sft.uri)).manifest
    assert m.stats["objective"]["reference"] == f"init_adapter {sft.uri} (frozen)"
    assert any(i.role == "init_adapter" and i.uri == sft.uri for i in m.inputs)
    curve = m.metrics  # the policy starts at the reference: the first step's loss is log 2
    assert curve["first_train_loss"] == pytest.approx(0.6931, abs=1e-3)
    with pytest.raises(ConfigError, match="lora.r"):
        train.run(config(pairs, tiny_model, f"{pairs.prefix}-dpo-r4", objective="dpo", init_adapter=sft.uri,
                         **{"lora.r": 4}))


@pytest.mark.integration
def test_what_cannot_work_is_refused(pairs: mf.Loaded, tiny_model: Path, tiny_tokenizer) -> None:
    with pytest.raises(ConfigError, match="holds preference pairs; set objective: dpo or orpo"):
        train.run(config(pairs, tiny_model, f"{pairs.prefix}-x"))
    sft_prep = publish_prepare(f"{pairs.prefix}-rows", tokenizer=tiny_tokenizer, n_train=4, n_eval=0)
    with pytest.raises(InputError, match="holds supervised rows"):
        train.run(cfg.load_config(train.Config, sets=["objective=dpo"], flags={
            "input": sft_prep.uri, "base_model": str(tiny_model), "output": f"{pairs.prefix}-y"}))
    for sets, msg in ((["objective=dpo", "packing=none"], "packing: none is not supported"),
                      (["objective=dpo", "preference.loss=ipo", "preference.label_smoothing=0.1"],
                       "label_smoothing applies to loss sigmoid only"),
                      (["objective=orpo", "preference.loss=hinge"], "ORPO has its own"),
                      (["objective=orpo", "preference.sft_weight=1"], "ORPO has its own")):
        with pytest.raises(ConfigError, match=msg):
            cfg.load_config(train.Config, sets=sets, flags={"input": "x", "base_model": "y", "output": "z"})
    assert objectives.Preference().beta == 0.1


@pytest.mark.timeout(400)
def test_sigkilled_dpo_resumes_to_the_adapter_an_uninterrupted_run_makes(pairs, tiny_model, dpo, subprocess_env):
    output = f"{pairs.prefix}-dpo-killed"
    cmd = [sys.executable, "-m", "jobs.cli", "train", "--input", pairs.uri, "--base-model", str(tiny_model),
           "--output", output]
    for k, v in {**SETS, "objective": "dpo", "eval_every": 4}.items():
        cmd += ["--set", f"{k}={v}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    assert proc.stderr is not None
    log = []
    for line in proc.stderr:
        log.append(line)
        if "checkpoint saved" in line and "step-00000004" in line:
            proc.send_signal(signal.SIGKILL)
            break
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, "".join(log[-30:])
    saved = {step for step, files in checkpoints.present(output).values() if checkpoints.MARKER in files}
    assert saved and not storage.exists(mf.manifest_uri(output))
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "reference log-probabilities" not in done.stderr  # cached in the checkpoint, not recomputed
    resumed = mf.load(done.stdout.strip().splitlines()[-1])
    assert resumed.manifest.stats["resumed_from_step"] == max(saved) and resumed.manifest.stats["attempts"] == 2
    assert _adapter(resumed) == pytest.approx(_adapter(dpo), rel=1e-4, abs=1e-6)
    assert resumed.manifest.metrics["eval_reward_accuracy"] == pytest.approx(dpo.manifest.metrics[
        "eval_reward_accuracy"])


def _adapter(loaded: mf.Loaded) -> list[float]:
    import tempfile

    from safetensors.torch import load_file

    with tempfile.TemporaryDirectory() as tmp:
        local = mf.fetch_artifact(loaded, loaded.manifest.artifact("adapter/adapter_model.safetensors"),
                                  Path(tmp) / "a.safetensors")
        weights = load_file(str(local))
    return [float(x) for k in sorted(weights) for x in weights[k].flatten()[:64]]
