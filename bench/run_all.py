"""`make bench`: run every stage's benchmark on this machine and print one table.

    .venv/bin/python -m bench.run_all [--only prepare,storage] [--quick]

Each benchmark runs as its own subprocess (its own process tree, its own
peak memory) and writes `bench/out/<name>.json` in the `bench/report.py`
format; this script gathers them into `bench/out/summary.json` and prints
one table: stage, metric, ftjobs, baseline, ratio, goal, met. Defaults are
small sizes, except merge, which runs at the 1.6 GB size its goal is about
(about 2 minutes on 2 cores); each script's --help gives the full-size options.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from bench.report import OUT, machine, table

# name -> (module, quick args, default args). Missing modules are reported, not faked.
BENCHES: dict[str, tuple[str, list[str], list[str]]] = {
    "prepare": ("bench.bench_prepare", ["--rows", "5000,20000"], ["--rows", "10000,50000"]),
    "train": ("bench.bench_train", ["--steps", "4", "--rows", "120"], ["--steps", "12", "--rows", "300"]),
    "dpo": ("bench.bench_dpo", ["--pairs", "48", "--heldout", "16"], ["--pairs", "96", "--heldout", "24"]),
    "merge": ("bench.bench_merge", ["--size", "small"], ["--size", "large"]),
    "infer": ("bench.bench_infer", ["--quick"], ["--quick"]),
    "storage": ("bench.bench_storage", ["--files", "2", "--mb", "32"], ["--files", "4", "--mb", "48"]),
    "sweep": ("bench.bench_sweep", ["--steps", "20"], ["--steps", "60"]),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="comma-separated subset of: " + ", ".join(BENCHES))
    ap.add_argument("--quick", action="store_true", help="smallest sizes (a smoke run, ratios less stable)")
    args = ap.parse_args()
    names = [n for n in (args.only.split(",") if args.only else BENCHES) if n]
    rows, runs = [], {}
    root = Path(__file__).resolve().parent.parent
    for name in names:
        module, quick, default = BENCHES[name]
        if not (root / (module.replace(".", "/") + ".py")).exists():
            runs[name] = {"status": "missing", "module": module}
            print(f"== {name}: {module} does not exist, skipped")
            continue
        print(f"== {name}: python -m {module} {' '.join(quick if args.quick else default)}", flush=True)
        t = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", module, *(quick if args.quick else default)], cwd=root,
                              check=False)
        runs[name] = {"status": "ok" if proc.returncode == 0 else f"exit {proc.returncode}",
                      "seconds": round(time.perf_counter() - t, 1)}
        out = OUT / f"{name}.json"
        if proc.returncode == 0 and out.exists():
            rows += json.loads(out.read_text())["rows"]
    summary = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(), "runs": runs,
               "rows": rows}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    print("\n" + table(rows))
    for name, run in runs.items():
        if run["status"] != "ok":
            print(f"{name}: {run['status']}")
    print(f"wrote {OUT / 'summary.json'}")


if __name__ == "__main__":
    main()
