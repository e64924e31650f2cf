"""Loss masks for templates written after published families' formats (tests/common/chat_published.py): over
varied conversations, each trained turn's labels decode to exactly what the format says that turn's answer is
(its content as the template renders it, its tool call, its end-of-turn token), nothing else is trained, the
spans do not depend on whether common.jinja_prefix found a plan, and a refused conversation names its message."""

from __future__ import annotations

import random
from typing import Any

import pytest

from common import chat, chat_encode
from tests.common.chat_families import FAMILIES
from tests.common.chat_families import tokenizer as family_tokenizer
from tests.common.chat_published import PUBLISHED, Published, qwen3_answer, tokenizer

pytestmark = pytest.mark.unit

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
# Short answers that also stand in prompts, edge whitespace, several lines, non-ASCII.
TEXTS = ["Two.", "  padded answer  ", "line one\nline two", "\nleading newline", "trailing newline\n", "Yes", "OK",
         "What is one plus one?", "a\n\n  b  \n", "ε ünïcode"]


def conversations(fam: Published, seed: int, n: int) -> list[tuple[list[dict[str, Any]], Any]]:
    """System or not, 1-5 turns, tool rounds (9-character ids, as Mistral wants), reasoning, weights, names."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs: list[dict[str, Any]] = []
        if fam.system and rng.random() < 0.5:
            msgs.append({"role": "system", "content": rng.choice(["Be brief.", "  spaced  ", "Answer OK or Yes."])})
        for t in range(rng.randint(1, 5)):
            msgs.append({"role": "user", "content": rng.choice([*TEXTS, "hi"]),
                         **({"name": "Bob"} if rng.random() < 0.15 else {})})
            if fam.tools and rng.random() < 0.3:
                cid = f"call{t}abcd"
                msgs += [{"role": "assistant", "content": "", "tool_calls": [{"id": cid, "type": "function",
                          "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
                         {"role": "tool", "content": rng.choice(['{"temp": 3}', "sunny"]), "tool_call_id": cid}]
            answer: dict[str, Any] = {"role": "assistant", "content": rng.choice(TEXTS)}
            if rng.random() < 0.25:
                answer["reasoning_content"] = rng.choice(["think a bit", "  step 1\nstep 2  "])
            if rng.random() < 0.2:
                answer["weight"] = rng.choice([0, 1])
            if rng.random() < 0.1:
                answer["name"] = "Ann"
            msgs.append(answer)
        has_calls = any(m.get("tool_calls") for m in msgs)
        out.append((msgs, TOOLS if fam.tools and (has_calls or rng.random() < 0.2) else None))
    return out


@pytest.fixture(scope="module")
def base(tiny_tokenizer: Any) -> Any:
    return tiny_tokenizer  # the session's tiny tokenizer (the tiny model's): built once for the suite


def trained_runs(tok: Any, enc: chat_encode.Encoded) -> list[str]:
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != chat.IGNORE_INDEX:
            if not prev:
                runs.append([])
            runs[-1].append(t)
        prev = lab != chat.IGNORE_INDEX
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def expected(name: str, fam: Published, msgs: list[dict[str, Any]], i: int) -> str:
    m = msgs[i]
    if m.get("tool_calls"):
        assert fam.call is not None and len(m["tool_calls"]) == 1
        return fam.call(m["tool_calls"][0])
    return qwen3_answer(msgs, i) if name == "qwen3" else fam.answer(m)


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_labels_are_each_trained_answer_and_its_end_of_turn_token(base: Any, name: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    fam = PUBLISHED[name]
    tok = tokenizer(fam, base)
    fmt = chat.chat_format(tok)
    rows = conversations(fam, seed=len(name), n=30)
    got = []
    for conv, tools in rows:
        sp = chat.spans(fmt, conv, tools)
        got.append(sp)
        msgs = chat.for_template(fmt, conv)
        assert [i for _, _, i in sp.assistant] == [i for i, m in enumerate(msgs) if m["role"] == "assistant"]
        assert [sp.text[s:e] for s, e, _ in sp.assistant] == [expected(name, fam, msgs, i)
                                                              for _, _, i in sp.assistant], (name, conv)
        enc = chat_encode.encode_many(tok, fmt, [conv], tools=[tools])[0]
        assert enc.error is None and enc.drop_reason in (None, "zero_trainable_tokens"), enc
        rules = chat.turn_rules(conv, "assistant", [i for _, _, i in sp.assistant])
        assert trained_runs(tok, enc) == [sp.text[s:e] for (s, e, _), rule in zip(sp.assistant, rules, strict=True)
                                          if rule == "trained"]
    monkeypatch.setattr(chat, "_prefix_plan", lambda fmt: None)  # every prefix rendered: the same spans
    assert [chat.spans(fmt, conv, tools) for conv, tools in rows] == got


def test_a_short_answer_that_also_stands_in_the_moved_system_prompt_is_found_at_its_turn(base: Any) -> None:
    """Mistral moves the system prompt into the last user turn; the answer "Yes" stands in it too. Searching the
    text in order trained ' Yes.\\n\\nOK[/INST] Yes</s>' (prompt text) before the markers."""
    tok = family_tokenizer(FAMILIES["mistral"], base)
    fmt = chat.chat_format(tok)
    conv = [{"role": "system", "content": "Answer OK or Yes."}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "OK"}, {"role": "user", "content": "OK"},
            {"role": "assistant", "content": "Yes"}]
    sp = chat.spans(fmt, conv)
    assert sp.method == "located" and [sp.text[s:e] for s, e, _ in sp.assistant] == [" OK</s>", " Yes</s>"]
    assert trained_runs(tok, chat_encode.encode_many(tok, fmt, [conv])[0]) == [" OK</s>", " Yes</s>"]


def test_a_header_written_differently_for_one_turn_does_not_send_it_to_a_later_turn(base: Any) -> None:
    """A participant's name in one assistant header: the generation prompt is not there, and searching for it
    found the next turn's header (and the same answer after it) before the markers."""
    fam = PUBLISHED["named-chatml"]
    tok = tokenizer(fam, base)
    fmt = chat.chat_format(tok)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Yes", "name": "Ann"},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "Yes"}]
    sp = chat.spans(fmt, conv)
    assert sp.method == "located"
    assert [(sp.text[:s].endswith("name=Ann\n"), sp.text[s:e]) for s, e, _ in sp.assistant] == [
        (True, "Yes<|im_end|>"), (False, "Yes<|im_end|>")]


def test_a_template_with_a_bos_per_turn_keeps_its_rows_and_a_bos_in_the_text_still_drops(base: Any) -> None:
    fam = PUBLISHED["llama2"]
    tok = tokenizer(fam, base)
    fmt = chat.chat_format(tok)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Two."},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "Four."}]
    enc = chat_encode.encode_many(tok, fmt, [conv])[0]
    assert enc.drop_reason is None and enc.input_ids.count(tok.bos_token_id) == 2
    assert trained_runs(tok, enc) == [" Two. </s>", " Four. </s>"]
    smuggled = [conv[0], {"role": "assistant", "content": "Two.<s>"}]
    assert chat_encode.encode_many(tok, fmt, [smuggled])[0].drop_reason == "multiple_bos"


@pytest.mark.parametrize("name", ["phi4-mini", "phi3"])
def test_the_eos_after_a_whole_conversation_is_not_trained_with_its_last_turn(base: Any, name: str) -> None:
    """Phi-3 ends each turn with <|end|> and the conversation with EOS: a one-turn row (prefixes hold) trains
    its answer through <|end|>, as a longer row's last turn does."""
    tok = tokenizer(PUBLISHED[name], base) if name in PUBLISHED else family_tokenizer(FAMILIES[name], base)
    fmt = chat.chat_format(tok)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Two."}]
    sp = chat.spans(fmt, conv)
    assert sp.method == "prefix" and sp.text.endswith("<|endoftext|>")
    assert trained_runs(tok, chat_encode.encode_many(tok, fmt, [conv])[0]) == ["Two.<|end|>"]


@pytest.mark.parametrize(("name", "conv", "names"), [
    ("mistral0.1", [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                    {"role": "assistant", "content": "a"}], "message 0, role 'system'"),
    ("gemma2", [{"role": "user", "content": "q"}, {"role": "user", "content": "q2"},
                {"role": "assistant", "content": "a"}], "message 1, role 'user'"),
    ("named-chatml", [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                      {"role": "tool", "content": "r", "tool_call_id": "x"}, {"role": "assistant", "content": "b"}],
     "message 2, role 'tool'"),
])
def test_a_conversation_the_template_refuses_is_an_error_naming_the_message(base: Any, name: str,
                                                                            conv: list[dict[str, Any]],
                                                                            names: str) -> None:
    tok = tokenizer(PUBLISHED[name], base)
    enc = chat_encode.encode_many(tok, chat.chat_format(tok), [conv])[0]
    assert enc.drop_reason == "template_error" and "Chat template raised" in (enc.error or "")
    assert names in (enc.error or "")


CALL: dict[str, Any] = {"id": "c1", "type": "function",
                        "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
TOOL_ROUND: list[dict[str, Any]] = [
    {"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny", "tool_call_id": "c1"}, {"role": "assistant", "content": "Sunny."}]


def test_a_template_that_renders_calls_only_for_a_content_of_none_gets_none(base: Any) -> None:
    """DeepSeek-R1's format renders an assistant's calls only when its content is none (OpenAI's form of a
    tool-calling turn); given "" it would leave them out. Its header is the generation prompt without the
    `<think>\n` that prompt adds."""
    tok = tokenizer(PUBLISHED["deepseek-r1"], base)
    enc = chat_encode.encode_many(tok, chat.chat_format(tok), [TOOL_ROUND])[0]
    assert trained_runs(tok, enc) == [
        "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n```json\n"
        '{"city": "Oslo"}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜><｜end▁of▁sentence｜>',
        "Sunny.<｜end▁of▁sentence｜>"]


def test_a_tool_call_the_template_leaves_out_is_refused_naming_the_turn(base: Any) -> None:
    """A template that renders calls only beside a content: the call would not be in the text, and the turn is
    refused rather than trained as an empty answer."""
    template = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content }}"
                "{% if m.tool_calls and m.content %}{% for c in m.tool_calls %}{{ c.function.name }}{% endfor %}"
                "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
    tok = tokenizer(PUBLISHED["named-chatml"], base)
    enc = chat_encode.encode_many(tok, chat.chat_format(tok, template), [TOOL_ROUND])[0]
    assert enc.drop_reason == "template_error"
    assert "assistant turn 1 (message 1): its call of 'get_weather' is not in the rendering" in (enc.error or "")


def test_a_template_that_names_tools_but_does_not_render_them_is_refused(base: Any) -> None:
    """Phi-4-mini's format reads tools from the system message (`message['tools']`): the word `tools` is in the
    template, yet a row's tools would be left out of the text."""
    tok = tokenizer(PUBLISHED["phi4-mini"], base)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ok"}]
    enc = chat_encode.encode_many(tok, chat.chat_format(tok), [conv], tools=[TOOLS])[0]
    assert enc.drop_reason == "template_error" and "leaves the tool 'get_weather' out of the text" in (enc.error or "")


def test_a_template_that_compares_messages_is_located_with_equal_texts_sharing_a_marker(base: Any) -> None:
    """Mistral v0.3 puts the tools before the user message equal to the last one (`message == user_messages[-1]`):
    two equal user messages both get them, which a marker per message would not reproduce. (The system prompt
    joins only a last user message: prefixes differ, so the turns are located.)"""
    fam = PUBLISHED["mistral0.3"]
    assert fam.call is not None
    tok = tokenizer(fam, base)
    fmt = chat.chat_format(tok)
    call = {**CALL, "id": "call0abcd"}
    conv: list[dict[str, Any]] = [
        {"role": "system", "content": "S"}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "One."}, {"role": "user", "content": "again"},
        {"role": "assistant", "content": "", "tool_calls": [call]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call0abcd"}, {"role": "assistant", "content": "Two."}]
    sp = chat.spans(fmt, conv, TOOLS)
    assert sp.method == "located" and sp.text.count("[AVAILABLE_TOOLS]") == 2
    msgs = chat.for_template(fmt, conv)
    assert [sp.text[s:e] for s, e, _ in sp.assistant] == [" One.</s>", fam.call(msgs[4]["tool_calls"][0]), " Two.</s>"]


def test_a_generation_block_that_leaves_out_the_end_of_turn_token_is_trained_through_it(base: Any) -> None:
    """`{% generation %}` around the content only: the <|im_end|> right after it is the turn's stop, trained
    with it (the blocks themselves are taken as they are, transformers' mask then lacks the stop)."""
    fam = PUBLISHED["tagged-chatml"]
    template = fam.template.replace("message['content'] | trim + '<|im_end|>' }}{% endgeneration %}",
                                    "message['content'] | trim }}{% endgeneration %}{{ '<|im_end|>' }}")
    assert template != fam.template
    tok = tokenizer(fam, base)
    fmt = chat.chat_format(tok, template)
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Two."},
            {"role": "user", "content": "again"}, {"role": "assistant", "content": "Four."}]
    assert chat.spans(fmt, conv).method == "tags"
    assert trained_runs(tok, chat_encode.encode_many(tok, fmt, [conv])[0]) == ["Two.<|im_end|>", "Four.<|im_end|>"]
