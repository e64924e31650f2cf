"""synth: new training examples from seed examples and a teacher model, kept only when they pass.

Reads
  --seeds    seed examples: a prepare manifest (its `train` split by default) or a JSONL / Parquet file with
             `messages` or `prompt`/`completion` (or, for `format: json`, any objects); repeatable;
  --teacher  the model that writes the examples: a merge manifest or any model source;
  judge.model, optionally: a model that grades each example (`judge.min_score` or better is kept).

Each of `num_prompts` prompts shows the teacher `prompt.shots` seeds (a seeded draw per prompt) and asks for
one new example in the declared `format` (messages, prompt_completion, or json with `json_schema`);
`sampling.n` completions per prompt. A completion is kept only when it is parseable, a row of the format
(schema-valid), within `limits`, not a near-duplicate of a seed or of an earlier kept row (Jaccard of
character 5-grams >= `near_duplicates.threshold`, 0.8: see common/neardup.py) and, with a judge, scored high enough.
Every rejected completion is counted by reason (rows.REASONS); the first examples of each go to
rejects.jsonl. `guided: true` constrains the teacher to the format's JSON schema (vLLM structured outputs).

Writes, under --output
  shards/teacher/, shards/judge/    resumable chunks (common.chunks): a killed run loses at most one chunk
  attempts/<id>/data.jsonl          the kept rows, one JSON object per line: what `ftjobs prepare --source`
                                    reads (give it this manifest; it reads data.jsonl, sha256-checked)
  attempts/<id>/rejects.jsonl       the first `reject_examples` rejected completions per reason
  manifest.json                     stage "synth": inputs seeds, teacher (and judge) when they are manifests;
                                    model.teacher; stats: kept, rejected by reason, the cost announced and spent
Before the teacher (and the judge) start, the prompts and the generated tokens they may cost are logged.
Fewer than `min_rows` kept rows is exit 3 with the reason table, and nothing is published.

    ftjobs synth --seeds data/seeds.jsonl --teacher Qwen/Qwen2.5-7B-Instruct --output s3://ml/runs/r1/synth \\
        --set num_prompts=500 --set sampling.n=4 --set sampling.temperature=0.9
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import Field, field_validator, model_validator

from common import chat, chunks, models, stage, storage
from common import judge as J
from common import manifest as mf
from common import neardup as dedup
from common.config import JobConfig, dump, json_schema_validator
from common.errors import InputError
from common.generate import EngineArgs, Sampling
from common.runner import config_options, execute
from jobs.synth import rows as R

STAGE = "synth"
LOG = logging.getLogger(__name__)


class Prompt(JobConfig):
    """What the teacher is asked (see rows.teacher_prompt for the whole prompt)."""

    instruction: str = Field(R.DEFAULT_INSTRUCTION, description="The task, said first; the examples, the format "
                                                                "and 'answer with one JSON object' follow it.")
    system: str | None = Field(None, description="A system turn before the request (None: none).")
    shots: int = Field(3, ge=0, le=64, description="Seed examples shown per prompt (a seeded draw per prompt; "
                                                   "all seeds when there are fewer).")


class Limits(JobConfig):
    """Length limits on a kept row."""

    min_chars: int = Field(1, ge=1, description="Every text field (a turn, the prompt, the completion) has at "
                                                "least this many characters, spaces aside.")
    max_chars: int = Field(8000, ge=1, description="The row's text fields together have at most this many "
                                                   "characters (guided: also each field's maxLength).")
    max_turns: int = Field(16, ge=2, description="Most turns in a generated conversation (guided messages).")


class NearDuplicates(JobConfig):
    """How similar to a seed or a kept row a row may be (see jobs/synth/dedup.py)."""

    threshold: float = Field(0.8, gt=0.0, le=1.0, description="Jaccard similarity of character n-gram sets at or "
                                                              "above which a row is a near-duplicate (1.0: only "
                                                              "rows equal after normalization).")
    ngram: int = Field(5, ge=1, le=32, description="Characters per shingle.")


class SynthJudge(J.JudgeModel):
    """A judge that grades each example on its own (no reference); the examples it scores low are rejected."""

    min_score: int = Field(description="Keep examples the judge scores at least this (1..scale).")

    @model_validator(mode="after")
    def _in_scale(self) -> SynthJudge:
        if not 1 <= self.min_score <= self.scale:
            raise ValueError(f"min_score {self.min_score} is off the scale 1..{self.scale}")
        return self


class Config(JobConfig):
    """ftjobs synth: generate examples from seeds with a teacher model; keep the ones that pass."""

    seeds: list[str] = Field(description="Prepare manifests or JSONL/Parquet files of seed examples.")
    teacher: str = Field(description="Merge manifest (URI or prefix) or model source (HF id, s3:// prefix, folder).")
    output: str = Field(description="Output prefix (local or s3://).")
    seed_split: str = Field("train", description="Which split of a prepare manifest the seeds come from.")
    format: R.Format = Field("messages", description="The rows' format: messages, prompt_completion, or json "
                                                     "(objects that satisfy json_schema).")
    json_schema: dict[str, Any] | str | None = Field(
        None, description="format json: the JSON schema (inline, or a path/URI of a .json file) every seed and kept "
                          "row satisfies.")
    prompt: Prompt = Field(default_factory=Prompt, description="What the teacher is asked.")
    num_prompts: int = Field(64, ge=1, description="Prompts sent to the teacher (each with its own draw of seeds).")
    sampling: Sampling = Field(default_factory=lambda: Sampling(temperature=1.0, seed=0, max_tokens=512),
                               description="Teacher sampling; n completions per prompt. A seed makes a resumed run "
                                           "equal an uninterrupted one.")
    guided: bool = Field(False, description="Constrain the teacher's output to the format's JSON schema (vLLM "
                                            "structured outputs): every completion parses. Needs engine: vllm.")
    limits: Limits = Field(default_factory=Limits, description="Length limits on kept rows.")
    near_duplicates: NearDuplicates = Field(default_factory=NearDuplicates, description="Near-duplicate rejection.")
    judge: SynthJudge | None = Field(None, description="Optional judge: examples it scores below min_score are "
                                                       "rejected.")
    engine: Literal["vllm", "transformers"] = Field("vllm", description="Generation engine for the teacher.")
    engine_args: EngineArgs = Field(default_factory=EngineArgs, description="Teacher engine settings.")
    chat_template: str | None = Field(None, description="Teacher template override (builtin name or Jinja text); "
                                                        "None: recorded upstream, else the teacher's own.")
    trust_remote_code: bool = Field(False, description="Allow teacher repos that ship their own code.")
    chunk_rows: int = Field(32, ge=1, description="Prompts per chunk: the unit of resume.")
    min_rows: int = Field(1, ge=0, description="Exit 3 (publishing nothing) when fewer rows are kept.")
    reject_examples: int = Field(5, ge=0, description="Rejected completions kept per reason in rejects.jsonl.")
    seed: int = Field(0, description="Seed of each prompt's draw of seed examples.")
    cache_dir: str | None = Field(None, description="Where downloaded models go; None: $FTJOBS_CACHE or "
                                                    "~/.cache/ftjobs.")
    run_id: str | None = Field(None, description="Run id recorded in the manifest (default: generated).")

    @field_validator("seeds")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("give at least one --seeds file or prepare manifest")
        return value

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.format == "json" and self.json_schema is None:
            raise ValueError("format json needs json_schema (the schema every example satisfies)")
        if self.format != "json" and self.json_schema is not None:
            raise ValueError(f"json_schema is only read with format json (format is {self.format})")
        if self.guided and self.engine != "vllm":
            raise ValueError("guided: true needs engine: vllm (the transformers engine cannot constrain output)")
        if self.limits.min_chars > self.limits.max_chars:
            raise ValueError(f"limits.min_chars {self.limits.min_chars} exceeds limits.max_chars "
                             f"{self.limits.max_chars}")
        if storage.normalize(self.output).rstrip("/") in {storage.normalize(x).rstrip("/") for x in self.seeds}:
            raise ValueError("output must be a prefix of its own, not a seeds location")
        return self


# --------------------------------------------------------------------------- the job


def run(config: Config) -> mf.Loaded:
    seeds_in = [R.seed_input(s) for s in config.seeds]
    from common.generate import model_input

    teacher_in = model_input(config.teacher)
    judge_in = model_input(config.judge.model) if config.judge else None
    inputs = [s if isinstance(s, mf.InputRef) else s.ref("seeds") for s in seeds_in]
    inputs += [lo.ref(role) for lo, role in ((teacher_in, "teacher"), (judge_in, "judge")) if lo is not None]
    identity = stage.Identity(STAGE, config.output, dump(config) | {"cache_dir": None}, inputs)
    result = stage.run(identity, lambda attempt: synthesize(config, attempt, seeds_in, teacher_in, judge_in))
    assert isinstance(result, mf.Loaded)
    return result


@dataclass
class Tally:
    """Kept rows and rejects, in the order the completions came."""

    keep_examples: int
    kept: list[dict[str, Any]] = field(default_factory=list)
    rejected: Counter[str] = field(default_factory=Counter)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)

    def reject(self, key: str, reason: str, detail: str, completion: str, **more: Any) -> None:
        self.rejected[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < self.keep_examples:
            ex.append({"reason": reason, "key": key, "detail": detail, "completion": completion[:2000], **more})


def synthesize(config: Config, attempt: stage.Attempt, seeds_in: list[Any], teacher_in: mf.Loaded | None,
               judge_in: mf.Loaded | None) -> stage.Outcome:
    """seeds -> prompts -> teacher (chunks) -> read and check each completion -> judge -> dedup -> write."""
    from common import generate

    t0 = time.monotonic()
    validator = (json_schema_validator(config.json_schema, "json_schema")  # type: ignore[arg-type]
                 if config.format == "json" else None)
    schema = validator.schema if validator is not None else None
    seeds = R.read_seeds(seeds_in, config.format, validator, config.seed_split)
    cache = Path(config.cache_dir) if config.cache_dir else models.cache_root()
    teacher = generate.load_model(config.teacher, teacher_in, cache=cache, trust_remote_code=config.trust_remote_code,
                                  chat_template=config.chat_template)
    LOG.info("%d seeds; teacher %s; %d prompts x %d samples", len(seeds), config.teacher, config.num_prompts,
             config.sampling.n)
    requests = []
    for i in range(config.num_prompts):
        shots = R.draw_shots(seeds, config.prompt.shots, config.seed, i)
        msgs = R.teacher_prompt(config.prompt.instruction, config.prompt.system, shots, config.format, schema)
        requests.append(chunks.Request(f"p{i:06d}", chat.encode_prompt(teacher.tokenizer, teacher.fmt, msgs)))
    # What a completion may cost: the teacher writes rows like its seeds, so their length in its tokens.
    lengths = [len(teacher.tokenizer(R.shown(s.row), add_special_tokens=False)["input_ids"]) for s in seeds]
    guided = (R.guided_schema(config.format, schema, config.limits.min_chars, config.limits.max_chars,
                              config.limits.max_turns) if config.guided else None)
    t_prep = time.monotonic()
    settings = {"teacher": teacher.identity(), "teacher_manifest": teacher_in.sha256 if teacher_in else None,
                "engine": config.engine, "engine_args": config.engine_args.model_dump(mode="json"),
                "sampling": config.sampling.model_dump(mode="json"), "guided": guided, "seed_by_prompt": True}
    gen = chunks.run(storage.join(config.output, "shards", "teacher"), requests, settings=settings,
                     chunk_rows=config.chunk_rows, samples=config.sampling.n, max_tokens=config.sampling.max_tokens,
                     start_engine=lambda: generate.start(config.engine, config, teacher.engine_model(), guided=guided,
                                                         seed_by_prompt=True),
                     what="synth teacher", estimate=sum(lengths) / len(lengths) + 1)  # + its end-of-turn token
    t_gen = time.monotonic()

    tally = Tally(keep_examples=config.reject_examples)
    candidates = check_completions(config, gen.records, seeds, validator, tally)
    judged: dict[str, Any] = {}
    if config.judge is not None:
        candidates, judged = judge_candidates(config, config.judge, judge_in, candidates, cache, tally)
    keep_new(config, candidates, tally)
    t_filter = time.monotonic()

    if len(tally.kept) < config.min_rows:
        raise InputError(refusal(tally, len(gen.records), config.min_rows))
    writer = attempt.writer
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in tally.kept)
    writer.add_bytes(lines.encode(), "data.jsonl", name="data", rows=len(tally.kept))
    rejects = "".join(json.dumps(e, ensure_ascii=False) + "\n" for r in R.REASONS for e in tally.examples.get(r, []))
    writer.add_bytes(rejects.encode(), "rejects.jsonl", name="rejects", rows=rejects.count("\n"))
    stats = {"seeds": len(seeds), "prompts": len(requests), "completions": len(gen.records), "kept": len(tally.kept),
             "rejected": {r: tally.rejected[r] for r in R.REASONS if tally.rejected[r]},
             "kept_fraction": round(len(tally.kept) / len(gen.records), 4) if gen.records else 0.0,
             "near_duplicates": config.near_duplicates.model_dump(), "teacher": gen.totals(), **judged}
    LOG.info("kept %d of %d completions; rejected: %s", len(tally.kept), len(gen.records),
             ", ".join(f"{r} {n}" for r, n in stats["rejected"].items()) or "none", extra={"stats": stats})
    model = mf.SynthModel(teacher=teacher_in.uri if teacher_in else config.teacher,
                          teacher_base_model=teacher.identity()["base_model"], teacher_revision=teacher.revision,
                          teacher_template_hash=teacher.fmt.hash, engine=config.engine, format=config.format,
                          judge=(config.judge.model if judge_in is None else judge_in.uri) if config.judge else None)
    return stage.Outcome(stats=stats, model=model.model_dump(mode="json", exclude_none=True), run_id=config.run_id,
                         timings={"prepare_s": t_prep - t0, "generate_s": t_gen - t_prep, "filter_s": t_filter - t_gen})


@dataclass
class Candidate:
    key: str  # p<prompt>-<sample>
    row: dict[str, Any]
    text: str  # its text fields joined: what near-duplicates compare
    completion: str


def check_completions(config: Config, records: list[dict[str, Any]], seeds: list[R.Seed], validator: Any,
                      tally: Tally) -> list[Candidate]:
    """Each completion read into a row and checked on its own and against the seeds (not against each other)."""
    near = config.near_duplicates
    seed_index = dedup.Index(near.threshold, near.ngram)
    for i, s in enumerate(seeds):
        seed_index.add(s.where or f"seed {i}", "\n".join(R.texts(s.row, config.format)))
    out = []
    for rec in records:
        key, text = f"{rec['key']}-{rec['sample']}", rec["completion"] or ""
        if rec["error"] is not None:
            tally.reject(key, "prompt_too_long", rec["error"], text)
            continue
        try:
            row = R.parse_completion(text, rec["finish_reason"], config.format, validator)
            R.check_length(row, config.format, config.limits.min_chars, config.limits.max_chars)
        except R.Reject as exc:
            tally.reject(key, exc.reason, exc.detail, text)
            continue
        joined = "\n".join(R.texts(row, config.format))
        hit = seed_index.nearest(joined)
        if hit is not None:
            tally.reject(key, "near_duplicate_of_seed", f"Jaccard {hit[1]:.2f} with {hit[0]}", text)
            continue
        out.append(Candidate(key=key, row=row, text=joined, completion=text))
    return out


def judge_candidates(config: Config, jc: SynthJudge, judge_in: mf.Loaded | None, candidates: list[Candidate],
                     cache: Path, tally: Tally) -> tuple[list[Candidate], dict[str, Any]]:
    """Ask the judge to score each candidate on its own; keep those at min_score or above."""
    from common import generate

    if not candidates:
        return [], {"judge": {"judged": 0}}
    model = generate.load_model(jc.model, judge_in, cache=cache, trust_remote_code=jc.trust_remote_code,
                                chat_template=jc.chat_template)
    requests = [chunks.Request(c.key, chat.encode_prompt(model.tokenizer, model.fmt, J.example_prompt(
        jc.rubric, R.shown(c.row), jc.scale, jc.max_text_chars))) for c in candidates]
    guided = J.verdict_schema("score", jc.scale) if jc.guided else None
    settings = {"judge": model.identity(), "judge_manifest": judge_in.sha256 if judge_in else None,
                **jc.model_dump(mode="json", include={"engine", "engine_args", "sampling"}), "guided": guided}
    gen = chunks.run(storage.join(config.output, "shards", "judge"), requests, settings=settings,
                     chunk_rows=jc.chunk_rows, samples=1, max_tokens=jc.sampling.max_tokens,
                     start_engine=lambda: generate.start(jc.engine, jc, model.engine_model(), guided=guided),
                     what="synth judge")
    verdicts = {r["key"]: r for r in gen.records}
    kept, scores = [], Counter()  # type: ignore[var-annotated]
    for c in candidates:
        rec = verdicts[c.key]
        v = (J.read(rec["completion"] or "", rec["finish_reason"], "score", jc.scale) if rec["error"] is None
             else J.Verdict(None, None, rec["error"]))
        if not v.ok:
            tally.reject(c.key, "judge_unparseable", v.problem or "", c.completion, verdict=rec["completion"])
            continue
        scores[v.value] += 1
        if int(v.value) < jc.min_score:  # type: ignore[arg-type]
            tally.reject(c.key, "judge_rejected", f"score {v.value} < min_score {jc.min_score}", c.completion,
                         reason_given=v.reason)
            continue
        kept.append(c)
    return kept, {"judge": {**gen.totals(), "judged": len(candidates), "scores": {str(k): scores[k]
                                                                                for k in sorted(scores)}}}


def keep_new(config: Config, candidates: list[Candidate], tally: Tally) -> None:
    """Keep candidates in order, each unless it is a near-duplicate of one kept before it."""
    near = config.near_duplicates
    index = dedup.Index(near.threshold, near.ngram)
    for c in candidates:
        hit = index.nearest(c.text)
        if hit is not None:
            tally.reject(c.key, "near_duplicate", f"Jaccard {hit[1]:.2f} with kept row {hit[0]}", c.completion)
            continue
        index.add(c.key, c.text)
        tally.kept.append(c.row if config.format == "json" else {"id": f"synth-{c.key}", **c.row})


def refusal(tally: Tally, completions: int, min_rows: int) -> str:
    lines = [f"synth kept {len(tally.kept)} of {completions} completions; min_rows is {min_rows}. Nothing was "
             "published.", "  reason                     count  first example"]
    for reason in R.REASONS:
        if tally.rejected[reason]:
            ex = (tally.examples.get(reason) or [{}])[0]
            lines.append(f"  {reason:<24} {tally.rejected[reason]:>7,}  {ex.get('key', '')}: "
                         f"{ex.get('detail', '')}  {json.dumps(ex.get('completion', ''))[:100]}")
    lines.append("A small or untrained teacher writes little that parses: use a stronger teacher, guided: true "
                 "(vLLM), more prompts, or looser limits; set min_rows: 0 to publish what is kept anyway.")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


@click.command(name="synth")
@click.option("--seeds", "seeds", multiple=True, metavar="PREPARE_MANIFEST_OR_FILE",
              help="Seed examples: a prepare manifest or a .jsonl/.parquet file. Repeatable.")
@click.option("--teacher", metavar="MODEL_MANIFEST_OR_SRC", help="Merge manifest, or a model source.")
@click.option("--output", metavar="URI", help="Output prefix (s3:// or local).")
@click.option("--engine", type=click.Choice(["vllm", "transformers"]), help="Generation engine (default vllm).")
@config_options(example="num_prompts=200")
def command(seeds: tuple[str, ...], teacher: str | None, output: str | None, engine: str | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """Generate training examples from seed examples with a teacher model; keep those that pass.

    stdout: the manifest URI; `ftjobs prepare --source URI` reads its data set.
    """
    execute(sys.modules[__name__], config_file, sets,
            {"seeds": list(seeds) or None, "teacher": teacher, "output": output, "engine": engine})
