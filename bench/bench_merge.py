"""Merge wall time beside copying the same base safetensors files on the same disk, in one run.

    .venv/bin/python -m bench.bench_merge [--size small|medium|large] [--dtype float32|bfloat16]

A merge has to read every base weight and write every merged weight, so a plain file copy of the base
checkpoint is the floor it is measured against. The base is a random Llama built from a config
(small ~100 MB, medium ~400 MB, large ~1.6 GB at float32) with a real peft LoRA (r=16, all linear
layers) published in the train contract. Rows, each against a copy timed in the same process:
- the job as shipped (mode auto, generation check on);
- mode in_memory and mode sharded with the generation check off (the merge itself).
The page cache is warm for both sides (the copy runs first, once untimed). Goal: <= 1.3x the copy.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

from bench.report import emit, row

SIZES = {"small": (512, 1408, 8), "medium": (1024, 2816, 8), "large": (2048, 5632, 8)}  # hidden, mlp, layers


def copy_base(base: Path, dest: Path) -> float:
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    start = time.perf_counter()
    for f in sorted(base.glob("*.safetensors")):
        shutil.copyfile(f, dest / f.name)
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="medium")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the base checkpoint (the merge keeps it)")
    ap.add_argument("--workdir", default=None, help="where the base, copies and outputs go (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    from common import tinymodel
    from common.config import validate
    from jobs import merge
    from tests.jobs.builders import publish_adapter

    hidden, mlp, layers = SIZES[args.size]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    base = tinymodel.build(root / "base", hidden=hidden, intermediate=mlp, layers=layers, heads=hidden // 64,
                           kv_heads=hidden // 64, dtype=args.dtype)
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    train = publish_adapter(str(root / "train"), base, r=16, alpha=32)
    copy_base(base, root / "copy")  # warm the page cache for both sides

    runs = [("job as shipped (auto, checks on)", {}),
            ("in_memory, generation check off", {"mode": "in_memory", "checks": {"generation": False}}),
            ("sharded, generation check off", {"mode": "sharded", "checks": {"generation": False}})]
    rows, details = [], {}
    for i, (label, extra) in enumerate(runs):
        copy_s = copy_base(base, root / "copy")
        start = time.perf_counter()
        loaded = merge.run(validate(merge.Config, {"input": train.uri, "output": str(root / f"merge{i}"),
                                                   "max_shard_size": "200MB", **extra}))
        merge_s = time.perf_counter() - start
        m = loaded.manifest
        assert m.metrics["checks_passed"]
        details[label] = {"timings": m.timings, "stats": m.stats, "copy_s": copy_s}
        rows.append(row("merge", f"wall s: {label}", merge_s, copy_s, goal="<= 1.3x", met=merge_s <= 1.3 * copy_s,
                        unit="s", notes=f"{size / 1e6:.0f} MB {args.dtype} base, mode {m.stats['mode']}"))
        shutil.rmtree(root / f"merge{i}", ignore_errors=True)
    emit("merge", rows, extra={"size": args.size, "base_bytes": size, "details": details})
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
