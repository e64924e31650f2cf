"""Experiment tracking: `report_to: none | tensorboard | mlflow | wandb`.

Each tool is configured the way its users already configure it, through its
own environment variables (TENSORBOARD_LOGGING_DIR; MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME; WANDB_PROJECT, WANDB_API_KEY, WANDB_MODE ...). The
library is imported only when chosen; a missing one is a ConfigError. The
train image installs all three (the `tracking` extra).

A tracker that cannot start fails the job before any step runs (exit 1: a
tracking server that is down may be up on the retry). Once training runs,
a failed log call is a warning, not a failed job: hours of GPU time are
worth more than a gap in a chart, and the loss curve is in the manifest.
"""

from __future__ import annotations

import logging
import os
import re
from typing import Any

from common.errors import ConfigError, FtjobsError

LOG = logging.getLogger(__name__)

SETTINGS = {
    "tensorboard": "TENSORBOARD_LOGGING_DIR",
    "mlflow": "MLFLOW_TRACKING_URI and MLFLOW_EXPERIMENT_NAME",
    "wandb": "WANDB_PROJECT, WANDB_API_KEY or WANDB_MODE=offline",
}


class Tracker:
    """Log scalars per step to the chosen tool; a no-op for `none` and on ranks other than 0."""

    def __init__(self, kind: str, run_name: str, config: dict[str, Any], enabled: bool = True):
        self.kind = kind if enabled else "none"
        self._impl: Any = None
        self._warned = False
        if self.kind == "none":
            return
        module = {"tensorboard": "torch.utils.tensorboard", "mlflow": "mlflow", "wandb": "wandb"}[self.kind]
        try:
            lib = __import__(module, fromlist=["_"])
        except ImportError:
            package = "tensorboard" if self.kind == "tensorboard" else self.kind
            raise ConfigError(f"report_to: {self.kind} needs the {package} package (pip install "
                              f"'ftjobs[tracking]'), or set report_to: none") from None
        try:
            if self.kind == "tensorboard":
                log_dir = os.path.join(os.environ.get("TENSORBOARD_LOGGING_DIR", "runs"), run_name)
                self._impl = lib.SummaryWriter(log_dir=log_dir)
            elif self.kind == "mlflow":
                lib.start_run(run_name=run_name)
                lib.log_params(_flat(config))
                self._impl = lib
            else:
                # The id is stable across a preempted run's attempts, so a resume continues the same wandb run.
                run_id = re.sub(r"[^A-Za-z0-9_.-]", "-", run_name)[:64]
                self._impl = lib.init(name=run_name, config=config, resume="allow", id=run_id)
        except Exception as e:  # the tools raise their own types; the message is what matters
            raise FtjobsError(f"report_to: {self.kind} could not start a run: {type(e).__name__}: {e}. "
                              f"Check {SETTINGS[self.kind]}, or set report_to: none") from e

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._impl is None:
            return
        try:
            if self.kind == "tensorboard":
                for key, value in metrics.items():
                    self._impl.add_scalar(key, value, step)
            elif self.kind == "mlflow":
                self._impl.log_metrics(metrics, step=step)
            elif self.kind == "wandb":
                self._impl.log(metrics, step=step)
        except Exception as e:
            if not self._warned:
                LOG.warning("report_to %s: logging step %d failed (%s: %s); training goes on, later failures "
                            "are not repeated", self.kind, step, type(e).__name__, e)
                self._warned = True

    def close(self) -> None:
        if self._impl is None:
            return
        impl, self._impl = self._impl, None
        try:
            if self.kind == "tensorboard":
                impl.close()
            elif self.kind == "mlflow":
                impl.end_run()
            elif self.kind == "wandb":
                impl.finish()
        except Exception as e:
            LOG.warning("report_to %s: closing the run failed (%s: %s)", self.kind, type(e).__name__, e)


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:250]
    return out
