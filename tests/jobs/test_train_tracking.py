"""report_to against the real tools, offline: an MLflow file store, an offline wandb run, TensorBoard event files.

The train job's own wiring (every step's loss reaches the tracker) is checked in test_train.py, whose
trained fixture runs with report_to: tensorboard.
"""

from __future__ import annotations

import logging
import time

import pytest

from common.errors import FtjobsError
from jobs.train.tracking import Tracker

pytestmark = pytest.mark.integration

CONFIG = {"learning_rate": 0.001, "lora": {"r": 8, "target_modules": "all-linear"}}


def _log_two_steps(tracker: Tracker) -> None:
    tracker.log({"train/loss": 2.0, "train/lr": 1e-3}, 1)
    tracker.log({"train/loss": 1.5, "train/lr": 1e-3}, 2)
    tracker.close()


def test_mlflow_run_holds_params_and_metric_history(tmp_path, monkeypatch):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ftjobs-test")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses file stores unless told
    _log_two_steps(Tracker("mlflow", "20261129-run", CONFIG))

    client = mlflow.tracking.MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("ftjobs-test").experiment_id])
    assert run.info.run_name == "20261129-run" and run.info.status == "FINISHED"
    assert run.data.params == {"learning_rate": "0.001", "lora.r": "8", "lora.target_modules": "all-linear"}
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        (1, 2.0), (2, 1.5)]


def test_wandb_offline_run_is_written_under_a_safe_stable_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    _log_two_steps(Tracker("wandb", "my run: lr/1e-3", CONFIG))

    (run_dir,) = (tmp_path / "wandb").glob("offline-run-*")
    assert run_dir.name.endswith("-my-run--lr-1e-3")  # the id a resumed attempt reuses
    (records,) = run_dir.glob("*.wandb")
    # wandb's service process writes the records file; on a loaded machine its last flush can land just
    # after finish() returns (seen once in a full run on 2 busy cores), so wait for it a while.
    deadline = time.monotonic() + 60
    while b"train/loss" not in (data := records.read_bytes()) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert b"train/loss" in data and b"learning_rate" in data


def test_tensorboard_that_cannot_start_fails_before_training_naming_the_setting(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the log folder should go")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(blocker))
    with pytest.raises(FtjobsError, match="report_to: tensorboard could not start a run.*TENSORBOARD_LOGGING_DIR"):
        Tracker("tensorboard", "run", CONFIG)


def test_a_failed_log_call_warns_once_and_training_goes_on(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path))
    tracker = Tracker("tensorboard", "run", CONFIG)
    with caplog.at_level(logging.WARNING, logger="jobs.train.tracking"):
        tracker.log({"train/loss": "not a number"}, 1)  # type: ignore[dict-item]
        tracker.log({"train/loss": "still not"}, 2)  # type: ignore[dict-item]
        tracker.log({"train/loss": 1.0}, 3)
    tracker.close()
    warnings = [r.getMessage() for r in caplog.records if "report_to tensorboard" in r.getMessage()]
    assert len(warnings) == 1 and "logging step 1 failed" in warnings[0]


def test_none_and_other_ranks_track_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path))
    _log_two_steps(Tracker("tensorboard", "rank1", CONFIG, enabled=False))
    _log_two_steps(Tracker("none", "run", CONFIG))
    assert list(tmp_path.iterdir()) == []
