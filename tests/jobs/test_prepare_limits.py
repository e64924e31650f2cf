"""Rows built to exhaust prepare: a conversation of 10,000 messages, and Parquet and CSV "bombs" (a small
file holding one huge value). Each is handled, named and counted as the contract says, in seconds and
without holding the huge value in memory. Timings and memory go to bench/bench_prepare_limits.py; the bounds
here are generous on purpose."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import data
from common import manifest as mf
from common.errors import InputError

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
BOMB = 256 << 20  # bytes of the one huge value


def chat_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"what is {i} plus one"},
                          {"role": "assistant", "content": f"it is {i + 1}"}]} for i in range(n)]


def many_messages(n: int) -> dict:
    return {"messages": [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(n)]}


def peak_rss_mib(env: dict[str, str], *args: str, timeout: int = 180) -> tuple[int, str, float]:
    """Exit code, stderr and peak RSS (MiB) of `ftjobs prepare` run as a child of a fresh Python process, so
    that the peak is that process's alone (RUSAGE_CHILDREN of a process with one child)."""
    code = ("import resource, subprocess, sys\n"
            "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)\n"
            "sys.stderr.buffer.write(p.stderr)\n"
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
            "sys.exit(p.returncode)\n")
    proc = subprocess.run([sys.executable, "-c", code, sys.executable, "-m", "jobs.cli", "prepare", *args],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return proc.returncode, proc.stderr, int(proc.stdout.strip() or 0) / 1024


def stats(out: Path) -> dict:
    return mf.load(str(out / "manifest.json")).manifest.stats


def test_a_row_of_ten_thousand_messages_is_dropped_or_truncated_in_seconds(tmp_path: Path, subprocess_env, tok_dir):
    src = tmp_path / "many.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in [*chat_rows(9), many_messages(10_000)]))
    code, err, _ = peak_rss_mib(subprocess_env, "--source", str(src), "--output", str(tmp_path / "o"),
                                "--set", "max_drop_fraction=0.5", "--set", "eval_size=1", timeout=120)
    assert code == 0, err[-2000:]
    assert stats(tmp_path / "o")["dropped"] == {"too_many_messages": 1}
    # Allowed through, it is rendered only as far as max_length reaches and kept truncated.
    code, err, _ = peak_rss_mib(subprocess_env, "--source", str(src), "--output", str(tmp_path / "t"),
                                "--tokenizer", str(tok_dir), "--set", "max_messages=20000", "--set", "max_length=64",
                                "--set", "eval_size=1", "--set", "workers=1", timeout=120)
    assert code == 0, err[-2000:]
    s = stats(tmp_path / "t")
    assert s["truncated"] == 1 and s["rows_out"] == 10 and s["tokens"]["max"] <= 64


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common import tinymodel

    path = tmp_path_factory.mktemp("tok") / "tok"
    tinymodel.build_tokenizer(path)
    return path


def huge_string(size: int) -> pa.Array:
    """One string of `size` bytes, built in Arrow (one copy in this process)."""
    values = pa.py_buffer(np.full(size, ord("x"), dtype=np.uint8))
    return pa.StringArray.from_buffers(1, pa.py_buffer(np.array([0, size], dtype=np.int32)), values)


def test_a_parquet_bomb_is_refused_by_name_without_being_decompressed(tmp_path: Path, subprocess_env):
    bomb = tmp_path / "bomb.parquet"
    pq.write_table(pa.table({"text": huge_string(BOMB)}), bomb, compression="zstd")
    assert bomb.stat().st_size < 1 << 20
    code, err, rss = peak_rss_mib(subprocess_env, "--source", str(bomb), "--output", str(tmp_path / "o"))
    assert code == 3, err[-2000:]
    assert f"{bomb} line 1: rows 1-1 (a row group) average more than max_line_bytes" in err
    assert "Traceback" not in err and not (tmp_path / "o" / "manifest.json").exists()
    # Against the same refusal of a 1 MiB value: what the process holds anyway (its imports, Arrow's pools)
    # differs between machines, what the bomb adds must not.
    small = tmp_path / "small.parquet"
    pq.write_table(pa.table({"text": huge_string(1 << 20)}), small, compression="zstd")
    code, err, base = peak_rss_mib(subprocess_env, "--source", str(small), "--output", str(tmp_path / "b"),
                                   "--set", "max_line_bytes=65536")
    assert code == 3 and "(a row group) average more than max_line_bytes" in err, err[-2000:]
    assert rss - base < 0.5 * (BOMB >> 20), f"peak RSS {rss:.0f} MiB for a {BOMB >> 20} MiB value, {base:.0f} for 1 MiB"


def test_a_huge_value_among_small_rows_is_dropped_before_python_sees_it(tmp_path: Path):
    """A row group that averages under the limit is read; its one long row is measured in Arrow and
    dropped (skip_bad_lines) or named (exit 3), the rows around it kept."""
    from common import config as cfg
    from jobs import prepare

    texts = pa.array([f"document number {i}" for i in range(3000)])
    big = huge_string(4 << 20)
    table = pa.table({"text": pa.concat_arrays([texts.slice(0, 1500), big, texts.slice(1500)])})
    src = tmp_path / "mixed.parquet"
    pq.write_table(table, src, row_group_size=4000)
    conf = {"sources": [str(src)], "max_line_bytes": 1 << 20, "eval_size": 10, "decontaminate": "off"}
    with pytest.raises(InputError, match=r"mixed.parquet line 1501: row 1,501 holds 4,194,304 bytes, more than "
                                         r"max_line_bytes \(1,048,576 bytes\)"):
        prepare.run(cfg.validate(prepare.Config, {**conf, "output": str(tmp_path / "o")}))
    loaded = prepare.run(cfg.validate(prepare.Config, {**conf, "output": str(tmp_path / "s"), "skip_bad_lines": True}))
    assert loaded.manifest.stats["dropped"] == {"line_too_long": 1}
    assert loaded.manifest.stats["rows_out"] == 3000


def test_a_csv_bomb_is_refused_by_line_without_being_held_whole(tmp_path: Path, subprocess_env):
    src = tmp_path / "bomb.csv"
    with open(src, "wb") as fh:
        fh.write(b"prompt,completion\nhello,world\nq,\"")
        chunk = b"y" * (1 << 20)
        for _ in range(BOMB >> 20):
            fh.write(chunk)
        fh.write(b"\"\nlast,row\n")
    code, err, rss = peak_rss_mib(subprocess_env, "--source", str(src), "--output", str(tmp_path / "o"),
                                  "--set", "max_line_bytes=8388608")
    assert code == 3, err[-2000:]
    assert f"{src} line 3: CSV record is longer than max_line_bytes (8,388,608 bytes)" in err
    small = tmp_path / "small.csv"
    small.write_bytes(b"prompt,completion\nhello,world\nq,\"" + b"y" * (1 << 20) + b"\"\nlast,row\n")
    code, err, base = peak_rss_mib(subprocess_env, "--source", str(small), "--output", str(tmp_path / "b"),
                                   "--set", "max_line_bytes=65536")
    assert code == 3 and "CSV record is longer than max_line_bytes" in err, err[-2000:]
    assert rss - base < 0.5 * (BOMB >> 20), f"peak RSS {rss:.0f} MiB for a {BOMB >> 20} MiB field, {base:.0f} for 1 MiB"
    # Skipped, the rows around it are read (the long record was one line).
    out = tmp_path / "s"
    code, err, _ = peak_rss_mib(subprocess_env, "--source", str(src), "--output", str(out), "--set",
                                "max_line_bytes=8388608", "--set", "skip_bad_lines=true", "--set",
                                "max_drop_fraction=0.5", "--set", "eval_size=1")
    assert code == 0, err[-2000:]
    assert stats(out)["dropped"] == {"line_too_long": 1} and stats(out)["rows_out"] == 2


def test_json_lines_of_infer_and_synth_refuse_a_line_over_the_limit(tmp_path: Path):
    src = tmp_path / "prompts.jsonl"
    src.write_text('{"prompt": "short"}\n' + json.dumps({"prompt": "y" * 5000}) + "\n")
    with pytest.raises(InputError, match=r"prompts line 2: longer than 4,096 bytes"):
        data.json_lines(src, "prompts", "prompts", max_line_bytes=4096)
    assert data.json_lines(src, "prompts", "prompts")[0] == (1, {"prompt": "short"})


def test_many_raw_files_are_one_digest_in_the_manifest_with_their_list_as_an_artifact(tmp_path: Path):
    from common import config as cfg
    from common import lineage
    from jobs import prepare
    from jobs.prepare import listing

    folder = tmp_path / "many"
    folder.mkdir()
    n = listing.LISTED_MAX + 20
    for i in range(n):
        (folder / f"f{i:04d}.jsonl").write_text(json.dumps(chat_rows(i + 1)[-1]) + "\n")
    conf = {"sources": [str(folder)], "output": str(tmp_path / "o"), "eval_size": 5}
    loaded = prepare.run(cfg.validate(prepare.Config, conf))
    refs = loaded.manifest.inputs
    assert [(r.uri, r.role) for r in refs] == [(str(folder), "data-listing")]
    art = loaded.manifest.artifact("inputs")
    listed = [json.loads(line) for line in Path(loaded.resolve(art)).read_text().splitlines()]
    assert len(listed) == n and {x["source"] for x in listed} == {str(folder)}
    assert (tmp_path / "o" / "manifest.json").stat().st_size < 20_000
    # The same files: already done (the digest is the identity); a changed file: another run.
    assert prepare.run(cfg.validate(prepare.Config, conf)).manifest.run_id == loaded.manifest.run_id
    (folder / "f0000.jsonl").write_text(json.dumps(chat_rows(500)[-1]) + "\n")
    other = prepare.run(cfg.validate(prepare.Config, {**conf, "output": str(tmp_path / "o2")}))
    assert other.manifest.inputs[0].sha256 != refs[0].sha256
    tree = lineage.lineage(str(tmp_path / "o"), verify="full")
    assert tree.ok and all(c.ok for c in tree.children)
