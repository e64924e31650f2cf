"""evaluate: metrics, comparison, report, gate, and bad input, against real infer-shaped manifests.

The predictions manifests are written here exactly as infer publishes them
(Parquet shards `predictions/part-NNNNN`, an infer manifest), on the local
store and the real S3 server.
"""

from __future__ import annotations

import html
import io
import json
import re
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from common import config as cfg
from common import data, metrics, storage
from common import manifest as mf
from common.errors import EXIT_GATE, ConfigError, GateFailed
from jobs.cli import main
from jobs.evaluate import job as evaluate

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]

SCHEMA = data.PREDICTIONS  # what infer writes
REFERENCES = {f"r{i}": json.dumps({"name": n, "age": 20 + i}) for i, n in enumerate(["Ada", "Bo", "Cy", "Di"])}


def publish_predictions(prefix: str, completions: dict[str, str | None], *, label: str | None = None,
                        adapter: str | None = None, shards: int = 2, table: pa.Table | None = None,
                        model_uri: str = "tiny") -> str:
    """An infer manifest with `completions` (id -> text) against REFERENCES, split over `shards` files."""
    ids = list(completions)
    rows = [{"id": rid, "prompt": [{"role": "user", "content": f"Extract the record: {REFERENCES.get(rid)}"}],
             "completion": completions[rid], "reference": REFERENCES.get(rid), "finish_reason": "stop",
             "prompt_tokens": 12, "completion_tokens": 9, "model": "tiny", "adapter": adapter, "sample": 0,
             "sampling": "{}", "error": None} for rid in ids]
    writer = mf.ArtifactWriter(prefix)
    per = max(1, -(-len(rows) // shards))
    parts = [table] if table is not None else [pa.Table.from_pylist(rows[start:start + per], schema=SCHEMA)
                                               for start in range(0, len(rows), per)]
    for n, part in enumerate(parts):
        buf = io.BytesIO()
        pq.write_table(part, buf)
        writer.add_bytes(buf.getvalue(), f"predictions/part-{n:05d}.parquet", name=f"predictions/part-{n:05d}",
                         rows=part.num_rows)
    model = {"model": model_uri, "adapter": adapter} | ({"label": label} if label else {})
    m = mf.build(stage="infer", run_id=mf.new_run_id(), config={"model": "tiny"}, inputs=[],
                 artifacts=writer.artifacts, model=model)
    return mf.publish(prefix, m)


def artifact_at(out: str, name: str) -> str:
    """Where the evaluate manifest at `out` keeps an artifact (in its attempt's folder)."""
    return mf.load(out, verify="none").artifact_uri(name)


BASE = {"r0": '{"name": "Ada", "age": 20}', "r1": "Bo is 21", "r2": "", "r3": "no idea"}
TUNED = {"r0": '{"name": "Ada", "age": 20}', "r1": '{"name": "Bo", "age": 21}', "r2": '{"name":"Cy","age":22}',
         "r3": '{"name": "Di", "age": 99}'}


@pytest.fixture
def two_sets(store_root: str) -> tuple[str, str, str]:
    base = publish_predictions(f"{store_root}/infer-base", BASE, label="base")
    tuned = publish_predictions(f"{store_root}/infer-ft", TUNED, adapter="s3://x/train", label="finetuned")
    return store_root, base, tuned


def test_scores_compares_and_writes_a_self_contained_report(two_sets: tuple[str, str, str]) -> None:
    root, base, tuned = two_sets
    schema = {"type": "object", "required": ["name", "age"], "properties": {"age": {"type": "integer",
                                                                                     "maximum": 90}}}
    conf = evaluate.Config(predictions=[base, tuned], output=f"{root}/eval",
                           checks={"json_valid": True, "json_schema": schema, "regex": r"\{.*\}"})
    loaded = evaluate.run(conf)
    sets = loaded.manifest.metrics["sets"]
    assert loaded.manifest.metrics["baseline"] == "base"
    # base: only r0 exact; tuned: r0, r1 exact; r2 matches once normalized (spacing/punctuation).
    assert sets["base"]["exact_match"] == pytest.approx(0.25)
    assert sets["finetuned"]["exact_match"] == pytest.approx(0.5)
    assert sets["finetuned"]["normalized_exact_match"] == pytest.approx(0.75)
    assert sets["base"]["json_valid"] == pytest.approx(0.25)
    assert sets["finetuned"]["json_valid"] == pytest.approx(1.0)
    assert sets["finetuned"]["json_schema_valid"] == pytest.approx(0.75)  # age 99 > maximum
    assert sets["finetuned"]["regex_match"] == pytest.approx(1.0)
    assert 0 < sets["base"]["token_f1"] < sets["finetuned"]["token_f1"] < 1
    assert 0 < sets["base"]["rouge_l"] < sets["finetuned"]["rouge_l"] < 1
    delta = loaded.manifest.metrics["comparisons"]["finetuned"]["metrics"]["exact_match"]
    assert delta["delta"] == pytest.approx(0.25) and delta["wins"] == 1 and delta["losses"] == 0
    assert loaded.manifest.metrics["exact_match/finetuned"] == pytest.approx(0.5)
    assert {r.stage for r in loaded.manifest.inputs} == {"infer"}

    md = storage.read_text(artifact_at(storage.join(root, "eval"), "report.md"))
    assert "| exact match | 25.0% | 50.0% | +25.0 pts" in md
    assert "Where the models differ (3 examples" in md  # r0 is identical in both sets
    assert "Bo is 21" in md and "no idea" in md
    page = storage.read_text(artifact_at(storage.join(root, "eval"), "report.html"))
    assert "data:image/png;base64,iVBOR" in page and "<script" not in page and "src='http" not in page
    assert storage.read_bytes(artifact_at(storage.join(root, "eval"), "chart.png"))[:4] == b"\x89PNG"
    metrics_json = json.loads(storage.read_text(artifact_at(storage.join(root, "eval"), "metrics.json")))
    assert metrics_json["metrics"]["sets"] == json.loads(json.dumps(sets))
    scores = pq.read_table(io.BytesIO(storage.read_bytes(artifact_at(f"{root}/eval", "scores.parquet"))))
    assert scores.num_rows == 8 and "json_schema_valid" in scores.column_names
    diffs = storage.read_text(artifact_at(storage.join(root, "eval"), "differences.jsonl")).splitlines()
    assert len(diffs) == 3 and {"base", "finetuned"} == set(json.loads(diffs[0])["completions"])
    # the published manifest's artifacts verify in full
    mf.load(loaded.uri, verify="full")


def test_rerun_is_already_done_and_gate_exits_4_with_report_published(tmp_path: Path) -> None:
    root = str(tmp_path)
    base = publish_predictions(f"{root}/infer-base", TUNED, label="base")   # the "base" is the good one here
    tuned = publish_predictions(f"{root}/infer-ft", BASE, label="finetuned")
    out = f"{root}/eval"
    runner = CliRunner()
    args = ["evaluate", "--predictions", base, "--predictions", tuned, "--output", out]
    first = runner.invoke(main, args)
    assert first.exit_code == 0, first.output
    uri = first.output.strip().splitlines()[-1]
    assert uri == mf.manifest_uri(out)
    again = runner.invoke(main, args)
    assert again.exit_code == 0 and again.output.strip().splitlines()[-1] == uri
    # The gate is not part of the run's identity: the finished evaluation is re-gated, not refused.
    gated = runner.invoke(main, args + ["--fail-if-worse", "exact_match"])
    assert gated.exit_code == EXIT_GATE
    assert gated.stdout.strip().splitlines()[-1] == uri  # a verdict: CI still gets the published manifest
    assert storage.exists(artifact_at(out, "report.html"))
    # A gate that passes: swap baseline and candidate into a new output.
    ok = runner.invoke(main, ["evaluate", "--predictions", tuned, "--predictions", base, "--output",
                              f"{root}/eval2", "--fail-if-worse", "token_f1"])
    assert ok.exit_code == 0, ok.output


def test_labels_default_from_model_identity_and_are_unique(tmp_path: Path) -> None:
    a = publish_predictions(f"{tmp_path}/a", BASE)
    b = publish_predictions(f"{tmp_path}/b", BASE)
    c = publish_predictions(f"{tmp_path}/c", TUNED, adapter="s3://x/train")
    loaded = evaluate.run(evaluate.Config(predictions=[a, b, c], output=f"{tmp_path}/eval", bootstrap=0))
    assert loaded.manifest.model["labels"] == ["tiny", "tiny#2", "tiny+adapter"]
    assert loaded.manifest.metrics["comparisons"]["tiny#2"]["metrics"]["exact_match"]["delta"] == 0


def test_a_merged_model_is_labelled_by_its_infer_folder_not_manifest_json(tmp_path: Path) -> None:
    base = publish_predictions(f"{tmp_path}/infer-base", BASE, model_uri="demo/base-model")
    merged = publish_predictions(f"{tmp_path}/infer-finetuned", TUNED,
                                 model_uri=f"{tmp_path}/merge/manifest.json")
    loaded = evaluate.run(evaluate.Config(predictions=[base, merged], output=f"{tmp_path}/eval", bootstrap=0))
    assert loaded.manifest.model["labels"] == ["base-model", "infer-finetuned"]
    assert "Candidates: **infer-finetuned**" in storage.read_text(artifact_at(f"{tmp_path}/eval", "report.md"))


def test_rows_without_reference_are_counted_skipped_and_named(tmp_path: Path,
                                                               caplog: pytest.LogCaptureFixture) -> None:
    base = publish_predictions(f"{tmp_path}/a", BASE | {"x9": "free text"})
    tuned = publish_predictions(f"{tmp_path}/b", TUNED | {"x9": "free text"})
    loaded = evaluate.run(evaluate.Config(predictions=[base, tuned], output=f"{tmp_path}/eval"))
    s = loaded.manifest.metrics["sets"]["tiny"]
    assert s["rows"] == 5 and s["rows_without_reference"] == 1 and s["exact_match"] == pytest.approx(0.25)
    note = "tiny: 1 of 5 rows have no reference; reference metrics use the other 4"
    assert note in caplog.text
    assert note in storage.read_text(artifact_at(f"{tmp_path}/eval", "report.md"))
    assert note in storage.read_text(artifact_at(f"{tmp_path}/eval", "report.html"))


NO_REF = {"x1": '{"a": 1}', "x2": "plain", "x3": "[]"}


def test_no_reference_anywhere_and_no_checks_is_nothing_to_score(tmp_path: Path) -> None:
    a = publish_predictions(f"{tmp_path}/a", NO_REF, label="base")
    b = publish_predictions(f"{tmp_path}/b", NO_REF, label="tuned")
    result = run_cli(["--predictions", a, "--predictions", b, "--output", f"{tmp_path}/e"])
    assert result.exit_code == 3, result.output
    assert "nothing to score: base: 0 of 3 rows have a reference; tuned: 0 of 3" in result.output
    assert "configure checks" in result.output and "Traceback" not in result.output
    assert not storage.list_objects(f"{tmp_path}/e")  # refused before writing anything

    # With a check there is something to score: the run succeeds and says the reference metrics are n/a.
    result = run_cli(["--predictions", a, "--predictions", b, "--output", f"{tmp_path}/e2",
                      "--set", "checks.json_valid=true"])
    assert result.exit_code == 0, result.output
    note = "base: 3 of 3 rows have no reference; reference metrics are n/a"
    assert note in result.output
    assert note in storage.read_text(artifact_at(f"{tmp_path}/e2", "report.md"))


def test_gate_on_a_metric_nobody_computed_exits_3_also_when_already_done(tmp_path: Path) -> None:
    a = publish_predictions(f"{tmp_path}/a", NO_REF, label="base")
    b = publish_predictions(f"{tmp_path}/b", NO_REF, label="tuned")
    args = ["--predictions", a, "--predictions", b, "--output", f"{tmp_path}/e", "--set", "checks.json_valid=true",
            "--fail-if-worse", "exact_match"]
    for attempt in ("fresh", "already done"):
        result = run_cli(args)
        assert result.exit_code == 3, (attempt, result.output)
        assert ("--fail-if-worse exact_match: the baseline base has no exact_match (0 of 3 rows have a reference); "
                "nothing to compare") in result.output, attempt
        assert "Traceback" not in result.output
    assert "already done" in result.output


def test_gate_never_takes_a_missing_metric_for_zero(tmp_path: Path) -> None:
    """One side without references: the gate refuses (exit 3) instead of passing or failing on 0%."""
    unreferenced = pa.Table.from_pylist([{"id": rid, "completion": text, "reference": None}
                                         for rid, text in TUNED.items()])
    with_refs = publish_predictions(f"{tmp_path}/refs", BASE, label="refs")
    without = publish_predictions(f"{tmp_path}/norefs", {}, table=unreferenced, shards=1, label="norefs")
    # Candidate without references: read as 0% it would fail the gate on nothing.
    result = run_cli(["--predictions", with_refs, "--predictions", without, "--output", f"{tmp_path}/e1",
                      "--fail-if-worse", "exact_match"])
    assert result.exit_code == 3, result.output
    assert "norefs has no exact_match (0 of 4 rows have a reference)" in result.output
    # Baseline without references: read as 0% any candidate passed the gate (exit 0).
    result = run_cli(["--predictions", without, "--predictions", with_refs, "--output", f"{tmp_path}/e2",
                      "--fail-if-worse", "exact_match"])
    assert result.exit_code == 3, result.output
    assert "the baseline norefs has no exact_match (0 of 4 rows have a reference)" in result.output


def test_samples_are_separate_examples_and_errors_count_as_wrong(tmp_path: Path) -> None:
    rows = [{"id": "r0", "sample": 0, "completion": REFERENCES["r0"], "reference": REFERENCES["r0"], "error": None},
            {"id": "r0", "sample": 1, "completion": "", "reference": REFERENCES["r0"],
             "error": "prompt has 900 tokens; max_model_len is 512"}]
    a = publish_predictions(f"{tmp_path}/a", {}, table=pa.Table.from_pylist(rows), shards=1)
    s = evaluate.run(evaluate.Config(predictions=[a], output=f"{tmp_path}/eval")).manifest.metrics["sets"]["tiny"]
    assert s["rows"] == 2 and s["errors"] == 1 and s["exact_match"] == pytest.approx(0.5)


HOSTILE = '<script>alert("x")</script> & \'quoted\' | "a"'


def test_hostile_text_is_escaped_in_the_html_report_and_cells_in_the_markdown(tmp_path: Path) -> None:
    """Prompts, completions and labels are arbitrary text: the page shows them, never runs or parses them."""
    row = {"id": "h1", "prompt": [{"role": "user", "content": f"Say {HOSTILE}"}], "completion": HOSTILE,
           "reference": "a & b"}
    base = publish_predictions(f"{tmp_path}/a", {}, table=pa.Table.from_pylist([row]), shards=1,
                               label="<b>base</b>")
    tuned = publish_predictions(f"{tmp_path}/b", {}, table=pa.Table.from_pylist([row | {"completion": "a & b"}]),
                                shards=1, label="tuned")
    evaluate.run(evaluate.Config(predictions=[base, tuned], output=f"{tmp_path}/eval", bootstrap=0))
    page = storage.read_text(artifact_at(f"{tmp_path}/eval", "report.html"))
    assert "<script" not in page and "<b>base</b>" not in page
    assert 'alert("x")' not in page and "'quoted'" not in page and " & " not in page
    shown = html.unescape(re.sub(r"<[^>]+>", "", page))
    assert f"Say {HOSTILE}" in shown and HOSTILE in shown and "Baseline: <b>base</b>." in shown
    md = storage.read_text(artifact_at(f"{tmp_path}/eval", "report.md"))
    escaped = html.escape(HOSTILE, quote=False).replace("|", "\\|")
    assert f"| h1 | Say {escaped} | a &amp; b | {escaped} | a &amp; b |" in md
    # as a viewer that passes HTML through (GitHub) renders it: the text shows, no tag survives
    from markdown_it import MarkdownIt

    rendered = MarkdownIt("commonmark", {"html": True}).enable("table").render(md)
    assert "<script" not in rendered and "<b>base</b>" not in rendered
    shown = html.unescape(re.sub(r"<[^>]+>", "", rendered))
    assert f"Say {HOSTILE}" in shown and "Baseline: <b>base</b>." in shown


def run_cli(args: list[str]) -> Any:
    return CliRunner().invoke(main, ["--log-format", "text", "evaluate", *args])


def test_bad_inputs_exit_3_naming_the_file_and_what_is_wrong(tmp_path: Path) -> None:
    good = publish_predictions(f"{tmp_path}/good", BASE)
    no_ref = pa.table({"id": ["a"], "completion": ["x"]})
    broken = publish_predictions(f"{tmp_path}/broken", {"a": "x"}, table=no_ref, shards=1)
    result = run_cli(["--predictions", good, "--predictions", broken, "--output", f"{tmp_path}/e1"])
    assert result.exit_code == 3
    assert "part-00000.parquet has no column(s) reference" in result.output
    assert not storage.exists(f"{tmp_path}/e1/manifest.json")

    dup = pa.Table.from_pylist([{"id": "a", "completion": "x", "reference": "x"}] * 2)
    dupe = publish_predictions(f"{tmp_path}/dupe", {"a": "x"}, table=dup, shards=1)
    result = run_cli(["--predictions", dupe, "--output", f"{tmp_path}/e2"])
    assert result.exit_code == 3 and "id 'a' already appeared" in result.output

    other = publish_predictions(f"{tmp_path}/other", {"zz": "x"})
    result = run_cli(["--predictions", good, "--predictions", other, "--output", f"{tmp_path}/e3"])
    assert result.exit_code == 3 and "share no example ids" in result.output

    not_infer = mf.publish(f"{tmp_path}/prep", mf.build(stage="prepare", run_id="r", config={}, inputs=[],
                                                        artifacts=[]))
    result = run_cli(["--predictions", not_infer, "--output", f"{tmp_path}/e4"])
    assert result.exit_code == 3 and "is a prepare manifest; expected infer" in result.output

    result = run_cli(["--predictions", f"{tmp_path}/nothing-here", "--output", f"{tmp_path}/e5"])
    assert result.exit_code == 3 and "Run `ftjobs infer`" in result.output


def test_config_mistakes_exit_2_with_the_fix() -> None:
    with pytest.raises(ConfigError, match="labels has 1 entries for 2 predictions"):
        cfg.validate(evaluate.Config, {"predictions": ["a", "b"], "output": "o", "labels": ["x"]})
    with pytest.raises(ConfigError, match="regex_match.*not a metric this config computes|not a metric"):
        cfg.validate(evaluate.Config, {"predictions": ["a", "b"], "output": "o", "fail_if_worse": "regex_match"})
    with pytest.raises(ConfigError, match="needs a baseline and at least one candidate"):
        cfg.validate(evaluate.Config, {"predictions": ["a"], "output": "o", "fail_if_worse": "exact_match"})
    with pytest.raises(ConfigError, match="regex does not compile"):
        cfg.validate(evaluate.Config, {"predictions": ["a"], "output": "o", "checks": {"regex": "("}})
    result = run_cli(["--predictions", "a", "--output", "o", "--set", "checks.jsn_valid=true"])
    assert result.exit_code == 2 and "did you mean 'json_valid'" in result.output


def test_a_chain_of_baselines_compares_dpo_with_sft_and_sft_with_the_base(tmp_path: Path) -> None:
    """baseline_of may name a set that has a baseline of its own (a run that trains SFT then DPO): SFT
    against the base, DPO against SFT, each with its paired interval; circles and a baseline for the first set
    are refused."""
    dpo = dict(TUNED, r1="Bo is 21")  # one answer worse than SFT's
    sets = [publish_predictions(f"{tmp_path}/{name}", rows) for name, rows in
            (("base", BASE), ("sft", TUNED), ("dpo", dpo))]
    out = evaluate.run(cfg.validate(evaluate.Config, {
        "predictions": sets, "labels": ["base", "finetuned", "dpo"], "output": str(tmp_path / "e"),
        "baseline_of": {"dpo": "finetuned", "finetuned": "base"}, "bootstrap": 100}))
    comps = out.manifest.metrics["comparisons"]
    assert {c: comps[c]["baseline"] for c in comps} == {"finetuned": "base", "dpo": "finetuned"}
    assert comps["dpo"]["metrics"]["exact_match"]["delta"] == pytest.approx(-0.25)
    report = storage.read_text(f"{tmp_path}/e/{next(a.path for a in out.manifest.artifacts if a.name == 'report.md')}")
    assert "Δ dpo vs finetuned (95% CI)" in report and "Δ finetuned vs base (95% CI)" in report
    base = {"predictions": ["a", "b", "c"], "output": "o", "labels": ["x", "y", "z"]}
    with pytest.raises(ConfigError, match="round in a circle"):
        cfg.validate(evaluate.Config, {**base, "baseline_of": {"y": "z", "z": "y"}})
    with pytest.raises(ConfigError, match="the first set is every other set's baseline"):
        cfg.validate(evaluate.Config, {**base, "baseline_of": {"x": "y"}})


def test_metric_functions() -> None:
    assert metrics.normalize("The  Cat, sat!") == "cat sat"
    assert metrics.token_f1("the cat sat", "a cat sat down") == pytest.approx(2 * (1 * 2 / 3) / (1 + 2 / 3))
    assert metrics.token_f1("", "") == 1.0 and metrics.token_f1("x", "") == 0.0
    scores = metrics.score_rows([{"id": "1", "completion": "Grüße aus Köln", "reference": "grüße aus köln"}],
                                metrics.Checks(), None)[0]
    assert scores["exact_match"] == 0.0 and scores["normalized_exact_match"] == 1.0
    assert scores["rouge_l"] == 1.0  # non-ASCII words count (rouge-score's own tokenizer would drop them)


def test_shipped_config_validates() -> None:
    conf = cfg.load_config(evaluate.Config, file=str(REPO / "configs" / "evaluate.yaml"),
                           flags={"predictions": ("a", "b"), "output": "o"})
    assert conf.checks.json_schema is not None and conf.fail_if_worse == "exact_match"


def test_evaluate_runs_without_torch(tmp_path: Path) -> None:
    """The prepare image, which also runs evaluate, has no torch: a whole run must not import it."""
    import subprocess
    import sys

    base = publish_predictions(f"{tmp_path}/a", BASE)
    tuned = publish_predictions(f"{tmp_path}/b", TUNED)
    code = ("import sys; from jobs.evaluate import job as evaluate; "
            f"evaluate.run(evaluate.Config(predictions=[{base!r}, {tuned!r}], output={str(tmp_path / 'e')!r}, "
            "checks={'json_valid': True})); "
            "bad = [m for m in ('torch', 'transformers') if m in sys.modules]; assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def publish_train(prefix: str, *, seconds: float, base_params: int) -> str:
    """A train manifest carrying what the leaderboard reads (cost and size), as `ftjobs train` records it."""
    m = mf.build(stage="train", run_id=mf.new_run_id(), config={"at": prefix}, inputs=[], artifacts=[],
                 metrics={"train_seconds": seconds, "wall_s": seconds + 5, "tokens_trained": 1000,
                          "peak_memory_bytes": 2**28},
                 stats={"params": {"trainable": 1000, "total": base_params // 2, "base": base_params}},
                 model={"base_model": prefix, "template_hash": "h", "lora": {"r": 8, "alpha": 16}})
    return mf.publish(prefix, m)


def test_a_sweep_leaderboard_ranks_cells_against_their_own_base(tmp_path: Path) -> None:
    root = str(tmp_path)
    small = publish_predictions(f"{root}/base-s", BASE, label="base-s")
    large = publish_predictions(f"{root}/base-l", {**BASE, "r2": '{"name": "Cy", "age": 22}'}, label="base-l")
    cells = {  # label: (completions, base, train seconds, model size)
        "s-lr1": (dict(BASE, r1='{"name": "Bo", "age": 21}'), "base-s", 10.0, 1_000),
        "s-lr2": (TUNED, "base-s", 20.0, 1_000),
        "l-lr1": (dict(TUNED, r3='{"name": "Di", "age": 23}'), "base-l", 80.0, 9_000),
    }
    preds, trains = [small, large], {}
    for label, (completions, _, seconds, size) in cells.items():
        preds.append(publish_predictions(f"{root}/{label}", completions, label=label))
        trains[label] = publish_train(f"{root}/train-{label}", seconds=seconds, base_params=size)
    conf = evaluate.Config(
        predictions=preds, labels=["base-s", "base-l", *cells], output=f"{root}/eval", fail_if_worse="exact_match",
        baseline_of={label: c[1] for label, c in cells.items()},
        leaderboard={"metric": "exact_match", "cells": [
            {"label": label, "values": {"base_model": c[1], "lr": label[-1]}, "train": trains[label]}
            for label, c in cells.items()]})
    loaded = evaluate.run(conf)  # the best cell beats its own base: the gate passes
    m = loaded.manifest
    assert {c: v["baseline"] for c, v in m.metrics["comparisons"].items()} == {
        "s-lr1": "base-s", "s-lr2": "base-s", "l-lr1": "base-l"}
    assert {r.role for r in m.inputs} >= {"train:s-lr1", "train:s-lr2", "train:l-lr1"}
    board = json.loads(storage.read_text(loaded.artifact_uri("leaderboard.json")))
    ranked = [(c["label"], c["metric"]) for c in board["cells"]]
    assert ranked == [("l-lr1", 0.75), ("s-lr1", 0.5), ("s-lr2", 0.5)]  # ties by label
    best = board["cells"][0]
    assert best["base"] == "base-l" and best["delta_vs_base"] == pytest.approx(0.25)  # vs its own base (50%)
    assert best["total_params"] == 9_000 and best["train_seconds"] == 80.0
    # l-lr1 is the best at any size; s-lr1 and s-lr2 tie at the small size, but s-lr1 costs less to train
    assert [(c["label"], c["pareto_total_params"], c["pareto_train_seconds"]) for c in board["cells"]] == [
        ("l-lr1", True, True), ("s-lr1", True, True), ("s-lr2", True, False)]
    assert board["best"] == "l-lr1" and board["runner_up"] == "s-lr1"
    paired = board["best_vs_runner_up"]
    assert paired["delta"] == pytest.approx(0.25) and paired["examples"] == 4 and paired["cis_overlap"] is True
    assert "Best: l-lr1 (75.0%" in board["verdict"] and "over the runner-up s-lr1" in board["verdict"]
    assert "intervals overlap, so the data does not separate them" in board["verdict"]
    page = storage.read_text(loaded.artifact_uri("leaderboard.html"))
    assert page.count("data:image/png;base64,") == 2 and "http" not in page
    md = storage.read_text(loaded.artifact_uri("leaderboard.md"))
    assert "| 1 | base-l | 1 | 75.0% [" in md  # the matrix values name the cell: no label column repeating them
    assert m.metrics["leaderboard"]["best"] == "l-lr1"


def test_a_sweep_leaderboard_lists_the_cells_that_failed_unranked(tmp_path: Path) -> None:
    root = str(tmp_path)
    base = publish_predictions(f"{root}/base", BASE, label="base")
    cell = publish_predictions(f"{root}/cell", TUNED, label="lr=1")
    failed = {"label": "lr=2", "values": {"lr": 2}, "step": "merge", "exit_code": 3,
              "reason": "merged model failed 1 check(s); first: the merged model departs from base + adapter\n..."}
    conf = evaluate.Config(predictions=[base, cell], labels=["base", "lr=1"], output=f"{root}/eval",
                           leaderboard={"metric": "exact_match", "cells": [{"label": "lr=1", "values": {"lr": 1}}],
                                        "failed": [failed]})
    loaded = evaluate.run(conf)
    board = json.loads(storage.read_text(loaded.artifact_uri("leaderboard.json")))
    assert [c["label"] for c in board["cells"]] == ["lr=1"] and board["failed"] == [failed]
    assert loaded.manifest.metrics["leaderboard"]["failed"] == [{"label": "lr=2", "step": "merge", "exit_code": 3}]
    md = storage.read_text(loaded.artifact_uri("leaderboard.md"))
    assert "| – | 2 | failed: merge, exit 3 |" in md
    assert "| merged model failed 1 check(s); first: the merged model departs from base + adapter ... |" in md
    assert "1 of 2 cells did not finish and are not ranked: lr=2 (merge, exit 3)" in md
    page = storage.read_text(loaded.artifact_uri("leaderboard.html"))
    assert "class='failed'" in page and "failed: merge, exit 3" in page
    with pytest.raises(ValueError, match=r"leaderboard cells \['lr=1'\] are listed as finished and as failed"):
        evaluate.Config(predictions=[base, cell], labels=["base", "lr=1"], output=f"{root}/eval2",
                        leaderboard={"metric": "exact_match", "cells": [{"label": "lr=1"}],
                                     "failed": [{**failed, "label": "lr=1"}]})


def test_the_sweep_gate_fails_when_the_best_cell_does_not_beat_its_base(tmp_path: Path) -> None:
    root = str(tmp_path)
    base = publish_predictions(f"{root}/base", TUNED, label="base")
    cell = publish_predictions(f"{root}/cell", BASE, label="cell")
    conf = evaluate.Config(predictions=[base, cell], labels=["base", "cell"], output=f"{root}/eval",
                           fail_if_worse="exact_match", leaderboard={"metric": "exact_match",
                                                                     "cells": [{"label": "cell"}]})
    with pytest.raises(GateFailed, match="the best cell did not beat its base: cell 0.2500 <= baseline base 0.5000"):
        evaluate.run(conf)
