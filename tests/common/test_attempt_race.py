"""A stale attempt never publishes what another attempt's tidy-up removed (common/attempts.py, common/stage.py).

The race, made deterministic: attempt A writes its files, then goes quiet (its beats stop reaching the store,
as on a frozen node); attempt B of the same run starts and tidies up; A comes back and publishes. Whatever the
interleaving, the output ends with no manifest or with one whose every file is there, on the local store and
on the S3 test server, and a manifest stuck naming missing files can be moved aside with `ftjobs gc
--unpublish-broken`.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from click.testing import CliRunner

from common import attempts, stage, storage
from common import manifest as mf
from common.errors import FtjobsError
from jobs.cli import main

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def short_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Quiet for 0.2 s: stale; for 1.0 s: over (an attempt refuses to publish after 0.8 s of silence)."""
    monkeypatch.setattr(attempts, "STALE_S", 0.2)
    monkeypatch.setattr(attempts, "REMOVE_AFTER_S", 1.0, raising=False)


def identity(out: str) -> stage.Identity:
    return stage.Identity(stage="train", output=out, config={"lr": 0.1}, inputs=[])


def write(attempt: stage.Attempt) -> None:
    attempt.writer.add_bytes(b"adapter weights", "adapter/adapter_model.safetensors", name="adapter")


def go_quiet(attempt: stage.Attempt, for_s: float) -> None:
    """A's beats stop reaching the store for `for_s` seconds (elsewhere: no local pid check helps B)."""
    beat = attempt.heartbeat
    beat._stop.set()  # the background beats end; the record ages as a frozen pod's would
    record = beat.record(host="a-node-that-froze") | {"heartbeat_at": time.time() - for_s}
    storage.write_bytes(beat.uri, storage.json_bytes(record))
    beat._last_ok = time.monotonic() - for_s  # the last beat that got through


def other_attempt_tidies(out: str) -> None:
    attempts.tidy(out, keep_attempt="b-the-replacement")  # what stage.run does first in attempt B


def assert_no_manifest_or_a_whole_one(out: str) -> None:
    if storage.exists(mf.manifest_uri(out)):
        mf.load(out, verify="full")


def test_a_stale_attempt_whose_files_were_removed_publishes_nothing(store_root: str) -> None:
    out = storage.join(store_root, "train")

    def work(attempt: stage.Attempt) -> Any:
        write(attempt)
        go_quiet(attempt, attempts.REMOVE_AFTER_S + 0.5)
        other_attempt_tidies(out)
        assert not storage.exists(attempt.writer.uri("adapter/adapter_model.safetensors"))  # B removed it
        attempt.heartbeat._last_ok = time.monotonic()  # say A even got a beat through since: the files decide
        return stage.Outcome(run_id="r1")

    with pytest.raises(FtjobsError, match="adapter/adapter_model.safetensors: missing") as err:
        stage.run(identity(out), work)
    assert err.value.exit_code == 1 and "Nothing was published" in str(err.value)
    assert not storage.exists(mf.manifest_uri(out))
    # the retry, a fresh attempt, publishes a whole run
    loaded = stage.run(identity(out), lambda a: (write(a), stage.Outcome(run_id="r1"))[1])
    assert isinstance(loaded, mf.Loaded)
    mf.load(loaded.uri, verify="full")


def test_an_attempt_quiet_long_enough_to_be_removed_does_not_publish_even_with_its_files(store_root: str) -> None:
    out = storage.join(store_root, "train")

    def work(attempt: stage.Attempt) -> Any:
        write(attempt)
        go_quiet(attempt, attempts.REMOVE_AFTER_S - attempts.STALE_S + 0.1)  # B may be deleting right now
        return stage.Outcome(run_id="r1")

    with pytest.raises(FtjobsError, match="was silent for"):
        stage.run(identity(out), work)
    assert not storage.exists(mf.manifest_uri(out))


def test_a_merely_stale_attempt_keeps_its_folder_and_publishes_a_whole_run(store_root: str) -> None:
    out = storage.join(store_root, "train")

    def work(attempt: stage.Attempt) -> Any:
        write(attempt)
        go_quiet(attempt, attempts.STALE_S + 0.1)  # stale (others stop waiting), far from over
        attempt.heartbeat._last_ok = time.monotonic()
        other_attempt_tidies(out)
        assert storage.exists(attempt.writer.uri("adapter/adapter_model.safetensors"))
        return stage.Outcome(run_id="r1")

    loaded = stage.run(identity(out), work)
    assert isinstance(loaded, mf.Loaded)
    assert_no_manifest_or_a_whole_one(out)


def test_a_manifest_naming_missing_files_is_moved_aside_by_gc(store_root: str) -> None:
    out = storage.join(store_root, "train")
    loaded = stage.run(identity(out), lambda a: (write(a), stage.Outcome(run_id="r1"))[1])
    assert isinstance(loaded, mf.Loaded)
    healthy = CliRunner().invoke(main, ["--log-format", "text", "gc", out, "--unpublish-broken", "--apply"])
    assert healthy.exit_code == 3 and "healthy published run" in healthy.output
    storage.delete(loaded.resolve(loaded.manifest.artifact("adapter")))  # stuck: every later try exits 3
    dry = CliRunner().invoke(main, ["--log-format", "text", "gc", out, "--unpublish-broken"])
    assert dry.exit_code == 0 and "would move" in dry.output and storage.exists(mf.manifest_uri(out))
    done = CliRunner().invoke(main, ["--log-format", "text", "gc", out, "--unpublish-broken", "--apply"])
    assert done.exit_code == 0 and "adapter_model.safetensors: missing" in done.output, done.output
    assert not storage.exists(mf.manifest_uri(out))
    assert [o.rel for o in storage.list_objects(out) if o.rel.startswith("manifest.broken-")]  # kept, aside
    again = stage.run(identity(out), lambda a: (write(a), stage.Outcome(run_id="r1"))[1])
    assert isinstance(again, mf.Loaded)
    mf.load(again.uri, verify="full")
