"""SIGTERM in train: a flag the loop reads at step boundaries, then a checkpoint and exit 1 within the
grace period (a Kubernetes preemption, `docker stop`, the pipeline stopping a step)."""

from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from common.errors import EXIT_RETRYABLE

LOG = logging.getLogger(__name__)


class StopFlag:
    """SIGTERM: ask the loop to stop after the current step; hard-exit if the grace period runs out."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.requested = False
        self._previous: Any = None
        self._timer: threading.Timer | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        self.requested = True
        LOG.warning("SIGTERM: finishing the current step, then checkpointing (grace %.0fs)", self.grace_seconds)
        self._timer = threading.Timer(self.grace_seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        LOG.error("grace period of %.0fs ran out before the checkpoint finished; exiting (the last complete "
                  "checkpoint will be used)", self.grace_seconds)
        logging.shutdown()
        os._exit(EXIT_RETRYABLE)

    def restore(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def install_sigterm(grace_seconds: float) -> StopFlag:
    flag = StopFlag(grace_seconds)
    if threading.current_thread() is threading.main_thread():
        flag._previous = signal.signal(signal.SIGTERM, flag.handle)
    return flag


# --------------------------------------------------------------------------- CLI
