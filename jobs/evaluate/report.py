"""evaluate's outputs: the report (Markdown and self-contained HTML), the chart, and the per-example scores.

`table_rows` builds the one table both reports show; the HTML embeds the
chart as a data URI, so the page is a single file with no external requests.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from jobs.evaluate.metrics import TITLES


def scores_parquet(sets: list[dict[str, Any]], names: list[str]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    records = [{"label": s["label"], **{k: v for k, v in sc.items() if k == "id" or k in names}}
               for s in sets for sc in s["scores"].values()]
    fields = [pa.field("label", pa.string()), pa.field("id", pa.string())] + [pa.field(m, pa.float64())
                                                                              for m in names]
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records, schema=pa.schema(fields)), buf, compression="zstd")
    return buf.getvalue()


def fmt_value(metric: str, value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%" if metric != "mean_completion_tokens" else f"{value:.1f}"


def fmt_delta(d: dict[str, Any]) -> str:
    if d["delta"] is None:
        return "n/a"
    text = f"{100 * d['delta']:+.1f} pts"
    if d.get("ci95"):
        lo, hi = d["ci95"]
        text += f" [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return text


def table_rows(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    labels = [s["label"] for s in report["sets"]]
    candidates = labels[1:]
    header = ["metric"] + labels + [f"Δ {c} vs {labels[0]} (95% CI)" for c in candidates]
    rows = []
    for m in report["names"]:
        rows.append([TITLES[m]] + [fmt_value(m, report["summary"][lab][m]) for lab in labels]
                    + [fmt_delta(report["comparisons"][c]["metrics"][m]) for c in candidates])
    rows.append(["examples"] + [str(report["summary"][lab]["rows"]) for lab in labels] + [""] * len(candidates))
    rows.append(["truncated (hit max tokens)"] + [str(report["summary"][lab]["truncated"]) for lab in labels]
                + [""] * len(candidates))
    rows.append(["errors (no completion, scored wrong)"] + [str(report["summary"][lab]["errors"]) for lab in labels]
                + [""] * len(candidates))
    return header, rows


def cell(text: Any, limit: int = 160) -> str:
    s = "" if text is None else str(text)
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return s.replace("|", "\\|").replace("\n", "<br>")


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    labels = [s["label"] for s in report["sets"]]
    lines = [f"# Evaluation report ({report['run_id']})", "",
             f"Baseline: **{labels[0]}**. Candidates: {', '.join(f'**{c}**' for c in labels[1:]) or 'none'}. "
             "Percentages are the share of examples; Δ is in percentage points with a paired bootstrap 95% "
             "interval.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    if report.get("notes"):
        lines += ["", "**Notes**:", ""] + [f"- {note}." for note in report["notes"]]
    lines += ["", "![metrics](chart.png)", "", "## Models", ""]
    lines += [f"- **{s['label']}**: `{s['manifest']}`" + "".join(
        f", {k}: `{v}`" for k, v in s["model"].items() if k in ("model", "base_model", "adapter", "source") and v)
        for s in report["sets"]]
    if len(labels) > 1:
        lines += ["", f"## Where the models differ ({report['differing']} examples; showing "
                      f"{len(report['examples'])})", "",
                  "| id | prompt | reference | " + " | ".join(labels) + " |", "|" + "---|" * (3 + len(labels))]
        for e in report["examples"]:
            lines.append(f"| {cell(e['id'], 14)} | {cell(e['prompt'])} | {cell(e['reference'])} | "
                         + " | ".join(cell(e["completions"].get(lab)) for lab in labels) + " |")
    return "\n".join(lines) + "\n"


CSS = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
       "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;"
       "text-align:left}th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}"
       "pre{white-space:pre-wrap;margin:0;font-size:0.9em}code{font-size:0.9em}")


def render_html(report: dict[str, Any], chart: bytes) -> str:
    esc = html.escape
    header, rows = table_rows(report)
    labels = [s["label"] for s in report["sets"]]
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>ftjobs evaluation {esc(report['run_id'])}"
             f"</title><style>{CSS}</style></head><body>",
             f"<h1>Evaluation report <small>{esc(report['run_id'])}</small></h1>",
             f"<p>Baseline: <b>{esc(labels[0])}</b>. Δ is in percentage points, with a paired bootstrap 95% "
             "interval.</p>",
             "<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    parts += ["<tr>" + f"<td>{esc(r[0])}</td>" + "".join(f"<td class='num'>{esc(c)}</td>" for c in r[1:]) + "</tr>"
              for r in rows]
    parts.append("</table>")
    parts += [f"<p><b>Note</b>: {esc(note)}.</p>" for note in report.get("notes", [])]
    parts.append(f"<img alt='metrics chart' src='data:image/png;base64,{base64.b64encode(chart).decode()}'>")
    parts.append("<h2>Models</h2><ul>")
    parts += [f"<li><b>{esc(s['label'])}</b>: <code>{esc(s['manifest'])}</code></li>" for s in report["sets"]]
    parts.append("</ul>")
    if len(labels) > 1:
        parts.append(f"<h2>Where the models differ ({report['differing']} examples; showing "
                     f"{len(report['examples'])})</h2><table><tr><th>id</th><th>prompt</th><th>reference</th>"
                     + "".join(f"<th>{esc(lab)}</th>" for lab in labels) + "</tr>")
        for e in report["examples"]:
            parts.append("<tr>" + "".join(f"<td><pre>{esc('' if v is None else str(v))}</pre></td>" for v in
                                          [e["id"][:14], e["prompt"], e["reference"]]
                                          + [e["completions"].get(lab) for lab in labels]) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts)


def render_chart(sets: list[dict[str, Any]], summary: dict[str, Any], names: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = [s["label"] for s in sets]
    width = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.3 * len(names) + 2), 3.6), dpi=100)
    for i, label in enumerate(labels):
        scores = [summary[label][m] for m in names]
        xs = [j + (i - (len(labels) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [100 * (v or 0.0) for v in scores], width, label=label)
        # A metric the set has no value for (no references) is marked n/a, never drawn as a 0 score.
        ax.bar_label(bars, labels=["n/a" if v is None else f"{100 * v:.0f}" for v in scores], fontsize=7)
    ax.set_xticks(range(len(names)), [TITLES[m] for m in names], fontsize=8)
    ax.set_ylabel("score, % (mean over examples)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8)
    ax.set_title("evaluation: baseline vs candidates")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()
