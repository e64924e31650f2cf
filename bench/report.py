"""One result format for every benchmark, so `make bench` can print one table.

Each benchmark script builds rows with `row(...)`, then calls `emit(name, rows)`,
which prints the rows as a table and writes `bench/out/<name>.json`.
`ratio` is always ftjobs divided by baseline; every row states its goal as
text ('>= 3x' for speed, '<= 1.3x' for time or memory) and whether it was met.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

OUT = Path(os.environ.get("FTJOBS_BENCH_OUT", Path(__file__).resolve().parent / "out"))


def row(stage: str, metric: str, ftjobs: float, baseline: float, *, goal: str, met: bool | None,
        unit: str = "", notes: str = "") -> dict[str, Any]:
    """One comparison. `goal` reads like '>= 3x' or '<= 1.3x'; `met` is the verdict."""
    ratio = ftjobs / baseline if baseline else float("nan")
    return {"stage": stage, "metric": metric, "unit": unit, "ftjobs": ftjobs, "baseline": baseline,
            "ratio": ratio, "goal": goal, "met": met, "notes": notes}


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except ImportError:
        pass
    return info


def table(rows: list[dict[str, Any]]) -> str:
    head = f"{'stage':<8} {'metric':<34} {'ftjobs':>12} {'baseline':>12} {'ratio':>7} {'goal':>8}  met"
    lines = [head, "-" * len(head)]
    for r in rows:
        met = {True: "yes", False: "NO", None: "n/a"}[r["met"]]
        lines.append(f"{r['stage']:<8} {r['metric']:<34} {r['ftjobs']:>12.4g} {r['baseline']:>12.4g} "
                     f"{r['ratio']:>6.2f}x {r['goal']:>8}  {met}")
    return "\n".join(lines)


def emit(name: str, rows: list[dict[str, Any]], extra: dict[str, Any] | None = None) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / f"{name}.json"
    payload = {"name": name, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": machine(),
               "rows": rows, **(extra or {})}
    path.write_text(json.dumps(payload, indent=2, default=str))
    print(table(rows))
    print(f"wrote {path}")
    return path
