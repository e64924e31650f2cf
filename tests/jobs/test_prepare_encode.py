"""Tokenizer worker processes: they live and die with the prepare process that forked them."""

from __future__ import annotations

import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def children(pid: int) -> set[int]:
    """Live (not zombie) processes whose parent is pid, from /proc."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, ppid = stat.rsplit(")", 1)[1].split()[:2]
        if int(ppid) == pid and state != "Z":
            out.add(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_workers_die_when_prepare_is_killed(tmp_path: Path, subprocess_env: dict[str, str]):
    from common import tinymodel

    tinymodel.build_tokenizer(tmp_path / "tok")
    src = tmp_path / "big.jsonl"
    with open(src, "w") as f:  # enough rows that the workers are still busy when the kill comes
        for i in range(100_000):
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {i} plus one"},
                                             {"role": "assistant", "content": f"it is {i + 1}"}]}) + "\n")
    cmd = [sys.executable, "-m", "jobs.cli", "prepare", "--source", str(src), "--tokenizer", str(tmp_path / "tok"),
           "--output", str(tmp_path / "out"), "--set", "workers=2", "--set", "batch_size=64"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while len(workers) < 2 and proc.poll() is None and time.monotonic() < deadline:
            workers = children(proc.pid)
            time.sleep(0.05)
        assert len(workers) == 2, "prepare never started its 2 tokenizer workers"
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=30) == -signal.SIGKILL  # killed mid-run, not finished before the kill
        deadline = time.monotonic() + 5
        while any(alive(p) for p in workers) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = [p for p in workers if alive(p)]
        assert not left, f"tokenizer workers {left} outlived their killed parent"
    finally:
        if proc.poll() is None:
            proc.kill()
        for p in workers:  # never leak them into the rest of the test session
            if alive(p):
                os.kill(p, signal.SIGKILL)


def test_a_tokenizer_only_folder_loads_as_autotokenizer_would_without_torch(tmp_path: Path,
                                                                             subprocess_env: dict[str, str]):
    from transformers import AutoTokenizer

    from common import tinymodel
    from jobs.prepare.encode import load_tokenizer

    tinymodel.build_tokenizer(tmp_path / "tok")
    ours, auto = load_tokenizer(str(tmp_path / "tok")), AutoTokenizer.from_pretrained(str(tmp_path / "tok"))
    assert type(ours) is type(auto) and ours.get_vocab() == auto.get_vocab()
    assert ours.chat_template == auto.chat_template and ours.special_tokens_map == auto.special_tokens_map
    text = "<s><|im_start|>user\nwhat is one plus one?<|im_end|>\n"
    assert ours(text, return_offsets_mapping=True).data == auto(text, return_offsets_mapping=True).data
    # The point of it: prepare starts without importing torch (seconds of CPU before the first row).
    probe = ("import sys; from jobs.prepare.encode import load_tokenizer; load_tokenizer(sys.argv[1]); "
             "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(tmp_path / "tok")], cwd=REPO, env=subprocess_env,
                         capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_the_cli_starts_without_torch_or_transformers(subprocess_env: dict[str, str]):
    """`ftjobs --help` imports every stage's module to list its command, and the prepare image (which also runs
    evaluate) has no torch: a stage module that imports torch at the top breaks that image."""
    probe = ("import sys, click, jobs.cli; names = jobs.cli.main.list_commands(click.Context(jobs.cli.main)); "
             "print(len(names), [m for m in ('torch', 'transformers', 'vllm', 'peft', 'bitsandbytes') "
             "if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=subprocess_env, capture_output=True,
                         text=True, check=True).stdout
    count, loaded = out.strip().split(" ", 1)
    assert int(count) >= 20 and loaded == "[]"


def test_a_command_imports_only_its_own_module(subprocess_env: dict[str, str]):
    """`ftjobs NAME` imports NAME's module alone (every other stage's module was 0.4 s of each start), and the
    table of names it looks commands up by is exactly what the modules declare."""
    import click

    from jobs import cli

    declared = cli.main.list_commands(click.Context(cli.main))
    assert set(declared) == set(cli.command_modules()) | {"show", "gc"}
    # In a fresh process, each name looked up alone (nothing listed first) finds its command through the table.
    probe = ("import sys, click, jobs.cli; jobs.cli.main.get_command(None, 'prepare'); "
             "print(sorted(m for m in sys.modules if m.startswith('jobs.') and m.count('.') == 1)); "
             "print([n for n in jobs.cli.command_modules() if jobs.cli.main.get_command(None, n) is None])")
    out = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=subprocess_env, capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines() == ["['jobs.cli', 'jobs.prepare']", "[]"]
    # A plugin stage that cannot be imported is a config error (exit 2, named), for help as for a command.
    for args in (["--help"], ["prepare", "--help"]):
        bad = subprocess.run([sys.executable, "-m", "jobs.cli", *args], cwd=REPO, capture_output=True, text=True,
                             env=subprocess_env | {"FTJOBS_EXTRA_STAGES": "nosuch.stages"})
        assert bad.returncode == 2 and "cannot import nosuch.stages" in bad.stderr, (args, bad.stderr[-2000:])
        assert "Traceback" not in bad.stderr


def test_one_batch_runs_in_the_job_and_a_second_starts_the_pool_with_both_in_order(tmp_path: Path):
    """A one-batch input never starts workers; a longer one does at its second batch, and the first batch goes
    to the pool too (it used to run here first, a core idle meanwhile). Results come back in submission order."""
    from common import chat, heap, tinymodel
    from jobs.prepare import batch as B
    from jobs.prepare import rows as R
    from jobs.prepare.config import Config
    from jobs.prepare.encode import Encoder, load_tokenizer

    tinymodel.build_tokenizer(tmp_path / "tok")
    conf = Config(sources=["x.jsonl"], tokenizer=str(tmp_path / "tok"), output=str(tmp_path / "o"))
    rules = B.Rules(columns=conf.columns.model_dump(), roles=R.DEFAULT_ROLES, max_chars=conf.max_chars, dedup="none",
                    seed=0, train_on="assistant", max_length=None, on_too_long="drop")
    tok = load_tokenizer(str(tmp_path / "tok"))
    fmt = chat.chat_format(tok)

    def batch(k: int) -> list[bytes]:
        return [json.dumps({"messages": [{"role": "user", "content": f"batch {k} row {i}?"},
                                         {"role": "assistant", "content": f"answer {k}.{i}"}]}).encode()
                for i in range(3)]

    for n in (1, 3):
        got: list[tuple[int, int]] = []

        def done(tag: int, result: tuple[list, object], got: list[tuple[int, int]] = got) -> None:
            got.append((tag, result[1].num_rows))  # type: ignore[attr-defined]

        enc = Encoder(tok, str(tmp_path / "tok"), fmt, rules, workers=2)
        try:
            for k in range(n):
                enc.submit("messages", batch(k), k, done)
            assert (enc.pool is not None) == (n > 1) and not got
            # While it runs, the start-up heap (transformers, pandas, the tokenizer) is frozen: no collection
            # walks it, in the workers neither (common/heap.py).
            assert gc.get_freeze_count() > 0
            if enc.pool is not None:  # the workers inherited it frozen, and collect their own objects less often
                assert enc.pool.submit(gc.get_freeze_count).result() > 0
                assert enc.pool.submit(gc.get_threshold).result()[0] == heap.WORKER_GEN0
            enc.drain(done)
        finally:
            enc.close()
        assert got == [(k, 3) for k in range(n)]
        # Closed, a caller in the same process has its collector back over everything.
        assert gc.get_freeze_count() == 0 and gc.isenabled()
