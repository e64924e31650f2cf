"""Object store: round trips on both backends, multipart folders, create-only, traversal, retries."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from common import storage
from common.errors import AlreadyExistsError, ConfigError, InputError
from tests.faults import FaultProxy

pytestmark = pytest.mark.integration


def test_bytes_and_json_round_trip(store_root: str) -> None:
    storage.write_bytes(storage.join(store_root, "a/b.bin"), b"\x00\x01hello")
    assert storage.read_bytes(storage.join(store_root, "a/b.bin")) == b"\x00\x01hello"
    storage.write_bytes(storage.join(store_root, "c.json"), storage.json_bytes({"x": [1, 2], "ü": "ß"}))
    assert storage.read_json(storage.join(store_root, "c.json")) == {"x": [1, 2], "ü": "ß"}
    assert storage.exists(storage.join(store_root, "c.json"))
    assert not storage.exists(storage.join(store_root, "missing.json"))
    assert [o.rel for o in storage.list_objects(store_root)] == ["a/b.bin", "c.json"]
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(store_root, "missing.json"))


def test_a_local_write_makes_its_folder_again_when_another_process_removed_it(tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A racing attempt's tidy removes empty folders under the output. A write whose folder went between
    being made and the temporary file being created makes it again (it failed the racing-attempts e2e with
    FileNotFoundError on .attempt.json's temporary file)."""
    import tempfile

    target = tmp_path / "out" / "attempts" / "a1" / ".attempt.json"
    real, removed = tempfile.mkstemp, []

    def after_the_other_tidy(*args: object, **kwargs: object) -> tuple[int, str]:
        if not removed:  # the other process's rmdir lands right after this one's mkdir, once
            target.parent.rmdir()
            removed.append(target.parent)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(tempfile, "mkstemp", after_the_other_tidy)
    storage.write_bytes(str(target), b"{}")
    assert removed and target.read_bytes() == b"{}"
    assert [p.name for p in target.parent.iterdir()] == [".attempt.json"]  # no temporary file left


def test_a_local_listing_leaves_out_folders_another_process_removes_while_it_walks(tmp_path: Path) -> None:
    """Two racing train attempts both clear the checkpoints folder once the run is published; the one whose
    listing met a folder the other had just removed failed with FileNotFoundError (the racing-attempts e2e,
    train on the local store). A listing takes what is there as it walks, as an S3 listing does."""
    import shutil

    root = tmp_path / "checkpoints"
    for i in range(4):
        (root / f"step-{i}" / "adapter").mkdir(parents=True)
        (root / f"step-{i}" / "adapter" / "a.bin").write_bytes(b"xy")
        (root / f"step-{i}" / "state.json").write_bytes(b"{}")
    walking = storage.iter_objects(str(root))
    first = next(walking)
    for i in range(4):  # the other attempt's rmtree, between two steps of this walk
        if not first.rel.startswith(f"step-{i}/"):
            shutil.rmtree(root / f"step-{i}")
    rest = list(walking)
    assert {o.rel.split("/")[0] for o in rest} <= {first.rel.split("/")[0]}
    assert all(o.size == 2 for o in [first, *rest])  # "xy" and "{}": what the files hold
    assert storage.delete_prefix(str(root)) >= 1 and not root.exists()


def test_a_local_listing_does_not_follow_a_link_to_a_folder_outside_the_prefix(tmp_path: Path) -> None:
    """A listing (and so gc and delete_prefix) stays under its prefix: a link to a folder elsewhere is not
    walked, a link to a file is listed as the file it names."""
    outside, root = tmp_path / "outside", tmp_path / "run"
    outside.mkdir()
    (outside / "secret").write_bytes(b"keep")
    (root / "a").mkdir(parents=True)
    (root / "a" / "f").write_bytes(b"y")
    (root / "link").symlink_to(outside, target_is_directory=True)
    (root / "file-link").symlink_to(outside / "secret")
    assert sorted(o.rel for o in storage.iter_objects(str(root))) == ["a/f", "file-link"]


def test_create_only_put_refuses_second_write(store_root: str) -> None:
    uri = storage.join(store_root, "manifest.json")
    storage.put_if_absent(uri, b"first")
    with pytest.raises(AlreadyExistsError, match="already exists"):
        storage.put_if_absent(uri, b"second")
    assert storage.read_bytes(uri) == b"first"


def test_folder_round_trip_with_multipart_file(store_root: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    big = os.urandom(storage.MULTIPART_THRESHOLD + 3 * 1024 * 1024)  # forces a multipart upload
    (src / "sub" / "big.bin").write_bytes(big)
    (src / "small.txt").write_text("small")
    (src / "empty").write_bytes(b"")
    up = {t.rel: t for t in storage.upload_dir(src, storage.join(store_root, "model"))}
    assert up["sub/big.bin"].sha256 == hashlib.sha256(big).hexdigest()
    assert up["sub/big.bin"].size == len(big)
    down = {t.rel: t for t in storage.download_dir(storage.join(store_root, "model"), tmp_path / "dst")}
    assert set(down) == {"sub/big.bin", "small.txt", "empty"}
    assert (tmp_path / "dst" / "sub" / "big.bin").read_bytes() == big
    assert down["sub/big.bin"].sha256 == up["sub/big.bin"].sha256
    assert (tmp_path / "dst" / "empty").read_bytes() == b""


def test_multipart_upload_really_used_parts(s3_root: str, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(storage.MULTIPART_THRESHOLD + 1024))
    storage.upload_file(big, storage.join(s3_root, "big.bin"))
    bucket, key = storage.split_s3(storage.join(s3_root, "big.bin"))
    etag = storage.s3_client().head_object(Bucket=bucket, Key=key)["ETag"]
    assert "-2" in etag  # a multipart ETag ends in -<parts>


@pytest.mark.parametrize("key", ["../evil.txt", "a/../../evil.txt", "/abs/evil.txt"])
def test_download_refuses_keys_escaping_destination(tmp_path: Path, key: str) -> None:
    with pytest.raises(InputError, match="escape|outside"):
        storage.safe_destination(tmp_path / "dest", key)


def test_download_dir_refuses_traversal_key_on_s3(s3_root: str, tmp_path: Path) -> None:
    bucket, key = storage.split_s3(s3_root)
    storage.s3_client().put_object(Bucket=bucket, Key=f"{key}/ok.txt", Body=b"ok")
    storage.s3_client().put_object(Bucket=bucket, Key=f"{key}/../{key.split('/')[-1]}-x/../../escape.txt", Body=b"x")
    storage.s3_client().put_object(Bucket=bucket, Key=f"{key}/sub/../../outside.txt", Body=b"x")
    with pytest.raises(InputError):
        storage.download_dir(s3_root, tmp_path / "dest")
    assert not (tmp_path / "outside.txt").exists()
    assert not any((tmp_path / "dest").rglob("*"))  # refused before anything was written


def test_unknown_scheme_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="gs"):
        storage.read_bytes("gs://bucket/key")


@pytest.mark.parametrize("fault", ["503", "drop"])
def test_transient_faults_are_retried(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch, fault: str) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        monkeypatch.setenv("S3_ENDPOINT_URL", proxy.url)
        storage._clients.clear()
        try:
            uri = f"s3://ftjobs-test/faults/{fault}.bin"
            proxy.match = "/faults/"
            proxy.faults = [fault, fault]
            storage.write_bytes(uri, b"payload")
            proxy.faults = [fault]
            assert storage.read_bytes(uri) == b"payload"
        finally:
            storage._clients.clear()
    outcomes = [o for (_, p, o) in proxy.seen if "/faults/" in p]
    assert outcomes.count(fault) == 3 and outcomes.count("forwarded") >= 2


def test_missing_credentials_are_a_config_error_naming_what_to_set(s3_root: str, subprocess_env: dict,
                                                                   tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {k: v for k, v in subprocess_env.items() if not k.startswith("AWS_ACCESS") and
           not k.startswith("AWS_SECRET") and k not in ("AWS_PROFILE", "AWS_SESSION_TOKEN")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "show", f"{s3_root}/prepare"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "No usable AWS credentials" in proc.stderr and "AWS_ACCESS_KEY_ID" in proc.stderr
    assert "Traceback" not in proc.stderr
