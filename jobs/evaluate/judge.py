"""evaluate's judge: a model grades the answers, or picks between the baseline's and a candidate's.

`judge:` in evaluate's config (common.judge.JudgeModel plus `mode`):

- `score`: each set's answers are graded against the reference on 1..`scale`; the metric `judge` is the mean
  score as a share of the scale, (score - 1) / (scale - 1), per set, compared between sets like every metric
  (paired bootstrap on the rows both sets had judged). Rows without a reference are skipped (not judged);
  infer's error rows score the lowest without asking, as every other metric counts them wrong.
- `pairwise`: for each candidate, every row it shares with the baseline is asked twice, once with the
  baseline as answer A and once as answer B, so a judge that prefers a position cannot make either side win.
  The candidate's points per order: 1 when it is picked, 0.5 for a tie, 0 when the baseline is; a row's points
  are the mean of the two orders. The metric `judge` is the candidate's mean points: its win rate against the
  baseline, ties counting half (the baseline's is 0.5 by definition), with a bootstrap interval over rows.
  Rows are counted as wins (points > 0.5), losses (< 0.5), ties (both orders tie) and inconsistent (the two
  orders pick opposite answers: points 0.5, the position decided). Where one side has an error row, the other
  wins without asking; both: a tie.

A verdict that cannot be read leaves its row out of the metric (both orders' in pairwise: one order alone
would bring the position bias back) and is counted as unparseable; it is never guessed. The judge runs through
the same engines as infer, in resumable chunks under `<output>/shards/judge/` (common.chunks); every verdict
goes to `judge.jsonl`, and the report shows the counts and the judge's reasons for a sample of rows.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import Field

from common import judge as J
from common import manifest as mf
from common import storage
from jobs.evaluate.comparison import bootstrap_interval, candidates_and_baselines, mean

LOG = logging.getLogger(__name__)
METRIC = "judge"
POINTS = {"ab": {"A": 0.0, "B": 1.0, "tie": 0.5}, "ba": {"A": 1.0, "B": 0.0, "tie": 0.5}}  # the candidate's


class Judge(J.JudgeModel):
    """An LLM judge for evaluate: `score` (against the reference) or `pairwise` (baseline vs candidate)."""

    mode: Literal["score", "pairwise"] = Field("score", description="score: grade each answer against the "
                                               "reference on 1..scale; pairwise: pick between the baseline's and "
                                               "a candidate's answer, asked in both orders.")
    reasons: int = Field(10, ge=0, le=200, description="Rows whose verdict and reason the report shows (a seeded "
                                                       "sample).")


@dataclass
class Judged:
    """What the judge said, ready for the report, the manifest and the comparison."""

    mode: str
    counts: dict[str, dict[str, int]]  # per set (score) or per candidate (pairwise)
    points: dict[str, list[float]] = field(default_factory=dict)  # pairwise: each candidate's per-row points
    baselines: dict[str, str] = field(default_factory=dict)  # pairwise: each candidate's baseline
    mean_scores: dict[str, float | None] = field(default_factory=dict)  # score: the mean on the judge's scale
    samples: list[dict[str, Any]] = field(default_factory=list)
    verdicts: list[dict[str, Any]] = field(default_factory=list)
    cost: dict[str, Any] = field(default_factory=dict)


def requests_for(jc: Judge, sets: list[dict[str, Any]], baseline_of: dict[str, str] | None = None
                 ) -> tuple[list[tuple[str, list[dict[str, str]]]], dict[str, Any]]:
    """Every judge prompt (key, messages), and the rows decided without asking (key -> value)."""
    asks: list[tuple[str, list[dict[str, str]]]] = []
    decided: dict[str, Any] = {}
    limit = jc.max_text_chars
    if jc.mode == "score":
        for i, s in enumerate(sets):
            for rid, row in s["rows"].items():
                if row["reference"] is None:
                    decided[f"{i}|{rid}"] = "no_reference"
                elif row.get("error"):
                    decided[f"{i}|{rid}"] = "error"
                else:
                    asks.append((f"{i}|{rid}", J.score_prompt(jc.rubric, J.conversation(row.get("prompt")),
                                                              row["reference"], row["completion"] or "", jc.scale,
                                                              limit)))
        return asks, decided
    by_label = {s["label"]: s for s in sets}
    pairs = candidates_and_baselines(sets, baseline_of)
    for i, s in enumerate(sets):
        if s["label"] not in pairs:
            continue
        for rid, b in by_label[pairs[s["label"]]]["rows"].items():
            c = s["rows"].get(rid)
            if c is None:
                continue
            if b.get("error") or c.get("error"):
                decided[f"{i}|{rid}"] = 0.5 if (b.get("error") and c.get("error")) else 0.0 if c.get("error") else 1.0
                continue
            question, ref = J.conversation(b.get("prompt")), b["reference"]
            ans_b, ans_c = b["completion"] or "", c["completion"] or ""
            asks.append((f"{i}|{rid}|ab", J.pairwise_prompt(jc.rubric, question, ref, ans_b, ans_c, limit)))
            asks.append((f"{i}|{rid}|ba", J.pairwise_prompt(jc.rubric, question, ref, ans_c, ans_b, limit)))
    return asks, decided


def run(jc: Judge, sets: list[dict[str, Any]], output: str, judge_in: mf.Loaded | None, cache_dir: str | None,
        seed: int, *, baseline_of: dict[str, str] | None = None, engine: Any = None) -> Judged:
    """Ask the judge (resumably), read its verdicts, and put each row's `judge` score into the sets' scores.

    `engine`: a started engine to use instead of loading `jc.model`; prompts reach it as the Unicode code
    points of their one user turn (tests: a scripted stand-in that reads them)."""
    asks, decided = requests_for(jc, sets, baseline_of)
    replies, cost = J.ask(jc, asks, storage.join(output, "shards", "judge"), judge_in, cache_dir, mode=jc.mode,
                          what=f"judge ({jc.mode})", engine=engine)
    judged = (_scores(jc, sets, replies, decided) if jc.mode == "score"
              else _pairwise(jc, sets, replies, decided, baseline_of))
    judged.cost = cost
    judged.samples = _sample(judged.verdicts, jc.reasons, seed)
    return judged


def _read(jc: Judge, reply: dict[str, Any]) -> J.Verdict:
    return J.read_reply(reply, jc.mode, jc.scale)


def _verdict(label: str, rid: str, order: str | None, reply: dict[str, Any], v: J.Verdict) -> dict[str, Any]:
    return {"set": label, "id": rid, "order": order, "value": v.value, "reason": v.reason, "problem": v.problem,
            "verdict": reply["completion"]}


def _scores(jc: Judge, sets: list[dict[str, Any]], replies: dict[str, dict[str, Any]],
            decided: dict[str, Any]) -> Judged:
    counts: dict[str, dict[str, int]] = {}
    verdicts, raw = [], {}
    for i, s in enumerate(sets):
        c = counts[s["label"]] = {"judged": 0, "unparseable": 0, "no_reference": 0, "errors_scored_lowest": 0}
        got = []
        for rid in s["rows"]:
            key, score = f"{i}|{rid}", None
            if decided.get(key) == "no_reference":
                c["no_reference"] += 1
            elif decided.get(key) == "error":
                c["errors_scored_lowest"] += 1
                score = 0.0
            else:
                v = _read(jc, replies[key])
                verdicts.append(_verdict(s["label"], rid, None, replies[key], v))
                if v.ok:
                    c["judged"] += 1
                    got.append(int(v.value))  # type: ignore[arg-type]
                    score = J.normalized(int(v.value), jc.scale)  # type: ignore[arg-type]
                else:
                    c["unparseable"] += 1
            s["scores"][rid][METRIC] = score
        raw[s["label"]] = mean([float(x) for x in got])
    return Judged(mode="score", counts=counts, mean_scores=raw, verdicts=verdicts)


def _pairwise(jc: Judge, sets: list[dict[str, Any]], replies: dict[str, dict[str, Any]],
              decided: dict[str, Any], baseline_of: dict[str, str] | None) -> Judged:
    by_label = {s["label"]: s for s in sets}
    pairs = candidates_and_baselines(sets, baseline_of)
    counts: dict[str, dict[str, int]] = {}
    points: dict[str, list[float]] = {}
    verdicts = []
    for s in sets:  # a baseline has no per-row value (0.5 against itself); a candidate's is set below
        for rid in s["rows"]:
            s["scores"][rid][METRIC] = None
    for i, s in enumerate(sets):
        if s["label"] not in pairs:
            continue
        base = by_label[pairs[s["label"]]]
        c = counts[s["label"]] = {"pairs": 0, "wins": 0, "losses": 0, "ties": 0, "inconsistent": 0,
                                  "unparseable": 0, "decided_by_errors": 0}
        mine = points[s["label"]] = []
        for rid in base["rows"]:
            key = f"{i}|{rid}"
            if rid not in s["rows"]:
                continue
            if key in decided:
                c["decided_by_errors"] += 1
                p: float | None = decided[key]
            else:
                c["pairs"] += 1
                read = {o: _read(jc, replies[f"{key}|{o}"]) for o in ("ab", "ba")}
                for o, v in read.items():
                    verdicts.append(_verdict(s["label"], rid, o, replies[f"{key}|{o}"], v))
                if not all(v.ok for v in read.values()):
                    c["unparseable"] += 1
                    p = None
                else:
                    ab, ba = (POINTS[o][str(read[o].value)] for o in ("ab", "ba"))
                    p = (ab + ba) / 2
                    if {ab, ba} == {0.0, 1.0}:
                        c["inconsistent"] += 1
                    elif ab == ba == 0.5:
                        c["ties"] += 1
                    else:
                        c["wins" if p > 0.5 else "losses"] += 1
            s["scores"][rid][METRIC] = p
            if p is not None:
                mine.append(p)
    return Judged(mode="pairwise", counts=counts, points=points, baselines=pairs, verdicts=verdicts)


def _sample(verdicts: list[dict[str, Any]], k: int, seed: int) -> list[dict[str, Any]]:
    """A seeded sample of the verdicts that could be read, plus up to a few that could not (so they are seen)."""
    ok = [v for v in verdicts if v["problem"] is None]
    bad = [v for v in verdicts if v["problem"] is not None]
    rng = random.Random(seed)
    picked = rng.sample(ok, min(k, len(ok))) + rng.sample(bad, min(max(1, k // 4) if k else 0, len(bad)))
    return sorted(picked, key=lambda v: (v["set"], v["id"], v["order"] or ""))


def amend(judged: Judged, summary: dict[str, Any], comparisons: dict[str, Any], resamples: int, seed: int) -> None:
    """Pairwise: the win rate is relative to the baseline, so its summary is 0.5 and each candidate's
    comparison is its win rate against 0.5, with a bootstrap interval over rows."""
    if judged.mode != "pairwise":
        return
    for base in set(judged.baselines.values()):
        summary[base][METRIC] = 0.5
    for i, (label, pts) in enumerate(judged.points.items(), start=1):
        diffs = [p - 0.5 for p in pts]
        c = judged.counts[label]
        comparisons[label]["metrics"][METRIC] = {
            "baseline": 0.5, "candidate": mean(pts), "delta": mean(diffs),
            "ci95": bootstrap_interval(diffs, resamples, seed + i), "wins": c["wins"], "losses": c["losses"],
            "examples": len(pts)}


def report(jc: Judged | None, config: Judge | None, model: str | None,
           comparisons: dict[str, Any]) -> dict[str, Any] | None:
    """The report's judge section: mode, model, counts, the headline value and interval, sample reasons."""
    if jc is None or config is None:
        return None
    head = {}
    for label, counts in jc.counts.items():
        entry: dict[str, Any] = {"counts": counts}
        if jc.mode == "score":
            entry["mean_score"] = jc.mean_scores.get(label)
        else:
            m = comparisons[label]["metrics"][METRIC]
            entry |= {"baseline": jc.baselines.get(label), "win_rate": m["candidate"],
                      "ci95": [0.5 + x for x in m["ci95"]] if m["ci95"] else None}
        head[label] = entry
    return {"mode": jc.mode, "model": model, "scale": config.scale, "rubric": config.rubric, "by_set": head,
            "samples": jc.samples}
