"""Merge at real sizes: the job as shipped against the plain peft way and against the floor, in one run.

    .venv/bin/python -m bench.bench_merge [--size small|medium|large] [--dtype float32|bfloat16]

The base is a random Llama built from a config (small ~100 MB, medium ~400 MB, large ~1.6 GB at float32)
with a real peft LoRA (r=16, all linear layers) published in the train contract, beside the prepare run
it names (80 short chats, tokenized). Every side reads the
same base files with the page cache warm (one untimed copy first) and writes to the same disk:

- plain peft way: what a user would otherwise run, with no checks: `from_pretrained` the 16-bit base,
  `PeftModel.from_pretrained`, `merge_and_unload`, `save_pretrained`.
- floor: copying the base's safetensors files plus one sha256 pass over the copies. Any merge has to read
  every weight and write every merged weight, and the manifest needs each output file's sha256. The copy
  is `shutil.copyfile` (copied inside the kernel); the same bytes read and written through user memory,
  as a merge must write them, are printed beside it.
- ftjobs as shipped (mode auto, every check on; the generation check compares on 4 held-out rows of the
  train run's prepared data, teacher-forced), its phases from the manifest's timings (load, merge, check,
  save, hash) and the check's own parts; the same with `checks.source: prompts` (the default before
  2026-12-07: 16 greedy tokens generated per prompt) and with `checks.max_new_tokens: 0` (the prompts'
  positions only); and the merge with the generation check off in each mode.

Goals: as shipped <= 1.0x the plain way (the checks cost less than what the plain way wastes); the merge
with checks off <= 2x the floor.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.report import emit, row
from jobs.merge.checks import summary

SIZES = {"small": (512, 1408, 8), "medium": (1024, 2816, 8), "large": (2048, 5632, 8)}  # hidden, mlp, layers
PHASES = ("load", "merge", "check", "save", "hash", "upload")


def floor(base: Path, dest: Path) -> dict[str, float]:
    """Copy the base's weight files, then hash the copies once: the least work a merge can do."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    start = time.perf_counter()
    for f in sorted(base.glob("*.safetensors")):
        shutil.copyfile(f, dest / f.name)
    copied = time.perf_counter()
    for f in sorted(dest.glob("*.safetensors")):
        h = hashlib.sha256()
        with open(f, "rb") as fh:
            while chunk := fh.read(8 << 20):
                h.update(chunk)
    done = time.perf_counter()
    shutil.rmtree(dest)
    dest.mkdir(parents=True)
    # The same bytes through user memory (read, write), as any merge must write them: its output differs
    # from its input, so the kernel cannot copy the file for it. Shown beside the floor, not as the floor.
    t = time.perf_counter()
    for f in sorted(base.glob("*.safetensors")):
        with open(f, "rb") as src, open(dest / f.name, "wb") as out:
            while chunk := src.read(64 << 20):
                out.write(chunk)
    user_copy = time.perf_counter() - t
    shutil.rmtree(dest)
    return {"copy_s": copied - start, "sha256_s": done - copied, "total_s": done - start,
            "user_copy_s": user_copy}


def plain_peft(base: Path, adapter: Path, dest: Path, dtype: str) -> float:
    """The unchecked way: load, wrap, merge_and_unload, save_pretrained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    shutil.rmtree(dest, ignore_errors=True)
    start = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=getattr(torch, dtype))
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    merged.save_pretrained(str(dest), max_shard_size="200MB")
    seconds = time.perf_counter() - start
    del model, merged
    gc.collect()
    shutil.rmtree(dest)
    return seconds


def ftjobs_merge(train_uri: str, out: Path, extra: dict[str, Any]) -> tuple[float, Any]:
    from common.config import validate
    from jobs.merge import job as merge

    start = time.perf_counter()
    loaded = merge.run(validate(merge.Config, {"input": train_uri, "output": str(out), "max_shard_size": "200MB",
                                               **extra}))
    seconds = time.perf_counter() - start
    m = loaded.manifest
    assert m.metrics["checks_passed"], m.metrics
    shutil.rmtree(out, ignore_errors=True)
    gc.collect()
    return seconds, m


def phases(m: Any) -> str:
    return ", ".join(f"{p} {m.timings[p]:.2f}" for p in PHASES if m.timings.get(p))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", choices=sorted(SIZES), default="large")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                    help="dtype of the base checkpoint (the merge keeps it)")
    ap.add_argument("--workdir", default=None, help="where the base, copies and outputs go (default: a temp dir)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

    import peft  # noqa: F401  (imported before any clock starts: no side pays for imports)
    import transformers  # noqa: F401

    from common import tinymodel
    from jobs import merge  # noqa: F401
    from tests.jobs.builders import publish_adapter
    from tests.jobs.helpers import publish_prepare

    hidden, mlp, layers = SIZES[args.size]
    root = Path(args.workdir or tempfile.mkdtemp(prefix="bench-merge-"))
    if not (root / "train" / "manifest.json").exists() or not (root / "prepare" / "manifest.json").exists():
        from transformers import AutoTokenizer

        for part in ("base", "prepare", "train"):
            shutil.rmtree(root / part, ignore_errors=True)
        base = tinymodel.build(root / "base", hidden=hidden, intermediate=mlp, layers=layers, heads=hidden // 64,
                               kv_heads=hidden // 64, dtype=args.dtype)
        # the train run's prepared data (held-out rows the default check compares on), as train records it
        prep = publish_prepare(str(root / "prepare"), tokenizer=AutoTokenizer.from_pretrained(str(base)),
                               n_train=64, n_eval=16, shards=1)
        publish_adapter(str(root / "train"), base, r=16, alpha=32, data=prep)
    base = root / "base"
    train_uri = str(root / "train")
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    what = f"{size / 1e9:.2f} GB {args.dtype} base"
    floor(base, root / "copy")  # warm the page cache for every side

    plain_s = plain_peft(base, root / "train" / "adapter", root / "plain", args.dtype)
    shipped_s, shipped = ftjobs_merge(train_uri, root / "shipped", {})
    generated_s, generated = ftjobs_merge(train_uri, root / "generated", {"checks": {"source": "prompts"}})
    prompts_s, prompts_only = ftjobs_merge(train_uri, root / "prompts-only", {"checks": {"max_new_tokens": 0}})
    unchecked = {mode: ftjobs_merge(train_uri, root / f"nocheck-{mode}",
                                    {"mode": mode, "checks": {"generation": False}})
                 for mode in ("sharded", "in_memory")}
    low = floor(base, root / "copy")
    rows = [
        row("merge", "as shipped (checks on) vs plain peft", shipped_s, plain_s, goal="<= 1.0x",
            met=shipped_s <= plain_s, unit="s",
            notes=f"{what}; mode {shipped.stats['mode']}; phases: {phases(shipped)}"),
    ]
    rows.append(row("merge", "checks on, prompts + 16 generated tokens (source prompts) vs plain peft", generated_s,
                    plain_s, goal="info", met=None, unit="s", notes=f"{what}; phases: {phases(generated)}"))
    rows.append(row("merge", "checks on, prompts only (max_new_tokens 0) vs plain peft", prompts_s, plain_s,
                    goal="info", met=None, unit="s", notes=f"{what}; phases: {phases(prompts_only)}"))
    for mode, (seconds, m) in unchecked.items():
        rows.append(row("merge", f"{mode}, generation check off vs floor", seconds, low["total_s"],
                        goal="<= 2x" if mode == "sharded" else "info",
                        met=seconds <= 2 * low["total_s"] if mode == "sharded" else None, unit="s",
                        notes=f"{what}; phases: {phases(m)}"))
    rows.append(row("merge", "plain peft (no checks) vs floor", plain_s, low["total_s"], goal="info", met=None,
                    unit="s", notes=f"floor: copy {low['copy_s']:.2f} s + sha256 {low['sha256_s']:.2f} s"))
    rows.append(row("merge", "sharded, check off vs user-space copy+sha256", unchecked["sharded"][0],
                    low["user_copy_s"] + low["sha256_s"], goal="info", met=None, unit="s",
                    notes="read + write through user memory, as a merge must write, plus sha256"))
    gen = shipped.metrics["generation"]
    print(f"as shipped, phases (s): {phases(shipped)}; generation check: {summary(gen)}")
    for name, m in (("as shipped", shipped), ("prompts + 16 generated", generated), ("prompts only", prompts_only)):
        print(f"{name}, the check's parts (s): " + ", ".join(
            f"{k} {v:.2f}" for k, v in m.metrics["generation"].get("seconds", {}).items()))
    emit("merge", rows, extra={"size": args.size, "base_bytes": size, "plain_s": plain_s, "floor": low,
                               "shipped": {"seconds": shipped_s, "timings": shipped.timings, "stats": shipped.stats},
                               "unchecked": {k: {"seconds": s, "timings": m.timings} for k, (s, m) in
                                             unchecked.items()}})
    if not args.workdir:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
