"""common.jinja_prefix: a prefix's text read off one rendering equals the prefix rendered on its own, for every
template the check accepts; what can never be read off is refused, a read that may see past a prefix sends the
rows that perform it to rendering, and those checks matter."""

from __future__ import annotations

import random
from typing import Any

import pytest

from common import chat, jinja_prefix
from tests.common.chat_families import FAMILIES

pytestmark = pytest.mark.unit

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]
WORDS = ["alpha", "beta", " gamma ", "\n delta", "ε", "<think>x</think> y", "end", "  "]


def conversations(seed: int, n: int) -> list[tuple[list[dict[str, Any]], Any]]:
    """Varied rows: with and without a system turn, 1-5 turns, contents with edge whitespace, reasoning, tool
    rounds, tools or none."""
    rng = random.Random(seed)

    def text() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 4))).strip() or "x"

    out = []
    for _ in range(n):
        msgs: list[dict[str, Any]] = []
        if rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(["Be brief.", "  spaced  ", "S"])})
        for _ in range(rng.randint(1, 5)):
            msgs.append({"role": "user", "content": text()})
            answer: dict[str, Any] = {"role": "assistant", "content": text()}
            if rng.random() < 0.2:
                answer["reasoning_content"] = "thinking " + text()
            if rng.random() < 0.15:
                call = {"id": "c1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
                msgs += [{"role": "assistant", "content": "", "tool_calls": [call]},
                         {"role": "tool", "content": "sunny", "tool_call_id": "c1"}]
            msgs.append(answer)
        out.append((msgs, TOOLS if rng.random() < 0.3 else None))
    return out


# Written here, after how the published Llama 3.2 and Qwen2.5 templates behave where a prefix is concerned.
# Llama 3.2: with tools, the first user message is taken into the tools block after a `messages | length`
# check (a whole-list read: rows with tools are rendered prefix by prefix, the others read off).
LLAMA32_TOOLS = (
    "{{- bos_token }}"
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system + '<|eot_id|>' }}"
    "{%- if tools %}{%- if messages | length != 0 %}{%- set first = messages[0]['content'] | trim %}"
    "{%- set messages = messages[1:] %}{%- else %}{{- raise_exception('no first user message') }}{%- endif %}"
    "{{- '<|start_header_id|>user<|end_header_id|>\n\nFunctions:\n' }}"
    "{%- for t in tools %}{{- t | tojson }}{{- '\n' }}{%- endfor %}{{- first + '<|eot_id|>' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' and message.tool_calls %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- for c in message.tool_calls %}{{- c.function.name + ' ' }}{{- c.function.arguments | tojson }}{%- endfor %}"
    "{{- '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' }}"
    "{{- message['content'] | trim + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{%- endif %}"
)
# Qwen2.5: consecutive tool results share one user turn, opened when the message before is not a tool result
# and closed when the next one is not (loop.last, messages[loop.index0 + 1]): rows with tool results are
# rendered prefix by prefix, the others read off.
QWEN25_TOOLS = (
    "{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\n' + messages[0]['content'] }}"
    "{%- else %}{{- '<|im_start|>system\nYou are a helpful assistant.' }}{%- endif %}"
    "{%- if tools %}{{- '\n\n# Tools\n<tools>' }}{%- for t in tools %}{{- '\n' + t | tojson }}{%- endfor %}"
    "{{- '\n</tools>' }}{%- endif %}{{- '<|im_end|>\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>assistant' }}"
    "{%- for tc in message.tool_calls %}{{- '\n<tool_call>\n' + tc.function.name + ' ' }}"
    "{{- tc.function.arguments | tojson }}{{- '\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\n' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if loop.index0 == 0 or messages[loop.index0 - 1].role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\n<tool_response>\n' + message.content + '\n</tool_response>' }}"
    "{%- if loop.last or messages[loop.index0 + 1].role != 'tool' %}{{- '<|im_end|>\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\n' }}{%- endif %}"
)
TEMPLATES = {**{name: f.template for name, f in FAMILIES.items()}, "llama32_tools": LLAMA32_TOOLS,
             "qwen25_tools": QWEN25_TOOLS}
# The templates that get a plan (the other families, Mistral, Qwen3 and generation tags, get none: every
# prefix of theirs is rendered, as before).
PLANNED = ["chatml", "gemma", "llama3", "phi3", "indented", "llama32_tools", "qwen25_tools"]


def fmt_of(name: str) -> chat.ChatFormat:
    f = FAMILIES.get(name)
    if f is None:
        return chat.ChatFormat(template=TEMPLATES[name], bos_token="<s>", eos_token="</s>")
    return chat.ChatFormat(template=f.template, bos_token=f.bos, eos_token=f.eos, specials=f.specials)


def plan_of(template: str) -> jinja_prefix.Plan | str:
    from transformers.utils.chat_template_utils import _compile_jinja_template

    return jinja_prefix.plan(_compile_jinja_template(template), template, {"bos_token": "<s>", "eos_token": "</s>"})


def variables(fmt: chat.ChatFormat, tools: Any) -> dict[str, Any]:
    return {"tools": tools, "documents": None, "add_generation_prompt": False, **fmt.variables()}


@pytest.mark.parametrize("name", PLANNED)
def test_every_prefix_read_off_one_rendering_is_the_prefix_rendered(name: str) -> None:
    fmt = fmt_of(name)
    plan = chat._prefix_plan(fmt)
    assert isinstance(plan, jinja_prefix.Plan), name
    read, rendered_rows = 0, 0
    for conv, tools in conversations(seed=len(name), n=120):
        msgs = chat.for_template(fmt, conv)
        try:
            whole = chat._render(fmt, msgs, False, tools)[0]
        except chat.ConfigError:  # the template refuses the row (gemma: a tool turn): so does the marked render
            with pytest.raises(Exception):  # noqa: B017 - the template's own error, whatever its type
                plan.render(msgs, variables(fmt, tools))
            continue
        rendered = plan.render(msgs, variables(fmt, tools))
        assert rendered.text == whole
        rendered_rows += rendered.loop_end is None
        for n in range(len(msgs) + 1):
            for gen in (False, True):
                got = plan.prefix(rendered, n, gen)
                if got is not None:
                    read += 1
                    assert got == chat._render(fmt, msgs[:n], gen, tools)[0], (name, n, gen)
    assert read > 400  # the plan is really used, not refused row by row
    # Where a row's render reads past a prefix (tools, tool results), that row is rendered prefix by prefix.
    assert (rendered_rows > 10) == (name in ("llama32_tools", "qwen25_tools")), rendered_rows


@pytest.mark.parametrize("name", PLANNED)
def test_spans_are_the_same_with_and_without_the_plan(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    fmt = fmt_of(name)
    assert chat._prefix_plan(fmt) is not None  # else both runs would take the same path
    rows = conversations(seed=7, n=60)

    def all_spans() -> list[Any]:
        out: list[Any] = []
        for conv, tools in rows:
            for limit in (None, 40):  # `fits` stops the prefix method early on long rows
                fits = (lambda s, limit=limit: len(s) <= limit) if limit else None
                try:
                    out.append(chat.spans(fmt, conv, tools, fits))
                except chat.ConfigError as exc:
                    out.append(str(exc))
        return out

    with_plan = all_spans()
    monkeypatch.setattr(chat, "_prefix_plan", lambda fmt: None)
    assert all_spans() == with_plan


# Reads that may see past a prefix: the plan wraps them, and a row whose render performs one gets no prefix.
READ_AT_RUN = {
    "loop.last": "{% for m in messages %}{{ m['content'] }}{% if not loop.last %}, {% endif %}{% endfor %}"
                 "{% if add_generation_prompt %}A:{% endif %}",
    "messages | length": "{% for m in messages %}{{ m['content'] }}{{ messages | length }}{% endfor %}",
    "messages[-1]": "{% for m in messages %}{{ m['content'] }}{{ messages[-1]['role'] }}{% endfor %}",
    "generation prompt in the loop": "{% for m in messages %}{{ m['content'] }}"
                                     "{% if add_generation_prompt %}+{% endif %}{% endfor %}",
    "loop passed on whole": "{% macro show(l) %}{{ l.length }}{% endmacro %}"
                            "{% for m in messages %}{{ m['content'] }}{{ show(loop) }}{% endfor %}",
    "a loop over the messages inside an if": "{% if tools %}{% for m in messages %}{{ m['role'] }}{% endfor %}"
                                             "{% endif %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
}
# What no read at run time can make safe: no plan, every prefix rendered.
REFUSED = {
    "a namespace read after the loop": "{% set ns = namespace(n=0) %}{% for m in messages %}{{ m['content'] }}"
                                       "{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}",
    "a second loop": "{% set ns = namespace(u=-1) %}{% for m in messages %}{% if m['role'] == 'user' %}"
                     "{% set ns.u = loop.index0 %}{% endif %}{% endfor %}{% for m in messages %}"
                     "{{ m['content'] }}{% if loop.index0 == ns.u %}!{% endif %}{% endfor %}",
    "a filtered loop": "{% for m in messages if m['role'] != 'system' %}{{ m['content'] }}{% endfor %}",
    "a sorted copy": "{% set ms = messages | sort(attribute='role') %}{% for m in ms %}{{ m['content'] }}{% endfor %}",
    "loop in a macro": "{% macro all() %}{% for m in messages %}{{ m['content'] }}{% endfor %}{% endmacro %}"
                       "{{ all() }}",
    "a break": "{% for m in messages %}{% if m['content'] == 'stop' %}{% break %}{% endif %}{{ m['content'] }}"
               "{% endfor %}",
    "the messages under a name the render passes": "{% if messages[0]['role'] == 'system' %}"
        "{% set tools = messages[1:] %}{% endif %}{% for m in tools %}{{ m['content'] }}{% endfor %}",
    "a special token set before the loop": "{% set eos_token = '<end>' %}{% for m in messages %}{{ m['content'] }}"
                                           "{% endfor %}{% if add_generation_prompt %}{{ eos_token }}{% endif %}",
    "the messages set to something else": "{% set messages = messages | reverse | list %}"
                                          "{% for m in messages %}{{ m['content'] }}{% endfor %}",
    "an include": "{% include 'other' %}{% for m in messages %}{{ m['content'] }}{% endfor %}",
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_a_template_whose_prefixes_cannot_be_read_off_gets_no_plan(case: str) -> None:
    assert isinstance(plan_of(REFUSED[case]), str), case


@pytest.mark.parametrize("case", sorted(READ_AT_RUN))
def test_a_row_whose_render_reads_past_a_prefix_gets_no_prefix(case: str) -> None:
    plan = plan_of(READ_AT_RUN[case])
    assert isinstance(plan, jinja_prefix.Plan) and plan.checked_reads >= 1, case
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
            {"role": "user", "content": "r"}, {"role": "assistant", "content": "b"}]
    rendered = plan.render(msgs, {"tools": TOOLS, "documents": None, "add_generation_prompt": False,
                                  "bos_token": "<s>", "eos_token": "</s>"})
    assert all(plan.prefix(rendered, n, gen) is None for n in range(5) for gen in (False, True)), case


def test_the_checks_matter_a_looking_ahead_prefix_is_not_in_the_whole() -> None:
    """Where a template reads loop.last, the text before message 1's iteration is not messages[:1]'s text."""
    from transformers.utils.chat_template_utils import _compile_jinja_template

    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    template = _compile_jinja_template(READ_AT_RUN["loop.last"])
    whole, prefix = template.render(messages=msgs), template.render(messages=msgs[:1])
    assert (whole, prefix) == ("q, a", "q")  # read off the whole, messages[:1] would be "q, "
    fmt = chat.ChatFormat(template=READ_AT_RUN["loop.last"])
    assert chat.spans(fmt, msgs).method == "located"  # the row reads loop.last: its prefixes were rendered


def test_what_a_plan_accepts() -> None:
    # A nested loop's loop.last and break are its own; slicing off a system turn before the loop; messages[0] before it.
    accepted = ("{% if messages[0]['role'] == 'system' %}{% set rest = messages[1:] %}{% else %}"
                "{% set rest = messages %}{% endif %}{% for m in rest %}{{ m['content'] }}"
                "{% for c in m.tool_calls or [] %}{{ c.function.name }}"
                "{% if not loop.last %},{% else %}{% break %}{% endif %}"
                "{% endfor %}{% if loop.first %}|{% endif %}{% endfor %}"
                "{% if add_generation_prompt %}A:{% else %}{{ eos_token }}{% endif %}")
    plan = plan_of(accepted)
    assert isinstance(plan, jinja_prefix.Plan)
    assert plan.min_prefix == 1  # messages[0] is read: an empty prefix is rendered, not read off
    assert plan.checked_reads == 0  # the nested loop's loop.last is its own: nothing to check at run time
    assert plan.after == ("</s>", "A:")


def test_the_templates_that_look_ahead_or_carry_tags_get_no_plan() -> None:
    assert {name for name in TEMPLATES if chat._prefix_plan(fmt_of(name)) is None} == set(TEMPLATES) - set(PLANNED)
