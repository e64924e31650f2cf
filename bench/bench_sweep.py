"""Sweep: four LoRA cells on one base as one `ftjobs sweep` vs four separate `ftjobs pipeline` runs.

    .venv/bin/python -m bench.bench_sweep [--steps 60] [--max-parallel 1]

The same four cells (learning rate x LoRA rank, plain LoRA, on the demo's base model and ticket data, the
real vLLM CPU engine) run twice in this one run, one after the other: as four pipelines (each its own
prepare, base inference, train, merge, finetuned inference and evaluate: what a user without sweeps runs),
then as one sweep (one prepare, one base inference, four trains, one engine serving the four adapters, one
evaluate). `--max-parallel 1` (the default) runs one step at a time, so the ratio is what sharing and
serving save, not parallelism on 2 cores. Printed: both wall times and the ratio (goal <= 0.6x), and
whether every cell's exact match is the same both ways (it must be: the same training, greedy decoding).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from bench.report import emit, row

REPO = Path(__file__).resolve().parent.parent
CELLS = [{"train.learning_rate": lr, "train.lora.r": r} for lr in (0.002, 0.004) for r in (8, 16)]


def base_config(root: Path, steps: int) -> dict[str, Any]:
    return {
        "root": str(root), "base_model": str(REPO / "demo/base-model"), "data": [str(REPO / "demo/data/tickets.jsonl")],
        "prepare": {"eval_size": 100, "max_length": 256},
        "train": {"quantization": {"mode": "nf4"}, "lora": {"r": 16, "alpha": 32, "dropout": 0.0},
                  "learning_rate": 0.002, "max_seq_length": 512, "batch_size": 1, "max_steps": steps,
                  "warmup_steps": 5, "gradient_checkpointing": False, "checkpoint": {"every_steps": None}},
        "infer": {"sampling": {"temperature": 0, "max_tokens": 32},
                  "engine_args": {"dtype": "float32", "max_model_len": 256}},
        "evaluate": {"checks": {"json_valid": True}, "bootstrap": 200},
    }


def put(conf: dict[str, Any], dotted: str, value: Any) -> None:
    *path, last = dotted.split(".")
    node = conf
    for part in path:
        node = node.setdefault(part, {})
    node[last] = value


def cli(args: list[str], env: dict[str, str]) -> tuple[float, str]:
    t = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args[:1])} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return time.perf_counter() - t, proc.stdout.strip().splitlines()[-1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60, help="train steps per cell")
    ap.add_argument("--max-parallel", type=int, default=1, help="the sweep's steps at once")
    args = ap.parse_args()
    env = dict(os.environ) | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "FTJOBS_LOG_FORMAT": "json"}
    from common import manifest as mf
    from common import storage

    with tempfile.TemporaryDirectory(prefix="ftjobs-bench-sweep-") as tmp:
        root = Path(tmp)
        separate_s, separate = 0.0, {}
        for i, cell in enumerate(CELLS):
            conf = base_config(root / "pipelines", args.steps)
            for key, value in cell.items():
                put(conf, key, value)
            path = root / f"pipeline-{i}.yaml"
            path.write_text(yaml.safe_dump(conf))
            # the same steps at once as the sweep gets (the pipeline runs infer-base beside train when it may)
            seconds, uri = cli(["pipeline", "--config", str(path), "--run-id", f"cell{i}", "--max-parallel",
                                str(args.max_parallel)], env)
            separate_s += seconds
            metrics = mf.load(uri, verify="none").manifest.metrics
            separate[i] = metrics["sets"]["finetuned"]["exact_match"]
            print(f"pipeline cell {i} {cell}: {seconds:.0f}s, exact match {separate[i]:.3f}", flush=True)

        conf = base_config(root, args.steps) | {"max_parallel": args.max_parallel, "matrix": {
            "train.learning_rate": [0.002, 0.004], "train.lora.r": [8, 16]}}
        path = root / "sweep.yaml"
        path.write_text(yaml.safe_dump(conf))
        sweep_s, uri = cli(["sweep", "--config", str(path), "--sweep-id", "bench"], env)
        loaded = mf.load(uri, verify="none")
        board = json.loads(storage.read_text(loaded.artifact_uri("leaderboard.json")))
        swept = {CELLS.index({k: c["values"][k] for k in CELLS[0]}): c["metric"] for c in board["cells"]}
        print(f"sweep: {sweep_s:.0f}s, exact match {dict(sorted(swept.items()))}", flush=True)

    same = all(abs(swept[i] - separate[i]) < 1e-9 for i in separate)
    rows = [row("sweep", "4 LoRA cells, wall seconds", sweep_s, separate_s, unit="s", goal="<= 0.6x",
                met=sweep_s <= 0.6 * separate_s,
                notes=f"max_parallel {args.max_parallel}; {args.steps} steps per cell; identical scores: {same}")]
    emit("sweep", rows, {"separate": separate, "swept": swept, "identical_scores": same})
    if not same:
        sys.exit(f"scores differ: sweep {swept} vs pipelines {separate}")


if __name__ == "__main__":
    main()
