"""Tool-calling data through the CLI: prepare -> train -> infer, the tools kept at every step.

The source reproduces LLaMA-Factory's `glaive_toolcall` sharegpt files (written here, not copied): a JSON
array of rows with `conversations` (human / function_call / observation / gpt turns, the function_call
value a JSON call `{name, arguments}`) and a `tools` column holding the JSON text of bare function schemas.
The commands run in this process (tests/inprocess.py): the tools' way through the stages is the subject.
"""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from common import chat, chat_encode, data
from common import manifest as mf
from tests.inprocess import ftjobs

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]

CONVERT = {"name": "convert_currency", "description": "Convert an amount of money into another currency",
           "parameters": {"type": "object", "properties": {"amount": {"type": "number"}, "to": {"type": "string"}},
                          "required": ["amount", "to"]}}
WEATHER = {"name": "get_weather", "description": "Weather now in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}


def glaive_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        call = {"name": "convert_currency", "arguments": {"amount": 10 + i, "to": "EUR"}}
        rows.append({"conversations": [
            {"from": "human", "value": f"Convert {10 + i} dollars to euros"},
            {"from": "function_call", "value": json.dumps(call)},
            {"from": "observation", "value": json.dumps({"result": 9 + i})},
            {"from": "gpt", "value": f"That is {9 + i} euros."}],
            # Three tool sets: rows that differ only in their tools are not duplicates.
            "tools": json.dumps([CONVERT] if i % 3 == 0 else [CONVERT, WEATHER] if i % 3 == 1 else [WEATHER, CONVERT])})
    return rows


def test_glaive_style_tools_reach_the_training_text_and_the_inference_prompt(
        tiny_model: Path, tiny_tokenizer, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    src = tmp_path / "glaive_toolcall.json"
    rows = glaive_rows(12)
    rows += [{**rows[0], "tools": json.dumps(t)} for t in ([WEATHER], [CONVERT, WEATHER])]  # same chat, other tools
    src.write_text(json.dumps(rows, indent=2))
    prep, raw = tmp_path / "prep", tmp_path / "raw"
    # decontaminate off: the same chat with other tools is a near-duplicate of an eval row to the default
    # (near) check, which would remove it from training; this test is about keeping such rows apart.
    ftjobs(["prepare", "--source", str(src), "--tokenizer", str(tiny_model), "--output", str(prep),
            "--set", "eval_size=3", "--set", "decontaminate=off"])
    ftjobs(["prepare", "--source", str(src), "--output", str(raw), "--set", "eval_size=3"])
    loaded = mf.load(str(prep))
    assert loaded.manifest.stats["rows_out"] == 14 and loaded.manifest.stats["dropped"] == {}
    assert loaded.manifest.stats["formats"] == {str(src): "sharegpt"}

    # Prepare: the canonical rows carry the tools and the call; the rendered training text shows the schema,
    # and the call (not the schema) is what is trained.
    train_rows = data.read_split(loaded, "train").to_pylist()
    row = next(r for r in train_rows if json.loads(r["tools"]) == [{"type": "function", "function": CONVERT}])
    call = row["messages"][1]["tool_calls"][0]["function"]
    assert call["name"] == "convert_currency" and json.loads(call["arguments"])["to"] == "EUR"
    assert row["messages"][2]["role"] == "tool"
    text = tiny_tokenizer.decode(row["input_ids"], skip_special_tokens=False)
    assert "Convert an amount of money into another currency" in text and '"required": ["amount", "to"]' in text
    trained = tiny_tokenizer.decode([t for t, lab in zip(row["input_ids"], row["labels"], strict=True)
                                     if lab != chat.IGNORE_INDEX], skip_special_tokens=False)
    assert trained.startswith('<tool_call>\n{"name": "convert_currency", "arguments": {"amount": ')
    assert "another currency" not in trained
    shown = ftjobs(["inspect", str(prep), "--rows", "14", "--color", "never"]).stdout
    assert "tool convert_currency(amount, to): Convert an amount of money" in shown
    assert "tool get_weather(city): Weather now in a city" in shown

    # Train tokenizes the untokenized run itself: it must render the same tools (same token count).
    train = tmp_path / "train"
    ftjobs(["train", "--input", str(raw), "--base-model", str(tiny_model), "--output", str(train),
            "--set", "max_steps=2", "--set", "max_seq_length=1024", "--set", "batch_size=2"])
    raw_rows = data.read_split(mf.load(str(raw)), "train").to_pylist()
    fmt = chat.chat_format(tiny_tokenizer)
    with_tools = chat_encode.encode_many(tiny_tokenizer, fmt, [r["messages"] for r in raw_rows],
                                  tools=[data.tools_of(r["tools"]) for r in raw_rows], max_length=1024)
    without = chat_encode.encode_many(tiny_tokenizer, fmt, [r["messages"] for r in raw_rows], max_length=1024)
    stats = mf.load(str(train)).manifest.stats["train"]
    assert stats["tokens"] == sum(len(e.input_ids) for e in with_tools) > sum(len(e.input_ids) for e in without)

    # Infer: each prompt is rendered with its row's tools.
    out = tmp_path / "infer"
    ftjobs(["infer", "--model", str(tiny_model), "--adapter", str(train), "--prompts", str(prep), "--output",
            str(out), "--engine", "transformers", "--set", "sampling.max_tokens=4",
            "--set", "sampling.temperature=0"])
    inferred = mf.load(str(out))
    preds = [r for a in inferred.manifest.artifacts_named("predictions/part-")
             for r in pq.read_table(inferred.resolve(a)).to_pylist()]
    assert len(preds) == 3
    for p in preds:
        tools = data.tools_of(p["tools"])
        assert tools and p["error"] is None
        prompt = chat.clean(p["prompt"])
        assert p["prompt_tokens"] == len(chat.encode_prompt(tiny_tokenizer, fmt, prompt, tools))
        assert p["prompt_tokens"] > len(chat.encode_prompt(tiny_tokenizer, fmt, prompt))
        assert "convert_currency" in chat.render_prompt(fmt, prompt, tools)
