"""Artifact paths stay under their manifest's folder: a manifest whose artifact path is absolute, climbs out with
'..', holds a backslash or an empty segment is refused when it is built and when it is loaded (exit 3, naming the
manifest and the path), whatever the store, and no artifact is fetched outside the destination folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from common import manifest as mf
from common import storage
from common.errors import InputError
from jobs.cli import main

pytestmark = pytest.mark.integration

SECRET = b"outside the manifest's folder"
BAD_PATHS = {
    "dotdot": "../../outside/secret.txt",
    "absolute": "/outside/secret.txt",
    "backslash": "data\\..\\..\\secret.txt",
    "empty segment": "data//train.parquet",
    "empty": "",
}


def crafted(store_root: str, bad: str) -> str:
    """A real prepare manifest, then rewritten so its one artifact names `bad` (with the outside file's true
    sha256 and size, so nothing but the path gives it away). Returns the manifest's URI."""
    outside = storage.join(store_root, "outside/secret.txt")
    storage.write_bytes(outside, SECRET)
    prefix = storage.join(store_root, "runs/r1/prepare")
    writer = mf.ArtifactWriter(prefix)
    writer.add_bytes(SECRET, "train/part-00000.parquet", name="train/part-00000.parquet", rows=1)
    uri = mf.publish(prefix, mf.build(stage="prepare", run_id="r1", config={}, inputs=[],
                                      artifacts=writer.artifacts))
    doc = json.loads(storage.read_bytes(uri))
    doc["artifacts"][0]["path"] = bad
    storage.delete(uri)
    storage.put_if_absent(uri, json.dumps(doc).encode())
    return uri


@pytest.mark.parametrize("bad", list(BAD_PATHS.values()), ids=list(BAD_PATHS))
def test_a_manifest_with_an_escaping_artifact_path_is_bad_input(store_root: str, bad: str) -> None:
    uri = crafted(store_root, bad)
    with pytest.raises(InputError) as err:
        mf.load(uri, verify="full")
    assert uri in str(err.value) and repr(bad) in str(err.value)
    for command in (["show", "--verify", "full", uri], ["inspect", uri, "--color", "never"]):
        result = CliRunner().invoke(main, ["--log-format", "text", *command])
        assert result.exit_code == 3, (command, result.output)
        assert uri in result.output and repr(bad) in result.output, result.output
        assert SECRET.decode() not in result.output


@pytest.mark.parametrize("bad", [p for p in BAD_PATHS.values() if p and not p.startswith("/")])
def test_building_a_manifest_refuses_an_escaping_path_before_writing(store_root: str, bad: str) -> None:
    prefix = storage.join(store_root, "runs/r1/prepare")
    with pytest.raises(InputError, match="manifest.json cannot record"):
        mf.ArtifactWriter(prefix).add_bytes(b"x", bad)
    assert storage.list_objects(store_root) == []  # nothing written anywhere, inside or out


def test_fetch_into_keeps_every_artifact_inside_the_folder(tmp_path: Path) -> None:
    prefix = str(tmp_path / "store/prepare")
    writer = mf.ArtifactWriter(prefix, base="attempts/a1")
    writer.add_bytes(b"report", "report.md")
    loaded = mf.load(mf.publish(prefix, mf.build(stage="evaluate", run_id="r1", config={}, inputs=[],
                                                 artifacts=writer.artifacts)))
    got = mf.fetch_into(loaded, loaded.manifest.artifacts[0], tmp_path / "out")
    assert got == (tmp_path / "out/attempts/a1/report.md").resolve() and got.read_bytes() == b"report"
