"""Guard evaluations on the tiny real model: a prompts suite and lm-evaluation-harness tasks (local YAML + JSONL,
offline), scored for the base and a finetune through ftjobs' engine, into the manifest and the report.

The suites are made so the base model is right on every row: their references (and the multiple-choice labels)
are what the base model itself answers (its greedy text, its most likely choice). Any finetune that changes
the model can then only lose on them, so a regression shows as a negative delta: the case a guard exists for.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from common import manifest as mf
from common import storage
from common.errors import ConfigError
from jobs.evaluate import guards
from jobs.evaluate import job as evaluate
from jobs.evaluate.lm_harness import EngineLM
from jobs.infer import job as infer
from tests.jobs.builders import publish_adapter

pytestmark = pytest.mark.integration

QUESTIONS = ["reverse: red cat", "the sun is", "one two three", "what is the moon", "copy: blue dog",
             "hello world", "list the star", "add one and two"]
CHOICES = [["yes", "no"], ["red", "blue"], ["cat", "dog"], ["one", "two"], ["sun", "moon"], ["tree", "car"]]
ENGINE = {"engine": "transformers", "max_tokens": 6}
GEN_TASK = """task: tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_gen.jsonl
test_split: test
output_type: generate_until
doc_to_text: "{{question}}"
doc_to_target: "{{answer}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 6
metric_list:
  - metric: exact_match
"""
MC_TASK = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: tiny_mc.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{question}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{label}}"
metric_list:
  - metric: acc
"""


@pytest.fixture(scope="module")
def world(tiny_model, tmp_path_factory, s3_endpoint) -> dict[str, Any]:
    """Base and finetuned predictions (infer, transformers engine) and guard suites the base gets right."""
    import uuid

    root = f"s3://ftjobs-test/guards/{uuid.uuid4().hex[:12]}"
    tmp = tmp_path_factory.mktemp("guards")
    prompts = tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": q, "reference": "x"}) + "\n"
                               for i, q in enumerate(QUESTIONS[:3])))
    adapter = publish_adapter(storage.join(root, "train"), tiny_model, r=8, seed=3, scale=4.0)
    common = {"prompts": str(prompts), "engine": "transformers", "sampling": {"temperature": 0, "max_tokens": 4}}
    base = infer.run(infer.Config(model=str(tiny_model), output=storage.join(root, "infer-base"), **common))
    tuned = infer.run(infer.Config(model=str(tiny_model), adapter=adapter.uri,
                                   output=storage.join(root, "infer-ft"), **common))
    assert isinstance(base, mf.Loaded) and isinstance(tuned, mf.Loaded)

    served = guards.Served(base, guards.GuardEngine(**ENGINE), tmp / "cache")
    lm = EngineLM(served)
    # the prompts suite: references are the base model's own greedy answers (with its chat template)
    from common import chat

    answers = served.generate([chat.encode_prompt(served.tokenizer, served.fmt, [{"role": "user", "content": q}],
                                                  None) for q in QUESTIONS])
    suite = tmp / "suite.jsonl"
    suite.write_text("".join(json.dumps({"id": f"q{i}", "prompt": q, "reference": a[0][0]}) + "\n"
                             for i, (q, a) in enumerate(zip(QUESTIONS, answers, strict=True))))
    # the harness tasks: answers and labels are the base model's own, through the same LM the guards use
    tasks = tmp / "tasks"
    tasks.mkdir()
    gen = lm.generate_until([SimpleNamespace(args=(q, {"until": ["\n"], "max_gen_toks": 6})) for q in QUESTIONS])
    (tasks / "tiny_gen.yaml").write_text(GEN_TASK)
    (tasks / "tiny_gen.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n"
                                                  for q, a in zip(QUESTIONS, gen, strict=True)))
    rows = []
    for q, choices in zip(QUESTIONS, CHOICES, strict=False):
        scores = lm.loglikelihood([SimpleNamespace(args=(q, " " + c)) for c in choices])
        rows.append({"question": q, "choices": choices, "label": max(range(len(choices)),
                                                                     key=lambda k: scores[k][0])})
    (tasks / "tiny_mc.yaml").write_text(MC_TASK)
    (tasks / "tiny_mc.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    served.close()
    task_uri = storage.join(root, "tasks")  # the task folder read from the object store, as a Job would
    for f in tasks.iterdir():
        storage.upload_file(f, storage.join(task_uri, f.name))
    return {"root": root, "base": base, "tuned": tuned, "suite": str(suite), "tasks": task_uri, "cache": tmp}


@pytest.fixture(scope="module")
def guarded(world) -> mf.Loaded:
    config = evaluate.Config(
        predictions=[world["base"].uri, world["tuned"].uri], labels=["base", "finetuned"],
        output=storage.join(world["root"], "evaluate"), bootstrap=200, cache_dir=str(world["cache"]),
        guard_engine=ENGINE,
        guards=[{"name": "own-answers", "kind": "prompts", "prompts": world["suite"],
                 "metrics": ["exact_match", "token_f1"]},
                {"name": "harness", "kind": "lm_eval", "tasks": ["tiny_gen", "tiny_mc"], "task_dir": world["tasks"],
                 "margin": 0.05}])
    return evaluate.run(config)


def test_guard_results_are_in_the_manifest_in_the_documented_shape(guarded):
    m = guarded.manifest.metrics
    assert set(m["guards"]) == {"own-answers", "harness"}
    assert m["guards"]["own-answers"]["base"] == {"exact_match": 1.0, "token_f1": 1.0}
    harness = m["guards"]["harness"]
    assert set(harness) == {"base", "finetuned"}
    assert harness["base"] == {"tiny_gen/exact_match": 1.0, "tiny_mc/acc": 1.0}  # both request types scored
    assert all(0.0 <= v <= 1.0 for v in harness["finetuned"].values())
    assert m["guard_suites"]["harness"] == {"kind": "lm_eval", "metrics": ["tiny_gen/exact_match", "tiny_mc/acc"],
                                            "margin": 0.05, "rows": 14}
    # the suite files are inputs: a changed suite is another evaluation
    roles = {i.role for i in guarded.manifest.inputs}
    assert {"guard:own-answers", "guard:harness"} <= roles


def test_a_regression_on_a_guard_is_a_negative_delta_with_its_interval(guarded):
    m = guarded.manifest.metrics
    comp = m["guard_comparisons"]["own-answers"]["finetuned"]
    assert comp["baseline"] == "base"
    em = comp["metrics"]["exact_match"]
    assert em["examples"] == len(QUESTIONS)
    assert em["delta"] < 0 and em["delta"] == pytest.approx(m["guards"]["own-answers"]["finetuned"]["exact_match"] - 1)
    assert em["ci95"] is not None and em["ci95"][0] <= em["delta"] <= em["ci95"][1]
    gen = m["guard_comparisons"]["harness"]["finetuned"]["metrics"]["tiny_gen/exact_match"]
    assert gen["delta"] < 0 and gen["examples"] == len(QUESTIONS)
    report = storage.read_bytes(guarded.artifact_uri("report.md")).decode()
    assert "## Guard evaluations" in report and "### own-answers" in report and "### harness" in report
    assert "finetuned vs base (paired 95% CI)" in report and "**regression**" in report
    assert "Guard evaluations" in storage.read_bytes(guarded.artifact_uri("report.html")).decode()


@pytest.mark.unit
def test_bad_guard_settings_name_the_fix(tmp_path: Path):
    with pytest.raises(ValueError, match="kind prompts needs `prompts`"):
        guards.Guard(name="g", kind="prompts")
    with pytest.raises(ValueError, match="choose from exact_match"):
        guards.Guard(name="g", kind="prompts", prompts="x.jsonl", metrics=["bleu"])
    with pytest.raises(ValueError, match="needs `tasks`"):
        guards.Guard(name="g", kind="lm_eval")
    with pytest.raises(ValueError, match="names must be unique"):
        evaluate.Config(predictions=["a"], output="o", guards=[{"name": "g", "kind": "lm_eval", "tasks": ["t"]},
                                                               {"name": "g", "kind": "lm_eval", "tasks": ["u"]}])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "hi"}\n')
    with pytest.raises(Exception, match="row 0: needs `prompt`.*`reference`"):
        guards.read_prompt_rows(bad, str(bad))
    with pytest.raises(ConfigError, match="perplexity tasks"):
        EngineLM.loglikelihood_rolling(None, [])  # type: ignore[arg-type]
