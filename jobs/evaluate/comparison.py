"""evaluate's comparison: each set's summary, the paired differences against the baseline, and the gate.

A set is one infer manifest's rows and their scores, keyed by example id
(`{"label", "loaded", "rows", "scores"}`). Sets are compared on the ids they
share; each difference gets a paired bootstrap 95% interval. The
`--fail-if-worse` gate reads only the published metrics, so a finished
evaluation can be re-gated.
"""

from __future__ import annotations

import logging
from collections import Counter
from typing import Any

from common.errors import ConfigError, GateFailed, InputError
from common.metrics import REFERENCE_METRICS

LOG = logging.getLogger(__name__)


def summarize(sets: list[dict[str, Any]], names: list[str]) -> dict[str, Any]:
    """Per set: the mean of each metric over the rows that have it, and the row counts the report shows."""
    summary: dict[str, Any] = {}
    for s in sets:
        scores = list(s["scores"].values())
        rows = list(s["rows"].values())
        finish = Counter(str(r.get("finish_reason")) for r in rows if r.get("finish_reason") is not None)
        tokens = [r["completion_tokens"] for r in rows if r.get("completion_tokens") is not None]
        summary[s["label"]] = {
            **{m: mean([x[m] for x in scores if x.get(m) is not None]) for m in names},
            "rows": len(rows),
            "rows_without_reference": sum(1 for r in rows if r["reference"] is None),
            "truncated": finish.get("length", 0),
            "errors": sum(1 for r in rows if r.get("error")),
            "mean_completion_tokens": mean([float(t) for t in tokens]),
        }
    return summary


def reference_notes(summary: dict[str, Any]) -> list[str]:
    """One line per set whose rows lack references: the reference metrics skip those rows."""
    notes = []
    for label, values in summary.items():
        missing, total = values["rows_without_reference"], values["rows"]
        if missing and missing == total:
            notes.append(f"{label}: {missing} of {total} rows have no reference; reference metrics are n/a")
        elif missing:
            notes.append(f"{label}: {missing} of {total} rows have no reference; reference metrics use the other "
                         f"{total - missing}")
    return notes


def compare(sets: list[dict[str, Any]], names: list[str], resamples: int, seed: int,
            baseline_of: dict[str, str] | None = None) -> tuple[dict[str, Any], list[str]]:
    """Each candidate against its baseline on their shared ids, and the ids whose completions differ.

    The baseline is the first set, unless `baseline_of` names one per candidate (a sweep: each finetuned
    cell against the base model it was trained from). Sets that are some candidate's baseline are not
    candidates themselves.
    """
    by_label = {s["label"]: s for s in sets}
    baselines = candidates_and_baselines(sets, baseline_of)
    comparisons: dict[str, Any] = {}
    differing: list[str] = []
    for i, s in enumerate(sets):
        if s["label"] not in baselines:
            continue
        base = by_label[baselines[s["label"]]]
        shared = [rid for rid in base["scores"] if rid in s["scores"]]
        if not shared:
            raise InputError(f"{s['loaded'].uri} and its baseline {base['loaded'].uri} share no example ids: "
                             "were they predicted from the same prompts?")
        deltas: dict[str, Any] = {}
        for m in names:
            pairs = [(base["scores"][r][m], s["scores"][r][m]) for r in shared
                     if base["scores"][r].get(m) is not None and s["scores"][r].get(m) is not None]
            diffs = [b - a for a, b in pairs]
            deltas[m] = {"baseline": mean([a for a, _ in pairs]), "candidate": mean([b for _, b in pairs]),
                         "delta": mean(diffs), "ci95": bootstrap_interval(diffs, resamples, seed + i),
                         "wins": sum(1 for d in diffs if d > 0), "losses": sum(1 for d in diffs if d < 0),
                         "examples": len(pairs)}
        comparisons[s["label"]] = {"baseline": base["label"], "shared_examples": len(shared),
                                   "only_in_baseline": len(base["scores"]) - len(shared),
                                   "only_in_candidate": len(s["scores"]) - len(shared), "metrics": deltas}
        seen = set(differing)
        differing += [r for r in shared if r not in seen
                      and base["rows"][r]["completion"] != s["rows"][r]["completion"]]
    return comparisons, differing


def candidates_and_baselines(sets: list[dict[str, Any]], baseline_of: dict[str, str] | None) -> dict[str, str]:
    """candidate label -> its baseline's label. Every set but the first is a candidate, against the first
    unless baseline_of names its own; a set that baseline_of names only as a baseline (a sweep's base models)
    is not a candidate itself, one it also gives a baseline is (SFT against the base, DPO against SFT)."""
    first = sets[0]["label"]
    explicit = dict(baseline_of or {})
    bases = set(explicit.values())
    return {s["label"]: explicit.get(s["label"], first) for s in sets
            if s["label"] != first and (s["label"] in explicit or s["label"] not in bases)}


def mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def bootstrap_interval(diffs: list[float], resamples: int, seed: int) -> list[float] | None:
    """95% interval of the mean paired difference, by resampling examples."""
    if not diffs or resamples == 0:
        return None
    import numpy as np

    rng = np.random.default_rng(seed)
    d = np.asarray(diffs, dtype=np.float64)
    means = d[rng.integers(0, len(d), size=(resamples, len(d)))].mean(axis=1)
    return [float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))]


def pick_examples(sets: list[dict[str, Any]], ids: list[str], limit: int, names: list[str]) -> list[dict[str, Any]]:
    """Differing examples, taken in turn from each outcome (which sets got it right), so the report
    shows where the candidate still fails as well as where it improved; within one outcome, the
    examples whose scores differ most come first."""
    def spread(rid: str) -> float:
        values = [s["scores"][rid].get("token_f1") or 0.0 for s in sets if rid in s["scores"]]
        return max(values) - min(values)

    groups: dict[tuple[Any, ...], list[str]] = {}
    for rid in sorted(ids, key=lambda r: (-spread(r), r)):
        groups.setdefault(tuple(s["scores"].get(rid, {}).get("exact_match") for s in sets), []).append(rid)
    picked: list[str] = []
    while len(picked) < min(limit, len(ids)):
        for group in groups.values():
            if group and len(picked) < limit:
                picked.append(group.pop(0))
    out = []
    for rid in picked:
        row = next(s["rows"][rid] for s in sets if rid in s["rows"])  # sets of data variants differ in ids
        out.append({"id": rid, "prompt": last_user_message(row.get("prompt")), "reference": row["reference"],
                    "completions": {s["label"]: s["rows"][rid]["completion"] for s in sets if rid in s["rows"]},
                    "scores": {s["label"]: {m: s["scores"][rid].get(m) for m in names}
                               for s in sets if rid in s["scores"]}})
    return out


def last_user_message(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return users[-1]
        return "\n".join(str(m.get("content") or "") for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


def gate(metrics: dict[str, Any], metric: str | None, uri: str) -> None:
    """--fail-if-worse: every candidate must score strictly higher than its baseline; with a leaderboard
    (a sweep), the best cell must beat its own base."""
    if metric is None:
        return
    sets = metrics["sets"]
    comparisons = metrics.get("comparisons", {})
    if metric not in sets[metrics["baseline"]]:
        raise ConfigError(f"fail_if_worse={metric!r}: {uri} did not compute that metric")
    judged = list(comparisons)
    board = metrics.get("leaderboard")
    if board is not None:
        if board.get("metric") != metric:
            raise ConfigError(f"fail_if_worse={metric!r}: the leaderboard in {uri} ranks cells by "
                              f"{board.get('metric')!r}; gate on that metric, or rank by {metric!r}")
        judged = [board["best"]] if board.get("best") else judged
    # A metric that was not computed is not 0%: comparing it would pass or fail the gate on nothing.
    for label in dict.fromkeys([*(comparisons[c]["baseline"] for c in judged), *judged]):
        values = sets[label]
        if values.get(metric) is None:
            who = f"the baseline {label}" if label not in comparisons else label
            total = values.get("rows", 0)
            if metric in REFERENCE_METRICS:
                why = f"{total - values.get('rows_without_reference', 0)} of {total} rows have a reference"
                fix = ("Evaluate predictions made from prompts with references (a prepare manifest, or a "
                       "'reference' column in the prompts file), or gate on a check metric.")
            elif metric == "judge":
                why = "no verdict of the judge could be read for any of its rows, or none was judged"
                fix = ("See the report's judge section: unparseable verdicts are counted, never guessed. Use a "
                       "stronger judge, or judge.guided: true (vLLM) to constrain its answers.")
            else:
                why, fix = f"{total} rows", "Evaluate predictions that hold rows."
            raise InputError(f"--fail-if-worse {metric}: {who} has no {metric} ({why}); nothing to compare. "
                             f"{fix} Report: {uri}")
    worse = [f"{label} {sets[label][metric]:.4f} <= baseline {comparisons[label]['baseline']} "
             f"{sets[comparisons[label]['baseline']][metric]:.4f}" for label in judged
             if sets[label][metric] <= sets[comparisons[label]["baseline"]][metric]]
    if worse:
        what = "the best cell did not beat its base: " if board is not None else ""
        raise GateFailed(f"--fail-if-worse {metric}: {what}" + "; ".join(worse) + f". Report published: {uri}",
                         manifest=uri)
    LOG.info("gate passed: %s beats %s on %s", "the best cell" if board is not None else "every candidate",
             "its base" if board is not None else "its baseline", metric)
