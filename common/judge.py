"""A model as a judge: its settings, the prompts it is asked, and how its verdicts are read.

Used by evaluate (`judge:`: grade answers, or pick between two) and by synth (`judge:`: accept or reject a
generated example). The judge answers with one JSON object, a reason first and then its verdict:

    score     {"reason": "...", "score": N}          N an integer on the stated scale 1..scale
    pairwise  {"reason": "...", "winner": "A" | "B" | "tie"}

A verdict that cannot be read (no JSON object, a missing or mistyped field, a score off the scale) is
unparseable: `parse_*` return it with the problem named, and callers count it. A verdict is never guessed
from free text. `guided: true` constrains the judge's output to that JSON (vLLM structured outputs), so every
verdict parses; the verdict itself is still the model's.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import Field, model_validator

from common.config import JobConfig
from common.generate import EngineArgs, Sampling

SCORE_RUBRIC = ("You are grading an answer to a question against a reference answer. Judge whether the answer "
                "is correct and as useful as the reference; wording may differ.")
PAIRWISE_RUBRIC = ("You are comparing two answers to the same question. Pick the answer that is more correct and "
                   "more useful (use the reference answer when one is given); answer tie when neither is better.")
EXAMPLE_RUBRIC = ("You are reviewing one example for a finetuning data set. Judge whether it is correct, "
                  "coherent and useful as a training example.")
WINNERS = ("A", "B", "tie")


class JudgeModel(JobConfig):
    """The judge model and how it runs (the same engines as infer)."""

    model: str = Field(description="The judge: a merge manifest (URI or prefix) or a model source (HF id, s3:// "
                                   "prefix, folder).")
    rubric: str | None = Field(None, description="What the judge is told to judge by (the first part of every "
                                                 "judge prompt); None: a default for the mode.")
    scale: int = Field(10, ge=2, le=100, description="Scores run from 1 to this (score mode).")
    engine: Literal["vllm", "transformers"] = Field("vllm", description="Generation engine for the judge.")
    engine_args: EngineArgs = Field(default_factory=lambda: EngineArgs.model_validate({}),
                                  description="Engine settings for the judge.")
    sampling: Sampling = Field(default_factory=lambda: Sampling.model_validate({"temperature": 0.0, "max_tokens": 256}),
                               description="Sampling for the judge; greedy by default, so a verdict is repeatable.")
    guided: bool = Field(False, description="Constrain the judge's output to the verdict JSON (vLLM structured "
                                            "outputs): every verdict parses. Needs engine: vllm.")
    chat_template: str | None = Field(None, description="Template override for the judge (builtin name or Jinja "
                                                        "text); None: the judge model's own.")
    trust_remote_code: bool = Field(False, description="Allow judge model repos that ship their own code.")
    chunk_rows: int = Field(64, ge=1, description="Judge prompts per chunk: the unit of resume.")
    max_text_chars: int = Field(4000, ge=100, description="Longest question, reference or answer put in a judge "
                                                          "prompt; longer ones are cut (and say so).")

    @model_validator(mode="after")
    def _check(self) -> JudgeModel:
        if self.sampling.n != 1:
            raise ValueError(f"judge sampling.n is {self.sampling.n}: a judge gives one verdict per question; "
                             "set sampling.n: 1")
        if self.guided and self.engine != "vllm":
            raise ValueError("guided: true needs engine: vllm (the transformers engine cannot constrain output)")
        return self


@dataclass(frozen=True)
class Verdict:
    """A judge's answer as read: its value (a score, or A/B/tie), its reason, or what made it unreadable."""

    value: int | str | None
    reason: str | None
    problem: str | None = None  # set when the verdict is unparseable

    @property
    def ok(self) -> bool:
        return self.problem is None


def _answer_format(mode: str, scale: int) -> str:
    if mode == "score":
        return (f'Answer with one JSON object and nothing else: {{"reason": "<one or two sentences>", "score": '
                f"<an integer from 1 (worst) to {scale} (best)>}}")
    return ('Answer with one JSON object and nothing else: {"reason": "<one or two sentences>", "winner": '
            '"A", "B" or "tie"}')


def conversation(prompt: Any) -> str:
    """The question as the judge reads it: the one user turn, or every turn with its role."""
    if isinstance(prompt, list):
        turns = [m for m in prompt if isinstance(m, dict)]
        if len(turns) == 1 and turns[0].get("role") == "user":
            return str(turns[0].get("content") or "")
        return "\n".join(f"{m.get('role')}: {m.get('content') or ''}" for m in turns)
    return "" if prompt is None else str(prompt)


def cut(text: str | None, limit: int) -> str:
    text = text or ""
    return text if len(text) <= limit else text[:limit] + f"\n[... cut: {len(text) - limit} more characters]"


def score_prompt(rubric: str | None, question: str, reference: str | None, answer: str, scale: int,
                 limit: int = 4000) -> list[dict[str, str]]:
    """The user turn that asks for a score; without a reference (synth's examples) the rubric alone decides."""
    parts = [rubric or (SCORE_RUBRIC if reference is not None else EXAMPLE_RUBRIC), "",
             "[Question]", cut(question, limit)]
    if reference is not None:
        parts += ["", "[Reference answer]", cut(reference, limit)]
    parts += ["", "[Answer]", cut(answer, limit), "", _answer_format("score", scale)]
    return [{"role": "user", "content": "\n".join(parts)}]


def example_prompt(rubric: str | None, example: str, scale: int, limit: int = 4000) -> list[dict[str, str]]:
    """The user turn that asks for a score of one training example on its own (synth's judge)."""
    parts = [rubric or EXAMPLE_RUBRIC, "", "[Example]", cut(example, limit), "", _answer_format("score", scale)]
    return [{"role": "user", "content": "\n".join(parts)}]


def pairwise_prompt(rubric: str | None, question: str, reference: str | None, answer_a: str, answer_b: str,
                    limit: int = 4000) -> list[dict[str, str]]:
    parts = [rubric or PAIRWISE_RUBRIC, "", "[Question]", cut(question, limit)]
    if reference is not None:
        parts += ["", "[Reference answer]", cut(reference, limit)]
    parts += ["", "[Answer A]", cut(answer_a, limit), "", "[Answer B]", cut(answer_b, limit), "",
              _answer_format("pairwise", 0)]
    return [{"role": "user", "content": "\n".join(parts)}]


def verdict_schema(mode: str, scale: int) -> dict[str, Any]:
    """The JSON schema of a verdict, for guided decoding."""
    value: dict[str, Any] = ({"type": "integer", "minimum": 1, "maximum": scale} if mode == "score"
                             else {"enum": list(WINNERS)})
    key = "score" if mode == "score" else "winner"
    return {"type": "object", "properties": {"reason": {"type": "string", "maxLength": 300}, key: value},
            "required": ["reason", key], "additionalProperties": False}


FENCE = re.compile(r"^```[a-zA-Z]*\s*|\s*```$")


def first_json_object(text: str) -> tuple[dict[str, Any] | None, str | None]:
    """The JSON object that starts at the first `{` of `text` (code fences and text around it allowed), or
    None and why not. Only the first: an object nested in a broken one is never taken for the answer. Control
    characters inside strings are accepted (some constrained decoders emit them raw)."""
    stripped = FENCE.sub("", text.strip())
    start = stripped.find("{")
    if start < 0:
        return None, "no JSON object in the completion"
    try:
        obj, _ = json.JSONDecoder(strict=False).raw_decode(stripped, start)
    except json.JSONDecodeError as exc:
        return None, f"the JSON object is not valid ({exc.msg} at character {exc.pos})"
    except RecursionError:
        return None, "the JSON object is nested too deeply"
    return obj, None


def _reason(obj: dict[str, Any]) -> str | None:
    reason = obj.get("reason")
    return reason if isinstance(reason, str) else None


def parse_score(text: str, scale: int) -> Verdict:
    obj, why = first_json_object(text)
    if obj is None:
        return Verdict(None, None, why)
    score = obj.get("score")
    if isinstance(score, str) and score.strip().isdigit():
        score = int(score.strip())
    if isinstance(score, float) and score.is_integer():
        score = int(score)
    if isinstance(score, bool) or not isinstance(score, int):
        return Verdict(None, _reason(obj), f"no integer 'score' (got {json.dumps(score)[:40]})")
    if not 1 <= score <= scale:
        return Verdict(None, _reason(obj), f"score {score} is off the scale 1..{scale}")
    return Verdict(score, _reason(obj))


def parse_pairwise(text: str) -> Verdict:
    obj, why = first_json_object(text)
    if obj is None:
        return Verdict(None, None, why)
    winner = obj.get("winner")
    if isinstance(winner, str):
        label = {"a": "A", "b": "B", "tie": "tie"}.get(winner.strip().lower())
        if label:
            return Verdict(label, _reason(obj))
    return Verdict(None, _reason(obj), f"'winner' is {json.dumps(winner)[:40]}, expected \"A\", \"B\" or \"tie\"")


def read(text: str, finish_reason: str, mode: str, scale: int) -> Verdict:
    """A judge's completion as a verdict; one cut off at max_tokens is unparseable and says so."""
    if finish_reason == "length":
        return Verdict(None, None, "the verdict hit sampling.max_tokens and was cut off: raise judge "
                                   "sampling.max_tokens")
    return parse_score(text, scale) if mode == "score" else parse_pairwise(text)


def normalized(score: int, scale: int) -> float:
    """A score on 1..scale as 0..1, so it reads like every other metric (a share) and gates the same way."""
    return (score - 1) / (scale - 1)


def ask(jc: JudgeModel, asks: list[tuple[str, list[dict[str, str]]]], prefix: str, judge_in: Any, cache_dir: str | None,
        *, mode: str, what: str, engine: Any = None) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    """Put `asks` (key, judge prompt) to the judge, resumably under `prefix` (chunks: a rerun skips what a
    killed run answered), and return each key's reply and the generation's totals.

    `engine`: a started engine instead of loading `jc.model`; prompts reach it as the Unicode code points of
    their one user turn (tests: a scripted stand-in that reads them)."""
    from pathlib import Path

    from common import chat, chunks, generate, models

    if engine is None:
        model = generate.load_model(jc.model, judge_in, cache=Path(cache_dir) if cache_dir else models.cache_root(),
                                    trust_remote_code=jc.trust_remote_code, chat_template=jc.chat_template)
        requests = [chunks.Request(k, chat.encode_prompt(model.tokenizer, model.fmt, msgs)) for k, msgs in asks]
        guided = verdict_schema(mode, jc.scale) if jc.guided else None

        def start() -> Any:
            return generate.start(jc.engine, jc, model.engine_model(), guided=guided)
        identity: Any = model.identity()
    else:
        requests = [chunks.Request(k, [ord(ch) for ch in msgs[-1]["content"]]) for k, msgs in asks]

        def start() -> Any:
            return engine
        identity = "given engine"
    settings = {"judge": identity, "mode": mode, "judge_manifest": judge_in.sha256 if judge_in else None,
                **jc.model_dump(mode="json", include={"engine", "engine_args", "sampling", "guided"})}
    gen = chunks.run(prefix, requests, settings=settings, chunk_rows=jc.chunk_rows, samples=1,
                     max_tokens=jc.sampling.max_tokens, start_engine=start, what=what)
    return {r["key"]: r for r in gen.records}, gen.totals()


def read_reply(reply: dict[str, Any], mode: str, scale: int) -> Verdict:
    """The verdict in one of `ask`'s replies (a failed generation is an unreadable verdict, named)."""
    if reply["error"] is not None:
        return Verdict(None, None, f"not asked: {reply['error']}")
    return read(reply["completion"] or "", reply["finish_reason"], mode, scale)
