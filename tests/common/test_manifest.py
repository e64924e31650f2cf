"""The manifest contract: publish last and create-only, verify on load, the already-done rule."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from common import manifest as mf
from common import storage
from common.errors import AlreadyExistsError, ChecksumError, InputError, OutputTakenError

pytestmark = pytest.mark.integration


def _publish(prefix: str, stage: str = "prepare", config: dict | None = None, inputs: list | None = None,
             payload: bytes = b"rows") -> mf.Loaded:
    writer = mf.ArtifactWriter(prefix)
    writer.add_bytes(payload, "data/train.parquet", name="train", rows=3)
    m = mf.build(stage=stage, run_id="r1", config=config or {"a": 1}, inputs=inputs or [],
                 artifacts=writer.artifacts, stats={"rows": 3})
    mf.publish(prefix, m)
    return mf.load(prefix)


def test_publish_then_load_verifies(store_root: str) -> None:
    loaded = _publish(storage.join(store_root, "prep"))
    assert loaded.manifest.stage == "prepare"
    assert loaded.manifest.artifact("train").rows == 3
    assert loaded.manifest.schema_version == mf.SCHEMA_VERSION
    assert loaded.manifest.config_hash == mf.config_hash({"a": 1})
    mf.load(loaded.uri, verify="full")


def test_tampered_artifact_is_detected(store_root: str) -> None:
    prefix = storage.join(store_root, "prep")
    loaded = _publish(prefix)
    storage.write_bytes(storage.join(prefix, "data/train.parquet"), b"ROWS")  # same size, other bytes
    mf.load(prefix, verify="size")  # the cheap check cannot see it ...
    with pytest.raises(ChecksumError, match="train"):
        mf.load(prefix, verify="full")  # ... the full one does
    storage.write_bytes(storage.join(prefix, "data/train.parquet"), b"rows and more")
    with pytest.raises(ChecksumError, match="bytes"):
        mf.load(prefix)
    with pytest.raises(ChecksumError):
        mf.fetch_artifact(loaded, loaded.manifest.artifact("train"), "/tmp/ftjobs-test-fetch.bin")


def test_missing_manifest_names_the_stage_to_run(store_root: str) -> None:
    with pytest.raises(InputError, match="ftjobs prepare"):
        mf.load(storage.join(store_root, "nothing"), expect_stage="prepare")


def test_wrong_stage_is_refused(store_root: str) -> None:
    prefix = storage.join(store_root, "prep")
    _publish(prefix)
    with pytest.raises(InputError, match="expected train"):
        mf.load(prefix, expect_stage="train")


def test_already_done_and_different_run(store_root: str) -> None:
    prefix = storage.join(store_root, "prep")
    _publish(prefix, config={"a": 1})
    assert mf.check_output(prefix, stage="prepare", config={"a": 1}, inputs=[]) is not None
    with pytest.raises(OutputTakenError, match="config differs at: a"):
        mf.check_output(prefix, stage="prepare", config={"a": 2}, inputs=[])
    assert mf.check_output(storage.join(store_root, "fresh"), stage="prepare", config={"a": 1}, inputs=[]) is None


def test_manifest_is_never_rewritten(store_root: str) -> None:
    prefix = storage.join(store_root, "prep")
    _publish(prefix)
    with pytest.raises(AlreadyExistsError, match="already published"):
        _publish(prefix)


def test_racing_writers_exactly_one_wins(store_root: str) -> None:
    prefix = storage.join(store_root, "race")
    barrier = threading.Barrier(8)
    results: list[str] = []

    def writer(i: int) -> None:
        m = mf.build(stage="prepare", run_id=f"writer-{i}", config={"i": i}, inputs=[], artifacts=[])
        barrier.wait()
        try:
            mf.publish(prefix, m)
            results.append(f"won-{i}")
        except AlreadyExistsError:
            results.append("lost")

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    winners = [r for r in results if r.startswith("won")]
    assert len(winners) == 1 and results.count("lost") == 7
    assert mf.load(prefix).manifest.run_id == winners[0].replace("won", "writer")


def test_schema_version_mismatch_is_clear(store_root: str) -> None:
    uri = storage.join(store_root, "m/manifest.json")
    storage.write_bytes(uri, json.dumps({"stage": "prepare", "schema_version": 99}).encode())
    with pytest.raises(InputError, match="schema version 99"):
        mf.load(uri)


def test_a_schema_1_manifest_still_reads_and_a_stage_records_the_executors_run(
        store_root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = _publish(storage.join(store_root, "prep"))
    old = json.loads(storage.read_bytes(loaded.uri))
    old["schema_version"] = 1  # before run ids meant the run: no `cells`
    del old["cells"]
    storage.write_bytes(storage.join(store_root, "old/manifest.json"), json.dumps(old).encode())
    read = mf.load(storage.join(store_root, "old"), verify="none").manifest
    assert (read.schema_version, read.run_id, read.cells) == (1, "r1", [])
    # an executor's environment names the run; a stage run alone gets a new id
    monkeypatch.setenv(mf.RUN_ID_ENV, "run-7")
    monkeypatch.setenv(mf.CELLS_ENV, "c00,c01")
    assert (mf.current_run_id(), mf.current_cells()) == ("run-7", ["c00", "c01"])
    monkeypatch.delenv(mf.RUN_ID_ENV)
    monkeypatch.delenv(mf.CELLS_ENV)
    assert mf.current_run_id() != mf.current_run_id() and mf.current_cells() == []


def test_show_cli_prints_lineage(store_root: str, subprocess_env: dict) -> None:
    raw = storage.join(store_root, "raw.jsonl")
    storage.write_bytes(raw, b'{"x": 1}\n')
    prep = _publish(storage.join(store_root, "prep"),
                    inputs=[mf.InputRef(uri=raw, sha256=storage.sha256_uri(raw), role="data")])
    train = _publish(storage.join(store_root, "train"), stage="train", inputs=[prep.ref("data")])
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "show", storage.parent(train.uri)],
                         capture_output=True, text=True, env=subprocess_env, check=False)
    assert out.returncode == 0, out.stderr
    assert "lineage:" in out.stdout and "└── [ok] prepare r1" in out.stdout
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "show", "--json", train.uri],
                         capture_output=True, text=True, env=subprocess_env, check=False)
    data = json.loads(out.stdout)
    assert data["verified"] is True and data["lineage"]["inputs"][0]["stage"] == "prepare"
    storage.write_bytes(storage.join(store_root, "prep/data/train.parquet"), b"tampered!")
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "show", train.uri],
                         capture_output=True, text=True, env=subprocess_env, check=False)
    assert out.returncode == 3 and "└── [FAILED] manifest " in out.stdout  # not taken for raw data
    assert "verification failed at " + storage.join(store_root, "prep/manifest.json") in out.stderr
    assert "data/train.parquet" in out.stderr.split("verification failed at", 1)[1]  # names the bad artifact


def test_a_data_file_given_for_a_manifest_says_so(tmp_path) -> None:
    data = tmp_path / "rows.jsonl"
    data.write_text('{"messages": []}\n')
    with pytest.raises(InputError, match=r"rows.jsonl is a file, not a manifest.*ftjobs prepare --source"):
        mf.load(str(data), expect_stage="prepare")


def test_an_unwritable_local_output_is_refused_before_any_work(tmp_path) -> None:
    from common.errors import ConfigError

    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"Cannot write under --output .*a-file/out.*writable folder"):
        mf.check_output(str(blocker / "out"), stage="prepare", config={}, inputs=[])
    # A writable one passes, and the probe leaves no folders behind for a job that then stops early.
    fresh = tmp_path / "new" / "deeper" / "out"
    assert mf.check_output(str(fresh), stage="prepare", config={}, inputs=[]) is None
    assert not (tmp_path / "new").exists()


def test_the_same_local_path_spelled_differently_is_the_same_run(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "x.jsonl").write_text("{}\n")
    (tmp_path / "data" / "y.jsonl").write_text("{}\n")
    raw = [mf.InputRef(uri="data/x.jsonl", sha256="ab" * 32, role="data")]
    _publish(str(tmp_path / "out"), config={"sources": [{"path": "data/x.jsonl"}], "seed": 0}, inputs=raw)
    for spelling in ("./data/x.jsonl", str(tmp_path / "data" / "x.jsonl"), "data//x.jsonl"):
        again = mf.check_output(str(tmp_path / "out"), stage="prepare", inputs=raw,
                                config={"sources": [{"path": spelling}], "seed": 0})
        assert again is not None, spelling
    # Another file, or the same path with another setting, is still another run.
    with pytest.raises(OutputTakenError, match="config differs at: sources"):
        mf.check_output(str(tmp_path / "out"), stage="prepare", inputs=raw,
                        config={"sources": [{"path": "data/y.jsonl"}], "seed": 0})
    with pytest.raises(OutputTakenError, match="config differs at: seed, sources"):
        mf.check_output(str(tmp_path / "out"), stage="prepare", inputs=raw,
                        config={"sources": [{"path": "./data/x.jsonl"}], "seed": 1})


def test_a_prefix_and_its_manifest_and_a_trailing_slash_are_one_spelling(store_root: str) -> None:
    prep = storage.join(store_root, "prepare")
    _publish(storage.join(store_root, "train"), stage="train",
             config={"input": f"{prep}/manifest.json", "output": storage.join(store_root, "train")})
    for inp, out in ((f"{prep}/", storage.join(store_root, "train") + "/"), (prep, storage.join(store_root, "train"))):
        again = mf.check_output(storage.join(store_root, "train"), stage="train", inputs=[],
                                config={"input": inp, "output": out})
        assert again is not None, (inp, out)
    with pytest.raises(OutputTakenError, match="config differs at: input"):
        mf.check_output(storage.join(store_root, "train"), stage="train", inputs=[],
                        config={"input": storage.join(store_root, "prepare2"),
                                "output": storage.join(store_root, "train")})


def test_a_model_section_that_does_not_fit_its_stage_is_bad_input_naming_the_manifest(tmp_path: Path) -> None:
    uri = mf.publish(str(tmp_path / "train"), mf.build(stage="train", run_id="r", config={}, inputs=[],
                                                       artifacts=[], model={"base_model": "m", "lora": {"r": 8}}))
    with pytest.raises(InputError, match=r"train/manifest.json: its model section is not what `ftjobs train` "
                                         r"writes \(template_hash: Field required; lora.alpha: Field required\)"):
        mf.model_block(mf.load(uri))
    good = mf.publish(str(tmp_path / "merge"), mf.build(stage="merge", run_id="r", config={}, inputs=[],
                                                        artifacts=[], model={"base_model": "m", "template_hash": "h",
                                                                             "something_new": 1}))
    block = mf.model_block(mf.load(good))
    assert isinstance(block, mf.MergeModel) and block.base_model == "m" and block.model_extra == {"something_new": 1}
