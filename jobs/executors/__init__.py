"""Executors run a plan (`jobs/plan.py`) and do nothing else.

Every executor runs the same loop (`Executor.run`): start each step instance the plan says is ready (what it
takes from has published), up to `max_parallel` at once, and record on the instance what happened: status
done or failed, its manifest, exit code and a one-line reason. A failed step blocks only the instances that
need it. What a run's outcome means (the pipeline's exit code, the sweep's leaderboard) the commands decide.

- `local.LocalExecutor`: each step a subprocess `python -m jobs.cli <stage> ...` (the pipeline, the sweep).
- `kube.KubeExecutor`: each step a Kubernetes Job (`ftjobs k8s submit [--sweep]`, the in-cluster driver).

Both start the same instances in an order that respects the same dependencies: independent steps
(infer-base and train) run at once on either, as cores or the cluster allow.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from common import manifest as mf
from common import storage
from common.errors import (
    EXIT_CONFIG,
    EXIT_GATE,
    EXIT_INPUT,
    EXIT_RETRYABLE,
    ConfigError,
    FtjobsError,
    GateFailed,
    InputError,
)
from jobs.plan import Instance, Plan

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class Finished:
    """How a started step ended: its exit code, the manifest it printed or published, and why when it failed."""

    exit_code: int
    manifest: str | None = None
    reason: str | None = None
    said: str | None = None  # the stage's own words for it (its log's error), where the executor could read them


def error_for(code: int, message: str) -> FtjobsError:
    """The exception a step's exit code stands for (the one mapping back from codes, for every executor)."""
    if code == EXIT_CONFIG:
        return ConfigError(message)
    if code == EXIT_INPUT:
        return InputError(message)
    if code == EXIT_GATE:
        return GateFailed(message)
    return FtjobsError(message)


class Executor(abc.ABC):
    """The loop every executor shares; a subclass says how to start a step and how to see that it ended."""

    max_parallel: int | None = None  # None: as many as are ready (a cluster queues them itself)
    poll_s: float = 0.2

    @abc.abstractmethod
    def start(self, plan: Plan, inst: Instance) -> Any:
        """Start the step; returns the handle `poll` is given."""

    @abc.abstractmethod
    def poll(self, plan: Plan, inst: Instance, handle: Any) -> Finished | None:
        """None while the step runs."""

    def stop_requested(self) -> bool:
        return False

    def stop(self, plan: Plan, running: list[tuple[Instance, Any, float]]) -> None:
        """Stop every running step (only executors that take signals do); by default nothing to stop."""
        return None

    def session(self) -> Any:
        """A context around the whole run (signal handlers)."""
        import contextlib

        return contextlib.nullcontext()

    def run_recorded(self, plan: Plan, outcome: Callable[[], mf.Loaded]) -> mf.Loaded:
        """Run the plan, then `outcome()` (the final manifest, or the error its steps add up to); the plan's
        record (pipeline.json / sweep.json) gets the exit code whatever happens."""
        from common.runner import exit_code

        code = EXIT_RETRYABLE
        try:
            self.run(plan)
            loaded = outcome()
            code = 0
            return loaded
        except BaseException as exc:
            code = exit_code(exc)
            raise
        finally:
            plan.record(code)

    def run(self, plan: Plan) -> None:
        """Run every pending instance once its inputs are published; a failure blocks only what needs it."""
        pending = [i for i in plan.instances.values() if i.status == "pending"]
        running: list[tuple[Instance, Any, float]] = []
        with self.session():
            while pending or running:
                if self.stop_requested():
                    self.stop(plan, running)
                    return
                room = len(pending) if self.max_parallel is None else max(0, self.max_parallel - len(running))
                for inst in plan.ready(pending)[:room]:
                    pending.remove(inst)
                    running.append((inst, self.begin(plan, inst), time.monotonic()))
                for entry in list(running):
                    inst, handle, started = entry
                    finished = self.poll(plan, inst, handle)
                    if finished is not None:
                        running.remove(entry)
                        settle(inst, finished, time.monotonic() - started)
                if pending or running:
                    time.sleep(self.poll_s)

    def begin(self, plan: Plan, inst: Instance) -> Any:
        inst.already_done = not inst.final and storage.exists(mf.manifest_uri(inst.output))
        inst.status = "running"
        return self.start(plan, inst)


def settle(inst: Instance, finished: Finished, seconds: float) -> None:
    """Record how the step ended; a gate's failure still records the report it published."""
    inst.seconds = round(seconds, 1)
    inst.exit_code = finished.exit_code
    if finished.exit_code == 0 and finished.manifest:
        inst.status, inst.manifest = "done", finished.manifest
        LOG.info("%s %s in %.1fs: %s", inst.name, "already done" if inst.already_done else "done", seconds,
                 inst.manifest)
        return
    inst.status = "failed"
    inst.reason = finished.reason or f"{inst.name} exited {finished.exit_code}"
    inst.said = finished.said
    if finished.exit_code == EXIT_GATE and inst.output and storage.exists(mf.manifest_uri(inst.output)):
        inst.manifest = mf.manifest_uri(inst.output)
    LOG.error("%s failed (exit %s) after %.0fs%s: %s", inst.name, inst.exit_code, seconds,
              f"; cells {', '.join(inst.cells)} stop here" if len(inst.cells) > 1 else "", inst.reason)
