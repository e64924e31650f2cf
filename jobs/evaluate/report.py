"""evaluate's outputs: the report (Markdown and self-contained HTML), the chart, and the per-example scores.

`table_rows` builds the one table both reports show; the layout is in
`templates/` (Jinja; the HTML one autoescaped). The HTML embeds the chart as a
data URI, so the page is a single file with no external requests.
"""

from __future__ import annotations

import base64
import html
import io
from typing import Any

from common.metrics import TITLES


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
    candidates = list(report["comparisons"])
    header = ["metric"] + labels + [f"Δ {c} vs {report['comparisons'][c]['baseline']} (95% CI)" for c in candidates]
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


def md_text(text: Any) -> str:
    """Arbitrary text (a prompt, a label, a note) shown as text in Markdown: `&`, `<`, `>` as entities, so a
    renderer that passes HTML through (GitHub, most viewers) shows `<script>` instead of running or hiding it."""
    return html.escape("" if text is None else str(text), quote=False)


def cell(text: Any, limit: int = 160) -> str:
    """A Markdown table cell: cut to `limit` characters, HTML escaped, pipes escaped, line breaks as <br>."""
    s = "" if text is None else str(text)
    s = s if len(s) <= limit else s[: limit - 1] + "…"
    return md_text(s).replace("|", "\\|").replace("\r", "").replace("\n", "<br>")


def md_code(text: Any) -> str:
    """A value shown as inline code (a URI, a model id): one line, no backtick that could end the span."""
    return "`" + " ".join(("" if text is None else str(text)).replace("`", "'").split()) + "`"


def render_markdown(report: dict[str, Any]) -> str:
    header, rows = table_rows(report)
    return template("report.md.jinja").render(
        **_common(report), header=header, rows=rows, model_keys=("model", "base_model", "adapter", "source"))


def render_html(report: dict[str, Any], chart: bytes) -> str:
    header, rows = table_rows(report)
    return template("report.html.jinja").render(
        **_common(report), header=header, rows=rows,
        chart_uri="data:image/png;base64," + base64.b64encode(chart).decode())


def _common(report: dict[str, Any]) -> dict[str, Any]:
    return {"run_id": report["run_id"], "labels": [s["label"] for s in report["sets"]], "sets": report["sets"],
            "notes": report.get("notes", []), "differing": report["differing"], "examples": report["examples"],
            "judge": report.get("judge"), "summary": report["summary"]}


def template(name: str) -> Any:
    """A template from jobs/evaluate/templates. The HTML one escapes every value it is given (prompts,
    completions and labels are arbitrary text); the Markdown one escapes each value by where it goes: table
    cells with `cell`, prose with `md`, inline code with `code`."""
    import jinja2

    env = jinja2.Environment(loader=jinja2.PackageLoader("jobs.evaluate", "templates"),
                             autoescape=name.endswith(".html.jinja"), undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters["cell"] = cell
    env.filters["md"] = md_text
    env.filters["code"] = md_code
    env.filters["text"] = lambda v: "" if v is None else str(v)
    env.filters["pct"] = lambda v: "n/a" if v is None else f"{100 * v:.1f}%"
    return env.get_template(name)


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
