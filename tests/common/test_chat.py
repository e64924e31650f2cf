"""Loss masks and prompts for templates that behave like each major family's (tests/common/chat_families.py),
on the tiny real tokenizer: trained tokens decoded and compared, prompts compared with training's text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from common import chat, chat_encode
from common.errors import ConfigError
from tests.common.chat_families import FAMILIES, GEMMA, tokenizer

pytestmark = pytest.mark.unit

CONV = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "What is one plus one?"},
    {"role": "assistant", "content": "Two.", "reasoning_content": "one and one make two"},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "Four.", "reasoning_content": "two and two make four"},
]
PLAIN = [{k: v for k, v in m.items() if k != "reasoning_content"} for m in CONV]
END = {"llama3": "<|eot_id|>", "gemma": "<end_of_turn>", "mistral": "</s>", "phi3": "<|end|>",
       "chatml": "<|im_end|>", "qwen3": "<|im_end|>", "tagged": "<|im_end|>", "indented": "<|end|>"}
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONV = [
    {"role": "user", "content": "Weather in Oslo?"},
    {"role": "assistant", "content": "", "tool_calls": [
        {"id": "call1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "call1", "name": "get_weather"},
    {"role": "assistant", "content": "It is 3 degrees."},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Any:
    from transformers import AutoTokenizer

    from common import tinymodel

    path = tmp_path_factory.mktemp("tok") / "tok"
    tinymodel.build_tokenizer(path)
    return AutoTokenizer.from_pretrained(str(Path(path)))


def trained_runs(tok: Any, enc: chat_encode.Encoded) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs: list[list[int]] = []
    prev = False
    for t, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != chat.IGNORE_INDEX:
            assert lab == t
            if not prev:
                runs.append([])
            runs[-1].append(t)
        prev = lab != chat.IGNORE_INDEX
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_multi_turn_labels_cover_exactly_each_answer_and_its_end_of_turn(base: Any, name: str) -> None:
    fam = FAMILIES[name]
    tok = tokenizer(fam, base)
    fmt = chat.chat_format(tok)
    conv = CONV if name == "qwen3" else PLAIN  # Qwen3's prefixes differ once turns carry reasoning
    sp = chat.spans(fmt, conv)
    assert sp.method == fam.method, f"{name} ({fam.doc}) took {sp.method}"
    enc = chat_encode.encode_many(tok, fmt, [conv])[0]
    assert enc.error is None and enc.drop_reason is None
    # Mistral's answer follows "[/INST] ": the space is part of the answer's first token, and trained with it.
    lead = " " if name == "mistral" else ""
    last = "<think>\ntwo and two make four\n</think>\n\n" if name == "qwen3" else lead
    assert trained_runs(tok, enc) == [f"{lead}Two.{END[name]}", f"{last}Four.{END[name]}"]
    # Infer's prompt for the last answer is the training text up to where that answer's labels start.
    prompt = chat.render_prompt(fmt, conv[:-1])
    assert prompt == sp.text[:sp.assistant[-1][0]]
    trained = [i for i, lab in enumerate(enc.labels) if lab != chat.IGNORE_INDEX]
    first = next(i for i in reversed(trained) if i - 1 not in trained)  # where the last answer's labels start
    assert chat.encode_prompt(tok, fmt, conv[:-1]) == enc.input_ids[:first]
    if fam.method in ("prefix", "tags"):  # there it is exactly apply_chat_template(add_generation_prompt=True)
        assert prompt == tok.apply_chat_template(conv[:-1], tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("name", ["qwen3", "chatml", "llama3"])
def test_every_turn_and_every_prompt_end_where_labels_start(base: Any, name: str) -> None:
    tok = tokenizer(FAMILIES[name], base)
    fmt = chat.chat_format(tok)
    sp = chat.spans(fmt, CONV)
    for start, _, i in sp.assistant:
        assert chat.render_prompt(fmt, CONV[:i]) == sp.text[:start]


def test_generation_tags_give_the_same_mask_as_transformers(base: Any) -> None:
    tok = tokenizer(FAMILIES["tagged"], base)
    fmt = chat.chat_format(tok)
    enc = chat_encode.encode_many(tok, fmt, [PLAIN])[0]
    theirs = tok.apply_chat_template(PLAIN, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    assert theirs["input_ids"] == enc.input_ids
    assert theirs["assistant_masks"] == [int(lab != chat.IGNORE_INDEX) for lab in enc.labels]


def test_qwen3_keeps_the_last_turns_reasoning_and_train_on_picks_the_turns(base: Any) -> None:
    tok = tokenizer(FAMILIES["qwen3"], base)
    fmt = chat.chat_format(tok)
    last_turn = "<think>\ntwo and two make four\n</think>\n\nFour.<|im_end|>"
    every, last = (chat_encode.encode_many(tok, fmt, [CONV], train_on=t)[0] for t in ("assistant", "last_assistant"))
    assert trained_runs(tok, every) == ["Two.<|im_end|>", last_turn]
    assert trained_runs(tok, last) == [last_turn]
    # Reasoning written inline as a <think> block is the same row to this template.
    inline = [m if m["role"] != "assistant" else {"role": "assistant", "content": f"<think>\n"
              f"{m['reasoning_content']}\n</think>\n\n{m['content']}"} for m in CONV]
    assert chat_encode.encode_many(tok, fmt, [inline])[0].input_ids == every.input_ids
    # A single-turn row still passes the prefix check.
    assert chat.spans(fmt, CONV[:3]).method == "prefix"


def test_a_template_that_does_not_read_reasoning_gets_it_as_a_think_block(base: Any) -> None:
    tok = tokenizer(FAMILIES["chatml"], base)
    enc = chat_encode.encode_many(tok, chat.chat_format(tok), [CONV])[0]
    assert trained_runs(tok, enc) == ["<think>\none and one make two\n</think>\n\nTwo.<|im_end|>",
                                      "<think>\ntwo and two make four\n</think>\n\nFour.<|im_end|>"]


@pytest.mark.parametrize("name", ["chatml", "qwen3", "llama3"])
def test_tool_schemas_are_rendered_and_tool_calls_are_trained(base: Any, name: str) -> None:
    tok = tokenizer(FAMILIES[name], base)
    fmt = chat.chat_format(tok)
    enc = chat_encode.encode_many(tok, fmt, [TOOL_CONV], tools=[TOOLS])[0]
    text = tok.decode(enc.input_ids, skip_special_tokens=False)
    assert "Weather for a city" in text and '"required"' in text  # the schema is in the training text
    runs = trained_runs(tok, enc)
    assert len(runs) == 2 and runs[1] == f"It is 3 degrees.{END[name]}"
    assert "get_weather" in runs[0] and '"city": "Oslo"' in runs[0] and runs[0].endswith(END[name])
    assert "Weather for a city" not in "".join(runs)  # the schema is context, never a target
    prompt = chat.render_prompt(fmt, TOOL_CONV[:1], TOOLS)
    assert "Weather for a city" in prompt and prompt == text[:text.index(runs[0])]


def test_templates_that_would_drop_tools_or_calls_are_refused(base: Any) -> None:
    tok = tokenizer(FAMILIES["gemma"], base)
    fmt = chat.chat_format(tok, GEMMA)
    with pytest.raises(ConfigError, match="never reads `tools`"):
        chat.render_prompt(fmt, TOOL_CONV[:1], TOOLS)
    enc = chat_encode.encode_many(tok, fmt, [TOOL_CONV])[0]
    assert enc.drop_reason == "template_error" and "never reads `tool_calls`" in (enc.error or "")


def test_a_row_the_template_refuses_or_a_turn_that_cannot_be_found_comes_back_as_an_error(base: Any) -> None:
    tok = tokenizer(FAMILIES["gemma"], base)
    fmt = chat.chat_format(tok)
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "c"}]
    good, refused = chat_encode.encode_many(tok, fmt, [PLAIN, bad])
    assert good.error is None and "roles must alternate" in (refused.error or "")
    # Prefixes differ (the message count leads the text) and the answer is rewritten (upper case).
    rewrites = ("{{ messages | length }} messages\n"
                "{% for m in messages %}{{ m['role'] + ': ' + m['content'] | upper + '\n' }}{% endfor %}")
    enc = chat_encode.encode_many(tok, chat.chat_format(tok, rewrites), [PLAIN])[0]
    assert enc.drop_reason == "template_error"
    assert "assistant turn 1 (message 2): its content ('Two.') is not in the rendering" in (enc.error or "")


def test_split_prompt_keeps_tool_fields_and_makes_a_call_the_reference() -> None:
    prompt, reference = chat.split_prompt(TOOL_CONV[:2])
    assert prompt == TOOL_CONV[:1] and reference == '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    prompt, reference = chat.split_prompt([*TOOL_CONV[:3], {"role": "assistant", "content": "ok",
                                                            "reasoning_content": None}])
    assert prompt[2] == TOOL_CONV[2] and reference == "ok"


def test_a_tool_round_before_the_last_user_message_is_located_with_its_call(base: Any) -> None:
    """Qwen3 drops the reasoning of the tool-calling turn once a later user message follows: prefixes differ,
    so the turns are located, and the call (not the dropped reasoning) is trained."""
    tok = tokenizer(FAMILIES["qwen3"], base)
    fmt = chat.chat_format(tok)
    conv = [TOOL_CONV[0], {**TOOL_CONV[1], "reasoning_content": "need the weather"}, *TOOL_CONV[2:],
            {"role": "user", "content": "And tomorrow?"},
            {"role": "assistant", "content": "Colder.", "reasoning_content": "a guess"}]
    sp = chat.spans(fmt, conv, TOOLS)
    assert sp.method == "located"
    runs = trained_runs(tok, chat_encode.encode_many(tok, fmt, [conv], tools=[TOOLS])[0])
    assert runs == ['\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>',
                    "It is 3 degrees.<|im_end|>", "<think>\na guess\n</think>\n\nColder.<|im_end|>"]
    assert chat.render_prompt(fmt, conv[:-1], TOOLS) == sp.text[:sp.assistant[-1][0]]


WEIGHTED = [
    {"role": "user", "content": "What is one plus one?"},
    {"role": "assistant", "content": "Three.", "weight": 0},
    {"role": "user", "content": "Are you sure?"},
    {"role": "assistant", "content": "Two, sorry.", "weight": 1},
    {"role": "user", "content": "And two plus two?"},
    {"role": "assistant", "content": "Four."},
]


@pytest.mark.parametrize(("train_on", "rules", "runs"), [
    ("assistant", ["weight_0", "trained", "trained"], ["Two, sorry.<|im_end|>", "Four.<|im_end|>"]),
    # weight 1 wins over last_assistant: the corrected answer is trained although it is not the last
    ("last_assistant", ["weight_0", "trained", "trained"], ["Two, sorry.<|im_end|>", "Four.<|im_end|>"]),
])
def test_a_weight_in_the_data_wins_over_train_on(base: Any, train_on: chat.TrainOn, rules: list[str],
                                                 runs: list[str]) -> None:
    tok = tokenizer(FAMILIES["chatml"], base)
    fmt = chat.chat_format(tok)
    assert chat.turn_rules(WEIGHTED, train_on) == rules
    enc = chat_encode.encode_many(tok, fmt, [WEIGHTED], train_on=train_on)[0]
    assert trained_runs(tok, enc) == runs
    # Weights are never part of the text: the same tokens as the row without them.
    plain = [{k: v for k, v in m.items() if k != "weight"} for m in WEIGHTED]
    assert chat_encode.encode_many(tok, fmt, [plain])[0].input_ids == enc.input_ids


def test_last_assistant_excludes_earlier_unweighted_turns_and_all_still_skips_weight_0(base: Any) -> None:
    tok = tokenizer(FAMILIES["llama3"], base)
    fmt = chat.chat_format(tok)
    unweighted_first = [{**m, "weight": None} if i == 1 else m for i, m in enumerate(WEIGHTED)]
    assert chat.turn_rules(unweighted_first, "last_assistant") == ["train_on_excluded", "trained", "trained"]
    enc = chat_encode.encode_many(tok, fmt, [unweighted_first], train_on="last_assistant")[0]
    assert trained_runs(tok, enc) == ["Two, sorry.<|eot_id|>", "Four.<|eot_id|>"]
    every = chat_encode.encode_many(tok, fmt, [WEIGHTED], train_on="all")[0]
    text = "".join(trained_runs(tok, every))
    assert "Three." not in text and "Two, sorry." in text and "What is one plus one?" in text
    # Every answer context only: nothing to train on.
    none = [{**m, "weight": 0} if m["role"] == "assistant" else m for m in WEIGHTED]
    assert chat_encode.encode_many(tok, fmt, [none])[0].drop_reason == "zero_trainable_tokens"


def test_truncation_counts_the_rules_of_the_turns_it_keeps(base: Any) -> None:
    tok = tokenizer(FAMILIES["chatml"], base)
    fmt = chat.chat_format(tok)
    full = chat_encode.encode_many(tok, fmt, [WEIGHTED])[0]
    cut = chat_encode.encode_many(tok, fmt, [WEIGHTED], max_length=len(full.input_ids) - 2,
                           train_on="last_assistant")[0]
    assert cut.truncated and cut.kept_messages == 4
    # The last kept turn has weight 1: trained; the weight-0 one before it is not.
    assert trained_runs(tok, cut) == ["Two, sorry.<|im_end|>"]
    assert chat.turn_rules(WEIGHTED[:cut.kept_messages], "last_assistant") == ["weight_0", "trained"]


def test_token_starts_from_the_encoding_match_a_search_over_every_offset(base: Any) -> None:
    """Labels map turn boundaries to tokens through chat_encode.Starts (the Rust Encoding asked at those characters);
    it must give what a binary search over all offsets gives, at every character, multi-byte text included."""
    import bisect
    import random

    rng = random.Random(0)
    alphabet = list("ab cd\u00e9  \u00fc\n\t\u4e2d\u6587\U0001f600") + ["<|im_end|>"]
    texts = ["".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40))) for _ in range(200)]
    for text, (_, starts) in zip(texts, chat_encode._tokenize(base, texts), strict=True):
        offsets = base(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        for c in range(len(text) + 2):
            assert starts.first_at(c) == bisect.bisect_left(offsets, c, key=lambda o: o[0]), (text, c)
