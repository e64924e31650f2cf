"""`ftjobs inspect`: prepared rows as the model sees them, in the terminal and as one HTML page."""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from common import config as cfg
from common import manifest as mf
from jobs import prepare
from jobs.cli import main
from jobs.prepare.inspect_cmd import token_pieces

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common import tinymodel

    root = tmp_path_factory.mktemp("inspect")
    tinymodel.build_tokenizer(root / "tok")
    rows = [{"messages": [{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": "Name a color <b>now</b>"},
                          {"role": "assistant", "content": "Blue, café."}]},
            {"messages": [{"role": "user", "content": "one plus one"}, {"role": "assistant", "content": "two"}]}]
    (root / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    conf = cfg.validate(prepare.Config, {"sources": [str(root / "in.jsonl")], "output": str(root / "out"),
                                         "tokenizer": str(root / "tok"), "eval_fraction": 0.0})
    prepare.run(conf)
    return root


def test_text_view_marks_trained_tokens_and_prints_histogram(prepared: Path):
    res = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--rows", "2", "--color", "never"])
    assert res.exit_code == 0, res.output
    assert "«Blue, café.<|im_end|>»" in res.output  # multi-byte characters survive token-by-token decoding
    assert "<s><|im_start|>system\nBe brief.<|im_end|>" in res.output
    assert "token length histogram, all splits" in res.output and "█" in res.output  # manifest-wide stats
    tokens = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--rows", "1", "--tokens",
                                       "--color", "never"])
    assert "<|im_start|>│" in tokens.output and "↵" in tokens.output


def test_html_page_is_self_contained_and_holds_the_rows(prepared: Path, tmp_path: Path):
    page = tmp_path / "rows.html"
    res = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--html", str(page)])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert text.startswith("<!doctype html>") and "<script" not in text and "http" not in text
    assert "<b>now" not in text  # row text is escaped ...
    shown = html.unescape(re.sub(r"<[^>]+>", "", text))
    assert "<|im_start|>user\nName a color <b>now</b><|im_end|>" in shown  # ... and reads as the model sees it
    assert "<span class='k t' title='id" in text and "Blue, café." in shown and "Token lengths" in text


def test_a_parquet_file_and_a_missing_split(prepared: Path):
    shard = Path(mf.load(str(prepared / "out")).artifact_uri("train/part-00000"))
    res = CliRunner().invoke(main, ["inspect", str(shard), "--tokenizer", str(prepared / "tok"),
                                    "--color", "never"])
    assert res.exit_code == 0 and "«two<|im_end|>»" in res.output
    missing = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--split", "eval"])
    assert missing.exit_code == 3


def test_token_pieces_join_to_the_decoded_text(prepared: Path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(prepared / "tok"))
    ids = tok("héllo wörld ✓ done", add_special_tokens=False)["input_ids"]
    assert "".join(token_pieces(tok, ids)) == tok.decode(ids)


def test_a_truncated_or_foreign_parquet_is_bad_input(prepared: Path, tmp_path: Path):
    shard = Path(mf.load(str(prepared / "out")).artifact_uri("train/part-00000")).read_bytes()
    (tmp_path / "cut.parquet").write_bytes(shard[: len(shard) // 2])
    cut = CliRunner().invoke(main, ["inspect", str(tmp_path / "cut.parquet")])
    assert cut.exit_code == 3 and "cut.parquet: not a readable Parquet file" in cut.output, cut.output
    assert "truncated" in cut.output and "Traceback" not in cut.output
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([{"instruction": "a", "input": "", "output": "b"}]), tmp_path / "raw.parquet")
    raw = CliRunner().invoke(main, ["inspect", str(tmp_path / "raw.parquet")])
    assert raw.exit_code == 3, raw.output
    assert "raw.parquet is not a prepare shard (missing columns id, messages, split, source; columns: " \
           "instruction, input, output)" in raw.output


def test_unwritable_html_path_is_refused_before_any_row_is_printed(prepared: Path, tmp_path: Path):
    target = tmp_path / "no" / "such" / "dir" / "rows.html"
    res = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--html", str(target), "--color", "never"])
    assert res.exit_code == 2, res.output
    assert f"--html {target}: the folder {target.parent} does not exist" in res.output
    assert "── row" not in res.output and not target.exists()
    folder = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--html", str(tmp_path)])
    assert folder.exit_code == 2 and "is a folder" in folder.output


def test_rows_must_not_be_negative(prepared: Path):
    neg = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--rows", "-1"])
    assert neg.exit_code == 2 and "--rows" in neg.output and "-1" in neg.output
    only_stats = CliRunner().invoke(main, ["inspect", str(prepared / "out"), "--rows", "0", "--color", "never"])
    assert only_stats.exit_code == 0 and "── row" not in only_stats.output
    assert "token length histogram" in only_stats.output


def test_hostile_row_text_and_paths_are_escaped_in_the_page(tmp_path: Path):
    """Row text is arbitrary: markup, ampersands and quotes show as text, in the rows and in the title."""
    hostile = '<script>alert("x")</script> & \'q\''
    rows = [{"messages": [{"role": "user", "content": hostile}, {"role": "assistant", "content": f"ok {hostile}"}]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out<i>&'"
    prepare.run(cfg.validate(prepare.Config, {"sources": [str(tmp_path / "in.jsonl")], "output": str(out),
                                             "eval_fraction": 0.0}))
    page = tmp_path / "rows.html"
    res = CliRunner().invoke(main, ["inspect", str(out), "--html", str(page), "--color", "never"])
    assert res.exit_code == 0, res.output
    text = page.read_text()
    assert "<script" not in text and "<i>" not in text and 'alert("x")' not in text and "'q'" not in text
    shown = html.unescape(re.sub(r"<[^>]+>", "", text))
    assert f"[user]\n{hostile}\n" in shown and f"ok {hostile}" in shown
    assert f"ftjobs inspect {out} (train)" in shown


def test_weights_show_in_the_rows_and_the_turn_counts_and_ignored_keys_under_them(tmp_path: Path):
    """Untokenized rows show each message's weight and mark a weight-0 answer as context; the manifest's
    turn counts and ignored keys follow the rows, in the terminal and on the page."""
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "draft", "weight": 0},
                          {"role": "user", "content": "again"}, {"role": "assistant", "content": "final"}],
             "metadata": {"n": 1}}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    prepare.run(cfg.validate(prepare.Config, {"sources": [str(tmp_path / "in.jsonl")], "output": str(tmp_path / "o"),
                                             "eval_fraction": 0.0}))
    page = tmp_path / "rows.html"
    res = CliRunner().invoke(main, ["inspect", str(tmp_path / "o"), "--color", "never", "--html", str(page)])
    assert res.exit_code == 0, res.output
    assert "[assistant weight=0]\ndraft\n[user]\nagain\n[assistant]\n«final\n»" in res.output
    assert "assistant turns: 1 trained, 1 weight 0 (context only), 0 excluded by train_on" in res.output
    assert "ignored keys: metadata (1 row)" in res.output
    shown = html.unescape(re.sub(r"<[^>]+>", " ", page.read_text()))
    assert "assistant turns: weight 0 (context only)" in shown and "ignored key: metadata" in shown


def test_row_text_cannot_drive_the_terminal(tmp_path: Path):
    """Escape sequences in row text (clear screen, set the title, recolour, CR overwrite, one-byte CSI, a bidi
    override) print as visible escapes, and only inspect's own colours reach the terminal."""
    evil = "hi\x1b[2J\x1b]0;pwned\x07\r\x9b31mred\u202eevil"
    rows = [{"messages": [{"role": "user", "content": evil}, {"role": "assistant", "content": f"ok {evil}"}]}]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    prepare.run(cfg.validate(prepare.Config, {"sources": [str(tmp_path / "in.jsonl")], "output": str(out),
                                             "eval_fraction": 0.0}))
    for color in ("never", "always"):
        res = CliRunner().invoke(main, ["inspect", str(out), "--color", color])
        assert res.exit_code == 0, res.output
        ours = re.sub(r"\x1b\[[0-9;]*m", "", res.stdout) if color == "always" else res.stdout  # our SGR colours
        assert not re.search("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e]", ours), repr(ours)
        assert "hi\\x1b[2J\\x1b]0;pwned\\x07\\x0d\\x9b31mred\\u202eevil" in ours
