"""evaluate's champion gate: the finetuned model (the challenger) against the registry's champion.

With a `promote:` section evaluate scores one more predictions set, the champion's answers to the same
held-out prompts (labelled `champion` by default), and decides whether the challenger may be promoted:

- with a champion: the paired bootstrap lower bound of (challenger - champion) on `metric` must be above
  `-margin` (margin 0: the challenger must not be worse with 95% confidence; without resamples, the mean
  difference is used);
- without one (the name's first run): the challenger must beat the base on `metric` (a strictly higher mean,
  the `--fail-if-worse` rule);
- no guard may regress by more than its margin against the champion (or the base on a first run):
  challenger mean - reference mean >= -margin. The guards are every metric of every `evaluate.guards` suite,
  with the suite's own `margin` (read from `metrics["guards"][SUITE][LABEL][METRIC]` and
  `metrics["guard_suites"][SUITE]["margin"]`, the shape docs/guards.md gives), plus `promote.guards`
  `{metric: margin}`: a metric evaluate computed on the main rows (`json_valid`), or `SUITE/METRIC` (which
  overrides that metric's suite margin). A guard with no value for either model fails: never a pass on nothing.

The verdict is published in the manifest's `metrics["promotion"]` (each check: what was compared, the value,
the threshold and by how much it failed) and as a section of the report; a refusal then exits 4 (a verdict,
like `--fail-if-worse`). `ftjobs promote --evaluation` reads the verdict from there and moves the champion.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import Field

from common.config import JobConfig
from common.errors import GateFailed

LOG = logging.getLogger(__name__)


class Promotion(JobConfig):
    """The champion gate: who the challenger must beat, on what, by how much."""

    name: str = Field(description="Registry name the challenger would be promoted under (models:/NAME).")
    metric: str = Field("exact_match", description="The metric challenger and champion are compared on.")
    margin: float = Field(0.0, ge=0.0, description="How much worse (as a share, 0.02 = 2 points) the paired 95% "
                                                   "lower bound of challenger - champion may be: the challenger "
                                                   "is refused when that bound is at or below -margin.")
    guards: dict[str, float] = Field(default_factory=dict, description="Metric -> the most it may drop "
                                     "(share) against the champion (or the base on a first run); a metric "
                                     "evaluate computes, or SUITE/METRIC of an evaluate.guards suite.")
    champion: str = Field("champion", description="Label of the champion's predictions set; absent: no "
                                                  "champion yet (the name's first run).")
    challenger: str | None = Field(None, description="Label of the challenger's set; None: the first candidate "
                                                     "that is not the champion.")


def decide(promotion: Promotion, labels: list[str], summary: dict[str, Any], comparisons: dict[str, Any],
           sets: list[dict[str, Any]], results: dict[str, Any], resamples: int, seed: int) -> dict[str, Any]:
    """The verdict as the manifest keeps it (metrics["promotion"]); `results`: evaluate's metrics so far (the
    guard suites' `guards` and `guard_suites`)."""
    from jobs.evaluate import comparison

    challenger = promotion.challenger or next(lab for lab in labels[1:] if lab != promotion.champion)
    has_champion = promotion.champion in labels and promotion.champion != labels[0]
    reference = promotion.champion if has_champion else labels[0]
    by_label = {s["label"]: s for s in sets}
    checks: list[dict[str, Any]] = []
    if has_champion:
        pair = [s for s in sets if s["label"] in (reference, challenger)]
        pair.sort(key=lambda s: s["label"] != reference)  # the champion is the pair's baseline
        head, _ = comparison.compare(pair, [promotion.metric], resamples, seed)
        d = head[challenger]["metrics"][promotion.metric]
        lower = d["ci95"][0] if d.get("ci95") else d["delta"]
        passed = lower is not None and lower > -promotion.margin
        checks.append({"check": "vs champion", "metric": promotion.metric, "against": reference,
                       "value": lower, "value_is": "paired 95% lower bound of challenger - champion"
                       if d.get("ci95") else "mean difference (no bootstrap)", "delta": d["delta"],
                       "ci95": d.get("ci95"), "threshold": -promotion.margin, "rule": "> threshold",
                       "passed": passed, "short_by": None if passed or lower is None
                       else -promotion.margin - lower, "examples": d["examples"]})
    else:
        d = comparisons.get(challenger, {}).get("metrics", {}).get(promotion.metric, {})
        delta = d.get("delta")
        passed = delta is not None and delta > 0
        checks.append({"check": "beats base (first version)", "metric": promotion.metric, "against": reference,
                       "value": delta, "value_is": "mean difference challenger - base", "delta": delta,
                       "ci95": d.get("ci95"), "threshold": 0.0, "rule": "> threshold", "passed": passed,
                       "short_by": None if passed or delta is None else -delta, "examples": d.get("examples")})
    guards = results.get("guards") or {}
    for metric, margin in guard_margins(promotion, results).items():
        ours, theirs = guard_values(metric, challenger, reference, summary, guards)
        delta = None if ours is None or theirs is None else ours - theirs
        passed = delta is not None and delta >= -margin
        checks.append({"check": f"guard {metric}", "metric": metric, "against": reference, "value": delta,
                       "value_is": "mean challenger - " + ("champion" if has_champion else "base"),
                       "delta": delta, "ci95": None, "threshold": -margin, "rule": ">= threshold",
                       "passed": passed, "short_by": None if passed or delta is None else -margin - delta,
                       "challenger_value": ours, "reference_value": theirs})
    failed = [c for c in checks if not c["passed"]]
    return {"name": promotion.name, "metric": promotion.metric, "margin": promotion.margin,
            "challenger": challenger, "challenger_model": model_of(by_label[challenger]),
            "champion": reference if has_champion else None,
            "champion_model": model_of(by_label[reference]) if has_champion else None,
            "decision": "refuse" if failed else "promote", "checks": checks,
            "failed": [explain(c) for c in failed]}


def guard_margins(promotion: Promotion, results: dict[str, Any]) -> dict[str, float]:
    """Every guard and its margin: each suite's metrics at the suite's margin, then promote.guards."""
    out: dict[str, float] = {}
    for suite, info in (results.get("guard_suites") or {}).items():
        for metric in info.get("metrics") or []:
            out[f"{suite}/{metric}"] = float(info.get("margin") or 0.0)
    return out | dict(promotion.guards)


def guard_values(metric: str, challenger: str, reference: str, summary: dict[str, Any],
                 guards: dict[str, Any]) -> tuple[float | None, float | None]:
    """A guard's value for the challenger and its reference: a main-suite metric, or SUITE/METRIC (an lm-eval
    suite's metric names hold a '/' of their own: `harness/tiny_mc/acc`)."""
    if metric in summary.get(challenger, {}):
        return summary[challenger].get(metric), summary.get(reference, {}).get(metric)
    suite, _, name = metric.partition("/")
    values = guards.get(suite) or {}
    return (values.get(challenger) or {}).get(name), (values.get(reference) or {}).get(name)


def model_of(s: dict[str, Any]) -> str | None:
    """The model a predictions set came from, as its infer manifest names it (the merge or train manifest)."""
    model = s["loaded"].manifest.model
    return model.get("adapter") or model.get("model")


def explain(check: dict[str, Any]) -> str:
    """One line: which check failed and by how much."""
    if check["value"] is None:
        return (f"{check['check']}: no value of {check['metric']} for the challenger or {check['against']} "
                "(not computed: check the metric's name and that the sets have references)")
    return (f"{check['check']}: {check['value_is']} on {check['metric']} is {100 * check['value']:+.1f} pts, "
            f"needs {check['rule'].split()[0]} {100 * check['threshold'] + 0.0:+.1f} pts (short by "
            f"{100 * check['short_by']:.1f} pts)")


def gate(promotion: dict[str, Any] | None, uri: str) -> None:
    """After publishing: exit 4 when the verdict is refuse."""
    if not promotion:
        return
    if promotion["decision"] != "promote":
        raise GateFailed(f"promotion to models:/{promotion['name']} refused: " + "; ".join(promotion["failed"])
                         + f". Report published: {uri}", manifest=uri)
    against = promotion["champion"] or "the base"
    LOG.info("promotion gate passed: %s may become models:/%s (compared with %s on %s)", promotion["challenger"],
             promotion["name"], against, promotion["metric"])


def markdown(promotion: dict[str, Any]) -> str:
    """The report's section: the verdict and every check with its numbers."""
    lines = [f"## Champion vs challenger: models:/{promotion['name']}", "",
             f"Challenger **{promotion['challenger']}** against "
             + (f"the champion **{promotion['champion']}** (`{promotion['champion_model']}`)"
                if promotion["champion"] else "the base (no champion yet: the first version must beat the base)")
             + f" on {promotion['metric']}, margin {100 * promotion['margin']:.1f} pts.", "",
             f"**Verdict: {'PROMOTE' if promotion['decision'] == 'promote' else 'REFUSED'}**", "",
             "| check | metric | value | threshold | passed | short by |", "|---|---|---|---|---|---|"]
    for c in promotion["checks"]:
        value = "n/a" if c["value"] is None else f"{100 * c['value']:+.1f} pts"
        if c.get("ci95"):
            value += f" (Δ {100 * c['delta']:+.1f} [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}])"
        short = "" if c["short_by"] is None else f"{100 * c['short_by']:.1f} pts"
        lines.append(f"| {c['check']} | {c['metric']} | {value} | {c['rule'].split()[0]} "
                     f"{100 * c['threshold'] + 0.0:+.1f} pts | {'yes' if c['passed'] else 'NO'} | {short} |")
    lines += [""] + [f"- {f}" for f in promotion["failed"]]
    return "\n".join(lines).rstrip() + "\n"


def add_to_report(md: str, page: str, promotion: dict[str, Any]) -> tuple[str, str]:
    """report.md and report.html with the section right after the metrics table (before the chart)."""
    md_at, html_at = "![metrics](chart.png)", "<img alt='metrics chart'"
    section, block = markdown(promotion) + "\n", html(promotion)
    md = md.replace(md_at, section + md_at, 1) if md_at in md else md + "\n" + section
    page = page.replace(html_at, block + html_at, 1) if html_at in page else page.replace("</body>", block + "</body>")
    return md, page


def html(promotion: dict[str, Any]) -> str:
    """The same section for report.html (every value escaped)."""
    from html import escape

    rows = []
    for c in promotion["checks"]:
        value = "n/a" if c["value"] is None else f"{100 * c['value']:+.1f} pts"
        short = "" if c["short_by"] is None else f"{100 * c['short_by']:.1f} pts"
        rows.append(f"<tr><td>{escape(c['check'])}</td><td>{escape(c['metric'])}</td><td class='num'>{value}</td>"
                    f"<td class='num'>{escape(c['rule'].split()[0])} {100 * c['threshold'] + 0.0:+.1f} pts</td>"
                    f"<td>{'yes' if c['passed'] else '<b>NO</b>'}</td><td class='num'>{short}</td></tr>")
    against = (f"the champion <b>{escape(promotion['champion'])}</b> (<code>{escape(str(promotion['champion_model']))}"
               "</code>)" if promotion["champion"] else "the base (no champion yet: the first version must beat it)")
    verdict = "PROMOTE" if promotion["decision"] == "promote" else "REFUSED"
    failed = "".join(f"<li>{escape(f)}</li>" for f in promotion["failed"])
    return (f"<h2>Champion vs challenger: models:/{escape(promotion['name'])}</h2>"
            f"<p>Challenger <b>{escape(promotion['challenger'])}</b> against {against} on "
            f"{escape(promotion['metric'])}, margin {100 * promotion['margin']:.1f} pts. <b>Verdict: {verdict}</b></p>"
            "<table><tr><th>check</th><th>metric</th><th>value</th><th>threshold</th><th>passed</th><th>short by</th>"
            "</tr>" + "".join(rows) + "</table>" + (f"<ul>{failed}</ul>" if failed else ""))


def check_config(promotion: Promotion, computed: list[str], labels: list[str]) -> None:
    """Config mistakes, before anything runs: a metric evaluate does not compute, a label that is no set."""
    if promotion.metric not in computed:
        raise ValueError(f"promote.metric={promotion.metric!r} is not a metric this config computes; choose one of "
                         f"{', '.join(computed)}")
    for metric in promotion.guards:
        if metric not in computed and "/" not in metric:
            raise ValueError(f"promote.guards: {metric!r} is neither a metric this config computes "
                             f"({', '.join(computed)}) nor SUITE/METRIC of an evaluate.guards suite")
    if promotion.challenger is not None and labels and promotion.challenger not in labels:
        raise ValueError(f"promote.challenger={promotion.challenger!r} is not one of the labels ({', '.join(labels)})")
    if promotion.challenger is not None and promotion.challenger == promotion.champion:
        raise ValueError("promote.challenger and promote.champion name the same set; they must differ")
