"""Shared fixtures: a real S3 server over HTTP, store roots, a tiny real model.

The S3 server is moto's (pinned in pyproject) on a loopback port, started
once per session, unless `S3_ENDPOINT_URL` is already set: then the same
tests run against that endpoint (e.g. MinIO) and the bucket in
`FTJOBS_TEST_BUCKET` (default `ftjobs-test`, created if missing).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest_plugins = ["tests.scheduling"]  # longest test files first on the xdist workers

TEST_BUCKET = os.environ.get("FTJOBS_TEST_BUCKET", "ftjobs-test")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def s3_endpoint() -> Iterator[str]:
    """A real S3 endpoint over HTTP; env vars point boto3 (and subprocesses) at it."""
    external = os.environ.get("S3_ENDPOINT_URL")
    server = None
    if external:
        endpoint = external
    else:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        os.environ["S3_ENDPOINT_URL"] = endpoint
        os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
        os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    from common import storage

    client = storage.s3_client()
    try:
        client.head_bucket(Bucket=TEST_BUCKET)
    except Exception:
        client.create_bucket(Bucket=TEST_BUCKET)
    yield endpoint
    if server is not None:
        server.stop()
        os.environ.pop("S3_ENDPOINT_URL", None)
        storage._clients.clear()


@pytest.fixture
def s3_root(s3_endpoint: str) -> str:
    """A fresh, unique prefix in the test bucket."""
    return f"s3://{TEST_BUCKET}/t/{uuid.uuid4().hex[:12]}"


@pytest.fixture(params=["local", "s3"])
def store_root(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test against the local store and the S3 server."""
    if request.param == "local":
        return str(tmp_path / "store")
    return request.getfixturevalue("s3_root")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama (head_dim 64, safetensors) with a trained BPE tokenizer and ChatML template."""
    from common import tinymodel

    return tinymodel.build(tmp_path_factory.mktemp("tiny-model") / "model")


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_model))


@pytest.fixture
def subprocess_env(s3_endpoint: str) -> dict[str, str]:
    """Environment for `ftjobs` subprocesses: the test S3 endpoint, JSON logs, no network hubs."""
    env = dict(os.environ)
    env.update({"FTJOBS_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "PYTHONUNBUFFERED": "1"})
    return env
