"""The learning-curve side of a sweep: its example config, and the leaderboard's plot of the metric against
training rows."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from common import config as cfg
from jobs import prepare, sweep
from jobs.evaluate import leaderboard

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_the_learning_curve_sweep_config_expands_into_prepare_configs_that_validate():
    conf = cfg.load_config(sweep.Config, file=str(REPO / "configs" / "sweep-learning-curve.yaml"),
                           flags={"sweep_id": "lc"})
    cells = sweep.expand(conf)
    assert [c["prepare.max_train_rows"] for c in cells] == [60, 125, 250, 500]
    for c in cells:
        p = cfg.validate(prepare.Config, {**conf.prepare, "max_train_rows": c["prepare.max_train_rows"],
                                          "sources": ["x.jsonl"], "output": "o"})
        assert p.max_train_rows == c["prepare.max_train_rows"] and p.eval_size == 100


def cell(label: str, metric: float, **values: object) -> dict:
    return {"label": label, "metric": metric, "ci95": [metric - 0.05, metric + 0.05], "values": values}


def test_metric_against_training_rows_is_plotted_only_when_cells_differ_in_rows():
    board = {"title": "exact match", "cells": [
        cell("s-60", 0.2, base_model="s", **{"prepare.max_train_rows": 60}),
        cell("s-250", 0.5, base_model="s", **{"prepare.max_train_rows": 250}),
        cell("l-60", 0.3, base_model="l", **{"prepare.max_train_rows": 60}),
        cell("l-250", 0.7, base_model="l", **{"prepare.max_train_rows": 250})]}
    trains = {c["label"]: SimpleNamespace(manifest=SimpleNamespace(stats={"train": {"rows": int(c["label"][2:])}}))
              for c in board["cells"]}
    rows = leaderboard.train_rows(trains)
    assert rows == {"s-60": 60, "s-250": 250, "l-60": 60, "l-250": 250}
    png = leaderboard.plot_data_size(board, rows)
    assert png is not None and png.startswith(b"\x89PNG")
    assert leaderboard.plot_data_size(board, dict.fromkeys(rows, 100)) is None
