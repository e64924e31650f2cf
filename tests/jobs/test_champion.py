"""Champion against challenger: evaluate's `promote:` gate and `ftjobs promote --evaluation`, end to end on the
store (local and the S3 server).

The predictions manifests are written as infer publishes them, with answers chosen to make the challenger
weaker or stronger than the champion; the models they name are real merge manifests of the tiny model, so
the promotion that follows verifies and records real files.
"""

from __future__ import annotations

import io
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from common import data, registry
from common import manifest as mf
from common.errors import EXIT_GATE
from jobs.cli import main
from tests.jobs.builders import publish_merged

pytestmark = pytest.mark.integration
N = 20
REFERENCE = {f"t{i}": f"route to team {i % 4}" for i in range(N)}


def predictions(prefix: str, model: str, right: int, *, near: bool = False) -> str:
    """An infer manifest of `model` answering the first `right` rows exactly; the rest wrong (or, with `near`,
    almost right: most tokens shared)."""
    rows = []
    for i, (rid, ref) in enumerate(REFERENCE.items()):
        text = ref if i < right else (ref + " asap" if near else "no idea")
        rows.append({"id": rid, "prompt": [{"role": "user", "content": f"ticket {i}"}], "completion": text,
                     "reference": ref, "finish_reason": "stop", "prompt_tokens": 5, "completion_tokens": 4,
                     "model": model, "adapter": None, "sample": 0, "sampling": "{}", "error": None})
    writer = mf.ArtifactWriter(prefix)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=data.PREDICTIONS), buf)
    writer.add_bytes(buf.getvalue(), "predictions/part-00000.parquet", name="predictions/part-00000", rows=N)
    return mf.publish(prefix, mf.build(stage="infer", run_id=mf.new_run_id(), config={"model": model}, inputs=[],
                                       artifacts=writer.artifacts, model={"model": model}))


def evaluate(root: str, run: str, base: str, challenger: str, champion: str | None, *sets: str) -> tuple[int, str, str]:
    out = f"{root}/runs/{run}/evaluate"
    args = ["evaluate", "--predictions", base, "--predictions", challenger, "--label", "base", "--label", "finetuned"]
    if champion:
        args += ["--predictions", champion, "--label", "champion"]
    args += ["--output", out, "--set", "promote.name=tickets", "--set", "promote.metric=exact_match", *sets]
    result = CliRunner().invoke(main, args)
    return result.exit_code, result.output, out


def promote(root: str, run: str, merge: str, evaluation: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["promote", merge, "--evaluation", evaluation, "--root", root,
                                       "--output", f"{root}/runs/{run}/promote"])
    return result.exit_code, result.output


@pytest.fixture
def first(store_root: str, tiny_model: Path) -> dict[str, str]:
    """Run 1: no champion yet; its finetune beats the base and becomes version 1."""
    merge = publish_merged(f"{store_root}/runs/r1/merge", tiny_model).uri
    base = predictions(f"{store_root}/runs/r1/infer-base", "base", right=2)
    tuned = predictions(f"{store_root}/runs/r1/infer-finetuned", merge, right=12)
    code, out, evaluation = evaluate(store_root, "r1", base, tuned, None)
    assert code == 0, out
    verdict = mf.load(evaluation).manifest.metrics["promotion"]
    assert verdict["decision"] == "promote" and verdict["champion"] is None
    assert verdict["checks"][0]["check"] == "beats base (first version)"
    code, out = promote(store_root, "r1", merge, evaluation)
    assert code == 0, out
    assert registry.resolve("models:/tickets", store_root).manifest == merge
    again = promote(store_root, "r1", merge, evaluation)  # the chain's step re-run: already done
    assert again[0] == 0 and len(registry.history("tickets", store_root)) == 1
    return {"merge": merge, "base": base, "tuned": tuned}


def challenger(root: str, tiny_model: Path, run: str, right: int, *, near: bool = False,
               champion_right: int = 12, champion_near: bool = False) -> dict[str, str]:
    """Run `run`: the base, a new finetune and the champion (v1) answering this run's rows."""
    merge = publish_merged(f"{root}/runs/{run}/merge", tiny_model, seed=7, noise=0.01).uri
    champ = registry.resolve("models:/tickets", root).manifest
    return {"merge": merge, "base": predictions(f"{root}/runs/{run}/infer-base", "base", right=2),
            "tuned": predictions(f"{root}/runs/{run}/infer-finetuned", merge, right=right, near=near),
            "champion": predictions(f"{root}/runs/{run}/infer-champion", champ, right=champion_right,
                                    near=champion_near)}


def test_a_weak_challenger_is_refused_and_the_champion_stays(store_root: str, tiny_model: Path,
                                                             first: dict[str, str]) -> None:
    run = challenger(store_root, tiny_model, "r2", right=6)  # beats the base (2), loses to the champion (12)
    code, out, evaluation = evaluate(store_root, "r2", run["base"], run["tuned"], run["champion"])
    assert code == EXIT_GATE
    assert "promotion to models:/tickets refused: vs champion" in out and "short by" in out
    loaded = mf.load(evaluation)
    verdict = loaded.manifest.metrics["promotion"]
    check = verdict["checks"][0]
    assert (verdict["decision"], check["check"], check["passed"]) == ("refuse", "vs champion", False)
    assert check["delta"] == pytest.approx(-0.3) and check["value"] < 0 and check["short_by"] == -check["value"]
    report = mf.load(evaluation).artifact_uri("report.md")
    from common import storage

    text = storage.read_text(report)
    assert "## Champion vs challenger: models:/tickets" in text and "**Verdict: REFUSED**" in text
    assert "| vs champion | exact_match |" in text
    code, out = promote(store_root, "r2", run["merge"], evaluation)
    assert code == EXIT_GATE and "refused the promotion" in out
    current = registry.champion("tickets", store_root)
    assert current is not None and current.version.manifest == first["merge"]
    assert len(registry.versions("tickets", store_root)) == 1


def test_a_strong_challenger_is_promoted(store_root: str, tiny_model: Path, first: dict[str, str]) -> None:
    run = challenger(store_root, tiny_model, "r3", right=20)
    code, out, evaluation = evaluate(store_root, "r3", run["base"], run["tuned"], run["champion"])
    assert code == 0, out
    verdict = mf.load(evaluation).manifest.metrics["promotion"]
    assert verdict["decision"] == "promote" and verdict["champion_model"] == first["merge"]
    assert verdict["checks"][0]["value"] > 0  # the paired lower bound of challenger - champion
    code, out = promote(store_root, "r3", run["merge"], evaluation)
    assert code == 0, out
    v = registry.resolve("models:/tickets", store_root)
    assert (v.version, v.manifest, v.evaluation) == (2, run["merge"], mf.as_manifest_uri(evaluation))
    # A second challenger evaluated against v1 too late: the champion moved, so it is refused.
    late = challenger(store_root, tiny_model, "r4", right=20)
    late["champion"] = predictions(f"{store_root}/runs/r4/infer-champion2", first["merge"], right=12)
    code, _, evaluation = evaluate(store_root, "r4", late["base"], late["tuned"], late["champion"])
    assert code == 0
    code, out = promote(store_root, "r4", late["merge"], evaluation)
    assert code == EXIT_GATE and "champion changed since the evaluation" in out
    assert registry.resolve("models:/tickets", store_root).version == 2


def test_a_guard_regression_blocks_promotion(store_root: str, tiny_model: Path, first: dict[str, str]) -> None:
    # The challenger gets more rows exactly right, but where it is wrong it is far off, while the champion's
    # misses are near: token F1, the guard, drops by more than its margin.
    run = challenger(store_root, tiny_model, "r5", right=14, champion_right=6, champion_near=True)
    code, out, evaluation = evaluate(store_root, "r5", run["base"], run["tuned"], run["champion"],
                                     "--set", "promote.guards={token_f1: 0.05}")
    assert code == EXIT_GATE, out
    verdict = mf.load(evaluation).manifest.metrics["promotion"]
    by_check = {c["check"]: c for c in verdict["checks"]}
    assert by_check["vs champion"]["passed"] and not by_check["guard token_f1"]["passed"]
    assert len(verdict["failed"]) == 1 and "guard token_f1" in verdict["failed"][0]
    assert registry.champion("tickets", store_root).version.manifest == first["merge"]


def test_promote_config_mistakes_exit_2() -> None:
    result = CliRunner().invoke(main, ["evaluate", "--predictions", "a", "--predictions", "b", "--output", "o",
                                       "--set", "promote.name=t", "--set", "promote.metric=bleu"])
    assert result.exit_code == 2 and "promote.metric='bleu' is not a metric this config computes" in result.output
    result = CliRunner().invoke(main, ["evaluate", "--predictions", "a", "--predictions", "b", "--output", "o",
                                       "--set", "promote.name=t", "--set", "promote.guards={typo: 0.1}"])
    assert result.exit_code == 2 and "'typo' is neither a metric" in result.output


@pytest.mark.unit
def test_guard_suites_take_part_in_the_gate_at_their_margins_and_a_missing_one_fails() -> None:
    """Every guard suite's metric is a guard at the suite's margin; `promote.guards` names more or overrides one;
    what was not computed fails."""
    from types import SimpleNamespace

    from jobs.evaluate import champion, comparison

    def scored(right: int) -> dict[str, object]:
        scores = {f"t{i}": {"id": f"t{i}", "exact_match": 1.0 if i < right else 0.0} for i in range(N)}
        rows = {rid: {"completion": str(s["exact_match"])} for rid, s in scores.items()}
        loaded = SimpleNamespace(manifest=SimpleNamespace(model={"model": f"m{right}"}), uri=f"m{right}")
        return {"scores": scores, "rows": rows, "loaded": loaded}

    sets = [{"label": "base", **scored(2)}, {"label": "finetuned", **scored(15)}, {"label": "champion", **scored(10)}]
    summary = {s["label"]: {"exact_match": sum(x["exact_match"] for x in s["scores"].values()) / N} for s in sets}
    comparisons, _ = comparison.compare(sets, ["exact_match"], 200, 0)
    # The shape evaluate.guards writes (docs/guards.md): suite -> label -> metric, and each suite's margin.
    results = {"guards": {"safety": {"finetuned": {"refusal": 0.80, "harness/acc": 0.5},
                                     "champion": {"refusal": 0.95, "harness/acc": 0.5}, "base": {"refusal": 0.9}}},
               "guard_suites": {"safety": {"kind": "prompts", "metrics": ["refusal", "harness/acc"], "margin": 0.2}}}
    gate = champion.Promotion(name="tickets", guards={"safety/refusal": 0.05, "other/acc": 0.1})
    verdict = champion.decide(gate, ["base", "finetuned", "champion"], summary, comparisons, sets, results, 200, 0)
    by_check = {c["check"]: c for c in verdict["checks"]}
    assert by_check["vs champion"]["passed"]
    # promote.guards overrides the suite's margin (0.2) for that metric; the suite's other metric keeps it.
    safety = by_check["guard safety/refusal"]
    assert not safety["passed"] and safety["delta"] == pytest.approx(-0.15) and safety["short_by"] == pytest.approx(0.1)
    assert by_check["guard safety/harness/acc"]["passed"] and by_check["guard safety/harness/acc"]["threshold"] == -0.2
    assert not by_check["guard other/acc"]["passed"] and "no value" in verdict["failed"][1]
    assert verdict["decision"] == "refuse" and verdict["champion_model"] == "m10"
