"""Lineage: a manifest's inputs walked back to the raw data, each verified, broken ones reported in the tree."""

from __future__ import annotations

import pytest

from common import lineage as lin
from common import manifest as mf
from common import storage

pytestmark = pytest.mark.integration


def _publish(prefix: str, stage: str = "prepare", inputs: list[mf.InputRef] | None = None) -> mf.Loaded:
    writer = mf.ArtifactWriter(prefix)
    writer.add_bytes(b"rows", "data/train.parquet", name="train", rows=3)
    mf.publish(prefix, mf.build(stage=stage, run_id="r1", config={"a": 1}, inputs=inputs or [],
                                artifacts=writer.artifacts))
    return mf.load(prefix)


def test_lineage_walks_inputs_and_flags_changes(store_root: str) -> None:
    raw = storage.join(store_root, "raw.jsonl")
    storage.write_bytes(raw, b'{"x": 1}\n')
    raw_ref = mf.InputRef(uri=raw, sha256=storage.sha256_uri(raw), stage=None, role="data")
    prep = _publish(storage.join(store_root, "prep"), inputs=[raw_ref])
    train = _publish(storage.join(store_root, "train"), stage="train", inputs=[prep.ref("data")])
    tree = lin.lineage(train.uri, verify="full")
    assert lin.all_ok(tree) and lin.first_failure(tree) is None
    assert tree.stage == "train" and tree.children[0].stage == "prepare"
    assert tree.children[0].children[0].uri == raw
    text = lin.render_tree(tree)
    assert "train r1" in text and "prepare r1" in text and "raw" in text
    assert lin.tree_dict(tree)["inputs"][0]["inputs"][0]["uri"] == raw
    storage.write_bytes(raw, b'{"x": 2}\n')
    tree = lin.lineage(train.uri, verify="full")
    assert not lin.all_ok(tree) and "CHANGED" in lin.render_tree(tree)
    bad = lin.first_failure(tree)
    assert bad is not None and bad.uri == raw


def test_a_shared_ancestor_is_walked_twice_and_a_cycle_is_flagged(tmp_path) -> None:
    """infer reads merge (-> train -> prepare) and prepare itself: a diamond, not a cycle."""
    prep = _publish(str(tmp_path / "prep"))
    train = _publish(str(tmp_path / "train"), stage="train", inputs=[prep.ref("data")])
    infer = _publish(str(tmp_path / "infer"), stage="infer", inputs=[train.ref("model"), prep.ref("data")])
    tree = lin.lineage(infer.uri)
    assert lin.all_ok(tree), lin.render_tree(tree)
    assert [c.stage for c in tree.children] == ["train", "prepare"]
    assert tree.children[0].children[0].stage == "prepare"
    # A manifest that names itself as an input (only a hand-edited one could): reported, not walked forever.
    loop = mf.manifest_uri(str(tmp_path / "loop"))
    looped = mf.build(stage="train", run_id="r2", config={}, artifacts=[],
                      inputs=[mf.InputRef(uri=loop, sha256="0" * 64, stage="train")])
    mf.publish(str(tmp_path / "loop"), looped)
    tree = lin.lineage(loop, verify="none")
    assert not lin.all_ok(tree) and tree.children[0].note == "cycle"
