"""A sweep's leaderboard: every cell of the matrix in one table that says which is best and how small it can be.

Per cell (a finetuned predictions set and the matrix values that made it): the metric with its own
bootstrap 95% interval, the paired difference against the cell's own base model (with its interval),
train wall time, tokens trained, peak memory, trainable and total parameters (from the cell's train
manifest). Cells are sorted by the metric; the best is compared with the runner-up on the examples both
answered (paired bootstrap), and the line says whether their intervals overlap: overlapping intervals
mean the data cannot tell the two apart. Two plots, metric vs model size and metric vs train cost, mark
the Pareto front: the cells no other cell beats on both axes at once. Cells that did not finish (the
sweep passes them as `failed`) get a row each after the ranking: the step, its exit code, the reason.

The page is meant to be read on a laptop (1280 px, no sideways scrolling; tests/jobs/test_leaderboard_page.py
checks it in headless Chromium): the matrix values name each cell (the label column only when they do not),
the cost columns sit under one heading, and numbers are written for people (402k, 824 MB, 3m 17s).
"""

from __future__ import annotations

import base64
import io
from typing import Any

from common.metrics import TITLES
from jobs.evaluate.comparison import bootstrap_interval, mean


def build(sets: dict[str, dict[str, Any]], comparisons: dict[str, Any], cells: list[Any], metric: str,
          trains: dict[str, Any], resamples: int, seed: int, failed: list[dict[str, Any]] | None = None
          ) -> dict[str, Any]:
    """The leaderboard as data (what leaderboard.json holds and both renderings show). `failed`: the cells
    that did not finish ({label, values, step, exit_code, reason}), listed after the ranking, unranked."""
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
                             "runner_up": None, "verdict": "no cell has a value for this metric", "notes": [],
                             "failed": list(failed or [])}
    if board["failed"]:
        board["notes"].append(f"{len(board['failed'])} of {len(rows) + len(board['failed'])} cells did not finish "
                              "and are not ranked: " + "; ".join(
                                  f"{f['label']} ({where(f)})" for f in board["failed"]))
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
    """A count or size for people: three significant digits and a suffix (402k, 1.2M, 824 MB with unit B)."""
    if n is None:
        return "n/a"
    sep = " " if unit else ""
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.3g}{sep}{suffix}{unit}"
    return f"{n:.0f}{sep}{unit}"


def duration(seconds: float | None) -> str:
    """42 s, 3m 17s, 1h 05m."""
    if seconds is None:
        return "n/a"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def whole(ci: list[float] | None, points: bool = False) -> str:
    """A 95% interval in whole percent (or signed points): [79, 92], [+77, +92]."""
    if not ci:
        return ""
    return f"[{100 * ci[0]:+.0f}, {100 * ci[1]:+.0f}]" if points else f"[{100 * ci[0]:.0f}, {100 * ci[1]:.0f}]"


def shown(value: Any) -> str:
    """A matrix value as a table shows it: a list joined with +, an empty one as none."""
    if isinstance(value, list):
        return "+".join(map(shown, value)) or "none"
    return str(value)


def one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 1] + "…"


# The cost columns, grouped under one heading in the HTML page (leaf header -> its name inside the group).
GROUPS = {"train cost": {"train time": "time", "tokens trained": "tokens", "peak memory": "peak memory"},
          "parameters": {"trainable params": "trainable", "total params": "total"}}
FAILED_MARK = "–"  # the rank column of a failed cell


def table(board: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """The rows every rendering shows (leaderboard.md/.html and the sweep's terminal summary): the ranked
    cells, then each failed cell (rank –, the step and exit code in the metric column, the reason in the last).

    The matrix values are the columns that name a cell; the label column is shown only when they do not
    (no values, or two cells with the same values), and the base each cell is compared with only when
    the cells have several and no base_model column says which.
    """
    cells, failed = board["cells"], board.get("failed", [])
    everyone = [*cells, *failed]
    keys = list(dict.fromkeys(k for r in everyone for k in r["values"]))
    combos = [tuple(shown(r["values"].get(k, "")) for k in keys) for r in everyone]
    show_label = not keys or len(set(combos)) < len(combos)
    show_base = len({r["base"] for r in cells}) > 1 and not any(k.split(".")[-1] == "base_model" for k in keys)
    names = [k.split(".")[-1] for k in keys]
    header = ["#", *(["cell"] if show_label else []),
              *[n if names.count(n) == 1 else k for n, k in zip(names, keys, strict=True)],
              f"{board['title']} (95% CI)", "Δ vs its base (95% CI)", *(["base"] if show_base else []),
              *[leaf for group in GROUPS.values() for leaf in group], "Pareto front"]
    rows = []
    for i, (r, combo) in enumerate(zip(cells, combos, strict=False), start=1):
        front = ", ".join(n for a, n in (("total_params", "size"), ("train_seconds", "cost")) if r[f"pareto_{a}"])
        rows.append([str(i), *([r["label"]] if show_label else []), *combo,
                     f"{pct(r['metric'])} {whole(r['ci95'])}".strip(),
                     f"{pts(r['delta_vs_base'])} {whole(r['delta_ci95'], points=True)}".strip(),
                     *([r["base"] or "n/a"] if show_base else []),
                     duration(r["train_seconds"]), human(r["tokens_trained"]), human(r["peak_memory_bytes"], "B"),
                     human(r["trainable_params"]), human(r["total_params"]), front or "–"])
    for f, combo in zip(failed, combos[len(cells):], strict=True):
        # the reason goes last: in a terminal it widens no column that another follows
        row = [FAILED_MARK, *([f["label"]] if show_label else []), *combo, f"failed: {where(f)}"]
        rows.append(row + [""] * (len(header) - len(row) - 1) + [one_line(f["reason"])])
    return header, rows


def where(failed: dict[str, Any]) -> str:
    """The step a failed cell stopped at and its exit code: `merge, exit 3`."""
    code = failed.get("exit_code")
    return f"{failed['step']}, " + ("no exit code" if code is None else f"exit {code}")


def header_rows(header: list[str]) -> list[list[tuple[str, int, int]]]:
    """The HTML page's two header rows as (text, colspan, rowspan): the cost columns under their group."""
    top: list[tuple[str, int, int]] = []
    leaves: list[tuple[str, int, int]] = []
    for h in header:
        group = next((g for g, members in GROUPS.items() if h in members), None)
        if group is None:
            top.append((h, 1, 2))
            continue
        if not top or top[-1][0] != group:
            top.append((group, 0, 1))
        top[-1] = (group, top[-1][1] + 1, 1)
        leaves.append((GROUPS[group][h], 1, 1))
    return [top, leaves]


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
    key = "\n".join(f"#{rank[id(r)]}  {', '.join(map(shown, r['values'].values())) or r['label']}" for r in pts_)
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
    ranked = len(board["cells"])
    reason_at = header.index("Δ vs its base (95% CI)")
    spans = [[(c, 1) for c in row] if i < ranked else  # a failed cell's reason spans the columns after it
             [(c, 1) for c in row[:reason_at]] + [(row[-1], len(row) - reason_at)]
             for i, row in enumerate(rows)]
    return str(template.render(board=board, header=header, heads=header_rows(header), rows=rows, spans=spans,
                               ranked=ranked, numbers=header.index(f"{board['title']} (95% CI)"), plots=uris))


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
