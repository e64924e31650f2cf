"""ftjobs pairs: preference pairs from a model's mistakes on TRAINING prompts ("evaluate, then train on what
was wrong").

Reads: an infer manifest whose prompts were a prepare manifest's `train` split (`ftjobs infer --set
split=train`), and that prepare manifest (found through the infer manifest's inputs, checksum-checked).
Each prediction is scored with the task metrics (`common/metrics.py`: exact match, normalized exact
match, token F1, ROUGE-L, JSON schema, regex, tool-call check); where the score is below `threshold` the row's
reference answer (its last assistant turn) becomes `chosen` and the model's answer `rejected`, after the
row's conversation up to that turn as the prompt.

With `judge:` an LLM judge decides instead of the metric (tasks no metric can check): it compares the
row's reference answer with the model's answer, without being shown which is which, in both orders (A/B and
B/A); a pair is made only where both orders pick the same answer, that answer chosen and the other rejected
(so a model answer the judge prefers over the reference is kept as chosen). Ties, split verdicts and
unreadable ones are skipped and counted; every pair's verdicts and reasons are in `provenance.jsonl`.

Never from held-out rows: an infer run on any split but `train` is refused, and so is a prediction whose id
is not a train row of that prepare run. The pairs are split train/eval by prompt (their own eval split
reports DPO's held-out reward accuracy; both are training prompts of the original data).

Writes under --output: preference Parquet shards as prepare writes them (`data/<split>/part-NNNNN.parquet`,
`common.preference`; untokenized: train tokenizes them with its model's template), `provenance.jsonl` (for
every pair: the prepare row, the prediction, its sample, the metric and score) and the manifest, last.

    ftjobs infer --model BASE --adapter s3://b/r/train/manifest.json --prompts s3://b/r/prepare/manifest.json \\
        --set split=train --output s3://b/r/infer-train
    ftjobs pairs --predictions s3://b/r/infer-train/manifest.json --output s3://b/r/pairs \\
        --set metric=normalized_exact_match
    ftjobs train --input s3://b/r/pairs/manifest.json --set objective=dpo --set init_adapter=s3://b/r/train/...
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import Field, model_validator

from common import chat, stage, storage
from common import config as cfg
from common import data as canonical
from common import judge as J
from common import manifest as mf
from common import metrics as M
from common import preference as P
from common.config import JobConfig
from common.errors import InputError
from common.runner import config_options, execute

STAGE = "pairs"
LOG = logging.getLogger(__name__)
Metric = Literal["exact_match", "normalized_exact_match", "token_f1", "rouge_l", "json_valid", "json_schema_valid",
                 "regex_match", "tool_call_valid"]
CHECK_NEEDS = {"json_schema_valid": "checks.json_schema", "regex_match": "checks.regex",
               "tool_call_valid": "checks.tool_call"}


class Config(JobConfig):
    """ftjobs pairs: a model's wrong answers on training prompts -> preference pairs (reference preferred)."""

    predictions: str = Field(description="An infer manifest run on a prepare manifest's train split.")
    output: str = Field(description="Output prefix (local path or s3://...); the manifest is written last.")
    metric: Metric = Field("normalized_exact_match", description="evaluate's metric that decides whether the "
                           "model's answer is wrong (score below threshold).")
    threshold: float = Field(1.0, gt=0, le=1, description="An answer scoring below this is wrong (1.0: anything "
                             "short of a full match; token_f1 or rouge_l: e.g. 0.5).")
    checks: M.Checks = Field(default_factory=M.Checks, description="What json_schema_valid, regex_match and "
                             "tool_call_valid check (as evaluate's checks).")
    eval_fraction: float = Field(0.1, ge=0, lt=1, description="Share of prompts (by hash) whose pairs form the "
                                 "pairs' eval split, for DPO's held-out reward accuracy.")
    max_pairs: int | None = Field(None, ge=1, description="Keep at most this many pairs (the lowest prompt hashes).")
    seed: int = Field(0, description="Seed of the split hash.")
    run_id: str | None = Field(None, description="Run id recorded in the manifest (default: generated).")
    judge: J.JudgeModel | None = Field(None, description="Decide with an LLM judge instead of `metric`: the "
                                       "reference and the model's answer compared in both orders, a pair only where "
                                       "both orders agree (module docstring).")
    cache_dir: str | None = Field(None, description="Where the judge model is downloaded; None: $FTJOBS_CACHE or "
                                                    "~/.cache/ftjobs.")

    @model_validator(mode="after")
    def _check_configured(self) -> Config:
        needs = CHECK_NEEDS.get(self.metric)
        if needs and self.metric not in M.computed(self.checks):
            raise ValueError(f"metric {self.metric} needs {needs} to be set (what the answer is checked against)")
        return self


def run(config: Config, *, judge_engine: Any = None) -> mf.Loaded:
    """`judge_engine`: a started engine for the judge instead of its model (tests: a scripted stand-in)."""
    from common import generate

    predictions = mf.load(config.predictions, verify="size", expect_stage="infer")
    prep = _prepare_of(predictions)
    judge_in = generate.model_input(config.judge.model) if config.judge else None
    inputs = [predictions.ref("predictions"), prep.ref("data")] + ([judge_in.ref("judge")] if judge_in else [])
    identity = stage.Identity(STAGE, config.output, cfg.dump(config), inputs)
    result = stage.run(identity, lambda attempt: make_pairs(config, predictions, prep, attempt,
                                                            Judging(judge_in, judge_engine)))
    assert isinstance(result, mf.Loaded)
    return result


def _prepare_of(predictions: mf.Loaded) -> mf.Loaded:
    """The prepare manifest the infer run read, refused unless it read its train split."""
    split = (predictions.manifest.config or {}).get("split")
    refs = [i for i in predictions.manifest.inputs if i.stage == "prepare"]
    if not refs:
        raise InputError(f"{predictions.uri} answered prompts from a file, not a prepare manifest; pairs need the "
                         "prepare run's train rows. Run infer with --prompts <prepare manifest> --set split=train")
    if split != "train":
        raise InputError(f"{predictions.uri} answered the {split!r} split; pairs are made from training prompts "
                         "only (never held-out rows). Run infer with --set split=train")
    prep = mf.load(refs[0].uri, verify="size", expect_stage="prepare")
    if prep.sha256 != refs[0].sha256:
        raise InputError(f"{prep.uri} changed since {predictions.uri} read it (sha256 {refs[0].sha256[:12]}, now "
                         f"{prep.sha256[:12]}); re-run infer on it")
    return prep


@dataclass(frozen=True)
class Judging:
    judge_in: mf.Loaded | None = None  # the judge's merge manifest, when it names one
    engine: Any = None                 # a started engine (tests)


def judge_verdicts(config: Config, candidates: list[dict[str, Any]], judging: Judging
                   ) -> dict[str, dict[str, Any]]:
    """Per prediction id: which answer the judge prefers in both orders ("reference", "answer"), or why not
    (None, with `skip`), and the two verdicts as read."""
    jc = config.judge
    assert jc is not None
    asks = []
    for row in candidates:
        question = J.conversation(row.get("prompt"))
        ref, ans = str(row["reference"]), str(row["completion"])
        asks.append((f"{row['id']}|ab", J.pairwise_prompt(jc.rubric, question, None, ref, ans, jc.max_text_chars)))
        asks.append((f"{row['id']}|ba", J.pairwise_prompt(jc.rubric, question, None, ans, ref, jc.max_text_chars)))
    replies, _ = J.ask(jc, asks, storage.join(config.output, "shards", "judge"), judging.judge_in, config.cache_dir,
                       mode="pairwise", what="judge (pairs)", engine=judging.engine)
    out = {}
    for row in candidates:
        read = {}
        for order in ("ab", "ba"):
            read[order] = J.read_reply(replies[f"{row['id']}|{order}"], "pairwise", jc.scale)
        picks = {o: None if not v.ok or v.value == "tie" else
                 ("reference" if (v.value == "A") == (o == "ab") else "answer") for o, v in read.items()}
        skip = ("judge_unreadable" if not all(v.ok for v in read.values()) else
                "judge_tie" if None in picks.values() else
                "judge_split" if picks["ab"] != picks["ba"] else None)
        out[row["id"]] = {"winner": None if skip else picks["ab"], "skip": skip,
                          "verdicts": {o: {"winner": v.value, "reason": v.reason, "problem": v.problem}
                                       for o, v in read.items()}}
    return out


def make_pairs(config: Config, predictions: mf.Loaded, prep: mf.Loaded, attempt: stage.Attempt,
               judging: Judging | None = None) -> stage.Outcome:
    from jobs.prepare import preference as PP
    from jobs.prepare import rows as R

    t0 = time.monotonic()
    train_rows = {r["id"]: r for r in canonical.read_split(prep, "train", columns=["id", "messages", "tools"])
                  .to_pylist()}
    held_out = set(canonical.read_split(prep, "eval", columns=["id"]).column("id").to_pylist())
    with tempfile.TemporaryDirectory(prefix="ftjobs-pairs-") as tmp:
        preds = canonical.read_predictions(predictions, Path(tmp))
    validator = M.load_schema(config.checks.json_schema) if config.checks.json_schema is not None else None
    skipped: Counter[str] = Counter()
    candidates = []
    for row in preds:
        base_id = row["id"].split("#", 1)[0]
        if base_id in held_out or base_id not in train_rows:
            raise InputError(f"{predictions.uri}: prediction {row['id']!r} is not a train row of {prep.uri}"
                             f"{' (it is held out)' if base_id in held_out else ''}; pairs never use held-out rows")
        if row.get("error"):
            skipped["generation_error"] += 1
        elif row.get("reference") is None:
            skipped["no_reference"] += 1
        elif not (row.get("completion") or "").strip():
            skipped["empty_completion"] += 1
        else:
            candidates.append(row)
    scores = {s["id"]: s for s in M.score_rows(candidates, config.checks, validator)}
    verdicts = judge_verdicts(config, candidates, judging or Judging()) if config.judge else {}
    kept: list[Any] = []
    origins: list[dict[str, Any]] = []
    seen: set[int] = set()
    for row in candidates:
        score = scores[row["id"]].get(config.metric)
        judged = verdicts.get(row["id"])
        if judged is not None:  # the judge decides: which answer it picked in both orders, or why none
            if judged["skip"]:
                skipped[judged["skip"]] += 1
                continue
            evidence: dict[str, Any] = {"judge": judged["verdicts"], "winner": judged["winner"], "score": score}
        elif score is None:
            skipped["not_scored"] += 1
            continue
        elif score >= config.threshold:
            skipped["right"] += 1
            continue
        else:
            evidence = {"metric": config.metric, "score": score}
        base_id = row["id"].split("#", 1)[0]
        source = train_rows[base_id]
        prompt, _ = chat.split_prompt(source["messages"])
        reference = chat.clean([source["messages"][-1]])[0]
        answer = {"role": "assistant", "content": row["completion"]}
        chosen, rejected = (answer, reference) if evidence.get("winner") == "answer" else (reference, answer)
        pair = PP.Pair(prompt, [chosen], [rejected], canonical.tools_of(source["tools"]))
        try:
            pair = PP.validated(pair, 10**9)
        except R.Drop as d:
            skipped[d.reason] += 1
            continue
        pid, prompt_id, exact, _ = PP.keys(pair)
        if exact in seen:
            skipped["duplicate"] += 1
            continue
        seen.add(exact)
        split = "eval" if R.split_point(prompt_id, config.seed) < config.eval_fraction else "train"
        kept.append(PP.Kept(pair, pid, prompt_id, f"{prep.uri}#{base_id}", split, 0))
        origins.append({"pair_id": pid, "row_id": base_id, "prediction_id": row["id"], "sample": row.get("sample"),
                        **evidence, "prepare": prep.uri, "predictions": predictions.uri, "split": split})
    if config.max_pairs is not None and len(kept) > config.max_pairs:
        order = sorted(range(len(kept)), key=lambda i: R.split_point(kept[i].prompt_id, config.seed + 1))
        keep = set(order[:config.max_pairs])
        kept = [k for i, k in enumerate(kept) if i in keep]
        origins = [o for i, o in enumerate(origins) if i in keep]
    if not kept:
        by = ("the judge agreed on in both orders" if config.judge
              else f"was wrong by {config.metric} < {config.threshold}")
        raise InputError(f"No pairs: of {len(preds)} predictions in {predictions.uri} none {by} "
                         f"({dict(skipped)}). Nothing to train on.")
    counts = PP.write_pairs(kept, attempt.writer, tokenized=False)
    provenance = "".join(json.dumps(o, ensure_ascii=False) + "\n" for o in origins)
    attempt.writer.add_bytes(provenance.encode(), "provenance.jsonl", name="provenance", rows=len(origins))
    stats = {"kind": P.KIND, "pairs": len(kept), **counts, "splits": dict(counts),
             "prompts": {s: len({k.prompt_id for k in kept if k.split == s}) for s in canonical.SPLITS},
             "predictions": len(preds), "wrong": len(kept), "skipped": dict(skipped),
             "decided_by": "judge" if config.judge else "metric", "metric": config.metric,
             "threshold": config.threshold,
             "answer_chosen": sum(1 for o in origins if o.get("winner") == "answer"),
             "from": {"prepare": prep.uri, "predictions": predictions.uri, "split": "train"}}
    attempt.writer.add_bytes(storage.json_bytes(stats), "stats.json", name="stats")
    LOG.info("%d pairs (train %d, eval %d) from %d predictions on training prompts; skipped %s", len(kept),
             counts["train"], counts["eval"], len(preds), dict(skipped))
    return stage.Outcome(stats=stats, timings={"total": time.monotonic() - t0}, run_id=config.run_id)


@click.command("pairs")
@click.option("--predictions", metavar="URI", help="Infer manifest (answers on a prepare run's train split).")
@click.option("--output", metavar="URI", help="Output prefix (local path or s3://bucket/prefix).")
@config_options(example="metric=token_f1")
def command(predictions: str | None, output: str | None, config_file: str | None, sets: tuple[str, ...]) -> None:
    """Preference pairs from a model's wrong answers on training prompts (reference chosen, answer rejected),
    or, with judge:, where an LLM judge prefers one of the two answers in both orders.

    Exit 3 when the predictions are not on a prepare run's train split, or no answer was wrong.
    """
    import sys

    execute(sys.modules[__name__], config_file, sets, {"predictions": predictions, "output": output})
