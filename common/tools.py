"""Tool calling: tool schemas, tool calls and the check evaluate scores them with.

Canonical forms (what prepare writes and train/infer/evaluate read):

- a tool is a JSON schema in the form chat templates expect,
  `{"type": "function", "function": {"name", "description", "parameters"}}`; a bare function
  (`{"name", "parameters"}`, as LLaMA-Factory's `tools` column holds) is wrapped;
- a tool call is `{"id", "type": "function", "function": {"name", "arguments"}}` with `arguments` as
  JSON text (calls differ in their arguments' shape, so Parquet stores the text); templates receive the
  arguments parsed, as `apply_chat_template` documents.

Every function raises `ValueError` with a message for people; callers add the file, row or field.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

Tool = dict[str, Any]
ToolCall = dict[str, Any]


def parse_json_text(value: Any, what: str) -> Any:
    """A value that may come as JSON text (CSV cells, LLaMA-Factory columns) as the object it holds."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except (ValueError, RecursionError) as exc:
            raise ValueError(f"{what} is a string that is not JSON ({exc})") from None
    return value


def normalize_tools(value: Any) -> list[Tool] | None:
    """A row's tools as canonical schemas; None when it has none (null, "", [], {}, or JSON text of them: a table
    column written with json.dumps holds "null" where a row has no tools)."""
    if isinstance(value, str) and not value.strip():
        return None
    value = parse_json_text(value, "tools")
    if value is None or value == [] or value == {}:
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise ValueError(f"tools is {type(value).__name__}, expected a list of function schemas")
    out = []
    for i, tool in enumerate(value):
        tool = parse_json_text(tool, f"tools[{i}]")
        if not isinstance(tool, dict):
            raise ValueError(f"tools[{i}] is {type(tool).__name__}, expected a function schema object")
        fn = tool.get("function") if tool.get("type", "function") == "function" and "function" in tool else tool
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ValueError(f"tools[{i}] has no function name (expected {{'name': ..., 'parameters': {{...}}}} "
                             "or {'type': 'function', 'function': {...}})")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise ValueError(f"tools[{i}] ({fn['name']}): parameters is {type(params).__name__}, expected a JSON "
                             "schema object")
        out.append({"type": "function", "function": fn})
    return out or None


def normalize_call(value: Any, where: str) -> ToolCall:
    """One tool call (OpenAI `{function: {name, arguments}}` or bare `{name, arguments|parameters}`)."""
    value = parse_json_text(value, where)
    if not isinstance(value, dict):
        raise ValueError(f"{where} is {type(value).__name__}, expected a tool call object")
    fn: dict[str, Any] = value["function"] if isinstance(value.get("function"), dict) else value
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError(f"{where} has no function name")
    args = fn.get("arguments", fn.get("parameters", {}))
    args = parse_json_text(args, f"{where}.arguments")
    if args is None:
        args = {}
    if not isinstance(args, dict):
        raise ValueError(f"{where}.arguments is {type(args).__name__}, expected an object")
    call: ToolCall = {"type": "function", "function": {"name": name, "arguments": dumps(args)}}
    if isinstance(value.get("id"), str) and value["id"]:
        call = {"id": value["id"], **call}
    return call


def normalize_calls(value: Any, where: str) -> list[ToolCall]:
    """A list of calls, or one call (LLaMA-Factory's `function_call` turn holds either)."""
    value = parse_json_text(value, where)
    items = value if isinstance(value, list) else [value]
    if not items:
        raise ValueError(f"{where} is an empty list of tool calls")
    return [normalize_call(c, f"{where}[{j}]" if isinstance(value, list) else where) for j, c in enumerate(items)]


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(", ", ": "))


def for_template(call: ToolCall) -> ToolCall:
    """A canonical call as templates read it: arguments as an object."""
    fn = call["function"]
    out = {k: v for k, v in call.items() if v is not None and k != "function"}
    out["function"] = {"name": fn["name"], "arguments": json.loads(fn["arguments"]) if fn.get("arguments") else {}}
    return out


def calls_text(calls: Sequence[ToolCall]) -> str:
    """Calls as the reference text infer records: one `{"name", "arguments"}` JSON object per line."""
    return "\n".join(dumps({"name": c["function"]["name"], "arguments": json.loads(c["function"]["arguments"] or "{}")})
                     for c in calls)


# --------------------------------------------------------------------------- finding calls in generated text


def find_calls(text: str) -> list[dict[str, Any]]:
    """Tool calls in generated text, whatever wrapper the template taught (`<tool_call>` tags, a bare JSON
    object, a `[TOOL_CALLS]` list): every JSON object in it with a string `name` and an object
    `arguments` (or `parameters`), in order."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    i = 0
    while True:
        i = min((p for p in (text.find("{", i), text.find("[", i)) if p >= 0), default=-1)
        if i < 0:
            return found
        try:
            obj, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            i += 1
            continue
        for item in obj if isinstance(obj, list) else [obj]:
            if isinstance(item, dict):
                fn: dict[str, Any] = item["function"] if isinstance(item.get("function"), dict) else item
                args = fn.get("arguments", fn.get("parameters"))
                if isinstance(args, str):
                    try:
                        args = json.loads(args)
                    except ValueError:
                        args = None
                if isinstance(fn.get("name"), str) and isinstance(args, dict):
                    found.append({"name": fn["name"], "arguments": args})
        i = end


def check_call(completion: str, tools: Sequence[Tool] | None, reference: str | None) -> float | None:
    """1.0 when the completion's first tool call names the right function with arguments valid against that
    tool's `parameters` schema, else 0.0; None for a row without tools (nothing to check).

    The right function is the reference's first call when the reference is a call, else any offered tool.
    """
    if not tools:
        return None
    import jsonschema

    calls = find_calls(completion)
    if not calls:
        return 0.0
    call = calls[0]
    by_name = {t["function"]["name"]: t["function"] for t in tools}
    wanted = find_calls(reference or "")
    if wanted and call["name"] != wanted[0]["name"]:
        return 0.0
    fn = by_name.get(call["name"])
    if fn is None:
        return 0.0
    schema = fn.get("parameters") or {"type": "object"}
    try:
        return float(jsonschema.validators.validator_for(schema)(schema).is_valid(call["arguments"]))
    except jsonschema.SchemaError:
        return 0.0
