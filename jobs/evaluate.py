"""evaluate: score predictions against references and compare models side by side.

Reads one or more infer manifests (`--predictions`, repeatable; the FIRST is
the baseline, e.g. the base model, the others are candidates, e.g. finetunes).
Each holds Parquet shards `predictions/part-NNNNN` with at least `id`,
`completion` and `reference` (plus `prompt`, `finish_reason`,
`completion_tokens` when infer wrote them). A row's `error` (e.g. a prompt too
long for the model) is counted and scored as a wrong answer; with `sample`
(sampling.n > 1) each (id, sample) pair is its own example.

Scores every row with exact match, normalized exact match (lower case,
punctuation as spaces, no articles, collapsed spaces), token F1 and ROUGE-L (the
`rouge-score` library), plus the optional checks from config (valid JSON,
JSON schema, regex). Rows without a reference are counted and skipped by the
reference metrics; the checks still apply to them. Sets are compared on the
ids they share, with a paired bootstrap 95% interval on each difference.

Writes under `--output`: `report.md`, `report.html` (self-contained, the chart
embedded), `chart.png`, `metrics.json`, `scores.parquet` (one row per example
and set) and `differences.jsonl` (examples where the sets disagree), then
`manifest.json` last; the manifest's metrics hold every set's numbers.

`--fail-if-worse METRIC` is a CI gate: after publishing, exit 4 when a
candidate does not beat the baseline on METRIC (strictly higher). Exit 4 is
a verdict, not a failure to retry; a re-run of a finished evaluation gives
the same verdict. A set with no value for METRIC (e.g. no row has a
reference) exits 3: there is nothing to compare.

Sets whose rows lack references are named in a warning and in the report. When
no set has a single reference and no checks are configured there is nothing
to score: exit 3, before anything is written.

    ftjobs evaluate --predictions runs/r1/infer-base --predictions runs/r1/infer-finetuned \\
        --output runs/r1/evaluate --fail-if-worse exact_match

Imports neither torch nor transformers: it runs in the prepare image.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import re
import string
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import click
from pydantic import Field, field_validator, model_validator

from common import manifest as mf
from common import storage
from common.config import JobConfig, dump
from common.errors import ConfigError, GateFailed, InputError
from common.runner import config_options, execute

STAGE = "evaluate"
LOG = logging.getLogger("ftjobs.evaluate")
REFERENCE_METRICS = ("exact_match", "normalized_exact_match", "token_f1", "rouge_l")
CHECK_METRICS = ("json_valid", "json_schema_valid", "regex_match")
METRIC_NAMES = {"exact_match": "exact match", "normalized_exact_match": "normalized exact match",
                "token_f1": "token F1", "rouge_l": "ROUGE-L", "json_valid": "valid JSON",
                "json_schema_valid": "matches JSON schema", "regex_match": "matches regex"}
REQUIRED_COLUMNS = ("id", "completion", "reference")


class Checks(JobConfig):
    """Optional checks on each completion; each adds a metric (fraction of rows that pass)."""

    json_valid: bool = Field(False, description="Score whether the completion parses as JSON (json_valid).")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="A JSON schema (inline mapping, or a path/URI of a .json file) the completion must "
                          "satisfy once parsed (json_schema_valid). Implies json_valid.")
    regex: str | None = Field(None, description="A Python regex the whole stripped completion must match "
                                                "(regex_match).")

    @field_validator("regex")
    @classmethod
    def _compiles(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"regex does not compile: {exc}") from None
        return value


class Config(JobConfig):
    """What to compare and what to write."""

    predictions: list[str] = Field(
        description="Infer manifest URIs (or their prefixes). The first is the baseline; the rest are candidates.")
    output: str = Field(description="Output prefix (local path or s3://) for the report and manifest.")
    labels: list[str] | None = Field(
        None, description="A display label per predictions set, same order. Default: the infer manifest's "
                          "model.label, else derived from its model and adapter.")
    fail_if_worse: str | None = Field(
        None, description="Gate: exit 4 after publishing when a candidate does not beat the baseline on this "
                          "metric. Not part of the run's identity, so a finished evaluation can be re-gated.")
    checks: Checks = Field(default_factory=Checks, description="Optional checks on each completion.")
    examples: int = Field(20, ge=0, le=1000, description="How many differing examples the report shows.")
    bootstrap: int = Field(1000, ge=0, le=100_000,
                           description="Paired bootstrap resamples for the 95% interval of each difference "
                                       "(0: off).")
    seed: int = Field(0, description="Seed for the bootstrap.")
    run_id: str | None = Field(None, description="Run id recorded in the manifest. Default: a new one.")

    @field_validator("predictions")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one --predictions manifest")
        if len(set(value)) != len(value):
            raise ValueError("the same predictions manifest is listed twice")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.labels is not None:
            if len(self.labels) != len(self.predictions):
                raise ValueError(f"labels has {len(self.labels)} entries for {len(self.predictions)} predictions "
                                 "sets; give one label per --predictions, in the same order")
            if len(set(self.labels)) != len(self.labels):
                raise ValueError(f"labels must be unique, got {self.labels}")
        if self.fail_if_worse is not None:
            known = self.metric_names()
            if self.fail_if_worse not in known:
                raise ValueError(f"fail_if_worse={self.fail_if_worse!r} is not a metric this config computes; "
                                 f"choose one of {', '.join(known)}")
            if len(self.predictions) < 2:
                raise ValueError("fail_if_worse needs a baseline and at least one candidate: give two or more "
                                 "--predictions")
        return self

    def metric_names(self) -> list[str]:
        names = list(REFERENCE_METRICS)
        if self.checks.json_valid or self.checks.json_schema is not None:
            names.append("json_valid")
        if self.checks.json_schema is not None:
            names.append("json_schema_valid")
        if self.checks.regex is not None:
            names.append("regex_match")
        return names


# --------------------------------------------------------------------------- scoring


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
    import jsonschema

    if isinstance(schema, str):
        try:
            schema = json.loads(storage.read_text(schema))
        except FileNotFoundError:
            raise ConfigError(f"checks.json_schema: {schema} does not exist") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"checks.json_schema: {schema} is not JSON ({exc})") from None
    try:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise ConfigError(f"checks.json_schema is not a valid JSON schema: {exc.message}") from None
    return cls(schema)


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
        out.append(s)
    return out


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


# --------------------------------------------------------------------------- reading


def read_predictions(loaded: mf.Loaded, tmp: Path) -> list[dict[str, Any]]:
    """All rows of an infer manifest's prediction shards, checksum-verified."""
    import pyarrow.parquet as pq

    shards = sorted(loaded.manifest.artifacts_named("predictions/part-"), key=lambda a: a.name)
    if not shards:
        raise InputError(f"{loaded.uri} lists no predictions/part-NNNNN artifacts: is it an infer manifest "
                         "that finished with rows?")
    rows: list[dict[str, Any]] = []
    seen: dict[str, str] = {}
    for i, art in enumerate(shards):
        local = mf.fetch_artifact(loaded, art, tmp / f"{i:05d}.parquet")
        try:
            table = pq.read_table(local)
        except Exception as exc:
            raise InputError(f"{loaded.resolve(art)} is not readable Parquet: {exc}") from None
        missing = [c for c in REQUIRED_COLUMNS if c not in table.column_names]
        if missing:
            raise InputError(f"{loaded.resolve(art)} has no column(s) {', '.join(missing)} (has: "
                             f"{', '.join(table.column_names)}); evaluate needs {', '.join(REQUIRED_COLUMNS)}. "
                             "Re-run infer with this version of ftjobs.")
        for n, row in enumerate(table.to_pylist()):
            if row["id"] is None or not isinstance(row["id"], str):
                raise InputError(f"{loaded.resolve(art)} row {n}: id is {row['id']!r}; every prediction needs a "
                                 "string id")
            # With sampling.n > 1 infer writes one row per sample: each (id, sample) is its own example.
            rid = row["id"] if not row.get("sample") else f"{row['id']}#{row['sample']}"
            row["id"] = rid
            if rid in seen:
                raise InputError(f"{loaded.resolve(art)} row {n}: id {rid!r} already appeared in {seen[rid]}; "
                                 "each example must be predicted once (were shards from two runs mixed?)")
            seen[rid] = loaded.resolve(art)
            rows.append(row)
    return rows


def default_label(loaded: mf.Loaded, index: int) -> str:
    info = loaded.manifest.model
    if info.get("label"):
        return str(info["label"])
    model = str(info.get("model") or info.get("base_model") or info.get("source") or f"set{index}")
    if model.rstrip("/").endswith(".json"):
        # A merged model is named by its merge manifest, whose file name says nothing; the folder
        # infer wrote to (e.g. infer-finetuned) is what the user chose to call this set.
        return storage.parent(storage.normalize(loaded.uri)).rstrip("/").split("/")[-1] or f"set{index}"
    name = model.rstrip("/").split("/")[-1] or model
    return f"{name}+adapter" if info.get("adapter") else name


def unique(labels: list[str]) -> list[str]:
    out: list[str] = []
    for label in labels:
        candidate, n = label, 2
        while candidate in out:
            candidate, n = f"{label}#{n}", n + 1
        out.append(candidate)
    return out


def last_user_message(prompt: Any) -> str:
    if isinstance(prompt, list):
        users = [m.get("content") or "" for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users:
            return users[-1]
        return "\n".join(str(m.get("content") or "") for m in prompt if isinstance(m, dict))
    return "" if prompt is None else str(prompt)


# --------------------------------------------------------------------------- run


def run(config: Config) -> mf.Loaded:
    t0 = time.monotonic()
    loaded = [mf.load(uri, verify="size", expect_stage="infer") for uri in config.predictions]
    inputs = [lo.ref(role="baseline" if i == 0 else f"candidate{i}") for i, lo in enumerate(loaded)]
    recorded = {k: v for k, v in dump(config).items() if k != "fail_if_worse"}
    done = mf.check_output(config.output, stage=STAGE, config=recorded, inputs=inputs)
    if done is not None:
        LOG.info("already done: %s", done.uri)
        gate(done.manifest.metrics, config.fail_if_worse, done.uri)
        return done

    labels = list(config.labels) if config.labels else unique(
        [default_label(lo, i) for i, lo in enumerate(loaded)])
    validator = load_schema(config.checks.json_schema) if config.checks.json_schema is not None else None
    sets = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, lo in enumerate(loaded):
            folder = Path(tmp) / str(i)
            folder.mkdir()
            rows = read_predictions(lo, folder)
            scores = score_rows(rows, config.checks, validator)
            sets.append({"label": labels[i], "loaded": lo, "rows": {r["id"]: r for r in rows},
                         "scores": {s["id"]: s for s in scores}})
    t_score = time.monotonic()

    names = config.metric_names()
    base = sets[0]
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
    notes = reference_notes(summary)
    for note in notes:
        LOG.warning("%s", note)
    if names == list(REFERENCE_METRICS) and not any(v["rows"] - v["rows_without_reference"]
                                                     for v in summary.values()):
        raise InputError(
            "nothing to score: " + "; ".join(f"{label}: 0 of {v['rows']} rows have a reference"
                                             for label, v in summary.items())
            + "; and no checks are configured. Evaluate predictions made from prompts with references (a "
              "prepare manifest, or a 'reference' column in the prompts file), or configure checks "
              "(checks.json_valid, checks.json_schema, checks.regex).")
    comparisons: dict[str, Any] = {}
    differing: list[str] = []
    for i, s in enumerate(sets[1:], start=1):
        shared = [rid for rid in base["scores"] if rid in s["scores"]]
        if not shared:
            raise InputError(f"{s['loaded'].uri} and the baseline {base['loaded'].uri} share no example ids: "
                             "were they predicted from the same prompts?")
        deltas: dict[str, Any] = {}
        for m in names:
            pairs = [(base["scores"][r][m], s["scores"][r][m]) for r in shared
                     if base["scores"][r].get(m) is not None and s["scores"][r].get(m) is not None]
            diffs = [b - a for a, b in pairs]
            deltas[m] = {"baseline": mean([a for a, _ in pairs]), "candidate": mean([b for _, b in pairs]),
                         "delta": mean(diffs), "ci95": bootstrap_interval(diffs, config.bootstrap, config.seed + i),
                         "wins": sum(1 for d in diffs if d > 0), "losses": sum(1 for d in diffs if d < 0),
                         "examples": len(pairs)}
        comparisons[s["label"]] = {"shared_examples": len(shared),
                                   "only_in_baseline": len(base["scores"]) - len(shared),
                                   "only_in_candidate": len(s["scores"]) - len(shared), "metrics": deltas}
        differing += [r for r in shared if r not in differing
                      and base["rows"][r]["completion"] != s["rows"][r]["completion"]]
    t_compare = time.monotonic()

    run_id = config.run_id or mf.new_run_id()
    metrics = {"baseline": base["label"], "sets": summary, "comparisons": comparisons,
               **{f"{m}/{label}": values[m] for label, values in summary.items() for m in names}}
    details = [{"label": s["label"], "manifest": s["loaded"].uri, "model": s["loaded"].manifest.model} for s in sets]
    examples = pick_examples(sets, differing, config.examples, names)
    writer = mf.ArtifactWriter(config.output)
    chart = render_chart(sets, summary, names)
    writer.add_bytes(chart, "chart.png")
    writer.add_bytes(json.dumps({"run_id": run_id, "sets": details, "metrics": metrics}, indent=2,
                                default=str).encode(), "metrics.json")
    writer.add_bytes(scores_parquet(sets, names), "scores.parquet", rows=sum(len(s["scores"]) for s in sets))
    writer.add_bytes("".join(json.dumps(e, ensure_ascii=False) + "\n" for e in examples).encode(),
                     "differences.jsonl", rows=len(examples))
    report = {"run_id": run_id, "sets": details, "summary": summary, "comparisons": comparisons, "names": names,
              "examples": examples, "differing": len(differing), "checks": config.checks, "notes": notes}
    writer.add_bytes(render_markdown(report).encode(), "report.md")
    writer.add_bytes(render_html(report, chart).encode(), "report.html")
    t_write = time.monotonic()

    last_model = loaded[-1].manifest.model
    manifest = mf.build(
        stage=STAGE, run_id=run_id, config=recorded, inputs=inputs, artifacts=writer.artifacts,
        stats={"sets": len(sets), "differing_examples": len(differing),
               "rows": {s["label"]: len(s["rows"]) for s in sets}},
        metrics=metrics,
        timings={"read_and_score_s": t_score - t0, "compare_s": t_compare - t_score, "write_s": t_write - t_compare},
        model={"labels": [s["label"] for s in sets], "sets": details,
               **{k: last_model[k] for k in ("base_model", "template_hash") if k in last_model}},
    )
    uri = mf.publish(config.output, manifest)
    LOG.info("report: %s", storage.join(config.output, "report.html"))
    result = mf.load(uri, verify="none")
    gate(metrics, config.fail_if_worse, uri)
    return result


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


def gate(metrics: dict[str, Any], metric: str | None, uri: str) -> None:
    """--fail-if-worse: every candidate must score strictly higher than the baseline."""
    if metric is None:
        return
    baseline = metrics["baseline"]
    sets = metrics["sets"]
    if metric not in sets[baseline]:
        raise ConfigError(f"fail_if_worse={metric!r}: {uri} did not compute that metric")
    # A metric that was not computed is not 0%: comparing it would pass or fail the gate on nothing.
    for label, values in sets.items():
        if values.get(metric) is None:
            who = f"the baseline {label}" if label == baseline else label
            total = values.get("rows", 0)
            if metric in REFERENCE_METRICS:
                why = f"{total - values.get('rows_without_reference', 0)} of {total} rows have a reference"
                fix = ("Evaluate predictions made from prompts with references (a prepare manifest, or a "
                       "'reference' column in the prompts file), or gate on a check metric.")
            else:
                why, fix = f"{total} rows", "Evaluate predictions that hold rows."
            raise InputError(f"--fail-if-worse {metric}: {who} has no {metric} ({why}); nothing to compare. "
                             f"{fix} Report: {uri}")
    worse = [f"{label} {values[metric]:.4f} <= baseline {baseline} {sets[baseline][metric]:.4f}"
             for label, values in sets.items()
             if label != baseline and values[metric] <= sets[baseline][metric]]
    if worse:
        raise GateFailed(f"--fail-if-worse {metric}: " + "; ".join(worse) + f". Report published: {uri}",
                         manifest=uri)
    LOG.info("gate passed: every candidate beats %s on %s", baseline, metric)


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
        row = sets[0]["rows"][rid]
        out.append({"id": rid, "prompt": last_user_message(row.get("prompt")), "reference": row["reference"],
                    "completions": {s["label"]: s["rows"][rid]["completion"] for s in sets if rid in s["rows"]},
                    "scores": {s["label"]: {m: s["scores"][rid].get(m) for m in names}
                               for s in sets if rid in s["scores"]}})
    return out


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


# --------------------------------------------------------------------------- report


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
        rows.append([METRIC_NAMES[m]] + [fmt_value(m, report["summary"][lab][m]) for lab in labels]
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
    ax.set_xticks(range(len(names)), [METRIC_NAMES[m] for m in names], fontsize=8)
    ax.set_ylabel("score, % (mean over examples)")
    ax.set_ylim(0, 110)
    ax.legend(fontsize=8)
    ax.set_title("evaluation: baseline vs candidates")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


# --------------------------------------------------------------------------- command


@click.command("evaluate")
@click.option("--predictions", "predictions", multiple=True, metavar="INFER_MANIFEST",
              help="Infer manifest URI or prefix. Repeatable; the first is the baseline.")
@click.option("--output", metavar="URI", help="Output prefix for the report and manifest.")
@click.option("--label", "labels", multiple=True, metavar="NAME", help="Display label per --predictions, in order.")
@click.option("--fail-if-worse", "fail_if_worse", metavar="METRIC",
              help="Exit 4 (after publishing) when a candidate does not beat the baseline on METRIC, "
                   "e.g. exact_match.")
@config_options(example="bootstrap=0")
def command(predictions: tuple[str, ...], output: str | None, labels: tuple[str, ...], fail_if_worse: str | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """Score predictions, compare baseline vs candidates, write a Markdown + HTML report.

    Exit 4 means the --fail-if-worse gate failed (the report is still published).
    """
    execute(sys.modules[__name__], config_file, sets,
            {"predictions": predictions, "output": output, "labels": labels, "fail_if_worse": fail_if_worse})

