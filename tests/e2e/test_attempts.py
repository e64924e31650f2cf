"""Two writers on one output never corrupt a published run (common/attempts.py).

For every stage, through the CLI as the containers run it, on the S3 test server: two attempts started
together race to one output, and a third is a zombie that passed the "already done" check, is held until
the winner published (FTJOBS_ATTEMPT_HOLD_S) and only then writes. Exactly one manifest stands, `ftjobs show
--verify full` passes on it before and after the zombie wrote, the zombie's files are garbage that `ftjobs gc`
lists and removes, and gc never removes a published file. The stages run as processes (the race is
between processes; each is `python -m jobs.cli ARGS` forked from a process that imported torch and
transformers once for the file, tests/e2e/stage_forks.py); `ftjobs show` and `ftjobs gc` run in this process
(they only read and remove files, and a process of their own costs a second each, six per case).

On the local store only prepare and train run the race (each case starts three stage processes, ~30 s on
2 cores). What decides the race there is one piece of code for every stage: the create-only manifest write
(common/storage.py, a hard link that fails when the name is taken; tests/common/test_storage.py and
tests/common/test_attempt_race.py cover it on the local store, tests/common/test_conditional_write.py the S3
side) and the attempt folders of common/attempts.py. Train is the stage whose zombie differs (it stops at its
first checkpoint once it sees the manifest, and checkpoints are files of their own), and prepare, the
cheapest stage, stands for the rest; merge, infer and evaluate would repeat the same local writes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from common import manifest as mf
from common import storage
from tests.e2e.stage_forks import Forked, Forks
from tests.inprocess import ftjobs
from tests.jobs import builders, helpers
from tests.jobs.test_evaluate import BASE, TUNED, publish_predictions

pytestmark = pytest.mark.e2e


def stage_args(stage: str, root: str, tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path) -> list[str]:
    """The stage's command line with real upstream outputs made for it."""
    if stage == "prepare":
        data = tmp_path / "chats.jsonl"
        data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"q {i}"},
                                                         {"role": "assistant", "content": f"a {i}"}]}) + "\n"
                                for i in range(40)))
        return ["prepare", "--source", str(data), "--tokenizer", str(tiny_model)]
    if stage == "train":
        prep = helpers.publish_prepare(f"{root}/up/prepare", tokenizer=tiny_tokenizer, n_train=16, n_eval=4)
        return ["train", "--input", prep.uri, "--base-model", str(tiny_model), "--set", "max_steps=3",
                "--set", "batch_size=2", "--set", "max_seq_length=64", "--set", "checkpoint.every_steps=1"]
    if stage == "merge":
        adapter = builders.publish_adapter(f"{root}/up/train", tiny_model)
        return ["merge", "--input", adapter.uri]
    if stage == "infer":
        prep = helpers.publish_prepare(f"{root}/up/prepare", tokenizer=tiny_tokenizer, n_train=4, n_eval=6)
        return ["infer", "--model", str(tiny_model), "--prompts", prep.uri, "--engine", "transformers",
                "--set", "sampling.temperature=0", "--set", "sampling.max_tokens=4", "--set", "chunk_rows=2",
                "--set", f"cache_dir={tmp_path / 'cache'}"]
    base = publish_predictions(f"{root}/up/infer-base", BASE, label="base")
    tuned = publish_predictions(f"{root}/up/infer-ft", TUNED, label="finetuned")
    return ["evaluate", "--predictions", base, "--predictions", tuned]


@pytest.fixture(scope="module")
def forks(s3_endpoint: str) -> Iterator[Forks]:
    """Where the stage processes are forked from (tests/e2e/stage_forks.py): torch and transformers imported
    once for the file, not ~5 s of imports in each of the 21 stage processes."""
    server = Forks(dict(os.environ) | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"})
    yield server
    server.close()


def wait_for_line(log: Path, text: str, proc: Forked, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in log.read_text():
            return
        assert proc.poll() is None, log.read_text()[-3000:]
        time.sleep(0.2)
    raise AssertionError(f"no {text!r} in {log}")


def show_full(out: str) -> Result:
    return ftjobs(["show", out, "--verify", "full"], check=False)


CASES = [*((stage, "s3") for stage in ("prepare", "train", "merge", "infer", "evaluate")),
         ("prepare", "local"), ("train", "local")]  # why not every stage on the local store: the docstring


@pytest.mark.parametrize(("stage", "store"), CASES, ids=[f"{stage}-{store}" for stage, store in CASES])
def test_racing_and_zombie_attempts_leave_the_published_run_intact(stage: str, store: str, tiny_model: Path,
                                                                   tiny_tokenizer: Any, tmp_path: Path,
                                                                   subprocess_env: dict[str, str], forks: Forks,
                                                                   request: pytest.FixtureRequest) -> None:
    store_root = str(tmp_path / "store") if store == "local" else request.getfixturevalue("s3_root")
    out = f"{store_root}/{stage}"
    args = [*stage_args(stage, store_root, tiny_model, tiny_tokenizer, tmp_path), "--output", out]
    env = subprocess_env | {"FTJOBS_LOG_FORMAT": "text"}
    # The zombie first: it passes the "already done" check, then is held until a winner has published.
    zombie_log = tmp_path / "zombie.log"
    zombie = forks.start(args, env | {"FTJOBS_ATTEMPT_HOLD_S": "600"}, zombie_log)
    wait_for_line(zombie_log, "holding this attempt", zombie)
    racers = [forks.start(args, env, tmp_path / f"racer{i}.log") for i in range(2)]
    for i, proc in enumerate(racers):
        stdout, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, (tmp_path / f"racer{i}.log").read_text()[-3000:]
        assert stdout.strip().splitlines()[-1] == mf.manifest_uri(out)
    published = storage.read_bytes(mf.manifest_uri(out))
    assert show_full(out).exit_code == 0

    stdout, _ = zombie.communicate(timeout=900)
    log = zombie_log.read_text()
    assert zombie.returncode == 0, log[-3000:]
    assert "another attempt of this run published" in log and "its results stand" in log
    assert stdout.strip().splitlines()[-1] == mf.manifest_uri(out)  # it reports the winner, not its own work

    # The zombie wrote its files after the winner published, and not one byte the manifest names changed.
    assert storage.read_bytes(mf.manifest_uri(out)) == published
    checked = show_full(out)
    assert checked.exit_code == 0, checked.output
    winner = mf.load(out, verify="full")
    named = {a.path for a in winner.manifest.artifacts}
    assert named and all(p.startswith(f"attempts/{winner.manifest.attempt}/") for p in named)
    leftover = [o.rel for o in storage.list_objects(storage.join(out, "attempts"))
                if not o.rel.startswith(f"{winner.manifest.attempt}/")]
    if stage != "train":  # train's zombie stops at its first checkpoint once it sees the manifest: no files
        assert leftover, "the zombie (and the losing racer) should have left files of their own"

    # gc: a dry run lists exactly the unreferenced files; --apply removes them and nothing published.
    dry = ftjobs(["gc", out])
    listed = {line.split()[-1] for line in dry.stdout.splitlines()}
    assert {f"attempts/{rel}" for rel in leftover} <= listed and not listed & named
    assert all(storage.exists(storage.join(out, f"attempts/{rel}")) for rel in leftover)  # dry: nothing removed
    ftjobs(["gc", out, "--apply"])
    assert show_full(out).exit_code == 0
    left = {o.rel for o in storage.list_objects(out)}
    assert named <= left and not any(rel.startswith("attempts/") and rel not in named for rel in left)
    again = ftjobs(["gc", out])
    assert again.stdout == "" and "0 file(s)" in again.stderr


def test_gc_without_a_manifest_leaves_live_attempts_and_resume_files_alone(tmp_path: Path) -> None:
    from common import attempts

    out = str(tmp_path / "train")
    storage.write_bytes(f"{out}/checkpoints/step-00000001/state.json", b"{}")
    storage.write_bytes(f"{out}/attempts/dead/adapter/a.bin", b"x")  # no record: its attempt is gone
    over = {"attempt": "old", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - attempts.REMOVE_AFTER_S - 1}
    storage.write_bytes(f"{out}/attempts/old/attempt.json", storage.json_bytes(over))
    storage.write_bytes(f"{out}/attempts/old/adapter/a.bin", b"x")
    # stale (nobody waits for it) but not over: it may be paused and come back to publish its files
    stale = {"attempt": "quiet", "host": "elsewhere", "pid": 1, "heartbeat_at": time.time() - attempts.STALE_S - 1}
    storage.write_bytes(f"{out}/attempts/quiet/attempt.json", storage.json_bytes(stale))
    storage.write_bytes(f"{out}/attempts/quiet/adapter/a.bin", b"x")
    with attempts.Heartbeat(out, "live", "train"):
        storage.write_bytes(f"{out}/attempts/live/adapter/a.bin", b"x")
        found = attempts.collect(out, dry_run=False)
        assert sorted(o.rel for o in found.removed) == ["attempts/dead/adapter/a.bin", "attempts/old/adapter/a.bin",
                                                       "attempts/old/attempt.json"]
        assert found.kept_live == ["live", "quiet"] and not found.published
        assert storage.exists(f"{out}/attempts/live/adapter/a.bin")
        assert storage.exists(f"{out}/attempts/quiet/adapter/a.bin")
    assert storage.exists(f"{out}/checkpoints/step-00000001/state.json")
    assert not storage.exists(f"{out}/attempts/live/attempt.json")  # an ended attempt takes its record away


def test_a_killed_local_attempt_is_not_waited_for(tmp_path: Path) -> None:
    from common import attempts

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    record = {"attempt": "a", "host": os.uname().nodename, "pid": proc.pid, "heartbeat_at": time.time()}
    assert not attempts.alive(record)
    assert attempts.alive(record | {"pid": os.getpid()})
    assert not attempts.alive(record | {"pid": os.getpid(), "heartbeat_at": time.time() - attempts.STALE_S})
