"""evaluate's judge with a scripted stand-in engine: verdict parsing, the position swap, tie and inconsistent
accounting, unparseable verdicts counted (never guessed), the gate on `judge`, and resume from chunks.

The stand-in has the engine's shape (`generate(prompts) -> [[(text, tokens, finish)]]`, context length,
version, close) and answers from the prompt's text, as a judge model would; the predictions are real
infer-shaped manifests (tests/jobs/test_evaluate.py). The real judge model on vLLM's CPU build runs in
tests/jobs/test_judge_vllm.py.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest

from common import config as cfg
from common import judge as J
from common import manifest as mf
from common import storage
from common.errors import GateFailed, InputError
from jobs.evaluate import job as evaluate
from tests.jobs.test_evaluate import BASE, REFERENCES, TUNED, artifact_at, publish_predictions

pytestmark = pytest.mark.integration


def scripted(decide: Callable[[str], str], fail_after: int | None = None) -> tuple[Any, list[str]]:
    """An engine that answers each prompt with decide(prompt text); fail_after: die (like a killed pod) after
    that many prompts."""
    asked: list[str] = []

    def generate(batch: list[list[int]]) -> list[list[tuple[str, int, str]]]:
        out = []
        for ids in batch:
            if fail_after is not None and len(asked) >= fail_after:
                raise SystemExit(1)
            text = "".join(chr(i) for i in ids)
            asked.append(text)
            out.append([(decide(text), 7, "stop")])
        return out

    return (generate, 10**9, "scripted 0", lambda: None), asked


def section(text: str, name: str) -> str:
    return re.search(rf"\[{re.escape(name)}\]\n(.*?)\n\n", text, re.S).group(1)  # type: ignore[union-attr]


def same(answer: str, reference: str) -> bool:
    return answer.replace(" ", "") == reference.replace(" ", "")


def fair(text: str) -> str:
    """Picks the answer that says what the reference says; tie when both or neither do."""
    ref, a, b = section(text, "Reference answer"), section(text, "Answer A"), section(text, "Answer B")
    winner = "tie" if same(a, ref) == same(b, ref) else "A" if same(a, ref) else "B"
    return f'Sure. {{"reason": "compared with the reference", "winner": "{winner}"}}'


def judge_config(out: str, preds: list[str], **judge: Any) -> evaluate.Config:
    return cfg.validate(evaluate.Config, {"predictions": preds, "output": out, "labels": ["base", "finetuned"],
                                          "bootstrap": 200, "judge": {"model": "scripted-judge", **judge}})


@pytest.fixture
def sets(tmp_path: Any) -> tuple[str, str, str]:
    root = str(tmp_path / "store")
    return (root, publish_predictions(f"{root}/infer-base", BASE), publish_predictions(f"{root}/infer-ft", TUNED))


def test_verdicts_are_read_or_counted_unparseable_never_guessed() -> None:
    assert J.parse_score('```json\n{"reason": "ok", "score": 7}\n```', 10) == J.Verdict(7, "ok")
    assert J.parse_score('I rate it {"score": "9", "reason": "good"} overall', 10).value == 9
    assert J.parse_score('{"score": 11}', 10).problem == "score 11 is off the scale 1..10"
    assert J.parse_score('{"score": 7.5}', 10).problem.startswith("no integer 'score'")  # type: ignore[union-attr]
    assert J.parse_score("Score: 8/10, a good answer", 10).problem == "no JSON object in the completion"
    assert J.parse_score('{"reason": "cut off", "score": ', 10).problem.startswith("the JSON object is not valid")
    # An object nested in a broken one is not taken for the verdict.
    assert not J.parse_score('{"a": [1, {"score": 9}', 10).ok
    assert J.parse_pairwise('{"winner": "b", "reason": "x"}').value == "B"
    assert J.parse_pairwise('{"winner": "TIE"}').value == "tie"
    assert not J.parse_pairwise('{"winner": "both"}').ok and not J.parse_pairwise("A is better").ok


def test_pairwise_asks_both_orders_and_counts_wins_ties_and_inconsistent(sets: tuple[str, str, str]) -> None:
    root, base, tuned = sets
    engine, asked = scripted(fair)
    loaded = evaluate.run(judge_config(f"{root}/eval", [base, tuned], mode="pairwise"), judge_engine=engine)
    m = loaded.manifest
    # 4 shared rows, each asked with the baseline as A and as B.
    assert len(asked) == 8
    ab = [t for t in asked if section(t, "Answer A") == BASE["r1"]]
    ba = [t for t in asked if section(t, "Answer B") == BASE["r1"]]
    assert len(ab) == len(ba) == 1 and section(ab[0], "Answer B") == section(ba[0], "Answer A") == TUNED["r1"]
    counts = m.stats["judge"]["counts"]["finetuned"]
    # r0: both right (tie); r1, r2: only the finetune right (wins); r3: neither (tie).
    assert counts == {"pairs": 4, "wins": 2, "losses": 0, "ties": 2, "inconsistent": 0, "unparseable": 0,
                      "decided_by_errors": 0}
    assert m.metrics["sets"]["finetuned"]["judge"] == 0.75 and m.metrics["sets"]["base"]["judge"] == 0.5
    d = m.metrics["comparisons"]["finetuned"]["metrics"]["judge"]
    assert d["candidate"] == 0.75 and d["delta"] == 0.25 and d["wins"] == 2 and d["examples"] == 4
    lo, hi = d["ci95"]
    assert 0.0 <= lo <= 0.25 <= hi <= 0.5
    verdicts = [json.loads(x) for x in storage.read_text(artifact_at(f"{root}/eval", "judge.jsonl")).splitlines()]
    assert len(verdicts) == 8 and {v["order"] for v in verdicts} == {"ab", "ba"}
    report = storage.read_text(artifact_at(f"{root}/eval", "report.md"))
    assert "## LLM judge (pairwise)" in report and "| finetuned | base | 75.0% [" in report
    assert "compared with the reference" in report  # the judge's reasons for sampled rows
    assert m.stats["judge"]["completions"] == 8 and m.stats["judge"]["announced"]["prompts"] == 8


def test_a_position_biased_judge_wins_nothing_and_is_counted_inconsistent(sets: tuple[str, str, str]) -> None:
    root, base, tuned = sets
    engine, _ = scripted(lambda text: '{"reason": "the first one", "winner": "A"}')
    conf = judge_config(f"{root}/eval", [base, tuned], mode="pairwise")
    m = evaluate.run(conf, judge_engine=engine).manifest
    counts = m.stats["judge"]["counts"]["finetuned"]
    assert counts["inconsistent"] == 4 and counts["wins"] == counts["losses"] == counts["ties"] == 0
    assert m.metrics["sets"]["finetuned"]["judge"] == 0.5  # the swap cancels the bias: no side wins


def test_unparseable_verdicts_leave_their_rows_out_and_the_gate_refuses_to_guess(sets: tuple[str, str, str]) -> None:
    root, base, tuned = sets

    def flaky(text: str) -> str:  # for r1 the judge rambles when the baseline is answer A
        return "Both are fine, I guess." if section(text, "Answer A") == BASE["r1"] else fair(text)

    engine, _ = scripted(flaky)
    m = evaluate.run(judge_config(f"{root}/eval", [base, tuned], mode="pairwise"), judge_engine=engine).manifest
    counts = m.stats["judge"]["counts"]["finetuned"]
    assert counts["unparseable"] == 1 and counts["wins"] == 1 and counts["ties"] == 2
    assert m.metrics["comparisons"]["finetuned"]["metrics"]["judge"]["examples"] == 3
    assert m.metrics["sets"]["finetuned"]["judge"] == pytest.approx(4 / 6)
    report = storage.read_text(artifact_at(f"{root}/eval", "report.md"))
    assert "unparseable: no JSON object in the completion" in report and "Both are fine, I guess." in report

    silent, _ = scripted(lambda text: "no idea")
    with pytest.raises(InputError, match="no judge.*no verdict of the judge could be read"):
        evaluate.run(judge_config(f"{root}/eval-silent", [base, tuned], mode="pairwise").model_copy(
            update={"fail_if_worse": "judge"}), judge_engine=silent)
    done = mf.load(f"{root}/eval-silent", verify="none").manifest
    assert done.stats["judge"]["counts"]["finetuned"]["unparseable"] == 4  # published, counted, not guessed


def test_score_mode_grades_against_the_reference_and_gates_like_any_metric(sets: tuple[str, str, str]) -> None:
    root, base, tuned = sets

    def grader(text: str) -> str:
        ref, answer = section(text, "Reference answer"), section(text, "Answer")
        right = same(answer, ref)
        return json.dumps({"reason": "right" if right else "wrong", "score": 10 if right else 1})

    engine, asked = scripted(grader)
    conf = judge_config(f"{root}/eval", [base, tuned], mode="score", scale=10)
    m = evaluate.run(conf.model_copy(update={"fail_if_worse": "judge"}), judge_engine=engine).manifest
    assert len(asked) == 8 and all(f"on 1..{10}" not in t and "from 1 (worst) to 10 (best)" in t for t in asked)
    assert m.metrics["sets"]["base"]["judge"] == 0.25 and m.metrics["sets"]["finetuned"]["judge"] == 0.75
    assert m.metrics["comparisons"]["finetuned"]["metrics"]["judge"]["delta"] == 0.5
    assert m.stats["judge"]["counts"]["base"] == {"judged": 4, "unparseable": 0, "no_reference": 0,
                                                  "errors_scored_lowest": 0}
    assert "| base | 3.25 | 25.0% | 4 |" in storage.read_text(artifact_at(f"{root}/eval", "report.md"))

    engine, _ = scripted(grader)
    worse = judge_config(f"{root}/eval-worse", [tuned, base], mode="score").model_copy(
        update={"fail_if_worse": "judge", "labels": ["finetuned", "base"]})
    with pytest.raises(GateFailed, match="--fail-if-worse judge: base 0.2500 <= baseline finetuned 0.7500"):
        evaluate.run(worse, judge_engine=engine)


def test_a_killed_judge_resumes_from_its_chunks_asking_each_prompt_once(sets: tuple[str, str, str]) -> None:
    root, base, tuned = sets
    conf = judge_config(f"{root}/eval", [base, tuned], mode="pairwise", chunk_rows=3)
    dying, first = scripted(fair, fail_after=4)  # writes one chunk of 3, dies inside the second
    with pytest.raises(SystemExit):
        evaluate.run(conf, judge_engine=dying)
    assert not storage.exists(mf.manifest_uri(f"{root}/eval"))
    engine, second = scripted(fair)
    m = evaluate.run(conf, judge_engine=engine).manifest
    assert len(second) == 8 - 3 and set(first[:3]).isdisjoint(second)
    assert m.stats["judge"]["generated_by_this_attempt"] == 5 and m.stats["judge"]["completions"] == 8
    assert m.metrics["sets"]["finetuned"]["judge"] == 0.75


def test_pairwise_needs_a_baseline_and_guided_needs_vllm() -> None:
    with pytest.raises(Exception, match="judge mode pairwise compares a baseline with candidates"):
        cfg.validate(evaluate.Config, {"predictions": ["a"], "output": "o",
                                       "judge": {"model": "m", "mode": "pairwise"}})
    with pytest.raises(Exception, match="guided: true needs engine: vllm"):
        cfg.validate(evaluate.Config, {"predictions": ["a"], "output": "o",
                                       "judge": {"model": "m", "guided": True, "engine": "transformers"}})
    conf = cfg.validate(evaluate.Config, {"predictions": ["a", "b"], "output": "o", "fail_if_worse": "judge",
                                          "judge": {"model": "m"}})
    assert "judge" in conf.metric_names() and REFERENCES


def test_pairwise_pairs_each_candidate_with_its_own_baseline(tmp_path: Any) -> None:
    # A sweep's evaluate: each finetuned cell against the base model it came from (baseline_of).
    root = str(tmp_path / "store")
    preds = [publish_predictions(f"{root}/{name}", answers) for name, answers in
             (("base0", BASE), ("base1", TUNED), ("ft0", TUNED), ("ft1", BASE))]
    engine, asked = scripted(fair)
    conf = cfg.validate(evaluate.Config, {
        "predictions": preds, "output": f"{root}/eval", "labels": ["base0", "base1", "ft0", "ft1"],
        "baseline_of": {"ft1": "base1"}, "bootstrap": 100, "judge": {"model": "scripted", "mode": "pairwise"}})
    m = evaluate.run(conf, judge_engine=engine).manifest
    assert len(asked) == 16  # two candidates x four rows x both orders
    assert m.stats["judge"]["counts"]["ft0"]["wins"] == 2 and m.stats["judge"]["counts"]["ft1"]["losses"] == 2
    assert m.metrics["sets"]["ft0"]["judge"] == 0.75 and m.metrics["sets"]["ft1"]["judge"] == 0.25
    assert m.metrics["sets"]["base0"]["judge"] == m.metrics["sets"]["base1"]["judge"] == 0.5
    assert m.metrics["comparisons"]["ft1"]["baseline"] == "base1"
    assert "| ft1 | base1 | 25.0% [" in storage.read_text(artifact_at(f"{root}/eval", "report.md"))
