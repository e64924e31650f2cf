"""Tool schemas and calls: normalizing what sources hold, finding calls in generated text, scoring them."""

from __future__ import annotations

import pytest

from common import tools as T

pytestmark = pytest.mark.unit

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                          "required": ["city"], "additionalProperties": False}}}
CONVERT = {"type": "function", "function": {"name": "convert", "parameters": {
    "type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}}}


def test_calls_in_the_shapes_templates_teach_are_found() -> None:
    hermes = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    llama = 'Sure. {"name": "get_weather", "parameters": {"city": "Oslo"}}'
    mistral = '[TOOL_CALLS][{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}]'
    for text in (hermes, llama, mistral):
        assert T.find_calls(text) == [{"name": "get_weather", "arguments": {"city": "Oslo"}}], text
    assert T.find_calls("no call {here} [1, 2]") == []


@pytest.mark.parametrize(("completion", "reference", "want"), [
    ('<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}</tool_call>', None, 1.0),
    ('{"name": "get_weather", "arguments": {"town": "Oslo"}}', None, 0.0),  # not valid against the schema
    ('{"name": "get_weather", "arguments": {"city": 3}}', None, 0.0),
    ('{"name": "get_time", "arguments": {}}', None, 0.0),  # a function that was not offered
    ('{"name": "convert", "arguments": {"amount": 3}}', None, 1.0),
    ('{"name": "convert", "arguments": {"amount": 3}}', '{"name": "get_weather", "arguments": {"city": "X"}}', 0.0),
    ("It is sunny.", None, 0.0),
])
def test_a_call_is_valid_when_it_names_the_right_function_with_arguments_its_schema_accepts(
        completion: str, reference: str | None, want: float) -> None:
    assert T.check_call(completion, [WEATHER, CONVERT], reference) == want
    assert T.check_call(completion, None, reference) is None  # a row without tools has nothing to check


def test_evaluate_scores_tool_calls_as_a_check_metric() -> None:
    from common import metrics

    rows = [{"id": "a", "completion": '{"name": "get_weather", "arguments": {"city": "Oslo"}}',
             "reference": '{"name": "get_weather", "arguments": {"city": "Oslo"}}', "tools": T.dumps([WEATHER])},
            {"id": "b", "completion": '{"name": "get_weather", "arguments": {}}', "reference": "x",
             "tools": T.dumps([WEATHER])},
            {"id": "c", "completion": "hi", "reference": "hi", "tools": None}]
    checks = metrics.Checks(tool_call=True)
    assert "tool_call_valid" in metrics.computed(checks)
    scores = metrics.score_rows(rows, checks, None)
    assert [s["tool_call_valid"] for s in scores] == [1.0, 0.0, None]


def test_tool_schemas_and_calls_are_normalized() -> None:
    bare = {"name": "get_weather", "parameters": WEATHER["function"]["parameters"]}
    assert T.normalize_tools(T.dumps([bare])) == [WEATHER] == T.normalize_tools([WEATHER])
    assert T.normalize_tools(None) is None and T.normalize_tools("") is None
    # a tools column written with json.dumps (CSV, Parquet): "null", "[]", "{}" or blank where a row has none
    assert [T.normalize_tools(v) for v in ("null", "[]", "{}", " ", {})] == [None] * 5
    with pytest.raises(ValueError, match=r"tools\[0\] \(f\): parameters is str"):
        T.normalize_tools([{"name": "f", "parameters": "object"}])
    calls = T.normalize_calls('{"name": "f", "arguments": "{\\"a\\": 1}"}', "x")
    assert calls == [{"type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]
    with pytest.raises(ValueError, match="x.arguments is list"):
        T.normalize_calls({"name": "f", "arguments": [1]}, "x")
