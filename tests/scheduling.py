"""How `make test` shares the tests between its xdist workers: in units that keep what is built once
together, the longest units first.

- A unit is a whole file when the file declares a module- or class-scoped fixture (a merge, a trained
  adapter, a vLLM engine: built once for the file, so its tests stay on one worker), else a single test
  (the conftest's fixtures are session-scoped: every worker has its own anyway). `--dist loadfile` with
  this plugin's scheduler (`pytest_xdist_make_scheduler`).
- Units go out longest first (the collection is sorted so; `--no-loadscope-reorder` keeps that order).
  xdist's default order, by number of tests, put the single-test end-to-end files (a minute or more each)
  last: one worker finished its share while the other still ran the sweep.

How long a file takes comes from `tests/file_seconds.json`, written by a run with
`--record-file-seconds tests/file_seconds.json` (`make test-durations`); a unit of a split file counts its
share of the file's time, and a file the table does not list counts by its tests' tier (`UNKNOWN_S`). The
table only orders the units: a stale one makes the suite slower, never wrong.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
TABLE = Path(__file__).with_name("file_seconds.json")
UNKNOWN_S = {"e2e": 60.0, "integration": 5.0}  # a test of a file the table lacks, by tier; others 0.5 s
SHARED_FIXTURE = re.compile(r"""scope\s*=\s*["'](module|class|package)["']""")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-file-seconds", metavar="PATH", default=None,
                     help="write each test file's total seconds (setup, call, teardown) to PATH as JSON")


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


@functools.cache
def builds_once(path: str) -> bool:
    """Whether the file declares a fixture built once for several of its tests."""
    try:
        return bool(SHARED_FIXTURE.search((ROOT / path).read_text()))
    except OSError:
        return True


def unit_of(nodeid: str) -> str:
    path = file_of(nodeid)
    return path if builds_once(path) else nodeid


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        known: dict[str, float] = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        known = {}
    in_file: dict[str, int] = defaultdict(int)
    for item in items:
        in_file[file_of(item.nodeid)] += 1
    cost: dict[str, float] = defaultdict(float)
    for item in items:
        path = file_of(item.nodeid)
        if path in known:
            seconds = known[path] / in_file[path]
        else:
            seconds = next((s for tier, s in UNKNOWN_S.items() if item.get_closest_marker(tier)), 0.5)
        cost[unit_of(item.nodeid)] += seconds
    # sorted() is stable: a unit's tests keep their order and stay together
    items.sort(key=lambda item: (-cost[unit_of(item.nodeid)], unit_of(item.nodeid)))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class Scheduler(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return unit_of(nodeid)

    return Scheduler(config, log)


class Recorder:
    """Sums each file's test durations as the reports arrive (on the xdist controller, or the one process)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.seconds: dict[str, float] = defaultdict(float)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        self.seconds[file_of(report.nodeid)] += report.duration

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        table = {f: round(s, 1) for f, s in sorted(self.seconds.items(), key=lambda kv: -kv[1])}
        self.path.write_text(json.dumps(table, indent=1) + "\n")


def pytest_configure(config: pytest.Config) -> None:
    path = config.getoption("--record-file-seconds")
    worker: Any = getattr(config, "workerinput", None)
    if path and worker is None:
        config.pluginmanager.register(Recorder(Path(path)), "file-seconds-recorder")
    if worker is not None:
        pin(int(worker["workerid"].removeprefix("gw")), int(worker["workercount"]))


def pin(index: int, workers: int) -> None:
    """Worker `index` of `workers` gets its own share of the CPUs (every `workers`-th one), when each can have
    at least one; its tests and the stage processes they start inherit it, and `common.resources`
    sizes torch's threads and prepare's pool by it. Unpinned, every test process sized itself for the
    whole machine: two workers' training runs (the racing-attempts and two-process tests start two each)
    put 4-8 OpenMP threads on 2 cores, and each such test ran 1.5-2.5x its time alone (CI log, 2026-12-07).
    FTJOBS_TEST_PIN=0 turns it off."""
    cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    if os.environ.get("FTJOBS_TEST_PIN") == "0" or workers < 2 or len(cpus) < workers:
        return
    os.sched_setaffinity(0, cpus[index::workers])
