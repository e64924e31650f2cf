"""The prepare job end to end: real files, real Parquet, the real S3 server, the tiny tokenizer."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import config as cfg
from common import data, storage
from common import manifest as mf
from common.errors import ConfigError, InputError, OutputTakenError
from jobs import prepare

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tokenizer-only folder (no weights): prepare needs nothing more."""
    from common import tinymodel

    path = tmp_path_factory.mktemp("tok") / "tok"
    tinymodel.build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def chat_rows(n: int, start: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"what is {i} plus one"},
                          {"role": "assistant", "content": f"it is {i + 1}"}]} for i in range(start, start + n)]


def run(**kw) -> mf.Loaded:
    if "eval_size" not in kw:
        kw.setdefault("eval_fraction", 0.0)
    return prepare.run(cfg.validate(prepare.Config, kw))


def rows_of(loaded: mf.Loaded, split: str = "train") -> list[dict]:
    return data.read_split(loaded, split).to_pylist()


def trained_text(tok, row: dict) -> list[str]:  # type: ignore[no-untyped-def]
    """The decoded runs of trained tokens."""
    runs, cur = [], []
    for t, lab in zip(row["input_ids"], row["labels"], strict=True):
        if lab != -100:
            assert lab == t
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r, skip_special_tokens=False) for r in runs]


def test_round_trip_tokenized_local_and_s3(store_root: str, tmp_path: Path, tok_dir: Path):
    src = jsonl(tmp_path / "a.jsonl", chat_rows(30))
    source = str(src)
    if storage.is_s3(store_root):  # raw data from the object store too
        storage.upload_file(src, storage.join(store_root, "raw", "a.jsonl"))
        source = storage.join(store_root, "raw") + "/"
    out = storage.join(store_root, "prep")
    loaded = run(sources=[source], output=out, tokenizer=str(tok_dir), eval_size=5)
    m = loaded.manifest
    assert m.stage == "prepare" and m.stats["rows_in"] == 30 and m.stats["train"] == 25 and m.stats["eval"] == 5
    assert [a.name for a in m.artifacts] == ["train/part-00000", "eval/part-00000", "drops", "stats"]
    # written in this attempt's own folder; the manifest names it, and readers resolve it from there
    assert m.artifact("train/part-00000").path == f"attempts/{m.attempt}/data/train/part-00000.parquet"
    assert m.inputs[0].role == "data" and m.inputs[0].stage is None
    assert m.inputs[0].sha256 == storage.sha256_file(src)
    assert set(m.model) >= {"tokenizer", "tokenizer_source", "template_hash", "chat_template", "train_on",
                            "max_length"}
    assert m.model["template_hash"] == __import__("hashlib").sha256(m.model["chat_template"].encode()).hexdigest()
    assert 0 < m.stats["tokens"]["trainable_ratio"] < 1 and sum(m.stats["tokens"]["histogram"]["counts"]) == 30
    hist, tokens = m.stats["tokens"]["histogram"], m.stats["tokens"]
    # the bins start at the shortest row (not at 0), so the first is not empty, and reach the longest
    assert hist["edges"][0] == tokens["min"] and hist["counts"][0] > 0 and hist["edges"][-1] >= tokens["max"]
    local = mf.fetch_artifact(loaded, m.artifact("train/part-00000"), tmp_path / "t.parquet")
    meta = pq.ParquetFile(local)
    assert meta.schema_arrow.equals(data.schema(tokenized=True))
    assert meta.metadata.row_group(0).column(0).compression == "ZSTD"
    assert storage.read_json(loaded.artifact_uri("stats"))["rows_out"] == 30
    # Re-running is a no-op; another config into the same prefix is refused.
    assert run(sources=[source], output=out, tokenizer=str(tok_dir), eval_size=5).manifest.run_id == m.run_id
    with pytest.raises(OutputTakenError, match="eval_size"):
        run(sources=[source], output=out, tokenizer=str(tok_dir), eval_size=6)


def test_golden_label_masks_multi_turn_system_and_truncation(tmp_path: Path, tok_dir: Path, tok):
    conv = {"messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is one plus one?"}, {"role": "assistant", "content": "Two."},
        {"role": "user", "content": "And two plus two?"}, {"role": "assistant", "content": "Four."}]}
    src = jsonl(tmp_path / "c.jsonl", [conv])
    row = rows_of(run(sources=[str(src)], output=str(tmp_path / "o1"), tokenizer=str(tok_dir)))[0]
    assert trained_text(tok, row) == ["Two.<|im_end|>", "Four.<|im_end|>"]
    assert row["input_ids"].count(tok.bos_token_id) == 1 and row["input_ids"][0] == tok.bos_token_id
    assert tok.decode(row["input_ids"], skip_special_tokens=False).startswith("<s><|im_start|>system\nBe brief.")
    assert row["num_tokens"] == len(row["input_ids"]) and row["num_trainable"] == sum(
        1 for x in row["labels"] if x != -100)

    last = rows_of(run(sources=[str(src)], output=str(tmp_path / "o2"), tokenizer=str(tok_dir),
                       train_on="last_assistant"))[0]
    assert trained_text(tok, last) == ["Four.<|im_end|>"]
    every = rows_of(run(sources=[str(src)], output=str(tmp_path / "o3"), tokenizer=str(tok_dir), train_on="all"))[0]
    assert every["labels"][0] == -100 and all(x != -100 for x in every["labels"][1:])

    # Truncation keeps whole turns: the second exchange goes, the first answer stays with its EOS.
    cut = len(row["input_ids"]) - 3
    loaded = run(sources=[str(src)], output=str(tmp_path / "o4"), tokenizer=str(tok_dir), max_length=cut)
    short = rows_of(loaded)[0]
    assert trained_text(tok, short) == ["Two.<|im_end|>"] and len(short["input_ids"]) <= cut
    assert [m["content"] for m in short["messages"]] == ["Be brief.", "What is one plus one?", "Two."]
    assert loaded.manifest.stats["truncated"] == 1
    # When even the first answer does not fit, the row is dropped and counted, never kept without its answer.
    with pytest.raises(InputError, match=r"No rows left(.|\n)*too_long_tokens .*first answer does not fit"):
        run(sources=[str(src)], output=str(tmp_path / "o5"), tokenizer=str(tok_dir), max_length=12)
    with pytest.raises(InputError, match=r"too_long_tokens .*tokens > max_length"):
        run(sources=[str(src)], output=str(tmp_path / "o6"), tokenizer=str(tok_dir), max_length=cut,
            on_too_long="drop")


def test_a_special_token_in_a_rows_own_text_drops_it_naming_where_unless_kept(tmp_path: Path, tok_dir: Path, tok):
    """A pasted chat log's `<|im_end|>` in a user message is read by the tokenizer as the end-of-turn token: the
    turn would end inside the text. Dropped (counted, the message named in drops.jsonl) unless kept on purpose;
    a special token the template never writes (the tiny vocabulary's `<unk>`) and plain look-alikes stay."""
    pasted = {"messages": [{"role": "user", "content": "Why does my log end with <|im_end|> here?"},
                           {"role": "assistant", "content": "It is a chat marker."}]}
    think = {"messages": [{"role": "user", "content": "Is <unk> or <|im_end| a marker?"},
                          {"role": "assistant", "content": "No."}], "tools": None}
    in_args = {"messages": [
        {"role": "user", "content": "log it"},
        {"role": "assistant", "content": "", "tool_calls": [{"id": "c1", "type": "function", "function": {
            "name": "log", "arguments": json.dumps({"text": "done<|im_end|>"})}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "ok"}, {"role": "assistant", "content": "Logged."}],
        "tools": [{"type": "function", "function": {"name": "log", "parameters": {"type": "object"}}}]}
    src = jsonl(tmp_path / "s.jsonl", [pasted, think, in_args, *chat_rows(37)])
    loaded = run(sources=[str(src)], output=str(tmp_path / "drop"), tokenizer=str(tok_dir))
    assert loaded.manifest.stats["dropped"] == {"special_token_in_text": 2} and loaded.manifest.stats["train"] == 38
    drops = [json.loads(line) for line in storage.read_text(loaded.artifact_uri("drops")).splitlines()]
    assert [d["line"] for d in drops] == [1, 3]
    assert "message 0 (user) content holds '<|im_end|>'" in drops[0]["detail"]
    assert "message 1 (assistant) tool call arguments holds '<|im_end|>'" in drops[1]["detail"]
    assert "special_tokens_in_text: keep" in drops[0]["detail"]

    kept = run(sources=[str(src)], output=str(tmp_path / "keep"), tokenizer=str(tok_dir),
               special_tokens_in_text="keep")
    assert kept.manifest.stats["train"] == 40 and not kept.manifest.stats["dropped"]
    first = rows_of(kept)[0]  # as the tokenizer reads it: the user turn's text holds the end-of-turn token
    assert first["input_ids"].count(tok.convert_tokens_to_ids("<|im_end|>")) == 3


def test_every_file_type_and_source_kind(tmp_path: Path):
    recs = [{"instruction": f"say {i}", "output": f"{i}"} for i in range(4)]
    d = tmp_path / "in"
    d.mkdir()
    jsonl(d / "a.jsonl", recs[:1])
    (d / "b.json").write_text(json.dumps(recs[1:2], indent=2))
    (d / "c.csv").write_text("instruction,output\n\"say 2\",2\n")
    with gzip.open(d / "d.jsonl.gz", "wt") as f:
        f.write(json.dumps(recs[3]) + "\n")
    pq.write_table(pa.Table.from_pylist([{"text": "plain text row"}]), d / "e.parquet")
    (d / "f.tsv").write_text("prompt\tcompletion\nhello\tworld\n")
    import datasets

    datasets.Dataset.from_list([{"conversations": [{"from": "human", "value": "hi"},
                                                   {"from": "gpt", "value": "hey"}]}]).save_to_disk(
        str(tmp_path / "hfdisk"))
    loaded = run(sources=[str(d), str(tmp_path / "hfdisk")], output=str(tmp_path / "out"))
    fmts = loaded.manifest.stats["formats"]
    assert sorted(fmts.values()) == ["alpaca", "alpaca", "alpaca", "alpaca", "prompt_completion", "sharegpt", "text"]
    got = {r["messages"][-1]["content"] for r in rows_of(loaded)}
    assert got == {"0", "1", "2", "3", "plain text row", "world", "hey"}
    assert len(loaded.manifest.inputs) == 7


def test_glob_and_s3_object_sources(tmp_path: Path, s3_root: str):
    jsonl(tmp_path / "p1.jsonl", chat_rows(3))
    jsonl(tmp_path / "p2.jsonl", chat_rows(3, start=3))
    storage.upload_file(jsonl(tmp_path / "s.jsonl", chat_rows(2, start=6)), s3_root + "/x/s.jsonl")
    loaded = run(sources=[str(tmp_path / "p*.jsonl"), s3_root + "/x/s.jsonl"], output=s3_root + "/out")
    assert loaded.manifest.stats["rows_out"] == 8
    assert [i.uri for i in loaded.manifest.inputs][-1] == s3_root + "/x/s.jsonl"


BROKEN = {
    "truncated_json": (b'{"text": "ok"}\n{"text": "cut of\n', "line 2", "invalid_json"),
    "non_utf8": (b'{"text": "ok"}\n{"text": "bad \xff\xfe bytes"}\n', "line 2", "invalid_utf8"),
    "not_an_object": (b'{"text": "ok"}\n[1, 2]\n', "line 2", "invalid_json"),
    # Nested past Python's recursion limit: json raises RecursionError (it was a traceback, exit 1).
    "deep_json": (b'{"text": "ok"}\n' + b'{"a": ' * 5000 + b"1" + b"}" * 5000 + b"\n", "line 2", "invalid_json"),
    # Valid JSON whose string is not text: a lone UTF-16 surrogate escape (it was a traceback, exit 1).
    "lone_surrogate": (b'{"text": "ok"}\n{"text": "half \\ud800 of a pair"}\n', "line 2", "invalid_unicode"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_lines_fail_naming_file_and_line_unless_skipped(tmp_path: Path, case: str):
    body, where, reason = BROKEN[case]
    src = tmp_path / "broken.jsonl"
    src.write_bytes(body + b"".join(json.dumps({"text": f"row {i}"}).encode() + b"\n" for i in range(20)))
    with pytest.raises(InputError, match=rf"broken.jsonl {where}.*skip_bad_lines"):
        run(sources=[str(src)], output=str(tmp_path / "o1"))
    assert not (tmp_path / "o1" / "manifest.json").exists()
    loaded = run(sources=[str(src)], output=str(tmp_path / "o2"), skip_bad_lines=True)
    assert loaded.manifest.stats["dropped"] == {reason: 1} and loaded.manifest.stats["rows_out"] == 21
    drops = storage.read_text(loaded.artifact_uri("drops")).splitlines()
    assert json.loads(drops[0])["line"] == 2 and json.loads(drops[0])["reason"] == reason


DEEP = "[" * 5000 + "]" * 5000


@pytest.mark.parametrize(("name", "body", "where"), [
    ("deep.csv", f'messages\n"{DEEP}"\n'.encode(), "line 2"),
    ("deep.json", b'[{"text": "ok"}, ' + DEEP.encode() + b"]", "line 1"),
    ("surrogate.json", b'[{"text": "ok"},\n {"text": "\\udfff"}]', "line 2"),
])
def test_unreadable_rows_anywhere_are_exit_3_naming_file_and_line(tmp_path: Path, name: str, body: bytes,
                                                                    where: str, subprocess_env: dict[str, str]):
    """Every failure while reading or normalizing a row is bad input (exit 3), never a retryable crash."""
    (tmp_path / name).write_bytes(body)
    cmd = [sys.executable, "-m", "jobs.cli", "prepare", "--source", str(tmp_path / name), "--output",
           str(tmp_path / "o"), "--format", "messages" if name.endswith(".csv") else "text"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env, timeout=120)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"{name} {where}" in proc.stderr and "Traceback" not in proc.stderr


def test_a_row_failing_while_normalized_is_fatal_unless_skipped(tmp_path: Path):
    src = tmp_path / "cells.csv"  # a CSV cell of JSON text too deep to parse: fails in normalization
    src.write_text("messages\n" + "".join(f'"[{{""role"": ""user"", ""content"": ""q{i}""}}, {{""role"": '
                                          f'""assistant"", ""content"": ""a{i}""}}]"\n' for i in range(20))
                   + f'"{DEEP}"\n')
    with pytest.raises(InputError, match=r"cells.csv line 22: the record cannot be read as a messages row "
                                         r"\(RecursionError.*skip_bad_lines"):
        run(sources=[str(src)], output=str(tmp_path / "o1"))
    stats = run(sources=[str(src)], output=str(tmp_path / "o2"), skip_bad_lines=True).manifest.stats
    assert stats["dropped"] == {"invalid_record": 1} and stats["rows_out"] == 20


def test_a_leading_byte_order_mark_is_accepted(tmp_path: Path):
    body = "".join(json.dumps(r) + "\n" for r in chat_rows(5)).encode()
    (tmp_path / "bom.jsonl").write_bytes(b"\xef\xbb\xbf" + body)
    (tmp_path / "bom.json").write_bytes(b"\xef\xbb\xbf" + json.dumps(chat_rows(5, start=5)).encode())
    gz = tmp_path / "bom.jsonl.gz"
    gz.write_bytes(gzip.compress(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in chat_rows(5, 10)).encode()))
    stats = run(sources=[str(tmp_path / n) for n in ("bom.jsonl", "bom.json", "bom.jsonl.gz")],
                output=str(tmp_path / "o")).manifest.stats
    assert stats["rows_out"] == 15 and stats["dropped"] == {}


LATIN1_CSV = b"instruction,output\n" + b"".join(f"caf\xe9 {i},{i}\n".encode("latin-1") for i in range(20))
UNREADABLE = {  # files that hold rows, none of them readable: never "empty"
    "utf16.jsonl": ("\n".join(json.dumps({"text": f"row {i}"}) for i in range(30)).encode("utf-16"),
                    "line 1: invalid UTF-8 at byte 0", "UTF-8 JSON lines"),
    "latin1.csv": (LATIN1_CSV, "line 2: invalid UTF-8", "UTF-8 CSV"),
    "strings.json": (json.dumps(["a", "b", "c"]).encode(), "line 1: array element is a JSON str",
                     "a JSON array of objects"),
    # pretty-printed objects one after another: not JSON lines ({"data": [...]} wrappers are read: test_prepare_formats)
    "pretty.jsonl": ("\n".join(json.dumps({"text": f"row {i}"}, indent=2) for i in range(5)).encode(),
                     "line 1: not valid JSON", "UTF-8 JSON lines"),
}


@pytest.mark.parametrize("name", sorted(UNREADABLE))
def test_a_file_with_no_readable_line_is_not_called_empty(tmp_path: Path, name: str):
    body, where, hint = UNREADABLE[name]
    (tmp_path / name).write_bytes(body)
    with pytest.raises(InputError) as info:
        run(sources=[str(tmp_path / name)], output=str(tmp_path / "o"))
    msg = str(info.value)
    assert f"{name} {where}" in msg and "no line of this file could be read" in msg and hint in msg, msg
    assert "empty" not in msg and "skip_bad_lines" in msg


def test_skipped_unreadable_file_counts_every_line_against_max_drop_fraction(tmp_path: Path):
    (tmp_path / "latin1.csv").write_bytes(LATIN1_CSV)  # 20 rows, none readable
    some = "".join(f"say {i},{i}\n" for i in range(19)).encode() + "caf\xe9,x\n".encode("latin-1")
    (tmp_path / "some.csv").write_bytes(b"instruction,output\n" + some)  # 20 rows, one unreadable
    kw = {"sources": [str(tmp_path / "latin1.csv"), str(tmp_path / "some.csv")], "skip_bad_lines": True}
    with pytest.raises(InputError, match=r"Dropped 21 of 40 rows \(52.5%\); max_drop_fraction is 50.0%"):
        run(output=str(tmp_path / "o1"), max_drop_fraction=0.5, **kw)
    stats = run(output=str(tmp_path / "o2"), max_drop_fraction=0.6, **kw).manifest.stats
    assert stats["rows_in"] == 40 and stats["rows_out"] == 19 and stats["dropped"] == {"invalid_utf8": 21}
    assert stats["empty_files"] == [] and stats["sources"][str(tmp_path / "latin1.csv")]["dropped"] == 20


@pytest.mark.parametrize(("name", "fmt"), [("cut.parquet", None), ("cut.parquet", "alpaca"),
                                         ("fake.parquet", None), ("fake.arrow", None), ("fake.arrow", "alpaca")])
def test_truncated_or_fake_table_file_is_bad_input_not_a_crash(tmp_path: Path, name: str, fmt: str | None):
    pq.write_table(pa.Table.from_pylist([{"instruction": f"say {i}", "output": str(i)} for i in range(50)]),
                   tmp_path / "good.parquet")
    good = (tmp_path / "good.parquet").read_bytes()
    body = good[: len(good) // 2] if name.startswith("cut") else b'{"instruction": "a", "output": "b"}\n'
    (tmp_path / name).write_bytes(body)
    kind = "Parquet" if name.endswith(".parquet") else "Arrow"
    with pytest.raises(InputError) as info:  # exit 3; it was an ArrowInvalid traceback, exit 1 (retryable)
        run(sources=[str(tmp_path / name)], output=str(tmp_path / "o"), **({"format": fmt} if fmt else {}))
    assert f"{name}: not a readable {kind} file" in str(info.value) and "truncated" in str(info.value)
    assert not (tmp_path / "o" / "manifest.json").exists()


def test_empty_file_missing_column_wrong_types(tmp_path: Path):
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(InputError, match=r"empty.jsonl holds no records"):
        run(sources=[str(tmp_path / "empty.jsonl")], output=str(tmp_path / "o1"))
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "answer": "b"}]), tmp_path / "m.parquet")
    with pytest.raises(InputError, match=r"m.parquet has no column 'output'.*columns: instruction, answer"):
        run(sources=[str(tmp_path / "m.parquet")], output=str(tmp_path / "o2"), format="alpaca")
    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "output": i} for i in range(5)]),
                   tmp_path / "w.parquet")
    with pytest.raises(InputError) as info:
        run(sources=[str(tmp_path / "w.parquet")], output=str(tmp_path / "o3"))
    assert "wrong_type" in str(info.value) and "output is int, expected a string" in str(info.value)


def test_ten_megabyte_line(tmp_path: Path):
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:
        f.write(json.dumps({"text": "x" * (10 << 20)}) + "\n")
        for i in range(30):
            f.write(json.dumps({"text": f"row {i}"}) + "\n")
    loaded = run(sources=[str(src)], output=str(tmp_path / "o1"))
    assert loaded.manifest.stats["dropped"] == {"too_long_chars": 1} and loaded.manifest.stats["rows_out"] == 30
    with pytest.raises(InputError, match=r"big.jsonl line 1: line is longer than max_line_bytes"):
        run(sources=[str(src)], output=str(tmp_path / "o2"), max_line_bytes=1 << 20)


def test_drop_threshold_fails_with_reason_table_and_leaves_nothing(tmp_path: Path):
    recs = chat_rows(6) + [{"messages": [{"role": "user", "content": "q"}]}] * 2 + chat_rows(2)
    src = jsonl(tmp_path / "t.jsonl", recs)
    out = tmp_path / "o"
    with pytest.raises(InputError) as info:
        run(sources=[str(src)], output=str(out), max_drop_fraction=0.2)
    msg = str(info.value)
    assert "Dropped 4 of 10 rows (40.0%); max_drop_fraction is 20.0%" in msg
    assert "no_assistant_turn" in msg and "duplicate_exact" in msg and "t.jsonl:7" in msg
    assert storage.list_objects(str(out)) == []  # nothing published, nothing left
    assert run(sources=[str(src)], output=str(out), max_drop_fraction=0.5).manifest.stats["dropped"] == {
        "no_assistant_turn": 2, "duplicate_exact": 2}


def test_dedup_modes(tmp_path: Path):
    recs = [{"text": "Hello world"}, {"text": "Hello world"}, {"text": "hello   WORLD"}, {"text": "other"}]
    src = jsonl(tmp_path / "d.jsonl", recs)
    kw = {"sources": [str(src)], "max_drop_fraction": 1.0}
    assert run(output=str(tmp_path / "a"), **kw).manifest.stats["dropped"] == {
        "duplicate_exact": 1, "duplicate_normalized": 1}
    assert run(output=str(tmp_path / "b"), dedup="exact", **kw).manifest.stats["rows_out"] == 3
    assert run(output=str(tmp_path / "c"), dedup="none", **kw).manifest.stats["rows_out"] == 4


def test_split_is_deterministic_row_for_row(tmp_path: Path):
    src = jsonl(tmp_path / "s.jsonl", chat_rows(200))
    kw = {"sources": [str(src)], "eval_fraction": 0.2}
    a, b = run(output=str(tmp_path / "a"), **kw), run(output=str(tmp_path / "b"), **kw)
    for split in ("train", "eval"):
        assert [r["id"] for r in rows_of(a, split)] == [r["id"] for r in rows_of(b, split)]
    assert 20 < a.manifest.stats["eval"] < 60
    c = run(output=str(tmp_path / "c"), seed=1, **kw)
    assert {r["id"] for r in rows_of(c, "eval")} != {r["id"] for r in rows_of(a, "eval")}
    # eval_size: exactly that many, the same ones each time; a source can be all eval.
    sized = run(sources=[str(src)], output=str(tmp_path / "d"), eval_size=17)
    assert sized.manifest.stats["eval"] == 17
    assert rows_of(sized, "eval") == rows_of(run(sources=[str(src)], output=str(tmp_path / "e"), eval_size=17), "eval")
    held = jsonl(tmp_path / "held.jsonl", chat_rows(5, start=500))
    per = prepare.run(cfg.validate(prepare.Config, {"sources": [str(src), {"path": str(held), "split": "eval"}],
                                                    "output": str(tmp_path / "f")}))
    assert {r["source"] for r in rows_of(per, "eval")} == {str(held)} and per.manifest.stats["eval"] == 5


def test_split_does_not_depend_on_where_the_data_lives(tmp_path: Path, s3_root: str):
    rows = chat_rows(120)
    (tmp_path / "here").mkdir()
    (tmp_path / "elsewhere").mkdir()
    here = jsonl(tmp_path / "here" / "data.jsonl", rows)
    moved = jsonl(tmp_path / "elsewhere" / "renamed.jsonl", rows)
    storage.upload_file(here, storage.join(s3_root, "raw/data.jsonl"))
    kw = {"eval_fraction": 0.25}
    splits = []
    for i, src in enumerate([str(here), str(moved), storage.join(s3_root, "raw/data.jsonl")]):
        out = run(sources=[src], output=str(tmp_path / f"out{i}"), **kw)
        splits.append(sorted(r["id"] for r in rows_of(out, "eval")))
    assert splits[0] == splits[1] == splits[2] and len(splits[0]) > 10


def test_an_eval_split_that_leaves_no_train_rows_is_refused_unless_every_source_is_eval(
        tmp_path: Path, caplog: pytest.LogCaptureFixture):
    src = jsonl(tmp_path / "s.jsonl", chat_rows(20))
    out = tmp_path / "o"
    with pytest.raises(ConfigError, match=r"eval_size 50 leaves no train rows \(20 rows in, 20 kept\); lower "
                                          r"eval_size.*mark every source split: eval"):
        run(sources=[str(src)], output=str(out), eval_size=50)
    # nothing published, no part left: the failed attempt's folder holds only its record
    assert storage.list_objects(str(out)) == []
    # The hashed split can put every one of a few rows in eval (here the one row, at seed 0): refused too.
    with pytest.raises(ConfigError, match=r"eval_fraction 0.99 put every row in eval"):
        run(sources=[str(jsonl(tmp_path / "one.jsonl", chat_rows(1)))], output=str(tmp_path / "f"),
            eval_fraction=0.99)
    # A run meant to make an eval set only says so and publishes it.
    caplog.set_level("INFO", logger="jobs.prepare")
    held = prepare.run(cfg.validate(prepare.Config, {"sources": [{"path": str(src), "split": "eval"}],
                                                     "output": str(tmp_path / "e")}))
    assert held.manifest.stats["train"] == 0 and held.manifest.stats["eval"] == 20
    assert "publishing an eval set only" in caplog.text


def test_rerun_without_manifest_removes_the_parts_of_the_unfinished_attempt(store_root: str, tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture):
    src = jsonl(tmp_path / "s.jsonl", chat_rows(30))
    out = storage.join(store_root, "prep")
    first = run(sources=[str(src)], output=out, rows_per_shard=5)
    storage.delete(storage.join(out, "manifest.json"))  # as if killed before the manifest
    storage.write_bytes(storage.join(out, "data", "notes.txt"), b"not ours")
    caplog.set_level("INFO", logger="common.attempts")
    loaded = run(sources=[str(src)], output=out, rows_per_shard=30)
    assert "left by earlier attempts" in caplog.text
    left = sorted(o.rel for o in storage.list_objects(out))
    mine = f"attempts/{loaded.manifest.attempt}"
    assert f"attempts/{first.manifest.attempt}/data/train/part-00000.parquet" not in left
    assert [rel for rel in left if rel.endswith(".parquet")] == [f"{mine}/data/train/part-00000.parquet"]
    assert "data/notes.txt" in left  # not a folder ftjobs writes: never touched


def test_a_failed_run_leaves_no_data_behind(tmp_path: Path):
    src = jsonl(tmp_path / "t.jsonl", chat_rows(3) + [{"messages": [{"role": "user", "content": "q"}]}] * 3)
    with pytest.raises(InputError, match="max_drop_fraction"):
        run(sources=[str(src)], output=str(tmp_path / "o"), dedup="none")
    # the parts it wrote are taken back, its attempt record goes when it ends, and no empty folder stays
    assert not (tmp_path / "o").exists()


def test_without_dedup_repeated_rows_keep_unique_ids(tmp_path: Path):
    src = jsonl(tmp_path / "dup.jsonl", chat_rows(5) + chat_rows(5))
    out = run(sources=[str(src)], output=str(tmp_path / "o"), dedup="none", eval_fraction=0.0)
    ids = [r["id"] for r in rows_of(out, "train")]
    assert len(ids) == 10 and len(set(ids)) == 10


def test_worker_processes_give_identical_output(tmp_path: Path, tok_dir: Path):
    src = jsonl(tmp_path / "w.jsonl", chat_rows(60))
    kw = {"sources": [str(src)], "tokenizer": str(tok_dir), "batch_size": 8}
    one = run(output=str(tmp_path / "a"), workers=1, **kw)
    two = run(output=str(tmp_path / "b"), workers=2, **kw)
    assert rows_of(one) == rows_of(two)


TOOL_ROW = {"conversations": [
    {"from": "human", "value": "Weather in Oslo?"},
    {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Oslo"}}'},
    {"from": "observation", "value": '{"temp": 3}'}, {"from": "gpt", "value": "3 degrees."}],
    "functions": '[{"name": "get_weather", "parameters": {"type": "object"}}]'}


def test_tools_a_template_cannot_render_or_a_mapping_that_finds_none_are_refused_naming_the_file(
        tmp_path: Path, tok_dir: Path):
    src = jsonl(tmp_path / "tools.jsonl", [TOOL_ROW])
    mapped = {"columns": {"tools": "functions"}}
    loaded = run(sources=[str(src)], output=str(tmp_path / "ok"), tokenizer=str(tok_dir), **mapped)
    assert rows_of(loaded)[0]["tools"] == '[{"type": "function", "function": {"name": "get_weather", ' \
                                          '"parameters": {"type": "object"}}}]'
    plain = "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + eos_token + '\n' }}{% endfor %}"
    with pytest.raises(ConfigError, match=r"tools.jsonl line 1: the chat template never reads `tools`"):
        run(sources=[str(src)], output=str(tmp_path / "o1"), tokenizer=str(tok_dir), chat_template=plain, **mapped)
    with pytest.raises(InputError, match=r"tools.jsonl: no record has the tools column 'tool_list'"):
        run(sources=[str(src)], output=str(tmp_path / "o2"), columns={"tools": "tool_list"})
    bad = jsonl(tmp_path / "bad.jsonl", [{**TOOL_ROW, "functions": "[{not json"}])
    with pytest.raises(InputError, match=r"bad.jsonl line 1: column 'functions': tools is a string that is not "
                                         r"JSON.*skip_bad_lines"):
        run(sources=[str(bad)], output=str(tmp_path / "o3"), **mapped)


def test_cli_exit_codes(tmp_path: Path, subprocess_env: dict[str, str]):
    src = jsonl(tmp_path / "c.jsonl", chat_rows(3) + [{"messages": [{"role": "user", "content": "q"}]}])
    cmd = [sys.executable, "-m", "jobs.cli", "prepare", "--source", str(src), "--output", str(tmp_path / "o")]
    bad = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=subprocess_env, timeout=120)
    assert bad.returncode == 3 and "no_assistant_turn" in bad.stderr and "max_drop_fraction" in bad.stderr
    ok = subprocess.run(cmd + ["--set", "max_drop_fraction=0.5"], capture_output=True, text=True, cwd=REPO,
                        env=subprocess_env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == str(tmp_path / "o" / "manifest.json")
    usage = subprocess.run(cmd + ["--set", "max_lenght=3"], capture_output=True, text=True, cwd=REPO,
                           env=subprocess_env, timeout=120)
    assert usage.returncode == 2 and "max_length" in usage.stderr


OPENAI = REPO / "tests" / "data" / "openai"


def test_a_preference_pair_among_supervised_rows_is_refused_naming_it(tmp_path: Path):
    """A preference pair (OpenAI's input / preferred_output / non_preferred_output) after supervised rows is
    not misread as chat rows: refused, whatever the format setting (preference files themselves are read
    as pairs: tests/jobs/test_prepare_preference.py)."""
    src = OPENAI / "preference.jsonl"
    pair = json.loads(src.read_text().splitlines()[0])
    mixed = jsonl(tmp_path / "mixed.jsonl", [*chat_rows(3), pair])
    with pytest.raises(InputError, match=r"mixed.jsonl line 4: a preference pair"):
        run(sources=[str(mixed)], output=str(tmp_path / "o2"), format="messages", skip_bad_lines=True)
    pq.write_table(pa.Table.from_pylist([{k: json.dumps(v) for k, v in pair.items()}]), tmp_path / "p.parquet")
    with pytest.raises(InputError, match=r"p.parquet its columns: a preference pair"):
        run(sources=[str(jsonl(tmp_path / "sft.jsonl", chat_rows(2))), str(tmp_path / "p.parquet")],
            output=str(tmp_path / "o3"))
    loaded = run(sources=[str(tmp_path / "p.parquet")], output=str(tmp_path / "o4"))  # JSON text cells
    assert loaded.manifest.stats["kind"] == "preference" and loaded.manifest.stats["pairs"] == 1


def test_turn_counts_weights_and_ignored_keys_reach_the_manifest(tmp_path: Path, tok_dir: Path, tok, caplog):
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"old {i}",
                                                                 "weight": 0},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": f"new {i}"},
                          {"role": "user", "content": "thanks"}, {"role": "assistant", "content": f"bye {i}"}],
             "metadata": {"n": i}, "parallel_tool_calls": False} for i in range(4)]
    rows.append({"messages": [{"role": "user", "content": "q"},
                              {"role": "assistant", "content": "context only", "weight": 0}]})
    src = jsonl(tmp_path / "w.jsonl", rows)
    with caplog.at_level("WARNING", logger="jobs.prepare.job"):
        loaded = run(sources=[str(src)], output=str(tmp_path / "tok"), tokenizer=str(tok_dir),
                     train_on="last_assistant", max_drop_fraction=0.5)
    stats = loaded.manifest.stats
    assert stats["turns"] == {"trained": 4, "weight_0": 4, "train_on_excluded": 4}
    assert stats["ignored_keys"] == {"metadata": 4, "parallel_tool_calls": 4}
    named = [r.getMessage() for r in caplog.records if "ignored" in r.getMessage()]
    assert named == [f"{src}: keys that ftjobs does not read were ignored: metadata (4 rows), "
                     "parallel_tool_calls (4 rows)"]  # once for the file, not once per row
    # The row whose only answer has weight 0 has nothing to train on: dropped, saying why.
    assert stats["dropped"] == {"zero_trainable_tokens": 1}
    drops = storage.read_bytes(loaded.artifact_uri("drops")).decode()
    assert "every assistant turn has weight 0 (context only)" in drops
    assert sorted(t for r in rows_of(loaded) for t in trained_text(tok, r)) == [f"bye {i}<|im_end|>"
                                                                                for i in range(4)]
    # Untokenized: the same weights travel in the rows, and the same row is dropped for the same reason.
    raw = run(sources=[str(src)], output=str(tmp_path / "raw"), max_drop_fraction=0.5)
    assert raw.manifest.stats["dropped"] == {"zero_trainable_tokens": 1}
    weights = [[m["weight"] for m in r["messages"] if m["role"] == "assistant"] for r in rows_of(raw)]
    assert weights == [[0, None, None]] * 4


def test_a_hub_dataset_out_of_reach_offline_says_how_to_bring_it(tmp_path: Path, subprocess_env: dict[str, str]):
    env = {**subprocess_env, "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--source", "hf://nobody/nodataset@train",
                           "--output", str(tmp_path / "o")], capture_output=True, text=True, cwd=REPO, env=env,
                          timeout=180)
    assert proc.returncode == 3, proc.stderr[-2000:]  # offline by choice: a retry cannot help
    assert "dataset 'nobody/nodataset'" in proc.stderr and "save_to_disk(DIR)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_shipped_config_validates():
    conf = cfg.load_config(prepare.Config, file=str(REPO / "configs" / "prepare.yaml"), flags={"output": "o"})
    assert conf.tokenizer and conf.sources
