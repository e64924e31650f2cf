"""The canonical Parquet rows: shards written before tools existed still read."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import data
from common import manifest as mf

pytestmark = pytest.mark.unit


def test_a_shard_without_tools_and_message_fields_reads_with_them_null(tmp_path: Path) -> None:
    old_message = pa.struct([("role", pa.string()), ("content", pa.string())])
    old = pa.schema([("id", pa.string()), ("messages", pa.list_(old_message)), ("split", pa.string()),
                     ("source", pa.string())])
    local = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist([{"id": "a", "messages": [{"role": "user", "content": "q"},
                                                                   {"role": "assistant", "content": "a"}],
                                          "split": "train", "source": "s"}], schema=old), local)
    writer = mf.ArtifactWriter(str(tmp_path / "prep"))
    writer.add_file(local, "data/train/part-00000.parquet", name="train/part-00000", rows=1)
    mf.publish(str(tmp_path / "prep"), mf.build(stage="prepare", run_id="r", config={}, inputs=[],
                                                artifacts=writer.artifacts))
    loaded = mf.load(str(tmp_path / "prep"))
    rows = data.read_split(loaded, "train", columns=["id", "messages", "tools"]).to_pylist()
    assert rows == [{"id": "a", "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                     "tools": None}]
    assert data.read_split(loaded, "train").column("tools").to_pylist() == [None]
    assert data.tools_of(data.tools_json([{"type": "function", "function": {"name": "f"}}])) == [
        {"type": "function", "function": {"name": "f"}}]
