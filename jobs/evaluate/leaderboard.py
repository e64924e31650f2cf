"""A sweep's leaderboard: every cell of the matrix in one table that says which is best and how small it can be.

Per cell (a finetuned predictions set and the matrix values that made it): the metric with its own
bootstrap 95% interval, the paired difference against the cell's own base model (with its interval),
train wall time, tokens trained, peak memory, trainable and total parameters (from the cell's train
manifest). Cells are sorted by the metric; the best is compared with the runner-up on the examples both
answered (paired bootstrap), and the line says whether their intervals overlap: overlapping intervals
mean the data cannot tell the two apart. Two plots, metric vs model size and metric vs train cost, mark
the Pareto front: the cells no other cell beats on both axes at once.
"""

from __future__ import annotations

import base64
import io
from typing import Any

from jobs.evaluate.comparison import bootstrap_interval, mean
from jobs.evaluate.metrics import TITLES


def build(sets: dict[str, dict[str, Any]], comparisons: dict[str, Any], cells: list[Any], metric: str,
          trains: dict[str, Any], resamples: int, seed: int) -> dict[str, Any]:
    """The leaderboard as data (what leaderboard.json holds and both renderings show)."""
    rows = []
    for i, cell in enumerate(cells):
        s = sets[cell.label]
        values = [v[metric] for v in s["scores"].values() if v.get(metric) is not None]
        comp = comparisons.get(cell.label, {})
        vs_base = comp.get("metrics", {}).get(metric, {})
        train = trains.get(cell.label)
        tm = train.manifest.metrics if train is not None else {}
        params = (train.manifest.stats.get("params") or {}) if train is not None else {}
        rows.append({
            "label": cell.label, "values": dict(cell.values), "metric": mean(values),
            "ci95": bootstrap_interval(values, resamples, seed + 7 * i), "examples": len(values),
            "base": comp.get("baseline"), "base_metric": vs_base.get("baseline"),
            "delta_vs_base": vs_base.get("delta"), "delta_ci95": vs_base.get("ci95"),
            "train_seconds": tm.get("train_seconds"), "train_wall_s": tm.get("wall_s"),
            "tokens_trained": tm.get("tokens_trained"), "peak_memory_bytes": tm.get("peak_memory_bytes"),
            "trainable_params": params.get("trainable"), "total_params": params.get("base") or params.get("total"),
            "train_manifest": train.uri if train is not None else None,
        })
    rows.sort(key=lambda r: (r["metric"] is None, -(r["metric"] or 0.0), r["label"]))
    for axis in ("total_params", "train_seconds"):
        for r, on in zip(rows, pareto(rows, axis), strict=True):
            r[f"pareto_{axis}"] = on
    board: dict[str, Any] = {"metric": metric, "title": TITLES.get(metric, metric), "cells": rows, "best": None,
                             "runner_up": None, "verdict": "no cell has a value for this metric", "notes": []}
    scored = [r for r in rows if r["metric"] is not None]
    if scored:
        best = scored[0]
        board["best"] = best["label"]
        verdict = f"Best: {best['label']} ({pct(best['metric'])} {interval(best['ci95'])} {TITLES.get(metric, metric)})"
        if best["delta_vs_base"] is not None:
            verdict += f", {pts(best['delta_vs_base'])} {interval(best['delta_ci95'], points=True)} over its base " \
                       f"{best['base']}"
        if len(scored) > 1:
            runner = scored[1]
            board["runner_up"] = runner["label"]
            shared = [rid for rid in sets[best["label"]]["scores"] if rid in sets[runner["label"]]["scores"]]
            diffs = [sets[best["label"]]["scores"][r][metric] - sets[runner["label"]]["scores"][r][metric]
                     for r in shared if sets[best["label"]]["scores"][r].get(metric) is not None
                     and sets[runner["label"]]["scores"][r].get(metric) is not None]
            paired: dict[str, Any] = {"delta": mean(diffs), "ci95": bootstrap_interval(diffs, resamples, seed + 1),
                      "examples": len(diffs), "cis_overlap": overlap(best["ci95"], runner["ci95"])}
            board["best_vs_runner_up"] = paired
            verdict += (f"; {pts(paired['delta'])} {interval(paired['ci95'], points=True)} over the runner-up "
                        f"{runner['label']} on {paired['examples']} shared examples")
            if paired["cis_overlap"] is not None:
                verdict += ("; their 95% intervals overlap, so the data does not separate them" if paired["cis_overlap"]
                            else "; their 95% intervals do not overlap")
            if len({len(sets[r["label"]]["scores"]) for r in scored}) > 1:
                board["notes"].append("cells were scored on eval sets of different sizes (data variants): each "
                                      "cell's metric is over its own eval set, the best-vs-runner-up difference "
                                      "over the examples both answered")
        board["verdict"] = verdict + "."
    return board


def pareto(rows: list[dict[str, Any]], axis: str) -> list[bool]:
    """Whether each row is on the Pareto front of (metric higher, `axis` lower)."""
    out = []
    for r in rows:
        if r["metric"] is None or r.get(axis) is None:
            out.append(False)
            continue
        dominated = any(o is not r and o["metric"] is not None and o.get(axis) is not None
                        and o["metric"] >= r["metric"] and o[axis] <= r[axis]
                        and (o["metric"] > r["metric"] or o[axis] < r[axis]) for o in rows)
        out.append(not dominated)
    return out


def overlap(a: list[float] | None, b: list[float] | None) -> bool | None:
    if not a or not b:
        return None
    return a[0] <= b[1] and b[0] <= a[1]


def pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def pts(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} pts"


def interval(ci: list[float] | None, points: bool = False) -> str:
    if not ci:
        return ""
    return f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if points else f"[{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"


def human(n: float | None, unit: str = "") -> str:
    if n is None:
        return "n/a"
    for div, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def table(board: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    keys = list(dict.fromkeys(k for r in board["cells"] for k in r["values"]))
    header = ["#", "cell", *keys, board["title"], "95% CI", "Δ vs its base (95% CI)", "train s", "tokens trained",
              "peak memory", "trainable params", "total params", "Pareto (size / cost)"]
    rows = []
    for i, r in enumerate(board["cells"], start=1):
        front = "/".join("yes" if r[f"pareto_{a}"] else "-" for a in ("total_params", "train_seconds"))
        rows.append([str(i), r["label"], *[str(r["values"].get(k, "")) for k in keys], pct(r["metric"]),
                     interval(r["ci95"]), f"{pts(r['delta_vs_base'])} {interval(r['delta_ci95'], points=True)} "
                     f"vs {r['base'] or 'n/a'}", "n/a" if r["train_seconds"] is None else f"{r['train_seconds']:.0f}",
                     human(r["tokens_trained"]), human(r["peak_memory_bytes"], "B"), human(r["trainable_params"]),
                     human(r["total_params"]), front])
    return header, rows


def plot(board: dict[str, Any], axis: str, xlabel: str) -> bytes:
    """The metric against one cost axis; the Pareto front joined and marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    # Points carry the table's rank (#1 is the best); the key beside the axes names each cell in full,
    # so long matrix labels neither overlap each other nor run off the plot.
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.6, bottom=0.12, top=0.9)
    rank = {id(r): i + 1 for i, r in enumerate(board["cells"])}
    pts_ = [r for r in board["cells"] if r["metric"] is not None and r.get(axis) is not None]
    for r in pts_:
        on = r[f"pareto_{axis}"]
        ax.scatter(r[axis], 100 * r["metric"], s=60 if on else 30, marker="o" if on else "x",
                   color="tab:red" if on else "tab:gray", zorder=3)
        ax.annotate(f"#{rank[id(r)]}", (r[axis], 100 * r["metric"]), fontsize=8, xytext=(5, 3),
                    textcoords="offset points")
        if r["ci95"]:
            ax.plot([r[axis]] * 2, [100 * r["ci95"][0], 100 * r["ci95"][1]], color="tab:gray", lw=0.8, zorder=2)
    front = sorted((r for r in pts_ if r[f"pareto_{axis}"]), key=lambda r: r[axis])
    if front:
        ax.plot([r[axis] for r in front], [100 * r["metric"] for r in front], color="tab:red", lw=1,
                label="Pareto front", zorder=2)
        ax.legend(fontsize=8)
    if axis == "total_params" and pts_ and max(r[axis] for r in pts_) > 10 * min(r[axis] for r in pts_):
        ax.set_xscale("log")
        sizes = sorted({r[axis] for r in pts_})
        ax.set_xticks(sizes, [human(x) for x in sizes])  # the bases' own sizes, not crowded decades
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12)
    key = "\n".join(f"#{rank[id(r)]}  {r['label']}" for r in pts_)
    fig.text(0.62, 0.9, key, fontsize=7.5, va="top", family="monospace")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{board['title']}, %")
    ax.set_title(f"{board['title']} vs {xlabel}", fontsize=9)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def render(board: dict[str, Any], plots: dict[str, bytes], template: Any) -> str:
    """leaderboard.md or the self-contained leaderboard.html (its plots embedded as data URIs)."""
    header, rows = table(board)
    uris = {k: "data:image/png;base64," + base64.b64encode(v).decode() for k, v in plots.items()}
    return str(template.render(board=board, header=header, rows=rows, plots=uris))


# --------------------------------------------------------------------------- learning curves: metric vs training rows

# Matrix keys that change only how much of the same split trains (prepare's nested subsets): cells that differ
# in nothing else lie on one learning curve.
DATA_SIZE_KEYS = ("prepare.max_train_rows", "prepare.train_fraction")


def train_rows(trains: dict[str, Any]) -> dict[str, int]:
    """Rows each cell trained on (its train manifest's train split), by cell label."""
    out = {}
    for label, loaded in trains.items():
        rows = ((loaded.manifest.stats or {}).get("train") or {}).get("rows") if loaded is not None else None
        if rows is not None:
            out[label] = int(rows)
    return out


def plot_data_size(board: dict[str, Any], rows: dict[str, int]) -> bytes | None:
    """The metric against training rows, one line per learning curve (cells equal but for DATA_SIZE_KEYS):
    "how much data do I need". None when every cell trained on the same number of rows."""
    pts_ = [r for r in board["cells"] if r["metric"] is not None and r["label"] in rows]
    if len({rows[r["label"]] for r in pts_}) < 2:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves: dict[str, list[dict[str, Any]]] = {}
    for r in pts_:
        key = ", ".join(f"{k}={v}" for k, v in sorted(r["values"].items()) if k not in DATA_SIZE_KEYS)
        curves.setdefault(key or "all cells", []).append(r)
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=100)
    fig.subplots_adjust(left=0.08, right=0.6, bottom=0.12, top=0.9)
    for key, cells in sorted(curves.items()):
        cells.sort(key=lambda r: rows[r["label"]])
        xs = [rows[r["label"]] for r in cells]
        line = ax.plot(xs, [100 * r["metric"] for r in cells], marker="o", lw=1, label=key)[0]
        for r in cells:
            if r["ci95"]:
                ax.plot([rows[r["label"]]] * 2, [100 * r["ci95"][0], 100 * r["ci95"][1]], color=line.get_color(),
                        lw=0.8, alpha=0.6)
    if max(rows[r["label"]] for r in pts_) > 10 * min(rows[r["label"]] for r in pts_):
        ax.set_xscale("log")
    ax.legend(fontsize=7.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
    ax.set_xlabel("training rows")
    ax.set_ylabel(f"{board['title']}, %")
    ax.set_title(f"{board['title']} vs training rows", fontsize=9)
    ax.grid(alpha=0.3)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
