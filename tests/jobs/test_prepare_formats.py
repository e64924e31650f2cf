"""Files as new users bring them: the layouts and spellings of each format that LLaMA-Factory, axolotl, TRL and
`datasets` accept, read by `ftjobs prepare` (real files, real Parquet and Arrow, the tiny tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import config as cfg
from common import data, storage
from common.errors import InputError
from jobs import prepare
from jobs.prepare import limits
from jobs.prepare import rows as R
from jobs.prepare.job import Columns

pytestmark = pytest.mark.integration
COLS = Columns().model_dump()


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common import tinymodel

    path = tmp_path_factory.mktemp("tok") / "tok"
    tinymodel.build_tokenizer(path)
    return path


def run(**kw: Any) -> Any:
    kw.setdefault("eval_fraction", 0.0)
    return prepare.run(cfg.validate(prepare.Config, {"workers": 1, "decontaminate": "off", **kw}))


def contents(loaded: Any) -> list[list[tuple[str, str]]]:
    return [[(m["role"], m["content"]) for m in r["messages"]] for r in data.read_split(loaded, "train").to_pylist()]


def qa(i: int) -> list[tuple[str, str]]:
    return [("user", f"question {i}"), ("assistant", f"answer {i}")]


# --------------------------------------------------------------------------- turn keys and roles


@pytest.mark.unit
def test_either_turn_spelling_in_either_chat_format_with_a_top_level_system():
    openai_keys = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    sharegpt_keys = [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]
    want = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    for fmt, key in (("sharegpt", "conversations"), ("messages", "messages")):
        for turns in (openai_keys, sharegpt_keys):
            assert R.to_messages({key: turns, "system": "s"}, fmt, COLS, R.DEFAULT_ROLES) == want, (fmt, turns)
    # TRL's conversational prompt/completion, in sharegpt's spelling too; OpenAI's developer role is the system
    rec = {"prompt": [{"from": "developer", "value": "s"}, {"from": "human", "value": "q"}],
           "completion": [{"from": "gpt", "value": "a"}]}
    assert R.to_messages(rec, "prompt_completion", COLS, R.DEFAULT_ROLES) == want
    # the raw ShareGPT dumps name their assistants; any case of a known name is that role
    turns = [{"from": "Human", "value": "q"}, {"from": "chatgpt", "value": "a"}, {"from": "user", "value": "q"},
             {"from": "bing", "value": "a"}, {"from": "HUMAN", "value": "q"}, {"from": "bard", "value": "a"}]
    assert [m["role"] for m in R.to_messages({"conversations": turns}, "sharegpt", COLS, R.DEFAULT_ROLES)] == [
        "user", "assistant"] * 3
    # columns.role/content, when given, are the only keys read
    with pytest.raises(R.Drop, match=r"conversations\[0\] has no 'speaker' key"):
        R.to_messages({"conversations": openai_keys}, "sharegpt", {**COLS, "role": "speaker"}, R.DEFAULT_ROLES)
    # the keys read are not reported as ignored; a top-level system is read, so not ignored either
    assert R.ignored_keys({"messages": sharegpt_keys, "system": "s", "meta": 1}, COLS) == ["meta"]


@pytest.mark.unit
def test_an_alpaca_history_cell_of_json_null_or_blank_is_no_history():
    for cell in ("null", "[]", " "):  # a table column written with json.dumps where a row has no history
        rec = {"instruction": "q", "output": "a", "history": cell}
        assert R.to_messages(rec, "alpaca", COLS, R.DEFAULT_ROLES) == [{"role": "user", "content": "q"},
                                                                       {"role": "assistant", "content": "a"}]


@pytest.mark.unit
def test_a_prompt_string_with_a_completion_of_messages_names_the_mismatch():
    rec = {"prompt": "q", "completion": [{"role": "assistant", "content": "a"}]}
    with pytest.raises(R.Drop, match=r"completion is a list of messages but prompt is str; give both as message "
                       "lists"):
        R.to_messages(rec, "prompt_completion", COLS, R.DEFAULT_ROLES)


# --------------------------------------------------------------------------- JSON wrappers


def test_a_json_object_wrapping_the_records_is_read_as_datasets_field_would(tmp_path: Path):
    recs = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(4)]
    (tmp_path / "pretty.json").write_text(json.dumps({"version": "1.1", "data": recs, "info": {"n": [4]}}, indent=2))
    (tmp_path / "oneline.json").write_text(json.dumps({"rows": recs}))
    (tmp_path / "record.json").write_text(json.dumps({"messages": [{"role": "user", "content": "question 9"},
                                                                   {"role": "assistant", "content": "answer 9"}],
                                                      "tags": ["a"]}, indent=2))
    loaded = run(sources=[str(tmp_path / n) for n in ("pretty.json", "oneline.json", "record.json")],
                 output=str(tmp_path / "o"), dedup="none")
    assert contents(loaded) == [qa(i) for i in range(4)] * 2 + [qa(9)]
    # a row's line is where its element starts in the file
    (tmp_path / "bad.json").write_text(json.dumps({"data": recs[:2] + [{"instruction": "q"}]}, indent=2))
    with pytest.raises(InputError, match=r"No rows left|Dropped 1 of 3") as info:
        run(sources=[str(tmp_path / "bad.json")], output=str(tmp_path / "o2"))
    assert "bad.json:11  output is missing" in str(info.value)
    # two arrays of records (a DatasetDict dumped as one object): which one to train on is the user's choice
    (tmp_path / "splits.json").write_text(json.dumps({"train": recs, "test": recs}, indent=2))
    with pytest.raises(InputError, match=r"splits.json: a JSON object holding records under 'train' and more data "
                       r"beside them \(test\)"):
        run(sources=[str(tmp_path / "splits.json")], output=str(tmp_path / "o3"))


def test_a_json_element_over_max_line_bytes_is_refused_even_when_it_was_read_whole(tmp_path: Path):
    # Elements were measured only when one spanned two 1 MiB reads: a 3 KB element passed a 2 KB limit.
    big = [{"text": "x" * 3000}]
    for name, body in (("array.json", json.dumps(big)), ("wrapped.json", json.dumps({"data": big}, indent=2))):
        (tmp_path / name).write_text(body)
        with pytest.raises(InputError, match=rf"{name} line \d: a JSON value is longer than max_line_bytes \(2,048\)"):
            run(sources=[str(tmp_path / name)], output=str(tmp_path / f"o-{name}"), max_line_bytes=2048)


# --------------------------------------------------------------------------- datasets folders


def test_a_saved_dataset_dict_reads_its_train_split_and_folders_skip_datasets_bookkeeping(tmp_path: Path):
    import datasets

    train = datasets.Dataset.from_list([{"text": f"train row {i}"} for i in range(4)])
    test = datasets.Dataset.from_list([{"text": f"test row {i}"} for i in range(2)])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    texts = [[c for _, c in r] for r in contents(run(sources=[str(tmp_path / "dd")], output=str(tmp_path / "o1")))]
    assert texts == [[f"train row {i}"] for i in range(4)]
    # a folder that holds a saved dataset among other files: its .arrow files, never its state/info JSON
    (tmp_path / "mixed").mkdir()
    train.save_to_disk(str(tmp_path / "mixed" / "saved"))
    (tmp_path / "mixed" / "extra.jsonl").write_text(json.dumps({"text": "extra row"}) + "\n")
    loaded = run(sources=[str(tmp_path / "mixed")], output=str(tmp_path / "o2"))
    assert sorted(loaded.manifest.stats["formats"].values()) == ["text", "text"]
    assert len(contents(loaded)) == 5
    datasets.DatasetDict({"validation": test}).save_to_disk(str(tmp_path / "val"))
    with pytest.raises(InputError, match=r"val is a saved DatasetDict without a 'train' split \(splits: validation\); "
                       r"give the split to read as the source, e.g. .*val/validation"):
        run(sources=[str(tmp_path / "val")], output=str(tmp_path / "o3"))


def test_a_saved_dataset_dict_under_an_s3_prefix_reads_its_train_split(tmp_path: Path, s3_root: str):
    import datasets

    train = datasets.Dataset.from_list([{"text": f"train row {i}"} for i in range(3)])
    test = datasets.Dataset.from_list([{"text": f"test row {i}"} for i in range(2)])
    datasets.DatasetDict({"train": train, "test": test}).save_to_disk(str(tmp_path / "dd"))
    for f in sorted(p for p in (tmp_path / "dd").rglob("*") if p.is_file()):
        storage.upload_file(f, f"{s3_root}/dd/{f.relative_to(tmp_path / 'dd').as_posix()}")
    loaded = run(sources=[s3_root + "/dd/"], output=str(tmp_path / "o"))
    assert [[c for _, c in r] for r in contents(loaded)] == [[f"train row {i}"] for i in range(3)]
    assert [i.uri.rsplit("/", 2)[-2:] for i in loaded.manifest.inputs] == [["train", "data-00000-of-00001.arrow"]]


# --------------------------------------------------------------------------- CSV


def test_csv_as_spreadsheets_write_it(tmp_path: Path):
    (tmp_path / "semicolon.csv").write_bytes(b"\xef\xbb\xbfinstruction;output\r\n" + b"".join(
        f'question {i};"answer {i}"\r\n'.encode() for i in range(3)))
    (tmp_path / "spaced.csv").write_text('instruction, output\nquestion 3, "answer 3"\n')
    loaded = run(sources=[str(tmp_path / "semicolon.csv"), str(tmp_path / "spaced.csv")], output=str(tmp_path / "o"))
    assert contents(loaded) == [qa(i) for i in range(4)]
    (tmp_path / "mac.csv").write_bytes(b"instruction,output\rquestion 1,answer 1\r")
    with pytest.raises(InputError, match=r"mac.csv line 1: the CSV header cannot be read \(lines end in a bare "
                       r"carriage return"):
        run(sources=[str(tmp_path / "mac.csv")], output=str(tmp_path / "o2"))
    (tmp_path / "latin1.csv").write_bytes("instruction,output\ncafé,olé\n".encode("latin-1"))
    with pytest.raises(InputError, match=r"latin1.csv line 2: invalid UTF-8: column 'instruction' holds the byte "
                       r"0xe9 \(a Latin-1 or Windows-1252 file\? re-save it as UTF-8\)"):
        run(sources=[str(tmp_path / "latin1.csv")], output=str(tmp_path / "o3"))


# --------------------------------------------------------------------------- Parquet and Arrow column types


@pytest.mark.unit
def test_row_bytes_measures_null_and_view_columns():
    batch = pa.record_batch({"none": pa.nulls(2), "view": pa.array(["abc", None], type=pa.string_view()),
                             "lists": pa.array([[1, 2], []], type=pa.list_view(pa.int32()))})
    assert limits.row_bytes(batch).tolist() == [3 + 8, 0]


def test_parquet_with_an_all_null_column_and_view_strings_is_read(tmp_path: Path):
    # datasets writes a column that is None in every row (`tools` of a chat set without tools, an image that no
    # part has) as Arrow's null type; pyarrow keeps string_view in the file's schema. Both crashed the reader.
    msgs = [[{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": f"answer {i}"}]
            for i in range(3)]
    pq.write_table(pa.table({"messages": msgs, "tools": pa.nulls(3)}), tmp_path / "nulls.parquet")
    pq.write_table(pa.table({"instruction": pa.array([f"question {i}" for i in range(3, 5)], type=pa.string_view()),
                             "output": pa.array([f"answer {i}" for i in range(3, 5)], type=pa.string_view())}),
                   tmp_path / "views.parquet")
    loaded = run(sources=[str(tmp_path / "nulls.parquet"), str(tmp_path / "views.parquet")], output=str(tmp_path / "o"))
    assert contents(loaded) == [qa(i) for i in range(5)]


# --------------------------------------------------------------------------- one run, every layout, real labels


def test_mixed_layouts_in_one_run_train_exactly_the_answers(tmp_path: Path, tok_dir: Path):
    from transformers import AutoTokenizer

    (tmp_path / "a.jsonl").write_text(json.dumps({"conversations": [{"role": "user", "content": "question 0"},
                                                                    {"role": "assistant", "content": "answer 0"}],
                                                  "system": "Be brief."}) + "\n")
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"instruction": "question 1", "output": "answer 1"}]},
                                                indent=2))
    (tmp_path / "c.csv").write_text("prompt;completion\nquestion 2;answer 2\n")
    loaded = run(sources=[str(tmp_path / n) for n in ("a.jsonl", "b.json", "c.csv")], output=str(tmp_path / "o"),
                 tokenizer=str(tok_dir))
    assert loaded.manifest.stats["formats"] == {str(tmp_path / "a.jsonl"): "sharegpt",
                                                str(tmp_path / "b.json"): "alpaca",
                                                str(tmp_path / "c.csv"): "prompt_completion"}
    tok = AutoTokenizer.from_pretrained(str(tok_dir))
    rows = data.read_split(loaded, "train").to_pylist()
    trained = [tok.decode([t for t, lab in zip(r["input_ids"], r["labels"], strict=True) if lab != -100])
               for r in rows]
    assert trained == [f"answer {i}<|im_end|>" for i in range(3)]
    assert str(tok.decode(rows[0]["input_ids"])).startswith("<s><|im_start|>system\nBe brief.")


def test_a_json_array_named_jsonl_is_read_and_trailing_commas_are_named(tmp_path: Path):
    recs = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(3)]
    (tmp_path / "array.jsonl").write_text(json.dumps(recs, indent=2))  # datasets reads it whatever the name
    loaded = run(sources=[str(tmp_path / "array.jsonl")], output=str(tmp_path / "o"))
    assert contents(loaded) == [qa(i) for i in range(3)]
    (tmp_path / "comma.json").write_text(json.dumps(recs, indent=2)[:-2] + ",\n]")
    with pytest.raises(InputError, match=r"comma.json line 13: a comma before the closing '\]'; JSON allows no "
                       "trailing comma"):
        run(sources=[str(tmp_path / "comma.json")], output=str(tmp_path / "o2"))
    (tmp_path / "comma.jsonl").write_text("".join(json.dumps(r) + ",\n" for r in recs))
    with pytest.raises(InputError, match=r"comma.jsonl line 1: not valid JSON: Extra data at column \d+; a comma after "
                       "the object\\? JSON lines have none"):
        run(sources=[str(tmp_path / "comma.jsonl")], output=str(tmp_path / "o3"))


def test_a_row_of_another_format_in_a_file_says_so(tmp_path: Path):
    rows: list[dict[str, Any]] = [{"instruction": f"question {i}", "output": f"answer {i}"} for i in range(3)]
    rows.append({"messages": [{"role": "user", "content": "question 3"}, {"role": "assistant", "content": "answer 3"}]})
    (tmp_path / "cat.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    loaded = run(sources=[str(tmp_path / "cat.jsonl")], output=str(tmp_path / "o"), max_drop_fraction=0.5)
    drops = [json.loads(x) for x in storage.read_bytes(loaded.artifact_uri("drops")).decode().splitlines()]
    assert [(d["line"], d["detail"]) for d in drops] == [
        (4, "instruction is missing; the row looks like messages, not alpaca: one format per file (split it, or one "
            "source each)")]


def test_bz2_xz_and_zstd_files_are_read_and_a_folder_names_what_it_leaves_out(tmp_path: Path,
                                                                              caplog: pytest.LogCaptureFixture):
    import bz2
    import lzma

    def body(i: int) -> bytes:
        return (json.dumps({"instruction": f"question {i}", "output": f"answer {i}"}) + "\n").encode()

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "a.jsonl.bz2").write_bytes(bz2.compress(body(0)))
    (folder / "b.jsonl.xz").write_bytes(lzma.compress(body(1)))
    sink = pa.BufferOutputStream()
    with pa.CompressedOutputStream(sink, "zstd") as out:
        out.write(body(2))
    (folder / "c.jsonl.zst").write_bytes(sink.getvalue().to_pybytes())
    (folder / "d.jsonl.lz4").write_bytes(b"not read")
    (folder / "README.md").write_text("# my data")
    loaded = run(sources=[str(folder)], output=str(tmp_path / "o"))
    assert contents(loaded) == [qa(i) for i in range(3)]
    assert "data: 2 files of types prepare does not read left out: README.md, d.jsonl.lz4" in caplog.text
    (tmp_path / "cut.jsonl.zst").write_bytes(sink.getvalue().to_pybytes()[:-6])
    with pytest.raises(InputError, match=r"cut.jsonl.zst: compressed data is truncated or corrupt"):
        run(sources=[str(tmp_path / "cut.jsonl.zst")], output=str(tmp_path / "o2"))
