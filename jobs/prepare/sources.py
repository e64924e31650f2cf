"""Raw inputs: expand sources into files, fetch and hash them, stream records.

A source is a file, a folder, a glob, an `s3://` object or prefix, a
`datasets.save_to_disk` folder (its `.arrow` files; a saved DatasetDict: its train split), or
`hf://<dataset id>` (optionally `@split`) when the Hugging Face Hub is reachable. Supported files:
`.jsonl`/`.ndjson`, `.json` (an array, an object wrapping one, or JSON lines), `.csv`, `.tsv`, `.parquet`,
`.arrow`; the text formats may be compressed (`.gz`, `.bz2`, `.xz`, `.zst`). A synth manifest (its URI, or
the prefix that holds it) stands for the data set it published: its `data` artifact, sha256-checked, and
the manifest is the run's input, so the lineage goes on through synth to its seeds and teacher. Its rows go
to the train split (unless the source says otherwise): the held-out comparison stays on real data.

Readers stream: JSON files as `jsonfiles.py` reads them, CSV record by record (`limits.BoundedLines`),
tables batch by batch. A reader yields `(line, record)`; a line that cannot be read yields `(line, Bad)`
and the caller decides (fatal unless `skip_bad_lines`).
"""

from __future__ import annotations

import bz2
import csv
import fnmatch
import glob
import gzip
import io
import itertools
import json
import logging
import lzma
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common import models, storage
from common.errors import InputError
from jobs.prepare import jsonfiles as J
from jobs.prepare import limits
from jobs.prepare.jsonfiles import Bad, parse_json_line  # noqa: F401 (read as S.Bad, S.parse_json_line)

LOG = logging.getLogger(__name__)

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
         ".parquet": "parquet", ".arrow": "arrow"}
# Compressions of the text formats, by extension: each opens a stream of the file's bytes.
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
ALSO = f"{', '.join(KINDS)}; the text formats also {', '.join(COMPRESSED)}"


@dataclass
class RawFile:
    uri: str          # what the manifest records (absolute)
    size: int
    split: str        # auto | train | eval
    format: str | None
    local: Path | None = None
    sha256: str = ""
    pos: int = 0      # bytes of the file read so far (for progress)
    manifest: Any = None  # the synth manifest (common.manifest.Loaded) whose data artifact this is

    def input_ref(self) -> Any:
        """What the prepare manifest records as this input: the synth manifest, or the raw file."""
        from common import manifest as mf

        if self.manifest is not None:
            return self.manifest.ref("data")
        return mf.InputRef(uri=self.uri, sha256=self.sha256, stage=None, role="data")

    @property
    def kind(self) -> str:
        return kind_of(self.uri)


def kind_of(uri: str) -> str:
    name = compression(uri.rsplit("/", 1)[-1].lower())[0]
    for ext, kind in KINDS.items():
        if name.endswith(ext):
            return kind
    return ""


def compression(name: str) -> tuple[str, str | None]:
    """A file name without its compression extension, and that extension (None when not compressed)."""
    for ext in COMPRESSED:
        if name.lower().endswith(ext):
            return name[: -len(ext)], ext
    return name, None


def supported(uri: str) -> bool:
    k = kind_of(uri)
    return bool(k) and not (compression(uri)[1] and k in ("parquet", "arrow"))


def _open_compressed(raw: IO[bytes], uri: str) -> IO[bytes]:
    """The file's bytes, decompressed as its extension says (pyarrow's zstd stream: no extra package)."""
    ext = compression(uri)[1]
    if ext == ".gz":
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if ext == ".bz2":
        return bz2.BZ2File(raw, mode="rb")
    if ext == ".xz":
        return lzma.LZMAFile(raw, mode="rb")
    if ext == ".zst":
        import pyarrow as pa

        return io.BufferedReader(pa.CompressedInputStream(pa.PythonFile(raw, mode="r"), "zstd"))
    return raw


# --------------------------------------------------------------------------- expanding sources


def expand(path: str, split: str, fmt: str | None) -> list[RawFile]:
    """Every supported file a source names, in a stable order."""
    if path.startswith("hf://"):
        return _hf_dataset(path[len("hf://"):], split, fmt)
    produced = _stage_output(path, split, fmt)
    if produced is not None:
        return produced
    if storage.is_s3(path):
        return _expand_s3(path, split, fmt)
    p = storage.local_path(path).expanduser()
    if any(ch in str(p) for ch in "*?["):
        matches = sorted(glob.glob(str(p), recursive=True))
        files = [Path(m) for m in matches if Path(m).is_file() and supported(m)]
        if not files:
            raise InputError(f"Source {path!r} matches no supported files ({ALSO})")
    elif p.is_dir():
        skipped: list[str] = []
        files = _folder(p, skipped)
        _left_out(str(p), skipped)
        if not files:
            raise InputError(f"Folder {p} holds no supported files ({ALSO})")
    elif p.is_file():
        if not supported(p.name):
            raise InputError(f"{p}: unsupported file type; expected one of {ALSO}")
        files = [p]
    else:
        raise InputError(f"Source {path!r} does not exist")
    return [RawFile(uri=str(f.resolve()), size=f.stat().st_size, split=split, format=fmt, local=f) for f in files]


# datasets.save_to_disk writes these beside its .arrow files: its own bookkeeping, never rows.
SAVE_TO_DISK = ("state.json", "dataset_info.json", "dataset_dict.json")


def _left_out(where: str, names: list[str]) -> None:
    """Say which files of a folder or prefix are not read (a .jsonl.lz4 beside .jsonl files is data left out)."""
    if names:
        LOG.warning("%s: %d file%s of types prepare does not read left out: %s%s (it reads %s)", where, len(names),
                    "s" * (len(names) != 1), ", ".join(names[:5]), ", ..." if len(names) > 5 else "", ALSO,
                    extra={"source": where, "left_out": names[:100]})


def _folder(p: Path, skipped: list[str]) -> list[Path]:
    """A folder's data files: a `datasets.save_to_disk` folder's .arrow files in its order, a saved DatasetDict's
    `train` split (as axolotl's `split: train` reads it; its other splits are a source of their own:
    DIR/test), else every supported file below it, save_to_disk folders below it read the same way."""
    if (p / "state.json").exists():
        names = [d["filename"] for d in json.loads((p / "state.json").read_text()).get("_data_files", [])]
        return [p / n for n in names]
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits") or []
        if "train" not in splits:
            raise InputError(f"{p} is a saved DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                             f"give the split to read as the source, e.g. {p / (splits[0] if splits else 'SPLIT')}")
        others = [x for x in splits if x != "train"]
        if others:
            LOG.info("%s is a saved DatasetDict: reading its train split; %s not read (give %s as a source, with "
                     "split: eval, to use it)", p, ", ".join(others), p / others[0])
        return _folder(p / "train", skipped)
    out: list[Path] = []
    for entry in sorted(p.iterdir()):
        if entry.name.startswith(".") or entry.name in SAVE_TO_DISK:
            continue
        if entry.is_dir():
            if not entry.is_symlink():  # as rglob: linked folders are not followed (no loops)
                out += _folder(entry, skipped)
        elif entry.is_file():
            (out.append(entry) if supported(entry.name) else skipped.append(entry.name))
    return out


def _stage_output(path: str, split: str, fmt: str | None) -> list[RawFile] | None:
    """A synth manifest (or the prefix that holds one): its data artifact. None when `path` is raw data. A
    prefix whose manifest.json is not a ftjobs manifest is raw data as before; another stage's is refused."""
    from common import manifest as mf

    named = path.rstrip("/").endswith("/" + mf.MANIFEST_NAME) or path == mf.MANIFEST_NAME
    uri = mf.as_manifest_uri(path) if named else mf.manifest_uri(path)
    if not named and (any(ch in path for ch in "*?[") or supported(path) or not storage.exists(uri)):
        return None
    try:
        loaded = mf.load(uri, verify="size")
    except InputError:
        if named:
            raise
        return None
    if loaded.manifest.stage != "synth":
        raise InputError(f"Source {path} is the output of `{mf.PRODUCER.get(loaded.manifest.stage)}`; prepare "
                         "reads raw data, or a synth manifest (the examples it generated)")
    art = loaded.manifest.artifact("data")
    # Generated examples train; the held-out comparison stays on real data unless a split is asked for.
    return [RawFile(uri=loaded.resolve(art), size=art.bytes, split="train" if split == "auto" else split,
                    format=fmt, manifest=loaded)]


def _expand_s3(path: str, split: str, fmt: str | None) -> list[RawFile]:
    if any(ch in path for ch in "*?["):
        base = path[: min(path.index(ch) for ch in "*?[" if ch in path)]
        base = base.rsplit("/", 1)[0]
        objs = [o for o in storage.list_objects(base) if fnmatch.fnmatchcase(o.uri, path)]
    elif supported(path) and storage.exists(path):
        return [RawFile(uri=path, size=storage.size(path), split=split, format=fmt)]
    else:
        objs = _saved_split(path.rstrip("/"), list(storage.list_objects(path)))
    names = [o.uri.rsplit("/", 1)[-1] for o in objs]
    files = [RawFile(uri=o.uri, size=o.size, split=split, format=fmt) for o, name in zip(objs, names, strict=True)
             if supported(name) and name not in SAVE_TO_DISK]
    _left_out(path, [n for n in names if not supported(n) and not n.startswith(".") and n not in SAVE_TO_DISK])
    if not files:
        raise InputError(f"No supported files under {path} ({ALSO})")
    return files


def _saved_split(prefix: str, objs: list[Any]) -> list[Any]:
    """The objects of a prefix; of a saved DatasetDict there, those of its train split (as `_folder`)."""
    if not any(o.uri == f"{prefix}/dataset_dict.json" for o in objs):
        return objs
    splits = storage.read_json(f"{prefix}/dataset_dict.json").get("splits") or []
    if "train" not in splits:
        raise InputError(f"{prefix} is a saved DatasetDict without a 'train' split (splits: {', '.join(splits)}); "
                         f"give the split to read as the source, e.g. {prefix}/{splits[0] if splits else 'SPLIT'}/")
    return [o for o in objs if o.uri.startswith(f"{prefix}/train/")]


def _hf_dataset(spec: str, split: str, fmt: str | None) -> list[RawFile]:
    name, _, hf_split = spec.partition("@")
    try:
        import datasets

        ds = datasets.load_dataset(name, split=hf_split or "train")
    except Exception as exc:  # no such dataset: exit 3; the Hub unreachable: exit 1, worth a retry
        raise models.hub_error(exc, "dataset", name, "Without the Hub, save it with `datasets.Dataset."
                               "save_to_disk(DIR)` elsewhere and pass DIR (or its .arrow files).") from None
    files = [Path(f["filename"]) for f in ds.cache_files]
    if not files:
        raise InputError(f"Hugging Face dataset {name!r} has no cache files to read")
    return [RawFile(uri=str(f), size=f.stat().st_size, split=split, format=fmt, local=f) for f in files]


def fetch(files: list[RawFile], workdir: Path) -> None:
    """Give every file a local path and its sha256 (S3 objects are downloaded, hashed while streaming)."""
    from common import manifest as mf

    for i, f in enumerate(files):
        if f.manifest is not None:  # a synth data set: its bytes must be the ones its manifest recorded
            art = f.manifest.manifest.artifact("data")
            f.local = mf.fetch_artifact(f.manifest, art, workdir / f"{i:05d}-{f.uri.rsplit('/', 1)[-1]}")
            f.sha256 = art.sha256
        elif f.local is None:
            t = storage.download_file(f.uri, workdir / f"{i:05d}-{f.uri.rsplit('/', 1)[-1]}")
            f.local, f.sha256 = Path(t.path), t.sha256
        else:
            f.sha256 = storage.sha256_file(f.local)


# --------------------------------------------------------------------------- reading


def records(f: RawFile, *, max_line_bytes: int, undecoded: bool = False
            ) -> Iterator[tuple[int, dict[str, Any] | bytes | Bad]]:
    """Stream one file's records as (line or row number, record | Bad); `f.pos` follows the bytes read.

    With `undecoded`, JSON lines come undecoded (bytes, BOM and blank lines already dealt with) for the caller to
    decode with `parse_json_line`, possibly in another process; other files still yield records."""
    try:
        if f.kind in ("parquet", "arrow"):
            total = total_rows(f)
            for i, item in enumerate(_table(f, max_line_bytes)):
                if total and i % 1024 == 0:
                    f.pos = f.size * i // total
                yield item
            return
        assert f.local is not None
        with open(f.local, "rb") as raw:
            fh = _open_compressed(raw, f.uri)
            gen: Iterator[tuple[int, dict[str, Any] | bytes | Bad]]
            if f.kind in ("jsonl", "json"):
                gen = J.read_json(fh, f.uri, max_line_bytes, undecoded, lines_only=f.kind == "jsonl")
            else:
                gen = _csv(fh, "\t" if f.kind == "tsv" else ",", max_line_bytes)
            for i, read in enumerate(gen):
                if i % 1024 == 0:
                    f.pos = raw.tell()
                yield read
        f.pos = f.size
    except (EOFError, zlib.error, lzma.LZMAError, OSError) as exc:  # bz2's and pyarrow's zstd's are OSErrors
        if isinstance(exc, OSError) and compression(f.uri)[1] is None:
            raise
        raise InputError(f"{f.uri}: compressed data is truncated or corrupt ({exc}); re-create the file") from None


def _csv(fh: IO[bytes], delimiter: str, max_line_bytes: int) -> Iterator[tuple[int, dict[str, Any] | Bad]]:
    csv.field_size_limit(max(max_line_bytes, 1 << 17))
    lines = limits.BoundedLines(fh, max_line_bytes)  # a record over max_line_bytes is never held whole
    try:
        header = next(lines, "")
    except limits.RowTooLong as exc:
        yield exc.line, Bad("line_too_long", f"the CSV header is longer than max_line_bytes ({max_line_bytes:,} "
                            "bytes)")
        return
    delimiter = csv_delimiter(header, delimiter)
    # "instruction, output": a space after every delimiter of the header is the file's style, not data
    spaced = header.count(delimiter + " ") == header.count(delimiter) > 0
    reader = csv.DictReader(itertools.chain([header], lines), delimiter=delimiter, skipinitialspace=spaced)
    try:
        if reader.fieldnames:
            reader.fieldnames = [name.strip() for name in reader.fieldnames]
    except (csv.Error, limits.RowTooLong) as exc:
        yield lines.line_num, Bad("invalid_csv", f"the CSV header cannot be read ({_csv_error(exc)})")
        return
    while True:
        lines.start_record()
        try:
            row = next(reader)
        except StopIteration:
            return
        except limits.RowTooLong as exc:
            yield exc.line, Bad("line_too_long", f"CSV record is longer than max_line_bytes ({max_line_bytes:,} "
                                "bytes)")
            if reader.fieldnames is None:  # the header itself: nothing after it can be read
                return
            reader = csv.DictReader(lines, fieldnames=reader.fieldnames, delimiter=delimiter, skipinitialspace=spaced)
            continue
        except csv.Error as exc:
            yield lines.line_num, Bad("invalid_csv", f"CSV error: {_csv_error(exc)}")
            continue
        n = lines.line_num
        if None in row:
            yield n, Bad("invalid_csv", f"{len(reader.fieldnames or []) + len(row[None])} fields; the header has "
                         f"{len(reader.fieldnames or [])}")
            continue
        bad = False
        for key, value in row.items():
            if isinstance(value, str):
                try:
                    value.encode("utf-8")
                except UnicodeEncodeError as exc:  # a byte that is not UTF-8 came in as a lone surrogate
                    byte = ord(exc.object[exc.start]) - 0xDC00
                    yield n, Bad("invalid_utf8", f"invalid UTF-8: column {key!r} holds the byte 0x{byte & 0xFF:02x} "
                                 "(a Latin-1 or Windows-1252 file? re-save it as UTF-8)")
                    bad = True
                    break
        if not bad:
            yield n, row


def _csv_error(exc: BaseException) -> str:
    if "new-line character seen in unquoted field" in str(exc):  # the csv module's words for \r-only lines
        return "lines end in a bare carriage return (old Mac style); convert the line ends to \\n or \\r\\n"
    return str(exc)


def csv_delimiter(header: str, default: str) -> str:
    """A .csv file's delimiter, read off its header: a comma, unless the header has none but semicolons (Excel
    in locales whose decimal mark is a comma) or tabs (a TSV file named .csv). A .tsv file is tab-separated."""
    if default != "," or "," in header:
        return default
    return ";" if ";" in header else "\t" if "\t" in header else ","


def _table(f: RawFile, max_line_bytes: int) -> Iterator[tuple[int, dict[str, Any] | Bad]]:
    """Rows of a Parquet or Arrow file; a row over max_line_bytes is a Bad line, never converted to Python
    (limits.py: Parquet row groups that certainly hold one are not even decompressed)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert f.local is not None
    n = 0
    try:
        groups: list[tuple[Iterator[Any] | None, int]]  # (batches, rows): None for a refused row group
        if f.kind == "parquet":
            pf = pq.ParquetFile(f.local)
            oversized = limits.oversized_groups(pf, max_line_bytes)
            groups = [(None if g in oversized else pf.iter_batches(batch_size=1024, row_groups=[g]),
                       pf.metadata.row_group(g).num_rows) for g in range(pf.metadata.num_row_groups)]
        else:
            groups = [(iter(_arrow_reader(f.local)), 0)]
        for batches, rows in groups:
            if batches is None:
                detail = (f"rows {n + 1:,}-{n + rows:,} (a row group) average more than max_line_bytes "
                          f"({max_line_bytes:,} bytes) each, uncompressed; not read")
                for _ in range(rows):
                    n += 1
                    yield n, Bad("line_too_long", detail)
                continue
            for row, rec, size in limits.table_records(batches, n, max_line_bytes):
                n = row
                yield n, rec if rec is not None else Bad(
                    "line_too_long", f"row {n:,} holds {size:,} bytes, more than max_line_bytes "
                    f"({max_line_bytes:,} bytes)")
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(f, exc, after=n) from None


def _unreadable(f: RawFile, exc: BaseException, after: int | None = None) -> InputError:
    kind = {"parquet": "Parquet", "arrow": "Arrow"}.get(f.kind, f.kind)
    where = f" after row {after:,}" if after else ""
    return InputError(f"{f.uri}: not a readable {kind} file{where} ({exc}). Is it truncated, or not {kind} at all? "
                      "Re-create it (or give it the extension of its real format).")


def _arrow_reader(path: Path) -> Any:
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(str(path)))


def table_columns(f: RawFile) -> list[str] | None:
    """Column names of a table file (None for JSON/CSV, whose keys are per record)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if f.kind == "parquet":
            return list(pq.ParquetFile(f.local).schema_arrow.names)
        if f.kind == "arrow":
            return list(_arrow_reader(f.local).schema.names)  # type: ignore[arg-type]
    except (pa.ArrowException, OSError) as exc:
        raise _unreadable(f, exc) from None
    return None


def total_rows(f: RawFile) -> int | None:
    """Row count when the file says so cheaply (Parquet metadata)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if f.kind == "parquet":
        try:
            return int(pq.ParquetFile(f.local).metadata.num_rows)
        except (pa.ArrowException, OSError) as exc:
            raise _unreadable(f, exc) from None
    return None
