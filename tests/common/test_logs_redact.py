"""Credentials in URLs never reach a log line (common/logs.py redacts every formatted line)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from common import logs

pytestmark = pytest.mark.unit

MASKED = [
    ('Could not connect to the endpoint URL: "http://admin:SuperSecret1@minio:9000/b/k"',
     'Could not connect to the endpoint URL: "http://admin:***@minio:9000/b/k"'),
    ("tracking at postgresql://mlflow:pa55@db:5432/mlflow failed",
     "tracking at postgresql://mlflow:***@db:5432/mlflow failed"),
    ("clone https://ghp_abc123@github.com/org/repo", "clone https://***@github.com/org/repo"),
    ("GET https://b.s3.amazonaws.com/k?X-Amz-Credential=AKIA%2F1&X-Amz-Date=1&X-Amz-Signature=deadbeef",
     "GET https://b.s3.amazonaws.com/k?X-Amz-Credential=***&X-Amz-Date=1&X-Amz-Signature=***"),
    ("https://api.example.com/v1?api_key=sk-1&model=m", "https://api.example.com/v1?api_key=***&model=m"),
]
UNTOUCHED = [
    "hf://squad@train",                      # a source's split, not a credential
    "hf://tatsu-lab/alpaca@train",
    "s3://bucket/runs/r1/prepare/manifest.json",
    "contact ops@example.com, eval_size=100",
    "http://minio:9000/b/k?partNumber=1&uploadId=abc",
]


@pytest.mark.parametrize(("text", "expected"), MASKED)
def test_credentials_in_urls_are_masked(text: str, expected: str) -> None:
    assert logs.redact(text) == expected


@pytest.mark.parametrize("text", UNTOUCHED)
def test_what_is_not_a_credential_stays(text: str) -> None:
    assert logs.redact(text) == text


@pytest.mark.parametrize("formatter", [logs.JsonFormatter(), logs.TextFormatter()])
def test_both_formatters_redact_messages_and_extras(formatter: logging.Formatter) -> None:
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "failed: %s", ("http://u:hunter2@h/p",), None)
    record.__dict__["tracking_uri"] = "postgresql://u:hunter2@db/x"  # an extra field (JSON lines carry them)
    line = formatter.format(record)
    assert "hunter2" not in line and "http://u:***@h/p" in line


def test_a_stage_that_cannot_reach_its_store_does_not_print_the_endpoint_password(tmp_path: Path) -> None:
    """A real prepare against an S3 endpoint URL with a user:password in it, on a port nothing listens on:
    the error names the endpoint, masked."""
    src = tmp_path / "d.jsonl"
    src.write_text('{"prompt": "a", "completion": "b"}\n')
    env = {**os.environ, "S3_ENDPOINT_URL": "http://admin:SuperSecret1@127.0.0.1:1", "AWS_ACCESS_KEY_ID": "k",
           "AWS_SECRET_ACCESS_KEY": "s", "AWS_MAX_ATTEMPTS": "1", "FTJOBS_LOG_FORMAT": "json"}
    done = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--source", str(src), "--output", "s3://b/p"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "SuperSecret1" not in done.stderr + done.stdout
    assert "http://admin:***@127.0.0.1:1" in done.stderr
