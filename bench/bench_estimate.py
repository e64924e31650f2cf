"""The estimate's memory formula (jobs/estimate.py) against a real train run's peak memory, on CPU.

For each method x gradient checkpointing, a short `jobs.train.run` (2 steps, full packed rows) runs in its own
subprocess on a small Llama built from a config (hidden 256, 4 layers, vocab ~1k: big enough that the
model's memory stands out of the interpreter's). What is measured is the peak resident set's growth over
the run: the process imports everything first, then resets the kernel's high-water mark
(`/proc/self/clear_refs` 5) and reads `VmHWM` after the run, minus `VmRSS` before it. The estimate is
`jobs.estimate.memory(..., cuda=False)`: float32 compute, adamw_torch, no CUDA context.

    .venv/bin/python bench/bench_estimate.py [--json out.json]

The numbers are in docs/estimate.md (the error it prints is the one documented there).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SHAPE = {"hidden": 256, "layers": 4, "heads": 4, "kv_heads": 4, "intermediate": 688}
# The floor: the same run on a 1-layer, hidden-64 model, whose own estimate is ~1 MiB. What it measures is the
# process's cost of running train at all (data, tokenizer, allocator arenas, thread pools): host memory that
# a GPU run keeps off the GPU. It is subtracted from each case before comparing with the estimate.
FLOOR_SHAPE = {"hidden": 64, "layers": 1, "heads": 1, "kv_heads": 1, "intermediate": 128}
BASE_SETS = ["max_seq_length=512", "batch_size=4", "max_steps=2", "lora.r=16", "checkpoint.every_steps=null",
             "checkpoint.every_minutes=null", "max_drop_fraction=1.0"]
CASES = {  # name -> extra train sets
    "qlora": [], "qlora-nogc": ["gradient_checkpointing=false"],
    "lora": ["method=lora"], "lora-nogc": ["method=lora", "gradient_checkpointing=false"],
    "full": ["method=full"], "full-nogc": ["method=full", "gradient_checkpointing=false"],
}


def status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def child(spec: dict[str, Any]) -> None:
    """Run one training in this process and print {"delta_bytes": peak RSS growth} as JSON."""
    import ctypes
    import gc

    import accelerate  # noqa: F401 - everything train imports, imported before the baseline is read
    import bitsandbytes  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import peft  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    from common import config as cfg
    from common.logs import setup
    from jobs.train import job as train

    setup("text", "warning")
    config = cfg.load_config(train.Config, sets=spec["sets"], flags={
        "input": spec["input"], "base_model": spec["model"], "output": spec["output"]})
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    before = status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")
    train.run(config)
    print(json.dumps({"delta_bytes": (status_kib("VmHWM") - before) * 1024}))


def prepare(root: Path) -> tuple[Path, Path, str]:
    from transformers import AutoTokenizer

    from common import tinymodel
    from tests.jobs.helpers import publish_prepare

    model = tinymodel.build(root / "model", **SHAPE)
    floor = tinymodel.build(root / "floor", **FLOOR_SHAPE)  # the same tokenizer (same seed and corpus)
    tok = AutoTokenizer.from_pretrained(str(model))
    loaded = publish_prepare(str(root / "prepare"), tokenizer=tok, n_train=240, n_eval=4, max_words=30)
    return model, floor, loaded.uri


def measure(model: Path, prep: str, sets: list[str], out: Path) -> int:
    spec = {"sets": sets, "input": prep, "model": str(model), "output": str(out)}
    # A fixed mmap threshold: glibc otherwise raises it as large blocks are freed, and later tensors of up to
    # 32 MiB then come from heap arenas that keep their pages, so the peak RSS would count freed tensors.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 17)}
    done = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          cwd=REPO, check=True, env=env)
    return int(json.loads(done.stdout.strip().splitlines()[-1])["delta_bytes"])


def estimated(model: Path, sets: list[str]) -> dict[str, int]:
    from common import config as cfg
    from jobs import estimate
    from jobs.train import job as train

    config = cfg.load_config(train.Config, sets=sets, flags={"input": "-", "base_model": str(model), "output": "-"})
    shape = estimate.shape_of(json.loads((model / "config.json").read_text()), str(model))
    mem = estimate.memory(shape, config, 1, cuda=False)
    return {"total": mem.total, **mem.parts, "activations": mem.total - sum(mem.parts.values())}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--json", help="Also write the results here.")
    parser.add_argument("--cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-estimate-") as tmp:
        model, floor_model, prep = prepare(Path(tmp))
        for name in args.cases:
            sets = [*BASE_SETS, *CASES[name]]
            floor = measure(floor_model, prep, sets, Path(tmp) / f"floor-{name}") \
                - estimated(floor_model, sets)["total"]
            measured = measure(model, prep, sets, Path(tmp) / f"out-{name}")
            est = estimated(model, sets)
            results.append({"case": name, "measured_mib": measured / 2**20, "floor_mib": floor / 2**20,
                            "model_mib": (measured - floor) / 2**20, "estimated_mib": est["total"] / 2**20,
                            "ratio": est["total"] / (measured - floor),
                            "parts_mib": {k: round(v / 2**20, 1) for k, v in est.items()}})
            r = results[-1]
            print(f"{name:<11} measured {r['measured_mib']:7.1f} MiB - floor {r['floor_mib']:6.1f} = "
                  f"{r['model_mib']:7.1f} MiB  estimated {r['estimated_mib']:7.1f} MiB  "
                  f"estimate/measured {r['ratio']:.2f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
    else:
        main()
