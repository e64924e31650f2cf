"""A training file in OpenAI's chat fine-tuning format through the CLI: prepare -> train -> infer -> evaluate.

`tests/data/openai/chat.jsonl` is written here (our own examples, not copied) in the shapes OpenAI documents
for supervised chat fine-tuning: `messages` with `weight` 0/1 on assistant turns, `name` on system, user and
assistant messages, content as a list of text parts; a top-level `tools` list with assistant `tool_calls`
(two in one turn, content null or absent) answered by `tool` messages with `tool_call_id`; the older form,
a top-level `functions` list, an assistant `function_call` {name, arguments as JSON text} and a `function`
result; and top-level keys prepare does not read (`parallel_tool_calls`, `metadata`).
`tests/data/openai/preference.jsonl` holds two rows of OpenAI's preference (DPO) format (read as pairs:
tests/jobs/test_prepare_preference.py). The commands run in this process (tests/inprocess.py): the file's way
through the stages is the subject here, not the process; test_pipeline.py runs the stages as processes.
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
FIXTURE = REPO / "tests" / "data" / "openai" / "chat.jsonl"


def trained(tok, ids: list[int], labels: list[int]) -> str:  # type: ignore[no-untyped-def]
    """The trained tokens decoded, each run of them on its own line."""
    runs, cur = [], []
    for t, lab in zip(ids, labels, strict=True):
        if lab != chat.IGNORE_INDEX:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    runs += [cur] if cur else []
    return "\n".join(tok.decode(r, skip_special_tokens=False) for r in runs)


def turn_text(m: dict) -> list[str]:
    """What of an assistant turn must (or must not) be among the trained tokens: its content, its calls."""
    out = [m["content"]] if m["content"] else []
    return out + [f'{{"name": "{c["function"]["name"]}", "arguments": {c["function"]["arguments"]}}}'
                  for c in m.get("tool_calls") or []]


def test_an_openai_chat_file_trains_as_it_would_there(tiny_model: Path, tiny_tokenizer,  # type: ignore[no-untyped-def]
                                                      tmp_path: Path) -> None:
    prep, raw = tmp_path / "prep", tmp_path / "raw"
    done = ftjobs(["prepare", "--source", str(FIXTURE), "--tokenizer", str(tiny_model), "--output", str(prep),
                   "--set", "eval_size=3"])
    ftjobs(["prepare", "--source", str(FIXTURE), "--output", str(raw), "--set", "eval_size=3"])
    stats = mf.load(str(prep)).manifest.stats
    assert stats["rows_out"] == 14 and stats["dropped"] == {} and stats["formats"] == {str(FIXTURE): "messages"}
    assert stats["turns"] == {"trained": 20, "weight_0": 4, "train_on_excluded": 0}
    assert stats["ignored_keys"] == {"metadata": 2, "parallel_tool_calls": 2} and stats["named_messages"] == 5
    logged = [json.loads(line) for line in done.stderr.splitlines() if line.startswith("{")]
    ignored = [e for e in logged if "does not read" in e["msg"]]  # named once for the file, not once per row
    assert len(ignored) == 1 and ignored[0]["level"] == "warning"
    assert ignored[0]["msg"].endswith("ignored: metadata (2 rows), parallel_tool_calls (2 rows)")

    # The canonical rows: weights kept, the older function form turned into tools, tool calls and results.
    loaded = mf.load(str(prep))
    rows = data.read_split(loaded, "train").to_pylist() + data.read_split(loaded, "eval").to_pylist()
    by_first = {r["messages"][0]["content"] if r["messages"][0]["role"] != "system" else r["messages"][1]["content"]:
                r for r in rows}
    legacy = by_first["When do you open on Monday?"]
    assert [t["function"]["name"] for t in data.tools_of(legacy["tools"])] == ["opening_hours"]
    assert legacy["messages"][1]["tool_calls"][0]["function"] == {"name": "opening_hours",
                                                                  "arguments": '{"day": "monday"}'}
    assert legacy["messages"][2]["role"] == "tool" and legacy["messages"][2]["name"] == "opening_hours"
    parallel = by_first["Is order A17 shipped, and do you have brake pads BP-2?"]
    assert [c["id"] for c in parallel["messages"][1]["tool_calls"]] == ["call_a17", "call_bp2"]
    assert [m["tool_call_id"] for m in parallel["messages"][2:4]] == ["call_a17", "call_bp2"]
    assert by_first["Can I return a helmet I bought last week?"]["messages"][1]["name"] == "dana"

    # Masks, decoded: a weight-0 turn is in the text but never trained; every other turn is trained, with
    # its calls (both parallel ones) and its end-of-turn token.
    weighted = 0
    for row in rows:
        text = tiny_tokenizer.decode(row["input_ids"], skip_special_tokens=False)
        learned = trained(tiny_tokenizer, row["input_ids"], row["labels"])
        for m in row["messages"]:
            if m["role"] != "assistant":
                assert not m["content"] or m["content"] not in learned, m
                continue
            for piece in turn_text(m):
                assert piece in text
                assert (piece in learned) == (m["weight"] != 0), (m, learned)
            weighted += m["weight"] is not None
        for tool in data.tools_of(row["tools"]) or []:  # schemas are context
            assert tool["function"]["description"] in text and tool["function"]["description"] not in learned
    assert weighted == 8
    assert trained(tiny_tokenizer, parallel["input_ids"], parallel["labels"]).startswith(
        '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "A17"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "get_stock", "arguments": {"sku": "BP-2"}}\n</tool_call><|im_end|>')
    shown = ftjobs(["inspect", str(prep), "--rows", "0", "--color", "never"]).stdout
    assert "assistant turns: 20 trained, 4 weight 0 (context only), 0 excluded by train_on" in shown
    assert "ignored keys: metadata (2 rows), parallel_tool_calls (2 rows)" in shown

    # Train tokenizes the untokenized run itself, through common.chat: the weights travel in its rows and
    # give exactly prepare's masks (the same trained-token count; without the weights it would be more).
    train = tmp_path / "train"
    ftjobs(["train", "--input", str(raw), "--base-model", str(tiny_model), "--output", str(train),
            "--set", "max_steps=2", "--set", "max_seq_length=1024", "--set", "batch_size=2"])
    train_stats = mf.load(str(train)).manifest.stats["train"]
    prepared = data.read_split(loaded, "train").to_pylist()
    assert train_stats["trainable_tokens"] == sum(r["num_trainable"] for r in prepared)
    raw_rows = data.read_split(mf.load(str(raw)), "train").to_pylist()
    unweighted = [[{**m, "weight": None} for m in r["messages"]] for r in raw_rows]
    fmt = chat.chat_format(tiny_tokenizer)
    more = chat_encode.encode_many(tiny_tokenizer, fmt, unweighted, tools=[data.tools_of(r["tools"]) for r in raw_rows])
    assert sum(e.num_trainable for e in more) > train_stats["trainable_tokens"]

    # Infer ignores the weights: each prompt is its row's conversation up to the last answer, weight-0 turns
    # included as context, rendered with the row's tools.
    preds = {}
    for name, extra in (("base", []), ("tuned", ["--adapter", str(train)])):
        out = tmp_path / f"infer-{name}"
        ftjobs(["infer", "--model", str(tiny_model), *extra, "--prompts", str(prep), "--output", str(out),
                "--engine", "transformers", "--set", "sampling.max_tokens=4", "--set", "sampling.temperature=0"])
        inferred = mf.load(str(out))
        preds[name] = [r for a in inferred.manifest.artifacts_named("predictions/part-")
                       for r in pq.read_table(inferred.resolve(a)).to_pylist()]
    eval_rows = {r["id"]: r for r in data.read_split(loaded, "eval").to_pylist()}
    assert len(preds["tuned"]) == 3 and {p["id"] for p in preds["tuned"]} == set(eval_rows)
    for p in preds["tuned"]:
        row = eval_rows[p["id"]]
        prompt, reference = chat.split_prompt(row["messages"])
        assert p["error"] is None and chat.clean(p["prompt"]) == prompt and p["reference"] == reference
        assert p["prompt_tokens"] == len(chat.encode_prompt(tiny_tokenizer, fmt, prompt, data.tools_of(row["tools"])))

    report = tmp_path / "evaluate"
    ftjobs(["evaluate", "--predictions", str(tmp_path / "infer-base"), "--predictions", str(tmp_path / "infer-tuned"),
            "--output", str(report)])
    sets = mf.load(str(report)).manifest.metrics["sets"]
    assert len(sets) == 2 and all("exact_match" in s for s in sets.values())
