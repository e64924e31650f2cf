"""Row rules of the prepare job: every format and mapping, every validation reason."""

from __future__ import annotations

import pytest

from jobs.prepare import rows as R
from jobs.prepare.job import Columns, Config

pytestmark = pytest.mark.unit

COLS = Columns().model_dump()
ROLES = dict(R.DEFAULT_ROLES)


def norm(rec, fmt, columns=None, roles=None, max_chars=10_000):
    cols = {**COLS, **(columns or {})}
    return R.validate(R.to_messages(rec, fmt, cols, {**ROLES, **(roles or {})}), max_chars)


def reason(rec, fmt, **kw):
    with pytest.raises(R.Drop) as info:
        norm(rec, fmt, **kw)
    return info.value.reason


def test_alpaca_with_input_system_and_history():
    rec = {"instruction": "Sum", "input": "2 3", "output": "5", "system": "Be exact.",
           "history": [["hi", "hello"]]}
    assert norm(rec, "alpaca") == [
        {"role": "system", "content": "Be exact."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "Sum\n\n2 3"},
        {"role": "assistant", "content": "5"}]
    # empty optional fields add nothing
    assert norm({"instruction": "a", "input": "", "output": "b", "system": ""}, "alpaca") == [
        {"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]


def test_sharegpt_roles_including_function_call_and_observation():
    rec = {"conversations": [
        {"from": "system", "value": "s"}, {"from": "human", "value": "q"},
        {"from": "function_call", "value": "{\"name\": \"f\", \"arguments\": {\"x\": 1}}"},
        {"from": "observation", "value": "42"}, {"from": "gpt", "value": "It is 42."}]}
    msgs = norm(rec, "sharegpt")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant", "tool", "assistant"]
    # The function_call turn is a tool call, not assistant text.
    assert msgs[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": '{"x": 1}'}}]}


GLAIVE_TOOLS = ('[{"name": "convert_currency", "description": "Convert an amount", "parameters": {"type": "object", '
                '"properties": {"amount": {"type": "number"}, "to": {"type": "string"}}, "required": ["amount"]}}]')


def test_llama_factory_glaive_style_tools_column_and_parallel_calls():
    """LLaMA-Factory's sharegpt tool data: a tools column of JSON text holding bare function schemas, and a
    function_call turn that may hold a list of calls (parallel calling)."""
    rec = {"conversations": [
        {"from": "human", "value": "Convert 10 and 20 to EUR"},
        {"from": "function_call", "value": '[{"name": "convert_currency", "arguments": {"amount": 10, "to": "EUR"}}, '
                                           '{"name": "convert_currency", "arguments": {"amount": 20, "to": "EUR"}}]'},
        {"from": "observation", "value": '[{"result": 9}, {"result": 18}]'},
        {"from": "gpt", "value": "9 and 18 EUR."}], "tools": GLAIVE_TOOLS}
    msgs = norm(rec, "sharegpt")
    assert [c["function"]["arguments"] for c in msgs[1]["tool_calls"]] == ['{"amount": 10, "to": "EUR"}',
                                                                         '{"amount": 20, "to": "EUR"}']
    tools = R.to_tools(rec, COLS)
    assert tools == [{"type": "function", "function": {
        "name": "convert_currency", "description": "Convert an amount", "parameters": {
            "type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
            "required": ["amount"]}}}]
    # Mapped from another column name; none at all is None; an unusable one is a fatal reason.
    assert R.to_tools({"functions": GLAIVE_TOOLS}, {**COLS, "tools": "functions"}) == tools
    assert R.to_tools({"tools": ""}, COLS) is None and R.to_tools({}, COLS) is None
    for bad, why in (("[{oops", "not JSON"), ('[{"description": "no name"}]', "no function name"), ("7", "int")):
        with pytest.raises(R.Drop, match=why) as info:
            R.to_tools({"tools": bad}, COLS)
        assert info.value.reason == "invalid_tools" and "invalid_tools" in R.FATAL


def test_openai_messages_with_tool_calls_tool_results_and_reasoning():
    rec = {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "reasoning_content": "I should look it up.", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": "{\"city\":\"Oslo\"}"}}]},
        {"role": "tool", "tool_call_id": "c1", "name": "weather", "content": {"temp": 3}},
        {"role": "assistant", "content": "3 degrees."}],
        "tools": [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]}
    msgs = norm(rec, "messages")
    assert msgs[1] == {"role": "assistant", "content": "", "reasoning_content": "I should look it up.",
                       "tool_calls": [{"id": "c1", "type": "function",
                                       "function": {"name": "weather", "arguments": '{"city": "Oslo"}'}}]}
    assert msgs[2] == {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "c1", "name": "weather"}
    with pytest.raises(R.Drop, match=r"messages\[1\].tool_calls\[0\] has no function name"):
        norm({"messages": [rec["messages"][0], {"role": "assistant", "tool_calls": [{"function": {}}]}]},
             "messages")


HOURS = {"name": "opening_hours", "parameters": {"type": "object", "properties": {"day": {"type": "string"}}}}


def test_openai_weights_and_names_are_kept_on_the_messages():
    rec = {"messages": [
        {"role": "system", "name": "policy", "content": "s"},
        {"role": "user", "name": "dana", "content": "q"},
        {"role": "assistant", "name": "pip", "content": "a", "weight": 0},
        {"role": "user", "content": "q2"},
        {"role": "assistant", "content": "a2", "weight": 1.0}]}  # a Parquet float column gives 1.0
    msgs = norm(rec, "messages")
    assert msgs[:3] == [{"role": "system", "content": "s", "name": "policy"},
                        {"role": "user", "content": "q", "name": "dana"},
                        {"role": "assistant", "content": "a", "name": "pip", "weight": 0}]
    assert msgs[4] == {"role": "assistant", "content": "a2", "weight": 1} and type(msgs[4]["weight"]) is int
    # Rows that train different turns are neither the same row nor duplicates of each other.
    other = [{**m, "weight": 1} if m["role"] == "assistant" else m for m in msgs]
    assert R.canonical(msgs) != R.canonical(other) and R.normalized_key(msgs) != R.normalized_key(other)
    unweighted = [{k: v for k, v in m.items() if k not in ("weight", "name")} for m in msgs]
    assert "weight" not in R.canonical(unweighted)


@pytest.mark.parametrize(("weight", "role", "why"), [
    (2, "assistant", "weight is 2; a weight is 0"), (0.5, "assistant", "weight is 0.5"),
    ("1", "assistant", "weight is '1'"), (True, "assistant", "weight is True"),
    (1, "user", "weight is set on a user message; only assistant turns"),
])
def test_a_weight_other_than_0_or_1_or_off_an_assistant_turn_is_refused(weight, role, why):
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    target = 1 if role == "assistant" else 0
    msgs[target] = {**msgs[target], "weight": weight}
    with pytest.raises(R.Drop, match=why) as info:
        norm({"messages": msgs}, "messages")
    assert info.value.reason == "wrong_type" and f"messages[{target}].weight" in info.value.detail


def test_openai_functions_function_call_and_function_results_become_tools_calls_and_results():
    """The older form of OpenAI's function calling: top-level `functions`, an assistant `function_call`
    {name, arguments (JSON text)} with null content, a `function` role result with the function's name."""
    rec = {"messages": [
        {"role": "user", "content": "Hours on Monday?"},
        {"role": "assistant", "content": None,
         "function_call": {"name": "opening_hours", "arguments": "{\"day\": \"monday\"}"}},
        {"role": "function", "name": "opening_hours", "content": "{\"open\": \"09:00\"}"},
        {"role": "assistant", "content": "Nine."}], "functions": [HOURS]}
    msgs = norm(rec, "messages")
    assert msgs[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "opening_hours", "arguments": '{"day": "monday"}'}}]}
    assert msgs[2] == {"role": "tool", "content": '{"open": "09:00"}', "name": "opening_hours"}
    assert R.to_tools(rec, COLS) == [{"type": "function", "function": HOURS}]
    # tools and functions together: both offered, tools first
    both = R.to_tools({**rec, "tools": [{"type": "function", "function": {"name": "f"}}]}, COLS)
    assert [t["function"]["name"] for t in both] == ["f", "opening_hours"]
    with pytest.raises(R.Drop, match="column 'functions'") as info:
        R.to_tools({"functions": [{"description": "no name"}]}, COLS)
    assert info.value.reason == "invalid_tools"
    two = {"messages": [rec["messages"][0], {**rec["messages"][1], "tool_calls": [
        {"id": "c", "type": "function", "function": {"name": "opening_hours", "arguments": "{}"}}]}]}
    with pytest.raises(R.Drop, match="both tool_calls and function_call"):
        norm(two, "messages")


def test_several_calls_per_turn_and_results_must_answer_a_call_of_their_turn():
    def call(i):
        return {"id": i, "type": "function", "function": {"name": "get_stock", "arguments": "{}"}}
    rec = {"messages": [
        {"role": "user", "content": "q"}, {"role": "assistant", "tool_calls": [call("c1"), call("c2")]},
        {"role": "tool", "tool_call_id": "c1", "content": "1"}, {"role": "tool", "tool_call_id": "c2", "content": "2"},
        {"role": "assistant", "content": "a"}]}
    msgs = norm(rec, "messages")
    assert [c["id"] for c in msgs[1]["tool_calls"]] == ["c1", "c2"]
    assert [m.get("tool_call_id") for m in msgs[2:4]] == ["c1", "c2"]
    wrong = {"messages": [*rec["messages"][:3], {**rec["messages"][3], "tool_call_id": "c9"}, rec["messages"][4]]}
    with pytest.raises(R.Drop, match=r"message 3 \(tool\) answers tool_call_id 'c9'.*call ids: c1, c2") as info:
        norm(wrong, "messages")
    assert info.value.reason == "unknown_tool_call_id"


def test_keys_nothing_reads_are_named_and_preference_pairs_recognised():
    rec = {"messages": [{"role": "user", "content": "q", "audio": None},
                        {"role": "assistant", "content": "a", "refusal": "no", "weight": 1}],
           "tools": None, "functions": [HOURS], "parallel_tool_calls": True, "metadata": {"k": 1}, "empty": None}
    assert R.ignored_keys(rec, COLS) == ["metadata", "parallel_tool_calls", "messages[].refusal"]
    mapped = {"dialog": [{"speaker": "user", "text": "q", "lang": "en"}]}
    assert R.ignored_keys(mapped, {**COLS, "messages": "dialog", "role": "speaker", "content": "text"}) == [
        "dialog[].lang"]
    pair = {"input": {"messages": [{"role": "user", "content": "q"}]},
            "preferred_output": [{"role": "assistant", "content": "good"}],
            "non_preferred_output": [{"role": "assistant", "content": "bad"}]}
    assert R.is_preference(pair) and R.is_preference(list(pair))
    assert not R.is_preference(rec) and not R.is_preference({"preferred_output": 1})


def test_rows_that_differ_only_in_tools_are_not_duplicates_and_tool_less_ids_do_not_move():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    t1 = [{"type": "function", "function": {"name": "f"}}]
    t2 = [{"type": "function", "function": {"name": "g"}}]
    keys = {R.exact_key(R.canonical(msgs, t)) for t in (None, t1, t2)}
    assert len(keys) == 3 and len({R.normalized_key(msgs, t) for t in (None, t1, t2)}) == 3
    assert R.canonical(msgs) == '[{"role":"user","content":"q"},{"role":"assistant","content":"a"}]'


def test_messages_with_text_parts_and_prompt_completion_and_text():
    rec = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                        {"role": "assistant", "content": "c"}]}
    assert norm(rec, "messages")[0]["content"] == "ab"
    assert norm({"prompt": "p", "completion": "c"}, "prompt_completion") == [
        {"role": "user", "content": "p"}, {"role": "assistant", "content": "c"}]
    conv = {"prompt": [{"role": "user", "content": "p"}], "completion": [{"role": "assistant", "content": "c"}]}
    assert norm(conv, "prompt_completion")[1] == {"role": "assistant", "content": "c"}
    assert norm({"text": "plain"}, "text") == [{"role": "text", "content": "plain"}]


def test_column_and_role_mapping():
    rec = {"question": "q", "answer": "a"}
    assert norm(rec, "alpaca", columns={"instruction": "question", "output": "answer"})[1]["content"] == "a"
    rec = {"dialog": [{"speaker": "client", "text": "q"}, {"speaker": "agent", "text": "a"}]}
    out = norm(rec, "messages", columns={"messages": "dialog", "role": "speaker", "content": "text"},
               roles={"client": "user", "agent": "assistant"})
    assert [m["role"] for m in out] == ["user", "assistant"]
    # a CSV cell holding JSON is parsed
    assert norm({"messages": '[{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]'},
                "messages")[1]["content"] == "a"


def test_detect():
    assert R.detect(["messages"], COLS) == "messages"
    assert R.detect(["conversations", "id"], COLS) == "sharegpt"
    assert R.detect(["instruction", "input", "output"], COLS) == "alpaca"
    assert R.detect(["prompt", "completion"], COLS) == "prompt_completion"
    assert R.detect(["text"], COLS) == "text"
    assert R.detect(["question", "answer"], COLS) is None
    assert R.detect(["question", "answer"], {**COLS, "instruction": "question", "output": "answer"}) == "alpaca"


@pytest.mark.parametrize("rec, fmt, want", [
    ({"instruction": "a", "output": 5}, "alpaca", "wrong_type"),
    ({"messages": "not json"}, "messages", "wrong_type"),
    ({"messages": [["user", "x"]]}, "messages", "wrong_type"),
    ({"output": "b"}, "alpaca", "missing_field"),
    ({"messages": [{"content": "x"}]}, "messages", "missing_field"),
    ({"instruction": "  ", "output": "b"}, "alpaca", "empty_content"),
    ({"text": ""}, "text", "empty_content"),
    ({"messages": [{"role": "narrator", "content": "x"}, {"role": "assistant", "content": "y"}]}, "messages",
     "unknown_role"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"},
                   {"role": "assistant", "content": "z"}]}, "messages", "broken_alternation"),
    ({"messages": [{"role": "assistant", "content": "x"}, {"role": "user", "content": "y"},
                   {"role": "assistant", "content": "z"}]}, "messages", "broken_alternation"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                   {"role": "user", "content": "z"}]}, "messages", "broken_alternation"),
    ({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "x"}]}, "messages",
     "no_assistant_turn"),
    ({"instruction": "a" * 100, "output": "b"}, "alpaca", "too_long_chars"),
])
def test_drop_reasons(rec, fmt, want):
    assert reason(rec, fmt, max_chars=50) == want


def test_drop_detail_names_the_problem():
    with pytest.raises(R.Drop, match=r"output is int, expected a string"):
        norm({"instruction": "a", "output": 5}, "alpaca")
    with pytest.raises(R.Drop, match=r"role 'narrator'.*roles:"):
        norm({"messages": [{"role": "narrator", "content": "x"}]}, "messages")


def test_duplicate_keys_and_ids():
    a = [{"role": "user", "content": "Hello  World"}, {"role": "assistant", "content": "Hi"}]
    b = [{"role": "user", "content": "hello world"}, {"role": "assistant", "content": "hi"}]
    assert R.exact_key(R.canonical(a)) != R.exact_key(R.canonical(b))
    assert R.normalized_key(a) == R.normalized_key(b)
    assert R.row_id(R.canonical(a)) == R.row_id(R.canonical(a)) != R.row_id(R.canonical(b))
    assert R.row_id(R.canonical(a), 1) != R.row_id(R.canonical(a))  # a kept repeat gets its own id


def test_split_point_is_seeded_and_uniform():
    ids = [f"{i:08d}" for i in range(4000)]
    share = sum(R.split_point(i, 0) < 0.25 for i in ids) / len(ids)
    assert 0.22 < share < 0.28
    assert [R.split_point(i, 0) for i in ids[:50]] == [R.split_point(i, 0) for i in ids[:50]]
    assert [R.split_point(i, 1) for i in ids[:50]] != [R.split_point(i, 0) for i in ids[:50]]


def test_config_rejects_contradictions():
    from common.config import validate
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="eval_fraction or eval_size"):
        validate(Config, {"sources": ["x"], "output": "o", "eval_fraction": 0.1, "eval_size": 10})
    with pytest.raises(ConfigError, match="chat_template needs a tokenizer"):
        validate(Config, {"sources": ["x"], "output": "o", "chat_template": "chatml"})
    with pytest.raises(ConfigError, match="at least one source"):
        validate(Config, {"sources": [], "output": "o"})
    with pytest.raises(ConfigError, match="did you mean 'max_length'"):
        validate(Config, {"sources": ["x"], "output": "o", "max_lenght": 5})
    c = validate(Config, {"sources": ["x", {"path": "y", "split": "eval"}], "output": "o"})
    assert c.effective_eval_fraction() == 0.0 and c.source_specs()[1].split == "eval"
    assert validate(Config, {"sources": ["x"], "output": "o"}).effective_eval_fraction() == 0.05
