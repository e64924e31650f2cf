"""Batch inference: the infer job's vLLM engine vs its transformers engine (batched `generate`).

    .venv/bin/python -m bench.bench_infer [--size tiny|small] [--prompts 256] [--max-tokens 64] [--quick]
    .venv/bin/python -m bench.bench_infer --model /path/to/hf/folder     # a real model, e.g. on a GPU box

Both sides are `ftjobs infer` subprocesses (the real job, the way a container runs it) on the same model
folder, the same prompts (uneven lengths, as real eval sets are) and the same greedy settings, one after
the other in this run; the transformers run goes first, so vLLM's CPU thread pinning cannot touch it.
Measured: output tokens/s over generation time (what each manifest records), and over the whole job
(imports, model load, engine start). Goal: >= 10x on a GPU (published vLLM results: 14-24x over HF
generate). On CPU the goal does not apply: the figure is recorded as seen. Greedy agreement between the
two engines is reported beside it.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import emit, row

REPO = Path(__file__).resolve().parent.parent
SIZES = {"tiny": {}, "small": {"hidden": 512, "layers": 4, "heads": 8, "kv_heads": 8, "intermediate": 1536}}


def make_prompts(path: Path, n: int, seed: int = 0) -> None:
    from common.tinymodel import WORDS

    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            words = rng.choice([4, 8, 16, 32, 64, 128])  # uneven: what padding in static batches pays for
            f.write(json.dumps({"id": f"p{i:05d}", "prompt": " ".join(rng.choice(WORDS) for _ in range(words))}) + "\n")


def run_engine(engine: str, model: str, prompts: Path, out: Path, args: argparse.Namespace,
               env: dict[str, str]) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "jobs.cli", "infer", "--model", model, "--prompts", str(prompts),
           "--output", str(out), "--engine", engine, "--set", "sampling.temperature=0",
           "--set", f"sampling.max_tokens={args.max_tokens}", "--set", f"engine_args.batch_size={args.batch_size}",
           "--set", f"chunk_rows={args.prompts}"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        sys.exit(f"{engine} run failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    from common import manifest as mf

    loaded = mf.load(proc.stdout.strip().splitlines()[-1], expect_stage="infer")
    import pyarrow.parquet as pq

    completions = {}
    for art in loaded.manifest.artifacts_named("predictions/"):
        for r in pq.read_table(io.BytesIO(Path(loaded.resolve(art)).read_bytes())).to_pylist():
            completions[r["id"]] = r["completion"]
    stats = loaded.manifest.stats
    return {"wall_s": wall, "generate_s": loaded.manifest.timings["generate_s"], "tokens": stats["completion_tokens"],
            "tokens_per_s": stats["tokens_per_s"], "engine": stats["shards"][0]["engine"], "completions": completions}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="A local HF model folder (safetensors); default: a random model of --size.")
    ap.add_argument("--size", choices=sorted(SIZES), default="small", help="Random Llama to build when no --model.")
    ap.add_argument("--prompts", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=32, help="transformers engine: prompts per generate call.")
    ap.add_argument("--quick", action="store_true", help="tiny model, 64 prompts, 32 tokens (a smoke run).")
    args = ap.parse_args()
    if args.quick:
        args.size, args.prompts, args.max_tokens = "tiny", 64, 32

    import torch

    gpu = torch.cuda.is_available()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model = args.model
        if model is None:
            from common import tinymodel

            model = str(tinymodel.build(root / "model", **SIZES[args.size]))
        prompts = root / "prompts.jsonl"
        make_prompts(prompts, args.prompts)
        env = dict(os.environ) | {"FTJOBS_LOG_FORMAT": "json", "FTJOBS_CACHE": str(root / "cache"),
                                  "HF_HUB_OFFLINE": "1"}
        hf = run_engine("transformers", model, prompts, root / "hf", args, env)
        vl = run_engine("vllm", model, prompts, root / "vllm", args, env)

    agree = sum(vl["completions"][k] == hf["completions"][k] for k in hf["completions"]) / len(hf["completions"])
    where = "GPU" if gpu else "CPU: goal is for GPU, recorded as seen"
    notes = f"{args.prompts} prompts x {args.max_tokens} tokens, greedy; {where}; greedy agreement {agree:.0%}"
    rows = [
        row("infer", "output tokens/s (generation)", vl["tokens_per_s"], hf["tokens_per_s"], goal=">= 10x",
            met=(vl["tokens_per_s"] >= 10 * hf["tokens_per_s"]) if gpu else None, unit="tok/s", notes=notes),
        row("infer", "output tokens/s (whole job)", vl["tokens"] / vl["wall_s"], hf["tokens"] / hf["wall_s"],
            goal="n/a", met=None, unit="tok/s", notes="includes imports, model load and engine start"),
    ]
    emit("infer", rows, extra={"config": vars(args), "model": model if args.model else f"random {args.size}",
                               "vllm": {k: v for k, v in vl.items() if k != "completions"},
                               "transformers": {k: v for k, v in hf.items() if k != "completions"},
                               "greedy_agreement": agree})


if __name__ == "__main__":
    main()
