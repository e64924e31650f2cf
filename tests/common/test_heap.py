"""common.heap: the cyclic collector paused around start-up work comes back as it was, whatever happens."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import heap

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_paused_restores_the_collector_as_it_was_also_on_an_error():
    assert gc.isenabled()
    with heap.paused():
        assert not gc.isenabled()
    assert gc.isenabled()
    with pytest.raises(RuntimeError), heap.paused():
        raise RuntimeError("a failed import")
    assert gc.isenabled()
    gc.disable()  # a caller that runs with the collector off keeps it off
    try:
        with heap.paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_freeze_and_thaw():
    heap.freeze()
    try:
        assert gc.get_freeze_count() > 0
    finally:
        heap.thaw()
    assert gc.get_freeze_count() == 0


def test_only_a_process_that_owns_its_command_skips_the_collection_at_exit():
    """At exit, a cycle's finalizer runs as usual in a process that is not marked as the command's own (an
    in-process caller: its libraries may count on it); in one the CLI marked, the teardown does not walk it."""
    probe = ("import sys; from common import heap\n"
             "if sys.argv[1] == 'own': heap.own_process()\n"
             "heap.freeze_at_exit()\n"
             "class Cycle:\n"
             "    def __del__(self): print('collected', flush=True)\n"
             "c = Cycle(); c.me = c; del c\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs = {how: subprocess.run([sys.executable, "-c", probe, how], cwd=REPO, env=env, capture_output=True,
                                text=True, check=True).stdout.strip() for how in ("caller", "own")}
    assert runs == {"caller": "collected", "own": ""}


def test_a_process_that_loaded_triton_collects_at_exit_and_prints_no_leak_warnings():
    """A prepare with a model folder's tokenizer loads triton (AutoTokenizer imports it): its nanobind bindings
    print "leaked instance" warnings at exit when the last collection is skipped, so it is not."""
    probe = ("from common import heap\nimport triton\nheap.own_process()\nheap.freeze_at_exit()\n"
             "class Cycle:\n    def __del__(self): print('collected', flush=True)\n"
             "c = Cycle(); c.me = c; del c\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True,
                          check=True)
    assert done.stdout.strip() == "collected" and "leaked" not in done.stderr, done.stderr[-1000:]
