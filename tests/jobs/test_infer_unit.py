"""infer's config, shard assignment and prompt-row rules: no model, no network."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import models
from common.config import load_config
from common.errors import ConfigError, InputError
from jobs.infer import inputs
from jobs.infer import job as infer

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]
REQUIRED = {"model": "m", "prompts": "p.jsonl", "output": "out"}


def test_shipped_config_loads_and_validates() -> None:
    conf = load_config(infer.Config, file=str(REPO / "configs" / "infer.yaml"))
    assert conf.num_shards == 4 and conf.sampling.temperature == 0 and conf.engine == "vllm"


@pytest.mark.parametrize("flags, message", [
    ({"shard": 3, "num_shards": 3}, "shard 3 is out of range for num_shards 3"),
    ({"sampling": {"n": 2, "temperature": 0}}, "n=2 with temperature 0"),
    ({"output": "m"}, "output must be a prefix of its own"),
    ({"sampling": {"max_token": 5}}, "did you mean 'max_tokens'"),
    ({"engine": "tgi"}, "engine"),
])
def test_contradictory_or_unknown_settings_are_refused(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(infer.Config, flags=REQUIRED | flags)


@pytest.mark.parametrize("total", [0, 1, 2, 7, 12, 1000])
@pytest.mark.parametrize("shards", [1, 3, 8])
def test_every_row_belongs_to_exactly_one_shard(total: int, shards: int) -> None:
    seen = [i for s in range(shards) for i in range(*infer.shard_bounds(total, s, shards))]
    assert seen == list(range(total))


def test_shard_comes_from_the_indexed_job_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    conf = load_config(infer.Config, flags=REQUIRED | {"num_shards": 4})
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "2")
    assert infer.shard_index(conf) == 2
    monkeypatch.setenv("JOB_COMPLETION_INDEX", "4")
    with pytest.raises(ConfigError, match="JOB_COMPLETION_INDEX='4' is not a shard of num_shards 4"):
        infer.shard_index(conf)
    monkeypatch.delenv("JOB_COMPLETION_INDEX")
    with pytest.raises(ConfigError, match="no shard was given"):
        infer.shard_index(conf)
    assert infer.shard_index(load_config(infer.Config, flags=REQUIRED)) == 0


def test_shard_flag_is_parsed_and_checked() -> None:
    from click.testing import CliRunner

    from jobs.cli import main

    result = CliRunner().invoke(main, ["infer", "--model", "m", "--prompts", "p.jsonl", "--output", "o",
                                       "--shard", "3/3"])
    assert result.exit_code == 2 and "shard I must be in 0..N-1" in result.output
    assert CliRunner().invoke(main, ["infer", "--shard", "x"]).exit_code == 2


def test_rows_split_into_prompt_and_reference() -> None:
    cols = inputs.Columns()
    conv = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
            {"role": "assistant", "content": "a"}]
    row = inputs.normalize_row("x", {"messages": conv}, cols, 0, "f")
    assert row == {"id": "x", "prompt": conv[:2], "tools": None, "reference": "a", "error": None}
    row = inputs.normalize_row("y", {"prompt": "hi", "reference": 3}, cols, 1, "f")
    assert row["prompt"] == [{"role": "user", "content": "hi"}] and row["reference"] == "3"
    bad = inputs.normalize_row("z", {"messages": [{"role": "bot", "content": "?"}]}, cols, 7, "f.parquet")
    assert bad["error"] == "'messages' is not a list of {role, content} messages (row 7 of f.parquet)"
    only_answer = inputs.normalize_row("w", {"messages": [{"role": "assistant", "content": "a"}]}, cols, 0, "f")
    assert "no turns before its assistant answer" in only_answer["error"]


def test_prompt_rows_keep_tools_and_tool_calls_in_openai_form() -> None:
    cols = inputs.Columns()
    item = {"messages": [
        {"role": "user", "content": "Weather in Oslo?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "weather", "arguments": '{"city":"Oslo"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": '{"temp": 3}'},
        {"role": "assistant", "content": None, "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "Bergen"}}}]}],
        "tools": '[{"name": "weather", "parameters": {"type": "object"}}]'}
    row = inputs.normalize_row("t", item, cols, 0, "f")
    assert row["error"] is None and row["tools"] == [
        {"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    assert row["prompt"][1]["tool_calls"][0]["function"] == {"name": "weather", "arguments": '{"city": "Oslo"}'}
    assert row["prompt"][2] == {"role": "tool", "content": '{"temp": 3}', "tool_call_id": "c1"}
    assert row["reference"] == '{"name": "weather", "arguments": {"city": "Bergen"}}'
    with pytest.raises(InputError, match=r"f row 4: column 'tools': tools is a string that is not JSON"):
        inputs.normalize_row("u", {**item, "tools": "[{no"}, cols, 4, "f")


def test_jsonl_lines_too_deep_or_not_text_name_the_line(tmp_path: Path) -> None:
    for body in (b'{"prompt": "a' + b'"}\n{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}\n",
                 b'{"prompt": "a"}\n{"prompt": "\\ud800"}\n'):
        (tmp_path / "p.jsonl").write_bytes(body)
        with pytest.raises(InputError, match=r"p.jsonl line 2: cannot be read"):
            inputs.read_jsonl(tmp_path / "p.jsonl", str(tmp_path / "p.jsonl"))


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_text('{"prompt": "a"}\n\n{"prompt": \n')
    with pytest.raises(InputError, match=r"p.jsonl line 3: not valid JSON \(Expecting value at column 12\)"):
        inputs.read_jsonl(bad, str(bad))
    bad.write_text('{"prompt": "a"}\n{"prompt": "tab\there"}\n')
    with pytest.raises(InputError, match=r"line 2: not valid JSON \(Invalid control character at column 16\)"):
        inputs.read_jsonl(bad, str(bad))
    bad.write_text('["a"]\n')
    with pytest.raises(InputError, match="line 1: expected a JSON object, got list"):
        inputs.read_jsonl(bad, str(bad))


def test_non_utf8_jsonl_names_the_line_and_byte(tmp_path: Path) -> None:
    bad = tmp_path / "p.jsonl"
    bad.write_bytes(b'{"prompt": "a"}\n{"prompt": "caf\xe9"}\n')  # Latin-1, as a spreadsheet might save it
    with pytest.raises(InputError, match=r"p.jsonl line 2: invalid UTF-8 at byte 15 \(invalid continuation byte\); "
                                         "save the prompts as UTF-8"):
        inputs.read_jsonl(bad, str(bad))
    good = tmp_path / "bom.jsonl"
    good.write_bytes(b'\xef\xbb\xbf{"prompt": "caf\xc3\xa9"}\r\n')  # UTF-8 with a BOM and CRLF is fine
    assert inputs.read_jsonl(good, str(good)) == [{"prompt": "café"}]


def test_unreadable_parquet_prompts_are_an_input_error_naming_the_file(tmp_path: Path) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = tmp_path / "p.parquet"
    pq.write_table(pa.table({"prompt": ["a", "b"]}), src)
    src.write_bytes(src.read_bytes()[:40])  # cut short, as an interrupted copy leaves it
    conf = load_config(infer.Config, flags=REQUIRED | {"prompts": str(src)})
    with pytest.raises(InputError, match=rf"{src}: not a readable Parquet file \(.*magic bytes.*\): it is truncated "
                                         "or not Parquet. Re-create it"):
        inputs.load_rows(conf, inputs.load_prompts_input(str(src)))


def test_missing_split_lists_only_real_splits(tmp_path: Path) -> None:
    import io

    import pyarrow.parquet as pq

    from common import data
    from common import manifest as mf

    buf = io.BytesIO()
    pq.write_table(data.schema(tokenized=False).empty_table(), buf)
    writer = mf.ArtifactWriter(str(tmp_path / "prep"))
    writer.add_bytes(buf.getvalue(), "data/eval/part-00000.parquet", name="eval/part-00000", rows=0)
    writer.add_bytes(b"{}", "drops.jsonl", name="drops")  # prepare publishes these beside the splits
    writer.add_bytes(b"{}", "stats.json", name="stats")
    mf.publish(str(tmp_path / "prep"), mf.build(stage="prepare", run_id="r", config={}, inputs=[],
                                                artifacts=writer.artifacts))
    conf = load_config(infer.Config, flags=REQUIRED | {"prompts": str(tmp_path / "prep"), "split": "test"})
    with pytest.raises(InputError, match=r"has no 'test' split \(has: eval\): set split"):
        inputs.load_rows(conf, inputs.load_prompts_input(str(tmp_path / "prep")))


def test_modules_to_save_on_vllm_suggests_a_merge_command_that_parses(tmp_path: Path) -> None:
    import re
    import shlex

    from common import manifest as mf
    from jobs.merge import job as merge

    train = mf.publish(str(tmp_path / "train"), mf.build(
        stage="train", run_id="r", config={}, inputs=[], artifacts=[],
        model={"base_model": "m", "template_hash": "t" * 64,
               "lora": {"r": 8, "alpha": 16, "modules_to_save": ["lm_head"]}}))
    conf = load_config(infer.Config, flags=REQUIRED | {"adapter": train, "engine": "vllm"})
    with pytest.raises(ConfigError, match=r"modules_to_save: \['lm_head'\]") as err:
        inputs.check_adapter(conf, mf.load(train), models.ModelRef(source="m", path=tmp_path, revision=None))
    message = str(err.value)
    suggested = re.search(r"Run `ftjobs (merge [^`]*)`", message)
    assert suggested, message
    argv = shlex.split(suggested.group(1).replace("<prefix>", str(tmp_path / "merged")))
    # The suggested options are merge's own: click parses them without "No such option".
    ctx = merge.command.make_context("merge", argv[1:])
    assert ctx.params["input_"] == train and ctx.params["output"] == str(tmp_path / "merged")
    assert "as --model" in message and "--engine transformers" in message


def test_missing_prompt_column_and_duplicate_ids_are_input_errors(tmp_path: Path) -> None:
    src = tmp_path / "p.jsonl"
    src.write_text('{"text": "a"}\n')
    conf = load_config(infer.Config, flags=REQUIRED | {"prompts": str(src)})
    with pytest.raises(InputError, match=r"neither a 'messages' nor a 'prompt' column \(has: text\)"):
        inputs.load_rows(conf, inputs.load_prompts_input(str(src)))
    src.write_text('{"id": 1, "prompt": "a"}\n{"id": 1, "prompt": "b"}\n')
    with pytest.raises(InputError, match="id '1' appears twice"):
        inputs.load_rows(conf, inputs.load_prompts_input(str(src)))
    with pytest.raises(InputError, match="does not exist"):
        inputs.load_prompts_input(str(tmp_path / "nope.jsonl"))


def test_model_and_prompts_may_be_left_out_only_by_finalize() -> None:
    with pytest.raises(ConfigError, match=r"model and prompts: required, but not given \(--finalize alone"):
        load_config(infer.Config, flags={"output": "out"})
    with pytest.raises(ConfigError, match=r"prompts: required, but not given"):
        load_config(infer.Config, flags={"output": "out", "model": "m", "finalize": True})
    conf = load_config(infer.Config, flags={"output": "out", "finalize": True})
    assert conf.model is None and conf.prompts is None


def test_help_names_what_each_option_takes_and_what_a_non_final_shard_prints() -> None:
    from click.testing import CliRunner

    from jobs.cli import main

    result = CliRunner().invoke(main, ["infer", "--help"], terminal_width=200)
    assert result.exit_code == 0
    for option in ("--model MODEL_MANIFEST_OR_SRC", "--adapter TRAIN_MANIFEST", "--prompts PREPARE_MANIFEST_OR_FILE",
                   "--output URI"):
        assert option in result.output
    text = " ".join(result.output.split())
    assert "A shard that is not the last to finish prints its shard marker" in text
    assert "`--finalize --output URI` alone finalizes the run recorded in URI/plan.json" in text
