"""CPU benchmark: the ftjobs train job vs the plain QLoRA recipe on the same variable-length chat data.

Both train the tiny real Llama (bitsandbytes NF4 on CPU, LoRA r=16
all-linear) on the same prepare manifest: chats whose lengths are long-tailed
between 32 and 1024 tokens. Each runs in its own subprocess (so peak RSS is
its own), side by side in one run:

- ftjobs: `jobs.train.run` (packed rows of 1024 tokens, 2 rows per step).
- plain: HF Trainer + peft + bitsandbytes, batches of 4 padded to the longest.

Prints effective (non-padding) tokens/s, peak memory and the ratios.

    .venv/bin/python bench/bench_train.py [--steps 20]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
WORDS = "the cat sat on a mat and the dog ran to see what red blue green tree house river moon sun".split()
MAX_LEN = 1024


def conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        words = max(12, min(MAX_LEN - 40, int(rng.lognormvariate(math.log(120), 0.9))))
        prompt = " ".join(rng.choice(WORDS) for _ in range(int(words * 0.4)))
        answer = " ".join(rng.choice(WORDS) for _ in range(words - int(words * 0.4)))
        out.append([{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}])
    return out


def publish(prefix: str, model: Path, n: int) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from transformers import AutoTokenizer

    from common import chat, data
    from common import manifest as mf

    tok = AutoTokenizer.from_pretrained(str(model))
    fmt = chat.chat_format(tok)
    convs = conversations(n)
    enc = chat.encode_many(tok, fmt, convs, max_length=MAX_LEN)
    table = pa.Table.from_pydict({
        "id": [str(i) for i in range(n)], "messages": convs, "tools": [None] * n, "split": ["train"] * n,
        "source": ["bench"] * n,
        "input_ids": [e.input_ids for e in enc], "labels": [e.labels for e in enc],
        "num_tokens": [len(e.input_ids) for e in enc], "num_trainable": [e.num_trainable for e in enc],
    }, schema=data.schema(tokenized=True))
    writer = mf.ArtifactWriter(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        pq.write_table(table, Path(tmp) / "p.parquet")
        writer.add_file(Path(tmp) / "p.parquet", "data/train/part-00000.parquet", name="train/part-00000",
                        rows=n)
    m = mf.build(stage="prepare", run_id=mf.new_run_id(), config={"bench": "train"}, inputs=[],
                 artifacts=writer.artifacts, model={"tokenizer": chat.tokenizer_identity(tok),
                                                    "template_hash": fmt.hash, "chat_template": fmt.template})
    return mf.publish(prefix, m)


def worker_ftjobs(manifest: str, model: str, out: str, steps: int) -> dict:
    import jobs.train as train

    config = train.Config(input=manifest, base_model=model, output=out, max_seq_length=MAX_LEN, batch_size=2,
                          max_steps=steps, learning_rate=2e-4, lora={"r": 16, "alpha": 32},
                          checkpoint={"every_steps": None, "every_minutes": None})
    m = train.run(config).manifest
    # The job's own clock covers all steps; the first one (allocator warm-up) is included.
    return {"tokens_per_s": m.metrics["effective_tokens_per_s"], "peak": m.metrics["peak_memory_bytes"],
            "density": m.stats["packing"]["density"]}


def worker_plain(manifest: str, model: str, steps: int) -> dict:
    import resource

    from bench.gpu_bench import load_quantized, run_plain
    from common import data
    from common import manifest as mf
    from jobs.train import packing

    table = data.read_split(mf.load(manifest), "train", columns=["input_ids", "labels"])
    examples = [packing.example(i, lab) for i, lab in zip(table.column("input_ids").to_pylist(),
                                                          table.column("labels").to_pylist(), strict=True)]
    base = load_quantized(Path(model), "cpu")
    result = run_plain(base, examples, "cpu", steps, warmup=1)
    return {"tokens_per_s": result["tokens_per_s"],
            "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rows", type=int, default=300)
    ap.add_argument("--worker", choices=["ftjobs", "plain"])
    ap.add_argument("--manifest")
    ap.add_argument("--model")
    ap.add_argument("--out")
    args = ap.parse_args()
    if args.worker == "ftjobs":
        print(json.dumps(worker_ftjobs(args.manifest, args.model, args.out, args.steps)))
        return
    if args.worker == "plain":
        print(json.dumps(worker_plain(args.manifest, args.model, args.steps)))
        return

    from bench import report
    from common import tinymodel

    with tempfile.TemporaryDirectory() as tmp:
        model = tinymodel.build(Path(tmp) / "model", hidden=256, layers=4, heads=4, kv_heads=4, intermediate=512,
                                max_positions=MAX_LEN)
        manifest = publish(str(Path(tmp) / "prepare"), model, args.rows)
        results = {}
        # Plain recipe: 4 padded examples per step. ftjobs: 2 packed rows of 1024 per step (more tokens per
        # step), so it runs fewer steps for about the same number of tokens.
        for name, steps in (("plain", args.steps * 2), ("ftjobs", args.steps)):
            t = time.monotonic()
            cmd = [sys.executable, __file__, "--worker", name, "--manifest", manifest, "--model", str(model),
                   "--out", str(Path(tmp) / f"train-{name}"), "--steps", str(steps)]
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            results[name]["wall_s"] = time.monotonic() - t
    f, p = results["ftjobs"], results["plain"]
    rows = [
        report.row("train", "effective tokens/s (CPU, NF4)", f["tokens_per_s"], p["tokens_per_s"], goal=">= 2x",
                   met=f["tokens_per_s"] >= 2 * p["tokens_per_s"], unit="tok/s",
                   notes=f"packing density {f['density']:.2f}"),
        report.row("train", "peak RSS (CPU)", f["peak"] / 2**20, p["peak"] / 2**20, goal="<= 1x",
                   met=f["peak"] <= p["peak"] * 1.02, unit="MiB"),
    ]
    report.emit("train", rows, extra={"results": results})


if __name__ == "__main__":
    main()
