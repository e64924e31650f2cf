"""The create-only manifest write as it goes over HTTP, and the boto3 floor it needs.

`common.manifest.publish` writes through `common.storage.put_if_absent`, which relies on S3's
`If-None-Match: *`. A boto3 without `IfNoneMatch` on put_object refuses the parameter, and every publish
would fail (and be retried as retryable) until the Job's backoff ran out; so the header is checked on the
wire, through a loopback proxy in front of the real S3 test server, not in the client's parameters.
"""

from __future__ import annotations

import tomllib
import uuid
from pathlib import Path

import pytest

from common import manifest as mf
from common import storage
from common.errors import AlreadyExistsError
from tests.conftest import TEST_BUCKET
from tests.faults import FaultProxy

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.integration
def test_publish_sends_if_none_match_star_and_the_second_writer_gets_412(s3_endpoint: str,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = f"s3://{TEST_BUCKET}/conditional/{uuid.uuid4().hex[:12]}/prepare/"
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
        storage._clients.clear()
        try:
            writer = mf.ArtifactWriter(prefix)
            writer.add_bytes(b"rows", "data/train.parquet", name="train", rows=1)
            manifest = mf.build(stage="prepare", run_id="r1", config={"a": 1}, inputs=[],
                                artifacts=writer.artifacts, stats={"rows": 1})
            uri = mf.publish(prefix, manifest)
            with pytest.raises(AlreadyExistsError, match="already published"):
                mf.publish(prefix, manifest)
            assert storage.read_json(uri)["stage"] == "prepare"
        finally:
            storage._clients.clear()
    puts = [x for x in proxy.exchanges if x.method == "PUT" and x.path.split("?")[0].endswith("/manifest.json")]
    assert [x.status for x in puts] == [200, 412]
    assert all({k.lower(): v for k, v in x.headers.items()}.get("if-none-match") == "*" for x in puts), puts
    # the data files are ordinary writes: only the manifest is create-only
    data = [x for x in proxy.exchanges if x.method == "PUT" and "/data/" in x.path]
    assert data and not any("if-none-match" in {k.lower() for k in x.headers} for x in data)


@pytest.mark.unit
def test_the_boto3_floor_has_conditional_writes_and_the_client_options_storage_sets() -> None:
    """Measured in throwaway venvs (boto3 and botocore of one release): 1.35.1's S3 model has no IfNoneMatch
    on PutObject, 1.35.2's has; up to 1.35.99 `Config(request_checksum_calculation=...)`, which
    common.storage passes for endpoints other than AWS, is a TypeError; 1.36.0 takes it."""
    import botocore.session
    from botocore.config import Config
    from packaging.requirements import Requirement

    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    boto3 = next(Requirement(d) for d in deps if Requirement(d).name == "boto3")
    assert not boto3.specifier.contains("1.35.1") and not boto3.specifier.contains("1.35.99")
    assert boto3.specifier.contains("1.36.0")
    # and the installed release really has both
    put = botocore.session.get_session().get_service_model("s3").operation_model("PutObject")
    assert "IfNoneMatch" in put.input_shape.members
    Config(request_checksum_calculation="when_required", response_checksum_validation="when_required")


def _publish_through(proxy: FaultProxy, monkeypatch: pytest.MonkeyPatch, prefix: str) -> object:
    """`ftjobs`'s publish of a small manifest with the store behind `proxy`; what the CLI exits with for it."""
    from click.testing import CliRunner

    from jobs.cli import main

    monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
    storage._clients.clear()
    storage._probed.clear()
    data = storage.join(prefix, "rows.jsonl").replace("/prepare", "/raw")
    storage.write_bytes(data, b'{"prompt": "q", "completion": "a"}\n')
    return CliRunner().invoke(main, ["--log-format", "text", "prepare", "--source", data, "--output", prefix,
                                     "--set", "eval_fraction=0"])


@pytest.mark.integration
def test_a_store_that_ignores_conditional_writes_is_refused_unless_the_risk_is_accepted(
        s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> None:
    root = f"s3://{TEST_BUCKET}/conditional/{uuid.uuid4().hex[:12]}"
    try:
        with FaultProxy(s3_endpoint) as proxy:
            proxy.strip_headers = {"if-none-match"}  # a gateway that drops the header: every write goes through
            refused = _publish_through(proxy, monkeypatch, f"{root}/a/prepare")
            assert refused.exit_code == 2, refused.output
            assert f"bucket '{TEST_BUCKET}' at {proxy.url}" in refused.output
            assert "ignores conditional writes" in refused.output and "FTJOBS_ALLOW_UNSAFE_STORE=1" in refused.output
            assert storage.list_objects(f"{root}/a/prepare") == []  # refused before any work, nothing written
            probes = [o.rel for o in storage.list_objects(root) if storage.PROBE_FOLDER in o.rel]
            assert probes == []  # the probe cleans up after itself
            monkeypatch.setenv(storage.UNSAFE_STORE_ENV, "1")
            accepted = _publish_through(proxy, monkeypatch, f"{root}/b/prepare")
            assert accepted.exit_code == 0, accepted.output
            assert "ignores conditional writes" in accepted.output  # said, not hidden
            monkeypatch.delenv(storage.UNSAFE_STORE_ENV)
        with FaultProxy(s3_endpoint) as honest:  # the real server, headers intact: probed once, passes
            ok = _publish_through(honest, monkeypatch, f"{root}/c/prepare")
            assert ok.exit_code == 0, ok.output
            storage.put_if_absent(f"{root}/c/other.json", b"{}")  # cached: no second probe
            probe_puts = [x for x in honest.exchanges if x.method == "PUT" and storage.PROBE_FOLDER in x.path]
            assert [x.status for x in probe_puts] == [200, 412]
    finally:
        storage._clients.clear()
        storage._probed.clear()
