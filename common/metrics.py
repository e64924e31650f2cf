"""The task metrics (evaluate scores with them; pairs and select judge answers with them): their names,
how one row is scored, and the optional checks.

Every metric is declared once, in `METRICS`: the config, the report, the
chart, the gate and the pipeline's headline read its name and title there.
Reference metrics compare the completion with the row's reference (rows
without one skip them); checks look at the completion alone and are computed
only when configured.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from dataclasses import dataclass
from typing import Any

from pydantic import Field, field_validator

from common import data, tools
from common.config import JobConfig, json_schema_validator


@dataclass(frozen=True)
class Metric:
    """One score per row, averaged over a set."""

    name: str  # the key in the manifest's metrics, metrics.json and scores.parquet
    title: str  # how the report and the chart name it
    reference: bool  # True: needs the row's reference; False: a check on the completion alone


METRICS = (
    Metric("exact_match", "exact match", True),
    Metric("normalized_exact_match", "normalized exact match", True),
    Metric("token_f1", "token F1", True),
    Metric("rouge_l", "ROUGE-L", True),
    Metric("json_valid", "valid JSON", False),
    Metric("json_schema_valid", "matches JSON schema", False),
    Metric("regex_match", "matches regex", False),
    Metric("tool_call_valid", "valid tool call", False),
    Metric("judge", "LLM judge", False),  # jobs/evaluate/judge.py: a share of the scale, or a win rate
)
TITLES = {m.name: m.title for m in METRICS}
REFERENCE_METRICS = tuple(m.name for m in METRICS if m.reference)


class Checks(JobConfig):
    """Optional checks on each completion; each adds a metric (fraction of rows that pass)."""

    json_valid: bool = Field(False, description="Score whether the completion parses as JSON (json_valid).")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="A JSON schema (inline mapping, or a path/URI of a .json file) the completion must "
                          "satisfy once parsed (json_schema_valid). Implies json_valid.")
    regex: str | None = Field(None, description="A Python regex the whole stripped completion must match "
                                                "(regex_match).")
    tool_call: bool = Field(False, description="Score the completion's first tool call on rows that offer tools "
                            "(tool_call_valid): it names the reference's function (any offered one when the "
                            "reference is no call) and its arguments satisfy that tool's parameters schema.")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return value


def computed(checks: Checks, judge: bool = False) -> list[str]:
    """The metrics a config computes, in report order: the reference metrics always, a check or the judge when
    configured."""
    configured = {"json_valid": checks.json_valid or checks.json_schema is not None,
                  "json_schema_valid": checks.json_schema is not None,
                  "regex_match": checks.regex is not None, "tool_call_valid": checks.tool_call, "judge": judge}
    return [m.name for m in METRICS if m.reference or configured[m.name]]


def normalize(text: str) -> str:
    """SQuAD-style, except that punctuation becomes a space (so `{"a":1}` equals `{"a": 1}`):
    lower case, no punctuation, no articles, whitespace collapsed."""
    text = "".join(" " if ch in string.punctuation else ch for ch in text.lower())
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def token_f1(prediction: str, reference: str) -> float:
    pred, ref = normalize(prediction).split(), normalize(reference).split()
    if not pred or not ref:
        return float(pred == ref)
    common = sum((Counter(pred) & Counter(ref)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(ref)
    return 2 * precision * recall / (precision + recall)


class _Words:
    """ROUGE tokenizer: the same normalization as F1, so non-ASCII words count too
    (rouge-score's default tokenizer drops every non [a-z0-9] character)."""

    def tokenize(self, text: str) -> list[str]:
        return normalize(text).split()


def load_schema(schema: dict[str, Any] | str) -> Any:
    return json_schema_validator(schema, "checks.json_schema")


def score_rows(rows: list[dict[str, Any]], checks: Checks, validator: Any) -> list[dict[str, Any]]:
    """Per-row scores; reference metrics are None where a row has no reference."""
    from rouge_score import rouge_scorer

    rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Words())
    regex = re.compile(checks.regex) if checks.regex else None
    out = []
    for row in rows:
        completion, reference = row["completion"] or "", row["reference"]
        s: dict[str, Any] = {"id": row["id"]}
        if reference is None:
            s.update(dict.fromkeys(REFERENCE_METRICS))
        else:
            s["exact_match"] = float(completion.strip() == reference.strip())
            s["normalized_exact_match"] = float(normalize(completion) == normalize(reference))
            s["token_f1"] = token_f1(completion, reference)
            s["rouge_l"] = rouge.score(reference, completion)["rougeL"].fmeasure
        if checks.json_valid or validator is not None:
            try:
                parsed, ok = json.loads(completion), True
            except ValueError:
                parsed, ok = None, False
            s["json_valid"] = float(ok)
            if validator is not None:
                s["json_schema_valid"] = float(ok and validator.is_valid(parsed))
        if regex is not None:
            s["regex_match"] = float(regex.fullmatch(completion.strip()) is not None)
        if checks.tool_call:  # None on rows without tools: they have no call to check
            s["tool_call_valid"] = tools.check_call(completion, data.tools_of(row.get("tools")), reference)
        out.append(s)
    return out
