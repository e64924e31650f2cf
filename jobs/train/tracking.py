"""Experiment tracking: `report_to: none | tensorboard | mlflow | wandb`.

Each tool is configured the way its users already configure it, through its
own environment variables (TENSORBOARD_LOGGING_DIR; MLFLOW_TRACKING_URI,
MLFLOW_EXPERIMENT_NAME; WANDB_PROJECT, WANDB_API_KEY, WANDB_MODE ...). The
library is imported only when chosen; a missing one is a ConfigError.
"""

from __future__ import annotations

import os
from typing import Any

from common.errors import ConfigError


class Tracker:
    """Log scalars per step to the chosen tool; a no-op for `none` and on ranks other than 0."""

    def __init__(self, kind: str, run_name: str, config: dict[str, Any], enabled: bool = True):
        self.kind = kind if enabled else "none"
        self._impl: Any = None
        if self.kind == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ConfigError("report_to: tensorboard needs the tensorboard package "
                                  "(pip install tensorboard), or set report_to: none") from None
            log_dir = os.path.join(os.environ.get("TENSORBOARD_LOGGING_DIR", "runs"), run_name)
            self._impl = SummaryWriter(log_dir=log_dir)
        elif self.kind == "mlflow":
            try:
                import mlflow
            except ImportError:
                raise ConfigError("report_to: mlflow needs the mlflow package (pip install mlflow), "
                                  "or set report_to: none") from None
            mlflow.start_run(run_name=run_name)
            mlflow.log_params(_flat(config))
            self._impl = mlflow
        elif self.kind == "wandb":
            try:
                import wandb
            except ImportError:
                raise ConfigError("report_to: wandb needs the wandb package (pip install wandb), "
                                  "or set report_to: none") from None
            self._impl = wandb.init(name=run_name, config=config, resume="allow", id=run_name)

    def log(self, metrics: dict[str, float], step: int) -> None:
        if self._impl is None:
            return
        if self.kind == "tensorboard":
            for key, value in metrics.items():
                self._impl.add_scalar(key, value, step)
        elif self.kind == "mlflow":
            self._impl.log_metrics(metrics, step=step)
        elif self.kind == "wandb":
            self._impl.log(metrics, step=step)

    def close(self) -> None:
        if self._impl is None:
            return
        if self.kind == "tensorboard":
            self._impl.close()
        elif self.kind == "mlflow":
            self._impl.end_run()
        elif self.kind == "wandb":
            self._impl.finish()
        self._impl = None


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = str(value)[:250]
    return out
