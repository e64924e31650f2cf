"""The order test files reach the xdist workers: the longest first.

`make test` runs files whole on each worker (`--dist loadfile`: a file's module fixtures, a merge or a vLLM
engine, are built once). xdist hands files out in the collection's order, or by default sorted by how many
tests a file has, which puts the single-test end-to-end files (a minute or more each) last: one worker
finished its share while the other still ran the sweep. Handed out longest first (`--no-loadscope-reorder`
keeps this order), the short files fill in at the end and both workers finish together.

How long a file takes comes from `tests/file_seconds.json`, written by a run with
`--record-file-seconds tests/file_seconds.json` (`make test-durations`); a file it does not list counts
`UNKNOWN_TEST_S` a test. The table only orders the files: a stale one makes the suite slower, never wrong.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest

TABLE = Path(__file__).with_name("file_seconds.json")
UNKNOWN_TEST_S = 1.0


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--record-file-seconds", metavar="PATH", default=None,
                     help="write each test file's total seconds (setup, call, teardown) to PATH as JSON")


def file_of(nodeid: str) -> str:
    return nodeid.split("::", 1)[0]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    try:
        known: dict[str, float] = json.loads(TABLE.read_text())
    except (OSError, ValueError):
        known = {}
    counts: dict[str, int] = defaultdict(int)
    for item in items:
        counts[file_of(item.nodeid)] += 1
    cost = {f: known.get(f, n * UNKNOWN_TEST_S) for f, n in counts.items()}
    # sorted() is stable: a file's tests keep their order and stay together
    items.sort(key=lambda item: (-cost[file_of(item.nodeid)], file_of(item.nodeid)))


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
