"""The local executor: each step instance a subprocess `python -m jobs.cli <stage> ...`, as its container runs it.

Up to `max_parallel` steps at once, each with cores / max_parallel threads (OMP_NUM_THREADS and friends, unless
set already). Each step is told the run it belongs to (FTJOBS_RUN_ID, and a sweep's FTJOBS_CELLS), so its
manifest records it. Its last stdout line is its manifest URI; its log goes to the terminal (`logs=None`, the
pipeline) or to `<logs>/<name>.log` (the sweep: copied beside the steps in an s3:// store when it ends).

SIGTERM or SIGINT (Ctrl-C) is passed to every running step as SIGTERM; each gets its grace period (the plan's
`grace_s`: train's checkpoint.grace_seconds + a margin) to save its state and exit, then is killed; the run
then stops with `Preempted` (exit 1), and the same run or sweep id resumes. The steps ignore SIGINT
themselves: Ctrl-C reaches the whole terminal process group, and a KeyboardInterrupt would stop train
without its checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common import storage
from common.errors import Preempted
from common.resources import available_cpus
from jobs.executors import Executor, Finished
from jobs.plan import Instance, Plan, one_line

LOG = logging.getLogger(__name__)
THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "RAYON_NUM_THREADS")
Command = Callable[[str, list[str]], list[str]]


def stage_argv(stage: str, args: list[str]) -> list[str]:
    return [sys.executable, "-m", "jobs.cli", stage, *args]


@dataclass
class Proc:
    popen: subprocess.Popen[str]
    log_path: Path | None
    log_file: IO[str] | None


class LocalExecutor(Executor):
    """Steps as subprocesses, up to max_parallel at once; signals are passed on to every running step."""

    def __init__(self, max_parallel: int, *, logs: Path | None = None, command: Command = stage_argv) -> None:
        self.max_parallel = max_parallel
        self.logs = logs
        self.command = command
        self.threads = max(1, available_cpus() // max_parallel)  # the pod's CPU quota, not the node's cores
        self.received: list[int] = []
        self.procs: dict[str, Proc] = {}  # instance name -> its process

    def env(self, plan: Plan, inst: Instance) -> dict[str, str]:
        env = {**os.environ, **plan.env(inst)}
        for var in THREAD_VARS:  # the cores split between the steps that run at once
            env.setdefault(var, str(self.threads))
        if self.logs is not None:
            env.setdefault("FTJOBS_LOG_FORMAT", "json")
        elif sys.stderr.isatty():  # a child's stderr is a pipe only when ours is: keep a terminal readable
            env.setdefault("FTJOBS_LOG_FORMAT", "text")
        return env

    def start(self, plan: Plan, inst: Instance) -> Proc:
        args = plan.arguments(inst)
        LOG.info("start %s: ftjobs %s %s", inst.name, inst.step.stage, " ".join(args))
        log_path = self.logs / f"{inst.name}.log" if self.logs is not None else None
        log_file = log_path.open("w") if log_path is not None else None
        main_thread = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None  # the child inherits it
        try:
            popen = subprocess.Popen(self.command(inst.step.stage, args), stdout=subprocess.PIPE, stderr=log_file,
                                     text=True, env=self.env(plan, inst))
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        if self.received:  # a signal arrived while it was starting
            popen.send_signal(signal.SIGTERM)
        inst.log = str(log_path) if log_path is not None else None
        proc = Proc(popen, log_path, log_file)
        self.procs[inst.name] = proc
        return proc

    def poll(self, plan: Plan, inst: Instance, handle: Proc) -> Finished | None:
        if handle.popen.poll() is None:
            return None
        return self.finish(plan, inst, handle)

    def finish(self, plan: Plan, inst: Instance, proc: Proc) -> Finished:
        stdout = proc.popen.stdout.read() if proc.popen.stdout else ""
        proc.popen.wait()
        if proc.log_file is not None:
            proc.log_file.close()
        inst.log = self.keep_log(plan, proc.log_path, inst.name)
        lines = [line.strip() for line in stdout.splitlines() if line.strip()]
        code = proc.popen.returncode
        if code == 0 and lines:
            return Finished(0, lines[-1])
        if code == 0:
            return Finished(1, None, f"stage {inst.name} exited 0 but printed no manifest URI")
        where = f"log: {inst.log}" if inst.log else "its log is above"
        said = reason_from_log(proc.log_path) if proc.log_path else None
        return Finished(code, None, f"stage {inst.name} failed with exit {code} ({where})" + (f": {said}" if said
                                                                                               else ""), said)

    def keep_log(self, plan: Plan, path: Path | None, name: str) -> str | None:
        """Where the step's log stays: an s3:// plan's go to the store beside its steps once a step ends."""
        if path is None or not storage.is_s3(plan.prefix):
            return str(path) if path else None
        uri = storage.join(plan.prefix, "logs", f"{name}.log")
        storage.upload_file(path, uri)
        return uri

    # ----------------------------------------------------------------------- signals

    @contextmanager
    def session(self) -> Iterator[None]:
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self.forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def forward(self, signum: int, frame: Any) -> None:
        if self.received:  # already passed on (a group kill also reaches the steps themselves)
            return
        self.received.append(signum)
        running = [name for name, p in self.procs.items() if p.popen.poll() is None]
        LOG.warning("received %s: passing SIGTERM to %s and waiting for %s to save %s state and exit",
                    signal.Signals(signum).name, ", ".join(running) or "the steps", "it" if len(running) == 1
                    else "them", "its" if len(running) == 1 else "their")
        for name in running:
            self.procs[name].popen.send_signal(signal.SIGTERM)

    def stop_requested(self) -> bool:
        return bool(self.received)

    def stop(self, plan: Plan, running: list[tuple[Instance, Any, float]]) -> None:
        """Each running step gets its grace period after the SIGTERM `forward` sent, then is killed."""
        stopped = time.monotonic()
        said = []
        for inst, proc, started in running:
            deadline = stopped + inst.grace_s
            while proc.popen.poll() is None and time.monotonic() < deadline:
                time.sleep(0.1)
            if proc.popen.poll() is None:
                LOG.error("stage %s did not exit within %.0fs of SIGTERM: killing it", inst.name, inst.grace_s)
                proc.popen.kill()
            finished = self.finish(plan, inst, proc)
            inst.status, inst.exit_code, inst.seconds = "interrupted", finished.exit_code, \
                round(time.monotonic() - started, 1)
            who = "it" if len(running) == 1 else inst.name
            said.append(f"{who} was killed" if finished.exit_code == -signal.SIGKILL
                        else f"{who} exited {finished.exit_code}")
        names = [inst.name for inst, _, _ in running]
        raise Preempted(f"{signal.Signals(self.received[0]).name} while stage{'s' if len(names) > 1 else ''} "
                        f"{', '.join(names) or '(none)'} ran; {'; '.join(said) or 'nothing was running'}. Re-run the "
                        f"same command with {plan.resume_hint} to resume: finished steps are skipped, and train "
                        "continues from its last checkpoint.")


def reason_from_log(path: Path | None) -> str | None:
    """The step's last error line (JSON log lines or text), as one line."""
    if path is None or not path.exists():
        return None
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()][-200:]
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            if " ERROR " in line or line.startswith("Error"):
                return one_line(line.split(": ", 1)[-1])
            continue
        if isinstance(record, dict) and record.get("level") in ("error", "critical"):
            return one_line(str(record.get("msg", "")))
    return one_line(lines[-1]) if lines else None
