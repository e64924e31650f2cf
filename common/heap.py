"""Python's cyclic garbage collector around a job's one-time start-up and its process exit.

The cyclic GC walks every container object it tracks. A prepare's start-up builds ~115k long-lived ones
that are never garbage (transformers' import structure, pandas, pyarrow, the tokenizer): collecting while
they were built, then walking them again on later full collections and in the interpreter's teardown at
exit, was ~0.3 s of the ~1.9 s of CPU of a 200-row `ftjobs prepare` (bench/RESULTS.md, 2026-12-07 fourth
session). Nothing here changes what is kept alive or freed by reference counting, only when the cycle
collector looks.

- `paused()`: build the long-lived objects (heavy imports, the tokenizer) with the collector off.
- `freeze()` / `thaw()`: move everything alive into the permanent generation for a job's duration
  (`gc.freeze`), and back when it ends, so an in-process caller (tests) keeps collecting its own cycles
  afterwards. Workers forked meanwhile inherit the frozen heap: they never walk (nor copy-on-write touch)
  the parent's objects.
- `fewer_collections()`: a tokenizer worker collects its youngest generation less often.
- `freeze_at_exit()`: at interpreter exit, freeze before the teardown's collections walk the whole heap
  (~0.25 s of a 200-row prepare). What is left in a cycle at exit is then never collected, so this is only for
  a process that is the command's own (`own_process`, set by the CLI for its command line, not for a caller
  in-process, such as a test that later loads other libraries), and for a job whose files are all closed by
  then (prepare's are: every shard and record is closed before the manifest is published). Not where torch or
  triton was loaded (a tokenizer in a model folder goes through AutoTokenizer, which imports both): triton's
  nanobind bindings count on that last collection and print ~27 lines of "leaked instance" warnings without it.
"""

from __future__ import annotations

import atexit
import contextlib
import gc
import sys
from collections.abc import Iterator

# A tokenizer worker allocates ~100 short-lived containers a row, all freed by reference counting (its
# collections found 9 objects of cyclic garbage in 10k rows): at CPython's default threshold of 700 it
# collected every ~7 rows, 0.27-0.49 s of CPU per worker over 25k rows; every ~100 rows, 0.07-0.12 s.
WORKER_GEN0 = 10_000
# Loaded, these need the teardown's collections: nanobind extensions check for leaked instances at exit.
NEEDS_EXIT_COLLECTION = ("torch", "triton")
_owned: list[bool] = []  # set: this process runs one ftjobs command and ends with it
_exit_hook: list[bool] = []


@contextlib.contextmanager
def paused() -> Iterator[None]:
    """The block runs with the cyclic collector off (left off if it was off)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def freeze() -> None:
    """Everything alive now moves to the permanent generation (until `thaw`)."""
    gc.freeze()


def thaw() -> None:
    """The frozen objects go back to the oldest generation: collectable again."""
    gc.unfreeze()


def fewer_collections() -> None:
    """A youngest-generation collection every WORKER_GEN0 allocations (a worker process's whole life)."""
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(WORKER_GEN0, older, oldest)


def own_process() -> None:
    """This process runs one command from its own command line and ends with it (jobs/cli.py)."""
    _owned[:] = [True]


def freeze_at_exit() -> None:
    """Once per process, and only in one `own_process` marked: the interpreter's teardown skips walking the
    heap in its collections."""
    if _owned and not _exit_hook:
        _exit_hook.append(True)
        atexit.register(_freeze_for_exit)


def _freeze_for_exit() -> None:
    if not any(name in sys.modules for name in NEEDS_EXIT_COLLECTION):
        gc.freeze()
