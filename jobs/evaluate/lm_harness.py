"""`EngineLM`: lm-evaluation-harness's `LM` interface over ftjobs' own engines (see guards.py).

- `generate_until`: the request's context as plain text (the harness's own prompt format, no chat
  template), generated greedily by the engine the guards run (vLLM or transformers, the adapter served as in
  infer), cut at the first of the request's `until` strings and at its `max_gen_toks` (at most the guard
  engine's max_tokens): what generative tasks need.
- `loglikelihood`: log P(continuation | context) and whether the continuation is the greedy one, from a
  transformers forward pass of the same weights and adapter (float32); the context/continuation split is the
  harness's (trailing spaces of the context move to the continuation, the continuation's tokens are those of
  context+continuation after the context's): what multiple-choice tasks need.
- `loglikelihood_rolling` (perplexity tasks such as wikitext) is not supported: refused with a message.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol

from lm_eval.api.model import LM

from common.errors import ConfigError


class ServedModel(Protocol):
    """What the harness needs of a served model (jobs/evaluate/guards.py `Served` is one): its tokenizer and
    length limit, its generation settings, greedy answers, and a transformers model to score continuations."""

    tokenizer: Any
    max_len: int
    settings: Any
    generate: Callable[..., Any]  # common.generate's engine: token ids in, (text, tokens, finish) per sample out

    def scorer(self) -> Any: ...


class EngineLM(LM):
    def __init__(self, served: ServedModel):
        super().__init__()
        self.served = served

    def _encode(self, text: str) -> list[int]:
        return list(self.served.tokenizer(text, add_special_tokens=False).input_ids)

    def _start(self) -> list[int]:
        tok = self.served.tokenizer
        return [tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id]

    def generate_until(self, requests: list[Any]) -> list[str]:
        tok = self.served.tokenizer
        room = max(1, self.served.max_len - self.served.settings.max_tokens)
        prompts = [(self._encode(r.args[0]) or self._start())[-room:] for r in requests]
        answers = self.served.generate(prompts)
        out = []
        for r, samples in zip(requests, answers, strict=True):
            text = samples[0][0]
            kwargs = r.args[1] if len(r.args) > 1 and isinstance(r.args[1], dict) else {}
            limit = kwargs.get("max_gen_toks")
            if limit is not None:
                text = tok.decode(self._encode(text)[: int(limit)])
            until = kwargs.get("until") or []
            for stop in [until] if isinstance(until, str) else until:
                if stop and stop in text:
                    text = text[: text.index(stop)]
            out.append(text)
        return out

    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        import torch

        net = self.served.scorer()
        out = []
        for r in requests:
            context, continuation = r.args[0], r.args[1]
            spaces = len(context) - len(context.rstrip(" "))
            if spaces:  # as the harness does: "Q: x A:" + " y", not "Q: x A: " + "y"
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            ctx = self._encode(context)
            whole = self._encode(context + continuation)
            cont = whole[len(ctx):] if whole[: len(ctx)] == ctx else self._encode(continuation)
            ctx = ctx or self._start()
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logits = net(input_ids=ids).logits[0, len(ctx) - 1: -1].float().log_softmax(-1)
            target = torch.tensor(cont)
            picked = logits.gather(-1, target[:, None]).squeeze(-1)
            out.append((float(picked.sum()), bool((logits.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        raise ConfigError("guard lm_eval: perplexity tasks (loglikelihood_rolling, e.g. wikitext) are not "
                          "supported; use generate_until or multiple-choice tasks")
