"""The CLI entry turns SIGTERM into a clean, retryable exit (a pod's PID 1 ignores it otherwise)."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration


def test_sigterm_exits_retryable_with_a_message(tmp_path: Path, subprocess_env: dict) -> None:
    # An S3 endpoint that accepts connections and never answers keeps prepare waiting mid-run.
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(16)
    env = dict(subprocess_env, S3_ENDPOINT_URL=f"http://127.0.0.1:{hole.getsockname()[1]}",
               FTJOBS_S3_MAX_ATTEMPTS="1")
    try:
        proc = subprocess.Popen([sys.executable, "-m", "jobs.cli", "prepare", "--source", "s3://raw/rows.jsonl",
                                 "--output", str(tmp_path / "out")], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # wait until it is blocked on the store
            hole.settimeout(1)
            try:
                hole.accept()
                break
            except TimeoutError:
                continue
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        hole.close()
    assert proc.returncode == 1, err
    messages = [json.loads(line)["msg"] for line in err.splitlines() if line.startswith("{")]
    assert any("received SIGTERM" in m for m in messages), err
    assert "Traceback" not in err
    assert out == ""
