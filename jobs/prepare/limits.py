"""The per-row byte limit (`max_line_bytes`) for every reader, applied before a row becomes Python objects.

A JSON line is read with a bounded `readline`. The table formats need their own guards, because a small
compressed file can hold one huge value (a 10 KB Parquet file can decompress to a 300 MiB string, and the
Python string, its JSON and its copies are several times that):

- Parquet: a row group whose uncompressed size (from the file's metadata) averages more than the limit per
  row certainly holds a row over it, and is refused before any of it is decompressed (`oversized_groups`).
  Other row groups are read batch by batch, and each batch's rows are measured in Arrow (`row_bytes`) before
  any of them is converted to Python: only rows within the limit are.
- Arrow (IPC) files are memory-mapped: their batches are measured the same way.
- CSV: `BoundedLines` hands the csv module lines read with a bounded `readline`, and stops a record whose
  lines add up to more than the limit, so neither a long line nor a quoted field spanning many lines is
  ever held whole.

What a row's "bytes" are differs a little by format (the JSON line's bytes; the values' bytes in Arrow, with
4 or 8 bytes per number; a CSV record's bytes), which is what a limit against memory blow-up needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import IO, Any

import numpy as np


class RowTooLong(Exception):
    """A CSV record over the limit; its physical line was skipped to its end."""

    def __init__(self, line: int, size: int):
        super().__init__(f"line {line}")
        self.line, self.size = line, size


# --------------------------------------------------------------------------- Arrow and Parquet


def row_bytes(batch: Any) -> Any:
    """Bytes of each row's values (a numpy int64 array, one per row), computed in Arrow without converting a
    value to Python: string and binary lengths, fixed widths, lists, structs, maps and dictionaries summed."""
    total = np.zeros(batch.num_rows, dtype=np.int64)
    for column in batch.columns:
        total += _array_bytes(column)
    return total


def _array_bytes(arr: Any) -> Any:
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(arr, pa.ChunkedArray):
        return np.concatenate([_array_bytes(c) for c in arr.chunks]) if arr.num_chunks else np.zeros(0, np.int64)
    t = arr.type
    n = len(arr)
    if pa.types.is_string(t) or pa.types.is_binary(t) or pa.types.is_large_string(t) or pa.types.is_large_binary(t):
        return pc.fill_null(pc.binary_length(arr), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if pa.types.is_dictionary(t):
        sizes = _array_bytes(arr.dictionary)
        idx = pc.fill_null(arr.indices, 0).to_numpy(zero_copy_only=False).astype(np.int64)
        out = sizes[idx] if len(sizes) else np.zeros(n, np.int64)
        return np.where(arr.is_null().to_numpy(zero_copy_only=False), 0, out)
    if pa.types.is_struct(t):
        out = np.zeros(n, np.int64)
        for child in arr.flatten():  # flatten() follows the slice; field() would not
            out += _array_bytes(child)
        return out
    if pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_map(t):
        offsets = arr.offsets.to_numpy(zero_copy_only=False).astype(np.int64)  # n + 1, into the whole child
        child = _array_bytes(arr.values)
        cumulative = np.concatenate([[0], np.cumsum(child)])
        return cumulative[offsets[1:]] - cumulative[offsets[:-1]]
    if pa.types.is_fixed_size_list(t):
        child = _array_bytes(arr.flatten())
        return child.reshape(n, t.list_size).sum(axis=1) if n else np.zeros(0, np.int64)
    if pa.types.is_null(t):  # a column that is null in every row (an unused score or margin column)
        return np.zeros(n, np.int64)
    try:
        width = t.bit_width or 64
    except ValueError:  # a type without a fixed width that none of the branches above measures
        width = 64
    return np.full(n, max(width // 8, 1), dtype=np.int64)


def oversized_groups(parquet_file: Any, max_bytes: int) -> set[int]:
    """Row groups whose uncompressed size averages more than `max_bytes` a row: each holds at least one row
    over the limit. Found from the file's metadata, so none of their pages is decompressed."""
    meta = parquet_file.metadata
    out = set()
    for g in range(meta.num_row_groups):
        rg = meta.row_group(g)
        if rg.num_rows and rg.total_byte_size > max_bytes * rg.num_rows:
            out.add(g)
    return out


def table_records(batches: Iterator[Any], first_row: int, max_bytes: int
                  ) -> Iterator[tuple[int, dict[str, Any] | None, int]]:
    """(row number, record, bytes) for every row of the batches; the record is None for a row over
    `max_bytes`, which is never converted to Python."""
    n = first_row
    for batch in batches:
        sizes = row_bytes(batch)
        over = sizes > max_bytes
        if over.any():
            import pyarrow as pa

            good = batch.filter(pa.array(~over)).to_pylist()
            it = iter(good)
            for k in range(batch.num_rows):
                n += 1
                yield n, (None if over[k] else next(it)), int(sizes[k])
        else:
            for rec in batch.to_pylist():
                n += 1
                yield n, rec, 0


# --------------------------------------------------------------------------- CSV


class BoundedLines:
    """Text lines of a binary stream for the csv module, each read with a bounded readline.

    `start_record()` before each record; a record whose lines add up to more than `max_bytes` raises
    RowTooLong (after skipping the rest of its current line), and the caller starts a fresh csv reader on
    the same lines (the csv module keeps a half-read record otherwise)."""

    def __init__(self, fh: IO[bytes], max_bytes: int):
        self.fh, self.max_bytes = fh, max_bytes
        self.line_num = 0
        self.record_bytes = 0
        self.record_start = 1

    def start_record(self) -> None:
        self.record_bytes = 0
        self.record_start = self.line_num + 1

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        raw = self.fh.readline(self.max_bytes + 1)
        if not raw:
            raise StopIteration
        self.line_num += 1
        if self.line_num == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        self.record_bytes += len(raw)
        if self.record_bytes > self.max_bytes:
            size = self.record_bytes
            while raw and not raw.endswith(b"\n"):  # the rest of this line, never held whole
                raw = self.fh.readline(1 << 20)
                size += len(raw)
            raise RowTooLong(self.record_start, size)
        return raw.decode("utf-8", "surrogateescape")
