"""The sweep leaderboard as people read it: every cell listed (failed ones with why), numbers for people,
and the HTML page fits a 1280 px laptop screen in a real browser (headless Chromium).

The board is `tests/data/leaderboard/demo_sweep.json`: what leaderboard.json holds for the demo sweep (six
cells with the costs a CPU run records, three matrix columns) plus one cell that failed at merge.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from jobs.evaluate import leaderboard, report
from tests.conftest import REPO

BOARD = REPO / "tests" / "data" / "leaderboard" / "demo_sweep.json"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    return json.loads(BOARD.read_text())


@pytest.mark.unit
def test_table_lists_every_cell_with_numbers_for_people(board: dict[str, Any]) -> None:
    header, rows = leaderboard.table(board)
    assert header[:4] == ["#", "base_model", "modules_to_save", "learning_rate"]  # no label repeating them
    assert len(rows) == 7 and [r[0] for r in rows] == ["1", "2", "3", "4", "5", "6", "–"]
    first = dict(zip(header, rows[0], strict=True))
    assert first["exact match (95% CI)"] == "85.0% [79, 92]"
    assert first["Δ vs its base (95% CI)"] == "+85.0 pts [+77, +92]"
    assert (first["train time"], first["tokens trained"], first["peak memory"]) == ("3m 17s", "402k", "824 MB")
    assert (first["trainable params"], first["total params"], first["Pareto front"]) == ("251k", "840k", "size, cost")
    failed = dict(zip(header, rows[-1], strict=True))
    assert failed["base_model"] == "demo/base-model-l" and failed["modules_to_save"] == "lm_head"
    assert failed["exact match (95% CI)"] == "failed: merge, exit 3"
    assert failed["Pareto front"].startswith("merged model failed 1 check(s); first: greedy generation")
    assert {failed[h] for h in header[5:-1]} == {""}  # the reason is last: it widens no column in a terminal


@pytest.mark.unit
def test_the_label_column_returns_when_the_values_do_not_tell_cells_apart(board: dict[str, Any]) -> None:
    same = {**board, "cells": [{**c, "values": {}} for c in board["cells"]], "failed": []}
    header, rows = leaderboard.table(same)
    assert header[:2] == ["#", "cell"] and rows[0][1] == board["cells"][0]["label"]


@pytest.mark.unit
@pytest.mark.parametrize(("n", "unit", "text"), [(401_900, "", "402k"), (823_890_000, "B", "824 MB"),
                                                 (1_234_567, "", "1.23M"), (999, "", "999"), (2**28, "B", "268 MB"),
                                                 (None, "", "n/a")])
def test_numbers_for_people(n: float | None, unit: str, text: str) -> None:
    assert leaderboard.human(n, unit) == text


@pytest.mark.unit
def test_markdown_lists_the_failed_cell_after_the_ranking(board: dict[str, Any]) -> None:
    md = leaderboard.render(board, {"size": b"", "cost": b""}, report.template("leaderboard.md.jinja"))
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    assert lines[1].startswith("| 1 | demo/base-model | lm_head | 0.002 | 85.0% [79, 92] |")
    assert lines[-1].startswith("| – | demo/base-model-l | lm_head | 0.005 | failed: merge, exit 3 |  |")
    assert "| merged model failed 1 check(s)" in lines[-1]
    assert "1 of 7 cells did not finish" in md


def measure_in_chromium(html: Path, width: int) -> dict[str, int]:
    """scrollWidth and innerWidth, as the page's own script reads them in headless Chromium."""
    page = html.read_text().replace("</body>", "<script>document.body.setAttribute('data-fit', JSON.stringify("
                                    "{scroll: document.documentElement.scrollWidth, inner: window.innerWidth}))"
                                    "</script></body>")
    probe = html.with_name("probe.html")
    probe.write_text(page)
    proc = subprocess.run([CHROMIUM, "--headless=new", "--no-sandbox", "--disable-gpu",  # type: ignore[list-item]
                           "--disable-background-networking", f"--window-size={width},900",
                           f"--user-data-dir={html.parent / 'profile'}", "--dump-dom", probe.as_uri()],
                          capture_output=True, text=True, timeout=120)
    found = re.search(r"data-fit=\"([^\"]+)\"", proc.stdout)
    assert found, f"chromium printed no measurement (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return dict(json.loads(found.group(1).replace("&quot;", '"')))


@pytest.mark.integration
@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (Debian: apt-get install -y chromium); "
                                             "the page's width is checked in a real browser only")
def test_leaderboard_page_fits_a_1280px_screen_in_chromium(board: dict[str, Any], tmp_path: Path) -> None:
    plots = {"size": leaderboard.plot(board, "total_params", "model size (parameters)"),
             "cost": leaderboard.plot(board, "train_seconds", "train cost (seconds)")}
    html = tmp_path / "leaderboard.html"
    html.write_text(leaderboard.render(board, plots, report.template("leaderboard.html.jinja")))
    page = html.read_text()
    assert "colspan='3' class='group'>train cost" in page and "class='failed'" in page
    fit = measure_in_chromium(html, 1280)
    assert fit["inner"] == 1280 and fit["scroll"] <= fit["inner"], fit
