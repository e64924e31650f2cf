"""CPU benchmark: ftjobs DPO (train.objective: dpo) vs TRL's DPOTrainer with peft, same pairs, side by side.

Both train the tiny real Llama (bitsandbytes NF4 on CPU, LoRA r=16 alpha=32 dropout 0.05 all-linear, beta 0.1,
sigmoid loss, lr 2e-4 cosine, AdamW, gradient checkpointing, the reference = the base with the adapter
disabled) for one epoch over the same preference pairs: a prepare run of conversational prompt / chosen /
rejected rows whose lengths are long-tailed, rendered with the model's ChatML template. Each side runs in its
own subprocess (its own peak RSS).

- ftjobs: `jobs.train.run` with objective dpo: both answers of a pair packed padding-free into rows of
  2 x max_seq_length tokens, reference log-probs computed once before the first step.
- trl: `DPOTrainer` (TRL 1.16) with `peft_config`, batches of 4 pairs (chosen and rejected concatenated and
  padded to the longest, as it does; its padding-free mode is FlashAttention-only and "temporarily
  unavailable"), the reference computed on the fly with the adapter disabled.

tokens/s counts real (non-padding) tokens, prompt + answer for each of the two sequences of a pair, after each
side's first step (for TRL: the mean real tokens per pair x pairs per step, since its batches are drawn
at random). Held-out reward accuracy: one function scores both trained adapters on the same held-out pairs
(sign of (log p(chosen) - log p(rejected)) under the adapter minus the same under the base).

    .venv/bin/python -m bench.bench_dpo [--pairs 96 --heldout 24]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
GOOD = "clear correct helpful precise kind brief exact honest".split()
BAD = "vague wrong rude sloppy long false odd lazy".split()
FILL = "the cat sat on a mat and the dog ran to see what red blue green tree house river moon sun".split()
MAX_LEN = 384  # tokens per sequence (prompt + one answer)
BATCH = 4      # TRL's pairs per step


def pairs(n: int, seed: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = max(8, min(200, int(rng.lognormvariate(math.log(40), 0.8))))
        prompt = " ".join(rng.choice(FILL) for _ in range(words))
        k = rng.randint(4, 40)
        out.append({"prompt": [{"role": "user", "content": prompt}],
                    "chosen": [{"role": "assistant", "content": " ".join(rng.choice(GOOD) for _ in range(k))}],
                    "rejected": [{"role": "assistant", "content": " ".join(rng.choice(BAD) for _ in range(k))}]})
    return out


def publish(tmp: Path, model: Path, n: int, heldout: int) -> str:
    from common import config as cfg
    from jobs import prepare

    train_src, eval_src = tmp / "train.jsonl", tmp / "eval.jsonl"
    train_src.write_text("".join(json.dumps(r) + "\n" for r in pairs(n, 0)))
    eval_src.write_text("".join(json.dumps(r) + "\n" for r in pairs(heldout, 1)))
    loaded = prepare.run(cfg.validate(prepare.Config, {
        "sources": [{"path": str(train_src), "split": "train"}, {"path": str(eval_src), "split": "eval"}],
        "output": str(tmp / "prepare"), "tokenizer": str(model), "max_length": MAX_LEN}))
    return loaded.uri


def rows_of(manifest: str, split: str) -> list[dict[str, Any]]:
    from common import chat, data
    from common import manifest as mf
    from common import preference as P

    table = data.read_split(mf.load(manifest), split, columns=[f.name for f in P.schema(True)]).to_pylist()
    for r in table:
        for k in ("prompt", "chosen", "rejected"):
            r[k] = chat.clean(r[k])
    return table


def heldout_reward_accuracy(model: Any, manifest: str) -> float:
    """Share of held-out pairs whose implicit reward prefers chosen: the same function for both sides."""
    import torch

    def logp(ids: list[int], labels: list[int]) -> float:
        x = torch.tensor([ids])
        with torch.no_grad():
            logits = model(input_ids=x).logits[0, :-1].float()
        y = torch.tensor(labels[1:])
        keep = y != -100
        return float(-torch.nn.functional.cross_entropy(logits[keep], y[keep], reduction="sum"))

    model.eval()
    right = 0
    rows = rows_of(manifest, "eval")
    for r in rows:
        p = list(r["prompt_ids"])
        seqs = [(p + list(r[f"{s}_ids"]), [-100] * len(p) + list(r[f"{s}_labels"])) for s in ("chosen", "rejected")]
        policy = [logp(*s) for s in seqs]
        with model.disable_adapter():
            ref = [logp(*s) for s in seqs]
        right += (policy[0] - ref[0]) > (policy[1] - ref[1])
    return right / len(rows)


def worker_ftjobs(manifest: str, model: str, out: str) -> dict:
    from peft import PeftModel

    from bench.gpu_bench import load_quantized
    from common import manifest as mf
    from jobs.train import job as train
    from jobs.train import objectives

    config = train.Config(input=manifest, base_model=model, output=out, objective="dpo", max_seq_length=MAX_LEN,
                          batch_size=1, epochs=1, learning_rate=2e-4, lora={"r": 16, "alpha": 32, "dropout": 0.05},
                          warmup_steps=0, preference={"beta": 0.1},
                          checkpoint={"every_steps": None, "every_minutes": None})
    clock: list[tuple[int, float]] = []
    step = objectives.PreferenceObjective.train_step

    def timed_step(self: Any, t: Any) -> dict[str, float]:
        scalars = step(self, t)
        clock.append((t.state.tokens, t.state.train_seconds))
        return scalars

    objectives.PreferenceObjective.train_step = timed_step  # type: ignore[method-assign]
    loaded = train.run(config)
    assert isinstance(loaded, mf.Loaded)  # one process: it publishes
    m = loaded.manifest
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    (tokens_1, seconds_1), (tokens_n, seconds_n) = clock[0], clock[-1]
    reference_s = m.timings.get("reference_s") or 0.0
    result = {"tokens_per_s": (tokens_n - tokens_1) / (seconds_n - seconds_1), "steps": m.metrics["steps"],
              # every step and the reference pass (which TRL spreads over its steps) counted
              "tokens_per_s_with_reference": tokens_n / (seconds_n + reference_s),
              "tokens_total": m.metrics["tokens_trained"], "peak": peak, "reference_s": m.timings.get("reference_s"),
              "own_eval_reward_accuracy": m.metrics.get("eval_reward_accuracy")}
    with tempfile.TemporaryDirectory() as tmp:
        for art in m.artifacts_named("adapter/"):
            mf.fetch_artifact(loaded, art, Path(tmp) / art.name)
        trained = PeftModel.from_pretrained(load_quantized(Path(model), "cpu"), str(Path(tmp) / "adapter"))
    result["heldout_reward_accuracy"] = heldout_reward_accuracy(trained, manifest)
    return result


def worker_trl(manifest: str, model: str, out: str) -> dict:
    import datasets
    import torch
    from peft import LoraConfig
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    from bench.gpu_bench import _trainer_args, load_quantized

    datasets.disable_progress_bars()
    torch.manual_seed(0)
    rows = rows_of(manifest, "train")
    per_pair = sum(2 * len(r["prompt_ids"]) + len(r["chosen_ids"]) + len(r["rejected_ids"]) for r in rows) / len(rows)
    data = datasets.Dataset.from_list([{k: r[k] for k in ("prompt", "chosen", "rejected")} for r in rows])
    steps = math.ceil(len(rows) / BATCH)
    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == 1:
                marks["t0"] = time.monotonic()

    base = load_quantized(Path(model), "cpu")
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    targs = {**_trainer_args("cpu", steps, 0, "cosine"), "max_steps": steps}
    args = DPOConfig(output_dir=out, per_device_train_batch_size=BATCH, beta=0.1, loss_type=["sigmoid"],
                     max_length=2 * MAX_LEN, **targs)
    trainer = DPOTrainer(model=base, args=args, train_dataset=data, processing_class=AutoTokenizer.from_pretrained(
        model), peft_config=lora, callbacks=[Clock()])
    trainer.train()
    seconds = time.monotonic() - marks["t0"]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"tokens_per_s": per_pair * BATCH * (steps - 1) / seconds, "steps": steps,
            "tokens_total": round(per_pair * len(rows)), "peak": peak,
            "heldout_reward_accuracy": heldout_reward_accuracy(trainer.model, manifest)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=96)
    ap.add_argument("--heldout", type=int, default=24)
    ap.add_argument("--worker", choices=["ftjobs", "trl"])
    ap.add_argument("--manifest")
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker:
        fn = worker_ftjobs if args.worker == "ftjobs" else worker_trl
        print(json.dumps(fn(args.manifest, args.model, args.out)))
        return

    from bench import report
    from common import tinymodel

    with tempfile.TemporaryDirectory() as tmp:
        model = tinymodel.build(Path(tmp) / "model", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512,
                                max_positions=2 * MAX_LEN)
        manifest = publish(Path(tmp), model, args.pairs, args.heldout)
        results: dict[str, dict] = {}
        for name in ("trl", "ftjobs"):
            t = time.monotonic()
            cmd = [sys.executable, "-m", "bench.bench_dpo", "--worker", name, "--manifest", manifest, "--model",
                   str(model), "--out", str(Path(tmp) / f"train-{name}")]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name]["wall_s"] = time.monotonic() - t
            print(name, json.dumps(results[name]), flush=True)
    print(f"{'side':<7} {'steps':>5} {'tokens':>7} {'tok/s':>7} {'peak MiB':>8} {'held-out reward acc':>19}")
    for name, r in results.items():
        print(f"{name:<7} {r['steps']:>5} {r['tokens_total']:>7} {r['tokens_per_s']:>7.0f} {r['peak'] / 2**20:>8.0f} "
              f"{r['heldout_reward_accuracy']:>19.3f}")
    ours, trl = results["ftjobs"], results["trl"]
    rows = [
        report.row("dpo", "tokens/s vs TRL DPOTrainer (CPU, NF4)", ours["tokens_per_s_with_reference"],
                   trl["tokens_per_s"], goal=">= 1.3x",
                   met=ours["tokens_per_s_with_reference"] >= 1.3 * trl["tokens_per_s"], unit="tok/s",
                   notes=f"{args.pairs} pairs, 1 epoch; ftjobs' reference pass ({ours['reference_s'] or 0:.1f}s) and "
                   f"first step included; without them {ours['tokens_per_s']:.0f} tok/s"),
        report.row("dpo", "peak RSS vs TRL DPOTrainer", ours["peak"] / 2**20, trl["peak"] / 2**20, goal="<= 1x",
                   met=ours["peak"] <= trl["peak"] * 1.02, unit="MiB"),
        report.row("dpo", "held-out reward accuracy vs TRL", ours["heldout_reward_accuracy"],
                   trl["heldout_reward_accuracy"], goal="within 2 points",
                   met=abs(ours["heldout_reward_accuracy"] - trl["heldout_reward_accuracy"]) <= 0.02,
                   notes=f"{args.heldout} held-out pairs"),
    ]
    report.emit("dpo", rows, extra={"results": results})


if __name__ == "__main__":
    main()
