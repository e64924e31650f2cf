"""Stage processes forked from one that imported their libraries once (tests/e2e/test_attempts.py).

`python -m tests.e2e.stage_forks` imports torch, transformers, peft and the rest of what the stages import
inside their functions (~5 s of CPU on this machine, for every stage process started plain), says `ready`,
then reads one JSON request a line from stdin and forks a child for each: the child takes the request's
environment, sends its stdout and stderr to the request's files, runs `python -m jobs.cli ARGS` (runpy, as
`-m` does: common/ and jobs/ are imported fresh in the child, under its own environment) and writes its exit
code to the request's `exit` file. Each child is a process of its own, racing the others on the store as the
containers do; only the import of the libraries is shared. Nothing of common/ or jobs/ is imported here.

`Forks` is the test side: `start` sends a request and returns a `Forked`, which answers `poll`,
`communicate` and `returncode` as a subprocess.Popen does.
"""

from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

IMPORTS = ["torch", "peft", "transformers:AutoModelForCausalLM", "transformers:AutoTokenizer", "safetensors.torch",
           "matplotlib.pyplot", "rouge_score.rouge_scorer", "pyarrow.parquet", "boto3", "click", "pydantic"]


def preload() -> None:
    """Import each `module` or `module:attribute` (transformers loads its classes on first access)."""
    for name in IMPORTS:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)


def child(request: dict[str, Any]) -> None:
    """In the forked child: become `python -m jobs.cli ARGS` with the request's environment and files."""
    code = 1
    try:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # the server's SIG_IGN would break the stage's own waits
        os.environ.clear()
        os.environ.update(request["env"])
        for fd, path in ((1, request["stdout"]), (2, request["stderr"])):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
        sys.argv = ["jobs.cli", *request["args"]]
        try:
            runpy.run_module("jobs.cli", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        Path(request["exit"] + ".tmp").write_text(str(code))
        os.replace(request["exit"] + ".tmp", request["exit"])
        os._exit(code)


def serve() -> None:
    preload()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the kernel reaps the children; the exit file tells the code
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        pid = os.fork()
        if pid == 0:
            child(request)
        print(pid, flush=True)


class Forked:
    """A forked stage run, read as a subprocess.Popen with stdout=PIPE (text)."""

    def __init__(self, pid: int, stdout: Path, exit_file: Path) -> None:
        self.pid, self.stdout_file, self.exit_file = pid, stdout, exit_file
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None and self.exit_file.exists():
            self.returncode = int(self.exit_file.read_text())
        return self.returncode

    def communicate(self, timeout: float) -> tuple[str, None]:
        deadline = time.monotonic() + timeout
        while self.poll() is None:
            if time.monotonic() > deadline:
                os.kill(self.pid, signal.SIGKILL)
                raise subprocess.TimeoutExpired(f"jobs.cli (pid {self.pid})", timeout)
            time.sleep(0.1)
        return self.stdout_file.read_text(), None


class Forks:
    """The server process, started with `env` (what its children's libraries read when imported)."""

    def __init__(self, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.e2e.stage_forks"], env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        assert self.proc.stdout is not None and self.proc.stdout.readline().strip() == "ready"
        self.started: list[Forked] = []

    def start(self, args: list[str], env: dict[str, str], log: Path) -> Forked:
        """`python -m jobs.cli ARGS` in a child of its own; stderr to `log`, stdout and exit code beside it."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        stdout, exit_file = log.with_suffix(".stdout"), log.with_suffix(".exit")
        log.touch()  # there to be read at once, as Popen's stderr file is
        request = {"args": args, "env": env, "stdout": str(stdout), "stderr": str(log), "exit": str(exit_file)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        self.started.append(Forked(int(self.proc.stdout.readline()), stdout, exit_file))
        return self.started[-1]

    def close(self) -> None:
        """End the server and any child still running (a failed test's held zombie)."""
        for forked in self.started:
            if forked.poll() is None:
                try:
                    os.kill(forked.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        self.proc.kill()
        self.proc.wait(timeout=60)


if __name__ == "__main__":
    serve()
