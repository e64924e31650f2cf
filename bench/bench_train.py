"""CPU benchmark: the ftjobs train job vs two baselines on the same variable-length chat data.

All three train the tiny real Llama (bitsandbytes NF4 on CPU, LoRA r=16
alpha=32 all-linear, lr 2e-4 cosine, AdamW, gradient checkpointing) on the
same prepare manifest: chats whose lengths are long-tailed between 32 and 1024
tokens, with the same input_ids and labels (loss on the assistant's tokens
only). Each runs in its own subprocess (so peak RSS is its own), side by side
in one run:

- ftjobs: `jobs.train.run` (packed rows of 1024 tokens, 2 rows per step).
- plain: HF Trainer + peft + bitsandbytes, batches of 4 padded to the longest
  (what most QLoRA notebooks do).
- trl: TRL's SFTTrainer with the packing its docs recommend,
  `packing=True, packing_strategy="bfd"` (best-fit decreasing into rows of
  1024, which implies `padding_free=True`: each step's 2 rows are flattened into
  one sequence with restarted position ids and no attention mask). TRL pairs
  padding-free with FlashAttention, which a CPU lacks; with SDPA transformers
  detects the restarts and builds the block-diagonal mask itself, so examples
  stay apart, but attention runs dense over the flattened 2048-token row. TRL is
  fed the pre-tokenized `input_ids` + `labels` (it keeps a `labels` column as
  it is), so its loss is on the same tokens. As its QLoRA recipe does, it casts
  the adapter weights to bf16 on a 4-bit base.

Steps are chosen so each side trains about the same number of real tokens
(printed). After training, each side scores its trained adapter on the same
held-out rows (the prepare run's eval split, trained on by nobody) with one
function (`gpu_bench.heldout_loss`: mean cross-entropy per target token, one
example per row), so nobody wins by training less. tokens/s counts real
(non-padding) tokens after each side's first step (allocator and thread-pool
warm-up); the job's own figure, every step included, is kept in the JSON.

    .venv/bin/python bench/bench_train.py [--steps 12 --rows 300]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORDS = "the cat sat on a mat and the dog ran to see what red blue green tree house river moon sun".split()
MAX_LEN = 1024
HELDOUT = 8  # eval rows every side is scored on after training


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = max(12, min(MAX_LEN - 40, int(rng.lognormvariate(math.log(120), 0.9))))
        prompt = " ".join(rng.choice(WORDS) for _ in range(int(words * 0.4)))
        answer = " ".join(rng.choice(WORDS) for _ in range(words - int(words * 0.4)))
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return out


def publish(prefix: str, model: Path, n: int) -> tuple[str, list[int]]:
    """A prepare manifest of `n` train rows and HELDOUT eval rows; returns its URI and the train lengths."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from common import chat, chat_encode, data
    from common import manifest as mf

    tok = AutoTokenizer.from_pretrained(str(model))
    fmt = chat.chat_format(tok)
    writer = mf.ArtifactWriter(prefix)
    train_lengths: list[int] = []
    for split, convs in (("train", conversations(n)), ("eval", conversations(HELDOUT, seed=1))):
        enc = chat_encode.encode_many(tok, fmt, convs, max_length=MAX_LEN)
        rows = len(convs)
        table = pa.Table.from_pydict({
            "id": [f"{split}-{i}" for i in range(rows)], "messages": convs, "tools": [None] * rows,
            "split": [split] * rows, "source": ["bench"] * rows,
            "input_ids": [e.input_ids for e in enc], "labels": [e.labels for e in enc],
            "num_tokens": [len(e.input_ids) for e in enc], "num_trainable": [e.num_trainable for e in enc],
        }, schema=data.schema(tokenized=True))
        with tempfile.TemporaryDirectory() as tmp:
            pq.write_table(table, Path(tmp) / "p.parquet")
            writer.add_file(Path(tmp) / "p.parquet", f"data/{split}/part-00000.parquet", name=f"{split}/part-00000",
                            rows=rows)
        if split == "train":
            train_lengths = [len(e.input_ids) for e in enc if e.num_trainable]
    m = mf.build(stage="prepare", run_id=mf.new_run_id(), config={"bench": "train"}, inputs=[],
                 artifacts=writer.artifacts, model={"tokenizer": chat.tokenizer_identity(tok),
                                                    "template_hash": fmt.hash, "chat_template": fmt.template})
    return mf.publish(prefix, m), train_lengths


def examples_of(manifest: str, split: str) -> list[Any]:
    """The split's rows as the job trains on them: rows left without a target by truncation are dropped (the job
    drops them too), so every side trains on the same rows."""
    from common import data
    from common import manifest as mf
    from jobs.train import packing

    table = data.read_split(mf.load(manifest), split, columns=["input_ids", "labels"])
    examples = [packing.example(i, lab) for i, lab in zip(table.column("input_ids").to_pylist(),
                                                          table.column("labels").to_pylist(), strict=True)]
    return [e for e in examples if e.trainable]


def worker_ftjobs(manifest: str, model: str, out: str, steps: int) -> dict:
    from peft import PeftModel

    from bench.gpu_bench import heldout_loss, load_quantized
    from common import manifest as mf
    from jobs.train import job as train

    config = train.Config(input=manifest, base_model=model, output=out, max_seq_length=MAX_LEN, batch_size=2,
                          max_steps=steps, learning_rate=2e-4, lora={"r": 16, "alpha": 32},
                          checkpoint={"every_steps": None, "every_minutes": None})
    # The job's own clock after each step (its cumulative tokens and train seconds), so its first step can be left
    # out of tokens/s as the baselines' is.
    clock: list[tuple[int, float]] = []
    step = train.Trainer.train_step

    def timed_step(self: Any) -> dict[str, float]:
        scalars = step(self)
        clock.append((self.state.tokens, self.state.train_seconds))
        return scalars

    train.Trainer.train_step = timed_step  # type: ignore[method-assign]
    loaded = train.run(config)
    m = loaded.manifest
    (tokens_1, seconds_1), (tokens_n, seconds_n) = clock[0], clock[-1]
    # Its own peak, taken before the adapter is loaded again here for the held-out loss.
    result = {"tokens_per_s": (tokens_n - tokens_1) / (seconds_n - seconds_1),
              "job_tokens_per_s": m.metrics["effective_tokens_per_s"],  # what the manifest says: every step
              "first_step_s": seconds_1, "peak": m.metrics["peak_memory_bytes"],
              "density": m.stats["packing"]["density"], "steps": m.metrics["steps"],
              "tokens_total": m.metrics["tokens_trained"], "targets_total": m.metrics["target_tokens_trained"],
              "own_eval_loss": m.metrics["eval_loss"]}
    with tempfile.TemporaryDirectory() as tmp:
        for art in m.artifacts_named("adapter/"):
            mf.fetch_artifact(loaded, art, Path(tmp) / art.name)
        trained = PeftModel.from_pretrained(load_quantized(Path(model), "cpu"), str(Path(tmp) / "adapter"))
    result["heldout_loss"] = heldout_loss(trained, examples_of(manifest, "eval"), "cpu")
    return result


def worker_baseline(name: str, manifest: str, model: str, steps: int) -> dict:
    from bench.gpu_bench import load_quantized, run_plain, run_trl

    examples, heldout = examples_of(manifest, "train"), examples_of(manifest, "eval")
    base = load_quantized(Path(model), "cpu")
    if name == "plain":
        result = run_plain(base, examples, "cpu", steps - 1, warmup=1, heldout=heldout, schedule="cosine")
    else:
        from transformers import AutoTokenizer

        result = run_trl(base, examples, "cpu", MAX_LEN, 2, steps - 1, warmup=1, heldout=heldout,
                         schedule="cosine", tokenizer=AutoTokenizer.from_pretrained(model))
    # peak_gib is ru_maxrss right after training, before the held-out loss.
    return {**result, "peak": result.pop("peak_gib") * 2**30}


def step_counts(steps: int, lengths: list[int]) -> dict[str, int]:
    """Steps per side for about the same number of real tokens: ftjobs and TRL take 2 packed rows of MAX_LEN
    per step, plain 4 examples padded to the longest (its padding is not counted, so more steps)."""
    from jobs.train import packing

    tokens = steps * 2 * sum(lengths) / len(packing.pack(lengths, MAX_LEN))
    return {"ftjobs": steps, "trl": steps, "plain": max(2, round(tokens / (4 * sum(lengths) / len(lengths))))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12, help="ftjobs' (and TRL's) optimizer steps")
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--only", default="ftjobs,plain,trl", help=argparse.SUPPRESS)  # for profiling one side
    ap.add_argument("--worker", choices=["ftjobs", "plain", "trl"])
    ap.add_argument("--manifest")
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.steps < 2:
        ap.error("--steps must be at least 2: each side's first step is left out of tokens/s")
    if args.worker == "ftjobs":
        print(json.dumps(worker_ftjobs(args.manifest, args.model, args.out, args.steps)))
        return
    if args.worker:
        print(json.dumps(worker_baseline(args.worker, args.manifest, args.model, args.steps)))
        return

    from bench import report
    from common import tinymodel

    with tempfile.TemporaryDirectory() as tmp:
        model = tinymodel.build(Path(tmp) / "model", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512,
                                max_positions=MAX_LEN)
        manifest, lengths = publish(str(Path(tmp) / "prepare"), model, args.rows)
        steps = step_counts(args.steps, lengths)
        results: dict[str, dict] = {}
        for name in ("plain", "trl", "ftjobs"):
            if name not in args.only.split(","):
                continue
            t = time.monotonic()
            cmd = [sys.executable, __file__, "--worker", name, "--manifest", manifest, "--model", str(model),
                   "--out", str(Path(tmp) / f"train-{name}"), "--steps", str(steps[name])]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name]["wall_s"] = time.monotonic() - t
    print(f"{'side':<7} {'steps':>5} {'tokens':>7} {'targets':>7} {'tok/s':>7} {'peak MiB':>8} {'held-out loss':>13}")
    for name, r in results.items():
        print(f"{name:<7} {r['steps']:>5} {r['tokens_total']:>7} {r['targets_total']:>7} {r['tokens_per_s']:>7.0f} "
              f"{r['peak'] / 2**20:>8.0f} {r['heldout_loss']:>13.4f}")
    if set(results) != {"ftjobs", "plain", "trl"}:
        return
    f, p, t = results["ftjobs"], results["plain"], results["trl"]
    trained = f"tokens trained {f['tokens_total']} / {p['tokens_total']} / {t['tokens_total']} (ftjobs/plain/trl)"
    rows = [
        report.row("train", "effective tokens/s (CPU, NF4)", f["tokens_per_s"], p["tokens_per_s"], goal=">= 2x",
                   met=f["tokens_per_s"] >= 2 * p["tokens_per_s"], unit="tok/s",
                   notes=f"packing density {f['density']:.2f}"),
        report.row("train", "peak RSS (CPU)", f["peak"] / 2**20, p["peak"] / 2**20, goal="<= 1x",
                   met=f["peak"] <= p["peak"] * 1.02, unit="MiB"),
        report.row("train", "held-out loss vs plain", f["heldout_loss"], p["heldout_loss"], goal="info", met=None,
                   notes=trained),
        report.row("train", "tokens/s vs TRL packed (CPU)", f["tokens_per_s"], t["tokens_per_s"], goal=">= 1.2x",
                   met=f["tokens_per_s"] >= 1.2 * t["tokens_per_s"], unit="tok/s",
                   notes=f"TRL packing=bfd (padding-free), {t['attention']}, density {t['density']:.2f}"),
        report.row("train", "peak RSS vs TRL packed", f["peak"] / 2**20, t["peak"] / 2**20, goal="<= 1x",
                   met=f["peak"] <= t["peak"] * 1.02, unit="MiB"),
        report.row("train", "held-out loss vs TRL packed", f["heldout_loss"], t["heldout_loss"], goal="<= 1.05x",
                   met=f["heldout_loss"] <= 1.05 * t["heldout_loss"], notes=trained),
    ]
    report.emit("train", rows, extra={"results": results, "steps": steps})


if __name__ == "__main__":
    main()
