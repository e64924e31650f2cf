"""Chat formatting and loss masks: the one implementation prepare, train and
infer share, so training and inference can never disagree about the template.

A conversation is a list of messages: `role` (system, user, assistant, tool)
and `content`, and optionally `reasoning_content` (an assistant's reasoning),
`tool_calls` (an assistant's calls, see `common.tools`), `tool_call_id` (a
tool result), `name` (a tool result's function, or a participant's name on
any message: templates that read it render it) and `weight` (an assistant
turn's, below). It may come with `tools`, a list of JSON schemas.
`render` turns it into text with the model's Jinja template through
transformers' own template machinery (`render_jinja_template`, what
`apply_chat_template` uses), the tools passed as `tools=`; `encode_many`
(`common/chat_encode.py`) tokenizes a batch and builds labels from the spans found here:

- `train_on`: `assistant` (every assistant turn, the default),
  `last_assistant` (only the final one) or `all` (every token but BOS).
- A turn's `weight` (OpenAI's chat fine-tuning format) wins over `train_on`:
  0 makes an assistant turn context only (never trained, also under `all`),
  1 trains it (also under `last_assistant`); a turn without one follows
  `train_on`. `turn_rules` says per turn which rule decided, for the counts
  prepare records. Weights are not part of the text: templates never see them.
- A trained turn's label span runs from the first token of its content
  through its end-of-turn token, so the model learns to stop.
- Exactly one BOS leading the text: added when the template does not render it, never twice (a template's own
  BOS per turn, Llama 2's `<s>[INST]`, is its format and kept; one written in a row's text drops the row).
- Truncation drops whole trailing turns; it never cuts inside a kept turn and
  never keeps a prompt whose answer was cut off.

Where each assistant turn lies in the rendered text is found by the first of
these that applies to a conversation:

1. Generation tags: a template that wraps assistant output in
   `{% generation %}...{% endgeneration %}` (transformers'
   `return_assistant_tokens_mask`) says itself what is trained; one block per
   assistant turn, taken as it is (through the end-of-turn token right after a block that
   leaves it out).
2. Prefixes: the text of messages[:i] with the generation prompt ends where
   assistant turn i starts and the text of messages[:i+1] ends where it ends
   (its trailing whitespace is not trained). Where the template's syntax
   shows that its message loop never looks past the message it renders, or
   a row's render performs none of the reads that could (common/jinja_prefix.py:
   ChatML; Llama 3.2 and Qwen2.5 rows without tools), those texts are read
   off one rendering of the whole conversation, which marks where each
   message's iteration begins: the same texts without rendering each prefix
   again (2T renders a row of T turns, each over the conversation so far,
   become one).
3. Location, for templates whose prefixes render differently (Qwen3 drops the
   reasoning of turns before the last user message; Mistral moves the system
   prompt into the last user turn; indented templates without whitespace
   control): each message's content is found in the full rendering, from a
   second rendering with every text replaced by a marker (common/chat_locate.py;
   where that does not line up, by searching for each content in order).
   An assistant turn's span starts after its header (the generation prompt)
   when the header is there, else at its content, and runs through its tool
   calls and its end-of-turn token (the special token the template puts after
   an answer). A turn that cannot be found is refused, naming the turn.

Reasoning is kept: templates that read `reasoning_content` get it as that
field; others get it as a `<think>` block leading the content. Whatever a
template renders of a turn's reasoning is part of that turn's span, so
`train_on` decides whose reasoning is trained: `assistant` every rendered
turn's, `last_assistant` the last turn's only. (A Qwen3-like template renders
no reasoning before the last user message: there is nothing there to train.)

Prompts for inference are training's view of the conversation: it is rendered
with one more assistant turn and cut where that turn's span starts. Where
prefixes hold that is exactly `apply_chat_template(add_generation_prompt=True)`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from common import chat_locate
from common import tools as T
from common.chat_locate import TurnNotFound  # raised here too; callers catch chat.TurnNotFound
from common.errors import ConfigError

IGNORE_INDEX = -100
ROLES = ("system", "user", "assistant", "tool")
# Message keys besides role and content that templates see, in the order rows store them (common.data.MESSAGE;
# rows also store `weight`, which decides labels and is never rendered).
OPTIONAL_FIELDS = ("reasoning_content", "tool_calls", "tool_call_id", "name")
TrainOn = Literal["assistant", "last_assistant", "all"]
# What decided an assistant turn's labels, in the order prepare's `stats.turns` lists them.
TURN_RULES = ("trained", "weight_0", "train_on_excluded")
Messages = Sequence[dict[str, Any]]
ToolList = list[dict[str, Any]] | None

# Used when a tokenizer has no chat template and the config names none. ChatML: plain, widely used, and each
# turn ends in a token the model learns. With tools it renders them in the system turn and each call as a
# JSON object in <tool_call> tags (the Hermes convention); without, its text is plain ChatML.
CHATML = (
    "{{ bos_token if bos_token else '' }}"
    "{% if tools %}"
    "{{ '<|im_start|>system\n' }}"
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\n\n' }}{% endif %}"
    "{{ '# Tools\n\nYou may call these functions, given as JSON schemas:\n<tools>\n' }}"
    "{% for tool in tools %}{{ tool | tojson }}{{ '\n' }}{% endfor %}"
    "{{ '</tools>\n\nTo call one, answer with a JSON object per call, each in <tool_call></tool_call> tags:\n"
    "<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments object>}\n</tool_call><|im_end|>\n' }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{% if not (tools and loop.first and message['role'] == 'system') %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% for call in message['tool_calls'] or [] %}"
    "{{ ('\n' if message['content'] or not loop.first else '') + '<tool_call>\n{\"name\": \"' }}"
    "{{ call['function']['name'] + '\", \"arguments\": ' }}{{ call['function']['arguments'] | tojson }}"
    "{{ '}\n</tool_call>' }}"
    "{% endfor %}"
    "{{ '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
BUILTIN_TEMPLATES = {"chatml": CHATML}
# The answer of the assistant turn appended to find where a prompt's answer would start.
PLACEHOLDER = "ftjobs-answer-placeholder"
GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")  # the pattern transformers checks for


def template_hash(template: str) -> str:
    """sha256 of the template text: travels in every manifest downstream of prepare."""
    return hashlib.sha256(template.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class ChatFormat:
    """A chat template plus the special tokens it renders."""

    template: str
    bos_token: str | None = None
    eos_token: str | None = None
    # Whether a BOS id must lead every sequence (the tokenizer adds one by default).
    needs_bos: bool = False
    extra: tuple[tuple[str, str], ...] = ()
    # Every special token's text, longest first: end-of-turn candidates when turns are located.
    specials: tuple[str, ...] = ()

    @property
    def hash(self) -> str:
        return template_hash(self.template)

    def variables(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.extra)
        out["bos_token"] = self.bos_token or ""
        out["eos_token"] = self.eos_token or ""
        return out


def resolve_template(tokenizer: Any, override: str | None = None) -> str:
    """The template to use: an override (builtin name or template text), else the tokenizer's own."""
    if override:
        return BUILTIN_TEMPLATES.get(override, override)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # some tokenizers carry several named templates
        template = template.get("default") or next(iter(template.values()))
    if not template:
        return CHATML
    return str(template)


def chat_format(tokenizer: Any, override: str | None = None) -> ChatFormat:
    template = resolve_template(tokenizer, override)
    bos = getattr(tokenizer, "bos_token", None)
    eos = getattr(tokenizer, "eos_token", None)
    needs_bos = False
    if bos and tokenizer.bos_token_id is not None:
        probe = tokenizer("x", add_special_tokens=True)["input_ids"]
        needs_bos = bool(probe) and probe[0] == tokenizer.bos_token_id
    extra = tuple(
        (k, str(v)) for k, v in (getattr(tokenizer, "special_tokens_map", {}) or {}).items()
        if isinstance(v, str) and k not in ("bos_token", "eos_token")
    )
    specials = set(getattr(tokenizer, "all_special_tokens", None) or [])
    specials |= {t.content for t in (getattr(tokenizer, "added_tokens_decoder", None) or {}).values()
                 if getattr(t, "special", False)}
    return ChatFormat(template=template, bos_token=bos, eos_token=eos, needs_bos=needs_bos, extra=extra,
                      specials=tuple(sorted((s for s in specials if s), key=lambda s: (-len(s), s))))


def tokenizer_identity(tokenizer: Any) -> dict[str, Any]:
    """Name, vocabulary size and a hash of the vocabulary: enough to tell two tokenizers apart."""
    vocab = tokenizer.get_vocab()
    h = hashlib.sha256(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode()).hexdigest()
    return {
        "name": getattr(tokenizer, "name_or_path", "") or "",
        "class": type(tokenizer).__name__,
        "vocab_size": len(vocab),
        "vocab_sha256": h,
        "bos_token": getattr(tokenizer, "bos_token", None),
        "eos_token": getattr(tokenizer, "eos_token", None),
    }


# --------------------------------------------------------------------------- messages as templates see them


def clean(messages: Messages) -> list[dict[str, Any]]:
    """Messages with only the known keys that are set (Parquet gives every optional key, mostly null)."""
    return [{k: m[k] for k in ("role", "content", *OPTIONAL_FIELDS) if m.get(k) is not None} for m in messages]


@dataclass(frozen=True)
class Features:
    """What a template reads, from its text."""

    tags: bool             # {% generation %} blocks
    tools: bool            # renders `tools`
    tool_calls: bool       # renders messages' `tool_calls`
    reasoning: str | None  # the message key it reads reasoning from, if any
    names: bool            # reads a message's `name` (a participant's name)
    # Tests a content for none (DeepSeek V3/R1 render an assistant's tool calls only when its content is none).
    none_content: bool = False


@lru_cache(maxsize=16)
def features(template: str) -> Features:
    reasoning = "reasoning_content" if "reasoning_content" in template else (
        "thinking" if re.search(r"message(\.thinking|\[['\"]thinking['\"]\])", template) else None)
    return Features(tags=bool(GENERATION_TAG.search(template)), tools=bool(re.search(r"\btools\b", template)),
                    tool_calls="tool_calls" in template, reasoning=reasoning,
                    names=bool(re.search(r"\b(message|msg|m)(\.name\b|\[['\"]name['\"]\])", template)),
                    none_content=bool(re.search(r"content['\"]?\]?\s+is\s+(not\s+)?none\b", template)))


def for_template(fmt: ChatFormat, messages: Messages) -> list[dict[str, Any]]:
    """Canonical messages as the template receives them: tool call arguments as objects, reasoning in the
    key the template reads or, when it reads none, as a `<think>` block leading the content. A tool-calling turn
    without content has content none (OpenAI's form) for a template that tests for it, else ""."""
    feats = features(fmt.template)
    key = feats.reasoning
    out = []
    for m in clean(messages):
        if "tool_calls" in m:
            m["tool_calls"] = [T.for_template(c) for c in m["tool_calls"]]
        reasoning = m.pop("reasoning_content", None)
        if reasoning:
            if key:
                m[key] = reasoning
            else:
                m["content"] = f"<think>\n{reasoning}\n</think>\n\n{m.get('content', '')}"
        m.setdefault("content", "")
        if feats.none_content and not m["content"] and m.get("tool_calls"):
            m["content"] = None
        out.append(m)
    return out


def check_supported(fmt: ChatFormat, messages: Messages, tools: ToolList) -> None:
    """Refuse what the template would silently leave out of the text: tools, tool calls."""
    feats = features(fmt.template)
    fix = "Use a template that renders them (chat_template: chatml renders both)."
    if tools and not feats.tools:
        raise ConfigError("the chat template never reads `tools`, so the tool schemas would be left out of the "
                          f"text and the model trained to call functions it was never shown. {fix}")
    if not feats.tool_calls and any(m.get("tool_calls") for m in messages):
        raise ConfigError("the chat template never reads `tool_calls`, so assistant tool calls would be left "
                          f"out of the text. {fix}")


# --------------------------------------------------------------------------- rendering


@lru_cache(maxsize=16)
def _variables(fmt: ChatFormat) -> dict[str, Any]:
    return fmt.variables()  # read only: passed as keyword arguments


@lru_cache(maxsize=16)
def _compiled(template: str) -> Any:
    """transformers' own compiled template (its cache, its sandboxed environment and filters) behind a
    common.jinja_render.Renderer, or None where this transformers has no such function: `_render` then goes
    through render_jinja_template for every text."""
    try:
        from transformers.utils.chat_template_utils import _compile_jinja_template
    except ImportError:
        return None
    from common.jinja_render import Renderer

    return Renderer(_compile_jinja_template(template))


def _render(fmt: ChatFormat, messages: list[dict[str, Any]], add_generation_prompt: bool, tools: ToolList,
            track: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """Text, and with `track` the character spans of its generation blocks, from transformers' renderer.

    Without `track` and with tools given as JSON schemas (what rows hold), the compiled template is called
    the way render_jinja_template calls it, without the per-call work around it (a row whose prefixes cannot
    be read off one rendering renders about four times: the whole and the prefixes around each turn)."""
    with _template_errors():
        compiled = None if track or not _schemas(tools) else _compiled(fmt.template)
        if compiled is not None:
            return compiled.render(messages=messages, tools=tools, documents=None,
                                   add_generation_prompt=add_generation_prompt, **_variables(fmt)), []
        from transformers.utils.chat_template_utils import render_jinja_template

        texts, indices = render_jinja_template(  # type: ignore[str-unpack]  # annotated -> str, returns a tuple
            conversations=[messages], tools=tools,  # type: ignore[arg-type]
            chat_template=fmt.template, return_assistant_tokens_mask=track,
            add_generation_prompt=add_generation_prompt, **_variables(fmt))
    return str(texts[0]), [tuple(x) for x in indices[0]] if track else []  # type: ignore[misc]


def _schemas(tools: ToolList) -> bool:
    """Whether tools are absent or JSON schemas already (render_jinja_template converts Python functions)."""
    return not tools or all(isinstance(t, dict) for t in tools)


@contextmanager
def _template_errors() -> Iterator[None]:
    """A template that does not compile, or raises while rendering, as a ConfigError in its own words."""
    import jinja2

    try:
        yield
    except jinja2.TemplateSyntaxError as exc:
        raise ConfigError(f"Chat template does not compile: {exc}") from None
    except Exception as exc:  # noqa: BLE001 - raise_exception() and template bugs: the template's own words
        raise ConfigError(f"Chat template raised: {exc}") from None


@lru_cache(maxsize=16)
def _prefix_plan(fmt: ChatFormat) -> Any:
    """common.jinja_prefix's Plan for this template (its prefixes read off one rendering), or None: a
    template it cannot prove that for, or one that does not compile (the plain render says so)."""
    from common import jinja_prefix

    try:
        compiled = _compiled(fmt.template)
        made = None if compiled is None else jinja_prefix.plan(compiled.template, fmt.template, _variables(fmt))
    except Exception:  # noqa: BLE001 - no plan: every text is rendered, and a broken template fails there
        return None
    return made if isinstance(made, jinja_prefix.Plan) else None


def render(fmt: ChatFormat, messages: Messages, add_generation_prompt: bool = False, tools: ToolList = None) -> str:
    """Render with the Jinja template, as `apply_chat_template(tokenize=False)` does."""
    return _render(fmt, for_template(fmt, messages), add_generation_prompt, tools)[0]


def is_text(messages: Messages) -> bool:
    """Plain-text rows (pretraining-style) are one message with role 'text'."""
    return len(messages) == 1 and messages[0].get("role") == "text"


@dataclass
class Spans:
    """The rendered text and, per assistant turn, its trainable character span."""

    text: str
    # (start, end, message_index) for assistant turns, in order.
    assistant: list[tuple[int, int, int]] = field(default_factory=list)
    method: str = "prefix"  # text | tags | prefix | located
    # False when the prefix method stopped early (`fits`): the turns after the last listed one start beyond
    # max_length tokens and cannot be kept, so they were never rendered on their own.
    complete: bool = True


# Whether a rendered prefix (the text before an assistant turn) may still fit in max_length tokens.
Fits = Callable[[str], bool]


def spans(fmt: ChatFormat, messages: Messages, tools: ToolList = None, fits: Fits | None = None) -> Spans:
    """Where each assistant turn lies in the rendered text (see the module docstring for the methods).

    `fits`, when given, lets the prefix method stop at the first turn whose prefix is already longer than
    max_length: one render per turn over the conversation so far is quadratic in the number of turns, and
    turns past max_length are truncated away anyway."""

    if is_text(messages):
        text = (fmt.bos_token or "") + messages[0]["content"] + (fmt.eos_token or "")
        start = len(fmt.bos_token or "")
        return Spans(text=text, assistant=[(start, len(text), 0)], method="text")
    check_supported(fmt, messages, tools)
    msgs = for_template(fmt, messages)
    turns = [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
    tags = features(fmt.template).tags
    plan = None if tags or not _schemas(tools) else _prefix_plan(fmt)
    prefix: Prefix | None = None
    blocks: list[tuple[int, int]]
    try:
        if plan is not None:  # one render; the prefixes are read off it where the plan can (else rendered)
            with _template_errors():
                marked = plan.render(msgs, {"tools": tools, "documents": None, "add_generation_prompt": False,
                                            **_variables(fmt)})
            full, blocks = marked.text, []

            def prefix(n: int, gen: bool) -> str | None:
                return plan.prefix(marked, n, gen)
        else:
            full, blocks = _render(fmt, msgs, False, tools, track=tags)
    except ConfigError as exc:
        raise _refused(fmt, msgs, tools, exc) from None
    if tools and (left := next((n for n in map(_tool_name, tools) if n and n not in full), None)):
        raise ConfigError(f"the chat template leaves the tool {left!r} out of the text (it names "
                          "`tools` but does not render them, as Phi-4-mini's reads them from the system message), "
                          "so the model would be trained to call functions it was never shown. Use a template "
                          "that renders them (chat_template: chatml renders both).")
    ordered = all(0 <= s <= e <= len(full) for s, e in blocks) and all(
        a[1] <= b[0] for a, b in zip(blocks, blocks[1:], strict=False))
    if blocks and len(blocks) == len(turns) and ordered:  # else (say, tags inside a macro) the other methods
        return _calls_trained(Spans(full, _through_end_of_turn(fmt, full, blocks, turns), "tags"), msgs)
    out = _by_prefix(fmt, msgs, full, turns, tools, fits, prefix)
    if out is not None:
        return _calls_trained(Spans(full, out, "prefix", complete=len(out) == len(turns)), msgs)
    header = _header(fmt)  # the marked rendering; where it does not line up, a search in order
    t = chat_locate.Template(render=lambda m, gen: _render(fmt, m, gen, tools)[0], eot=_end_of_turn(fmt),
                             header=header if header.strip() else "", reasoning=features(fmt.template).reasoning,
                             specials=fmt.specials)
    located = chat_locate.locate(t, msgs, full, turns)
    return Spans(full, located if located is not None else chat_locate.search(t, msgs, full, turns), "located")


def _through_end_of_turn(fmt: ChatFormat, full: str, blocks: list[tuple[int, int]],
                         turns: list[int]) -> list[tuple[int, int, int]]:
    """Generation blocks as spans, each through the end-of-turn token that directly follows it where the block
    leaves it out (`{% generation %}{{ content }}{% endgeneration %}<|im_end|>`): a model must learn to stop."""
    eot = _end_of_turn(fmt)
    return [(s, e + len(eot) if eot and full.startswith(eot, e) else e, i)
            for (s, e), i in zip(blocks, turns, strict=True)]


def _tool_name(tool: Any) -> str | None:
    """A JSON schema's function name (None for what is not one: a Python function transformers converts)."""
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    return fn.get("name") if isinstance(fn, dict) and isinstance(fn.get("name"), str) else None


def _calls_trained(sp: Spans, msgs: list[dict[str, Any]]) -> Spans:
    """`sp`, once each turn's tool calls are found in its span: a template that reads `tool_calls` may still
    leave a turn's calls out (DeepSeek's renders them only for a content of none), and that turn would teach
    an empty answer where a call belongs."""
    for k, (s, e, i) in enumerate(sp.assistant):
        for call in msgs[i].get("tool_calls") or ():
            if sp.text.find(call["function"]["name"], s, e) < 0:
                raise TurnNotFound(
                    f"assistant turn {k + 1} (message {i}): its call of {call['function']['name']!r} is not in "
                    f"the rendering of the turn ({sp.method}), so the model would learn an answer without it. Use "
                    "a template that renders every tool call (chat_template: chatml) or fix the row.")
    return sp


def _refused(fmt: ChatFormat, msgs: list[dict[str, Any]], tools: ToolList, exc: ConfigError) -> ConfigError:
    """A template's refusal of a conversation, naming the first message it refuses (the shortest prefix that
    raises too): rendered again only for a row that is refused anyway."""
    for n in range(1, len(msgs)):
        try:
            _render(fmt, msgs[:n], False, tools)
        except ConfigError:
            return ConfigError(f"{exc} (message {n - 1}, role {msgs[n - 1]['role']!r}: the template refuses the "
                               "conversation from there on)")
    return ConfigError(f"{exc} (message {len(msgs) - 1}, role {msgs[-1]['role']!r}: the template refuses the "
                       "whole conversation, not a shorter part of it)") if msgs else exc


# The text of messages[:n], with or without the generation prompt, when it can be had without rendering.
Prefix = Callable[[int, bool], "str | None"]


def _by_prefix(fmt: ChatFormat, msgs: list[dict[str, Any]], full: str, turns: list[int],
               tools: ToolList, fits: Fits | None = None, known: Prefix | None = None
               ) -> list[tuple[int, int, int]] | None:
    """The prefix method; `known` gives a prefix's text when it is read off the full rendering (else, or
    where it gives None, the prefix is rendered)."""

    def text(n: int, gen: bool) -> str:
        got = known(n, gen) if known is not None else None
        return got if got is not None else _render(fmt, msgs[:n], gen, tools)[0]

    out: list[tuple[int, int, int]] = []
    for i in turns:
        try:
            before = text(i, True)
            if fits is not None and out and full.startswith(before) and not fits(before):
                return out  # this turn and every later one start past max_length: they cannot be kept
            # A turn that ends the conversation ends at the end of `full`: the same render, done once.
            through = full if i == len(msgs) - 1 else text(i + 1, False)
        except ConfigError:  # the template refuses a part of the conversation it renders whole: locate instead
            return None
        if not full.startswith(before) or not full.startswith(through) or len(through) < len(before):
            return None
        end = len(through.rstrip())  # the turn's own end-of-turn token is trained; the newline after is not
        if through is full:
            end = _without_closing(fmt, full, len(before), end)
        out.append((len(before), max(end, len(before)), i))
    return out


def _without_closing(fmt: ChatFormat, full: str, start: int, end: int) -> int:
    """The end of a conversation's last turn without the EOS a template puts after the whole conversation
    when it is not the turn's own end-of-turn token (Phi-3: `answer<|end|>\\n<|endoftext|>`): the turn is
    trained through its <|end|>, as every earlier turn is."""
    eos = fmt.eos_token
    if not eos or not full.endswith(eos, start, end):
        return end
    eot = _end_of_turn(fmt)
    if not eot or eot == eos:
        return end
    cut = start + len(full[start:end - len(eos)].rstrip())
    return cut if full.endswith(eot, start, cut) else end


@lru_cache(maxsize=16)
def _header(fmt: ChatFormat) -> str:
    """The generation prompt (what add_generation_prompt appends), or "" when the template has none."""
    probe = [{"role": "user", "content": "ftjobs probe question"}]
    try:
        plain, prompted = _render(fmt, probe, False, None)[0], _render(fmt, probe, True, None)[0]
    except ConfigError:
        return ""
    return prompted[len(plain):] if prompted.startswith(plain) else ""


@lru_cache(maxsize=16)
def _end_of_turn(fmt: ChatFormat) -> str | None:
    """The special token the template puts after an answer (<|im_end|>, <|eot_id|>, </s>, <end_of_turn>...)."""
    answer, question = "ftjobs probe answer", "ftjobs probe second question"
    two = [{"role": "user", "content": "ftjobs probe question"}, {"role": "assistant", "content": answer},
           {"role": "user", "content": question}, {"role": "assistant", "content": "ftjobs probe last"}]
    rest = None
    for probe in (two, two[:2]):
        try:
            text = _render(fmt, probe, False, None)[0]
        except ConfigError:
            continue
        if answer in text:
            after = text[text.index(answer) + len(answer):]
            rest = after[:after.index(question)] if question in after else after
            break
    if rest is None:
        return None
    rest = rest.lstrip()
    return next((tok for tok in (*fmt.specials, fmt.eos_token) if tok and rest.startswith(tok)), None)


def turn_rules(messages: Messages, train_on: TrainOn, turns: Sequence[int] | None = None) -> list[str]:
    """For each assistant turn (message indices `turns`, default every assistant message), the rule that
    decides its labels (one of TURN_RULES): its `weight` when the data gives one (0: `weight_0`, 1:
    `trained`), else `train_on` (`last_assistant` excludes every turn but the last one of `turns`)."""
    if turns is None:
        turns = [i for i, m in enumerate(messages) if m.get("role") == "assistant"]
    out = []
    for k, i in enumerate(turns):
        weight = messages[i].get("weight")
        if weight is not None:
            out.append("trained" if weight else "weight_0")
        elif train_on == "last_assistant" and k != len(turns) - 1:
            out.append("train_on_excluded")
        else:
            out.append("trained")
    return out


# --------------------------------------------------------------------------- prompts for inference


def split_prompt(messages: Messages) -> tuple[list[dict[str, Any]], str | None]:
    """The conversation up to its last assistant turn, and that turn as the reference: its content, and
    its tool calls as one `{"name", "arguments"}` JSON object per line."""
    msgs = clean(messages)
    if msgs and msgs[-1].get("role") == "assistant":
        last = msgs[-1]
        reference = str(last.get("content") or "")
        if last.get("tool_calls"):
            reference = "\n".join(x for x in (reference, T.calls_text(last["tool_calls"])) if x)
        return msgs[:-1], reference
    return msgs, None


def render_prompt(fmt: ChatFormat, messages: Messages, tools: ToolList = None) -> str:
    """The text a model continues from: the conversation as training renders it, up to where the next
    assistant turn's trained span starts (for most templates: the conversation plus the generation prompt)."""
    if is_text(messages):
        return (fmt.bos_token or "") + messages[0]["content"]
    sp = spans(fmt, [*messages, {"role": "assistant", "content": PLACEHOLDER}], tools)
    return sp.text[:sp.assistant[-1][0]]


def encode_prompt(tokenizer: Any, fmt: ChatFormat, messages: Messages, tools: ToolList = None) -> list[int]:
    """Token ids of the prompt, with the same single-BOS rule as training.

    Engines get ids, not text, so they cannot add a second BOS of their own.
    """
    ids = list(tokenizer(render_prompt(fmt, messages, tools), add_special_tokens=False)["input_ids"])
    bos_id = tokenizer.bos_token_id
    if fmt.needs_bos and bos_id is not None and (not ids or ids[0] != bos_id):
        ids = [bos_id] + ids
    return ids
