"""ftjobs pairs: a model's wrong answers on training prompts become preference pairs, never from held-out rows.

The prepare run is real (tests.jobs.helpers.publish_prepare); the infer manifests are written exactly as infer
publishes them (Parquet `predictions/part-NNNNN` shards with the prompts' prepare manifest as an input and the
split it answered in its config), so that every case (right, wrong, errors, held-out ids) is chosen here.
"""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import config as cfg
from common import data, storage
from common import manifest as mf
from common import preference as P
from common.errors import InputError
from jobs import pairs
from jobs.train import job as train
from tests.jobs.helpers import publish_prepare

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def publish_infer(prefix: str, prep: mf.Loaded, split: str, completions: dict[str, str | None],
                  errors: frozenset[str] = frozenset()) -> str:
    """An infer manifest answering `split` of `prep`: id -> completion (None: empty)."""
    rows_by_id = {r["id"]: r for s in data.SPLITS for r in data.read_split(prep, s).to_pylist()}
    rows = []
    for rid, text in completions.items():
        msgs = rows_by_id[rid.split("#")[0]]["messages"]
        rows.append({"id": rid.split("#")[0], "sample": int(rid.split("#")[1]) if "#" in rid else 0,
                     "prompt": [{k: m[k] for k in ("role", "content")} for m in msgs[:-1]], "tools": None,
                     "completion": text or "", "reference": msgs[-1]["content"], "finish_reason": "stop",
                     "prompt_tokens": 5, "completion_tokens": 3, "model": "tiny", "adapter": "s3://x/train",
                     "sampling": "{}", "error": "engine died" if rid in errors else None})
    writer = mf.ArtifactWriter(prefix)
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=data.PREDICTIONS), buf)
    writer.add_bytes(buf.getvalue(), "predictions/part-00000.parquet", name="predictions/part-00000", rows=len(rows))
    m = mf.build(stage="infer", run_id=mf.new_run_id(), config={"model": "tiny", "split": split},
                 inputs=[prep.ref("data")], artifacts=writer.artifacts, model={"model": "tiny"})
    return mf.publish(prefix, m)


@pytest.fixture(scope="module")
def prep(s3_endpoint: str, tiny_tokenizer) -> mf.Loaded:  # type: ignore[no-untyped-def]
    import uuid

    return publish_prepare(f"s3://ftjobs-test/t/{uuid.uuid4().hex[:12]}/prepare", tokenizer=tiny_tokenizer,
                           n_train=24, n_eval=4, shards=1)


def test_wrong_answers_on_training_prompts_become_pairs_with_their_provenance(prep, subprocess_env, tiny_model):
    refs = {r["id"]: r["messages"][-1]["content"] for r in data.read_split(prep, "train").to_pylist()}
    answers: dict[str, str | None] = {}
    for i, (rid, ref) in enumerate(sorted(refs.items())):
        answers[rid] = ref if i % 3 == 0 else (None if i == 1 else f"wrong answer {i}")
    answers[f"{sorted(refs)[2]}#1"] = "another wrong sample"  # sampling n > 1: each sample is scored
    wrong = [k for k, v in answers.items() if v and v != refs[k.split("#")[0]]]
    uri = publish_infer(f"{prep.prefix}-infer-train", prep, "train", answers, errors=frozenset({wrong[-1]}))
    out = f"{prep.prefix}-pairs"
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "pairs", "--predictions", uri, "--output", out,
                           "--set", "eval_fraction=0.3"], capture_output=True, text=True, cwd=REPO,
                          env=subprocess_env, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded = mf.load(out)
    st = loaded.manifest.stats
    assert P.is_preference_run(loaded) and loaded.manifest.stage == "pairs"
    assert st["pairs"] == len(wrong) - 1 and st["skipped"] == {"right": 8, "empty_completion": 1,
                                                               "generation_error": 1}
    assert st["from"] == {"prepare": prep.uri, "predictions": uri, "split": "train"}
    assert st["train"] > 0 and st["eval"] > 0
    got = data.read_split(loaded, "train", columns=[f.name for f in P.schema(False)]).to_pylist() + \
        data.read_split(loaded, "eval", columns=[f.name for f in P.schema(False)]).to_pylist()
    provenance = [json.loads(x) for x in storage.read_bytes(loaded.resolve(
        loaded.manifest.artifact("provenance"))).decode().splitlines()]
    by_pair = {p["pair_id"]: p for p in provenance}
    assert len(by_pair) == len(got)
    for row in got:
        origin = by_pair[row["id"]]
        assert row["chosen"][0]["content"] == refs[origin["row_id"]]  # the reference is preferred
        assert row["rejected"][0]["content"] == answers[origin["prediction_id"]]
        assert origin["row_id"].startswith("train-") and origin["score"] == 0.0
        assert row["source"] == f"{prep.uri}#{origin['row_id']}"
    # The pairs train DPO as any preference data (tokenized by train with its model's template).
    m = train.run(cfg.load_config(train.Config, sets=["objective=dpo", "max_steps=1", "max_seq_length=64",
                                                      "lora.r=8", "lora.alpha=16"],
                                  flags={"input": loaded.uri, "base_model": str(tiny_model),
                                         "output": f"{prep.prefix}-pairs-dpo"})).manifest
    assert m.stats["data_source"] == "tokenized_here" and m.stats["objective"]["pairs"]["train"] == st["train"]


def test_held_out_rows_are_never_used(prep, subprocess_env) -> None:
    evals = {r["id"]: "x" for r in data.read_split(prep, "eval").to_pylist()}
    on_eval = publish_infer(f"{prep.prefix}-infer-eval", prep, "eval", evals)
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "pairs", "--predictions", on_eval, "--output",
                           f"{prep.prefix}-no"], capture_output=True, text=True, cwd=REPO, env=subprocess_env,
                          timeout=120)
    assert proc.returncode == 3 and "answered the 'eval' split" in proc.stderr and "Traceback" not in proc.stderr
    mixed = publish_infer(f"{prep.prefix}-infer-mixed", prep, "train", {"train-0": "x", **evals})
    with pytest.raises(InputError, match="is not a train row .* \\(it is held out\\)"):
        pairs.run(cfg.validate(pairs.Config, {"predictions": mixed, "output": f"{prep.prefix}-no2"}))
    with pytest.raises(Exception, match="checks.regex"):
        cfg.validate(pairs.Config, {"predictions": "x", "output": "y", "metric": "regex_match"})


def test_a_judge_makes_pairs_only_where_both_orders_agree(prep) -> None:
    """judge: the reference and the model's answer, unlabelled, in both orders; a pair (the preferred answer
    chosen, even when it is the model's) only where both orders agree; ties, split and unreadable verdicts are
    skipped and counted; the judge never sees which answer is the reference."""
    import re

    from tests.jobs.test_evaluate_judge import scripted

    def decide(text: str) -> str:
        a, b = (re.search(rf"\[Answer {x}\]\n(.*?)\n\n", text, re.S).group(1) for x in "AB")  # type: ignore[union-attr]
        if "???" in a + b:
            return "I cannot say."
        if "SPLIT" in a + b:
            return '{"reason": "first is best", "winner": "A"}'  # position bias: the orders disagree
        winner = "A" if "GOOD" in a or "BAD" in b else "B" if "GOOD" in b or "BAD" in a else "tie"
        return json.dumps({"reason": "compared", "winner": winner})

    refs = {r["id"]: r["messages"][-1]["content"] for r in data.read_split(prep, "train").to_pylist()}
    ids = sorted(refs)
    answers: dict[str, str | None] = {ids[0]: "a GOOD answer", ids[1]: "a BAD answer", ids[2]: "SPLIT answer",
                                      ids[3]: "??? answer", ids[4]: refs[ids[4]]}
    uri = publish_infer(f"{prep.prefix}-infer-judge", prep, "train", answers)
    engine, asked = scripted(decide)
    conf = cfg.validate(pairs.Config, {"predictions": uri, "output": f"{prep.prefix}-pairs-judge",
                                       "judge": {"model": "scripted", "engine": "transformers"},
                                       "eval_fraction": 0.0})
    loaded = pairs.run(conf, judge_engine=engine)
    st = loaded.manifest.stats
    assert st["decided_by"] == "judge" and st["pairs"] == 2 and st["answer_chosen"] == 1
    assert st["skipped"] == {"judge_split": 1, "judge_unreadable": 1, "judge_tie": 1}
    assert len(asked) == 10 and not any("[Reference answer]" in q for q in asked)  # both orders, no labels
    got = {r["source"].split("#")[1]: r for r in data.read_split(loaded, "train").to_pylist()}
    assert got[ids[0]]["chosen"][0]["content"] == "a GOOD answer"  # the model's answer beat the reference
    assert got[ids[0]]["rejected"][0]["content"] == refs[ids[0]]
    assert got[ids[1]]["chosen"][0]["content"] == refs[ids[1]]
    assert got[ids[1]]["rejected"][0]["content"] == "a BAD answer"
    provenance = [json.loads(x) for x in storage.read_bytes(loaded.resolve(
        loaded.manifest.artifact("provenance"))).decode().splitlines()]
    assert {p["winner"] for p in provenance} == {"answer", "reference"}
    assert all(set(p["judge"]) == {"ab", "ba"} and p["judge"]["ab"]["reason"] == "compared" for p in provenance)
