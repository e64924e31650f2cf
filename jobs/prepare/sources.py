"""Raw inputs: expand sources into files, fetch and hash them, stream records.

A source is a file, a folder, a glob, an `s3://` object or prefix, a
`datasets.save_to_disk` folder (its `.arrow` files), or `hf://<dataset id>`
(optionally `@split`) when the Hugging Face Hub is reachable. Supported
files: `.jsonl`/`.ndjson`, `.json` (an array, or JSON lines), `.csv`, `.tsv`,
`.parquet`, `.arrow`; the text formats may be gzipped (`.gz`). A synth manifest (its URI, or the prefix
that holds it) stands for the data set it published: its `data` artifact, sha256-checked, and the manifest
is the run's input, so the lineage goes on through synth to its seeds and teacher. Its rows go to the train
split (unless the source says otherwise): the held-out comparison stays on real data.

Readers stream: JSON lines are read one at a time (up to `max_line_bytes`),
JSON arrays are decoded element by element, tables batch by batch. A reader
yields `(line, record)`; a line that cannot be read yields `(line, Bad)` and
the caller decides (fatal unless `skip_bad_lines`). Whatever fails while a
line is decoded and parsed (bad UTF-8, bad JSON, nesting deeper than Python's
recursion limit, strings holding lone UTF-16 surrogates such as `\ud800`,
which are not text) is a Bad line, never a crash; a leading UTF-8 byte-order
mark is skipped.
"""

from __future__ import annotations

import csv
import fnmatch
import glob
import gzip
import io
import itertools
import json
import logging
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from common import models, storage
from common.errors import InputError
from jobs.prepare import limits

LOG = logging.getLogger(__name__)

KINDS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
         ".parquet": "parquet", ".arrow": "arrow"}
READ_CHUNK = 1 << 20
BOM = b"\xef\xbb\xbf"
# A \uD800-\uDFFF escape: JSON allows it, but alone (not as half of a pair) it decodes to no character.
SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass
class Bad:
    """A line that could not be read as a record."""

    reason: str
    detail: str
    preview: str = ""


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
    name = uri.rsplit("/", 1)[-1].lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for ext, kind in KINDS.items():
        if name.endswith(ext):
            return kind
    return ""


def supported(uri: str) -> bool:
    k = kind_of(uri)
    return bool(k) and not (uri.lower().endswith(".gz") and k in ("parquet", "arrow"))


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
            raise InputError(f"Source {path!r} matches no supported files ({', '.join(KINDS)}, also .gz)")
    elif p.is_dir():
        files = _folder(p)
        if not files:
            raise InputError(f"Folder {p} holds no supported files ({', '.join(KINDS)}, also .gz)")
    elif p.is_file():
        if not supported(p.name):
            raise InputError(f"{p}: unsupported file type; expected one of {', '.join(KINDS)} (optionally .gz)")
        files = [p]
    else:
        raise InputError(f"Source {path!r} does not exist")
    return [RawFile(uri=str(f.resolve()), size=f.stat().st_size, split=split, format=fmt, local=f) for f in files]


# datasets.save_to_disk writes these beside its .arrow files: its own bookkeeping, never rows.
SAVE_TO_DISK = ("state.json", "dataset_info.json", "dataset_dict.json")


def _folder(p: Path) -> list[Path]:
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
        return _folder(p / "train")
    out: list[Path] = []
    for entry in sorted(p.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            if not entry.is_symlink():  # as rglob: linked folders are not followed (no loops)
                out += _folder(entry)
        elif entry.is_file() and supported(entry.name) and entry.name not in SAVE_TO_DISK:
            out.append(entry)
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
        objs = list(storage.list_objects(path))
    files = [RawFile(uri=o.uri, size=o.size, split=split, format=fmt) for o in objs if supported(o.uri)]
    if not files:
        raise InputError(f"No supported files under {path} ({', '.join(KINDS)}, also .gz)")
    return files


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
            fh: IO[bytes] = gzip.GzipFile(fileobj=raw, mode="rb") if f.uri.lower().endswith(".gz") else raw  # type: ignore[assignment]
            gen: Iterator[tuple[int, dict[str, Any] | bytes | Bad]]
            if f.kind in ("jsonl", "json"):
                gen = _json(fh, f, max_line_bytes, undecoded, lines_only=f.kind == "jsonl")
            else:
                gen = _csv(fh, "\t" if f.kind == "tsv" else ",", max_line_bytes)
            for i, read in enumerate(gen):
                if i % 1024 == 0:
                    f.pos = raw.tell()
                yield read
        f.pos = f.size
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise InputError(f"{f.uri}: compressed data is truncated or corrupt ({exc}); re-create the file") from None


def _jsonl(fh: IO[bytes], max_line_bytes: int, undecoded: bool = False
           ) -> Iterator[tuple[int, dict[str, Any] | bytes | Bad]]:
    n = 0
    while True:
        line = fh.readline(max_line_bytes + 1)
        if not line:
            return
        n += 1
        if n == 1 and line.startswith(BOM):  # files saved on Windows: pandas and datasets read them too
            line = line[len(BOM):]
        if len(line) > max_line_bytes:
            while line and not line.endswith(b"\n"):  # skip the rest of the long line
                line = fh.readline(READ_CHUNK)
            yield n, Bad("line_too_long", f"line is longer than max_line_bytes ({max_line_bytes:,} bytes)")
            continue
        if not line.strip():
            continue
        yield n, line if undecoded else parse_json_line(line)


def parse_json_line(line: bytes) -> dict[str, Any] | Bad:
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Bad("invalid_utf8", f"invalid UTF-8 at byte {exc.start} ({exc.reason})",
                   line[:200].decode("utf-8", "replace"))
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        hint = ("; a comma after the object? JSON lines have none" if exc.msg == "Extra data"
                and text.rstrip().endswith(",") else "")
        return Bad("invalid_json", f"not valid JSON: {exc.msg} at column {exc.colno}{hint}", text[:200])
    except RecursionError:
        return Bad("invalid_json", "JSON nested deeper than Python's recursion limit", text[:200])
    except Exception as exc:  # noqa: BLE001 - whatever else json raises on a line is that line's fault
        return Bad("invalid_json", f"not readable JSON ({type(exc).__name__}: {exc})", text[:200])
    if not isinstance(obj, dict):
        return Bad("invalid_json", f"a JSON {type(obj).__name__}, expected an object per line", text[:200])
    return _text_only(obj, text) or obj


def _text_only(obj: Any, text: str) -> Bad | None:
    """Bad when a decoded string holds a lone surrogate (from an escape such as \\ud800): not encodable text."""
    if not SURROGATE_ESCAPE.search(text):  # pairs such as \\ud83d\\ude00 decode to one character: fine
        return None
    try:
        json.dumps(obj, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as exc:
        bad = ord(exc.object[exc.start])
        return Bad("invalid_unicode", f"a JSON string holds a lone UTF-16 surrogate (\\u{bad:04x}), "
                   "which is not text; fix the producer of this file", text[:200].encode("utf-8", "replace")
                   .decode("utf-8"))
    except RecursionError:
        return Bad("invalid_json", "JSON nested deeper than Python's recursion limit", "")
    return None


# Keys a record of some format has (the default column names): a top-level object with one of them is a record,
# never a wrapper around records.
RECORD_KEYS = frozenset({"messages", "conversations", "history", "prompt", "completion", "tools", "functions",
                         "chosen", "rejected", "preferred_output", "non_preferred_output", "instruction", "input",
                         "output", "system", "text"})


def wrapped(obj: dict[str, Any]) -> str | None:
    """The key of a wrapper object's records ({"data": [...]}, {"version": 1, "rows": [...]}), as datasets'
    `field` names it: its one array of objects, when it has no key a record has. None for a record."""
    if RECORD_KEYS & obj.keys():
        return None
    lists = [k for k, v in obj.items() if isinstance(v, list) and all(isinstance(x, dict) for x in v)]
    return lists[0] if len(lists) == 1 else None


def _json(fh: IO[bytes], f: RawFile, max_line_bytes: int, undecoded: bool = False, lines_only: bool = False
          ) -> Iterator[tuple[int, dict[str, Any] | bytes | Bad]]:
    """A JSON array decoded element by element; a JSON object wrapping one (`wrapped`), its array decoded the
    same way; a file of JSON lines named .json is read as lines (a line that is a wrapper gives its records).
    With `lines_only` (a .jsonl file) only an array is looked for (as `datasets` reads one, whatever the name)."""
    buffered = fh if isinstance(fh, io.BufferedReader) else io.BufferedReader(fh)  # type: ignore[type-var]
    head = buffered.peek(4096)[:4096].lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if lines_only and not head.startswith(b"["):
        yield from _jsonl(buffered, max_line_bytes, undecoded)
        return
    first_line = head.split(b"\n", 1)[0] if b"\n" in head else None
    if head.startswith(b"[") or (first_line is not None and head.startswith(b"{")
                                 and not isinstance(parse_json_line(first_line), dict)):
        yield from _JsonStream(buffered, f, max_line_bytes).top()  # one value over several lines
        return
    lines = _jsonl(buffered, max_line_bytes, undecoded=True)  # JSON lines; the first says if they are wrappers
    first = next(lines, None)
    if first is None:
        return
    head_rec = record_of(first[1])
    if not (isinstance(head_rec, dict) and wrapped(head_rec)):
        for line, item in itertools.chain([first], lines):
            yield line, item if undecoded else record_of(item)
        return
    for line, item in itertools.chain([first], lines):  # each line a wrapper ({"data": [...]}): its records
        rec = record_of(item)
        key = wrapped(rec) if isinstance(rec, dict) else None
        if key is None or not isinstance(rec, dict):
            yield line, rec
        else:
            for element in rec[key]:
                yield line, element


def record_of(item: dict[str, Any] | bytes | Bad) -> dict[str, Any] | Bad:
    return parse_json_line(item) if isinstance(item, bytes) else item


def _not_an_object(value: Any, where: str) -> Bad:
    return Bad("invalid_json", f"{where} element is a JSON {type(value).__name__}, expected an object")


class _JsonStream:
    """One JSON value read from a stream piece by piece: an array of records element by element, or an object
    (pretty-printed, several lines) whose array of records is read so (`wrapped`) and whose other values are
    decoded whole (up to max_line_bytes each)."""

    def __init__(self, buffered: IO[bytes], f: RawFile, max_line_bytes: int):
        self.text = io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="strict")
        self.f, self.max_line_bytes = f, max_line_bytes
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.line = "", 0, 1

    def top(self) -> Iterator[tuple[int, dict[str, Any] | Bad]]:
        self.skip_ws()
        if self.buf[self.pos] == "[":
            yield from self.array("array")
        else:
            yield from self.wrapper()

    def fail(self, line: int, what: str) -> InputError:
        return InputError(f"{self.f.uri} line {line}: {what}; a JSON file cannot be read past it. Fix the file or "
                          "convert it to JSON lines (then skip_bad_lines can drop bad lines).")

    def more(self) -> bool:
        try:
            chunk = self.text.read(READ_CHUNK)
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.f.uri} near line {self.line}: invalid UTF-8 ({exc.reason}); a JSON array cannot "
                             "be read past it. Fix the encoding or convert the file to JSON lines.") from None
        if not chunk:
            return False
        self.buf = self.buf[self.pos:] + chunk
        self.pos = 0
        return True

    def skip_ws(self) -> None:
        while True:
            buf, pos = self.buf, self.pos
            while pos < len(buf) and buf[pos] in " \t\r\n":
                self.line += buf[pos] == "\n"
                pos += 1
            self.pos = pos
            if pos < len(buf) or not self.more():
                return

    def peek(self, n: int) -> str:
        """The next n characters that are not whitespace (fewer at the end of the file), none consumed."""
        out, j = "", self.pos
        while len(out) < n:
            if j >= len(self.buf):
                j -= self.pos
                if not self.more():
                    break
                j += self.pos
                continue
            if self.buf[j] not in " \t\r\n":
                out += self.buf[j]
            j += 1
        return out

    def no_trailing_comma(self, closing: str) -> None:
        if self.peek(1) == closing:  # JavaScript and Python allow it, JSON does not: say so, not "Expecting value"
            raise InputError(f"{self.f.uri} line {self.line}: a comma before the closing {closing!r}; JSON allows no "
                             "trailing comma. Remove it.")

    def expect(self, chars: str, where: str) -> str:
        self.skip_ws()
        if self.pos >= len(self.buf):
            raise InputError(f"{self.f.uri} line {self.line}: the JSON {where} is truncated")
        ch = self.buf[self.pos]
        if ch not in chars:
            raise InputError(f"{self.f.uri} line {self.line}: expected {' or '.join(map(repr, chars))} in the JSON "
                             f"{where}, got {ch!r}")
        self.pos += 1
        return ch

    def value(self) -> tuple[int, Any, str]:
        """The next JSON value, whole: (its first line, it, its text)."""
        self.skip_ws()
        start = self.line
        while True:
            try:
                obj, end = self.decoder.raw_decode(self.buf, self.pos)
                break
            except RecursionError:
                raise self.fail(start, "an element is nested deeper than Python's recursion limit") from None
            except json.JSONDecodeError as exc:
                if len(self.buf) - self.pos > self.max_line_bytes:
                    raise InputError(f"{self.f.uri} line {start}: an array element is longer than max_line_bytes "
                                     f"({self.max_line_bytes:,}); raise it or split the record") from None
                if not self.more():
                    raise self.fail(start + exc.lineno - 1, f"not valid JSON ({exc.msg})") from None
        self.line += self.buf.count("\n", self.pos, end)
        text, self.pos = self.buf[self.pos:end], end
        return start, obj, text

    def array(self, where: str) -> Iterator[tuple[int, dict[str, Any] | Bad]]:
        """The elements of the array that starts here, one by one."""
        self.expect("[", where)
        self.skip_ws()
        if self.pos < len(self.buf) and self.buf[self.pos] == "]":
            self.pos += 1
            return
        while True:
            line, obj, text = self.value()
            yield line, (_text_only(obj, text) or obj) if isinstance(obj, dict) else _not_an_object(obj, where)
            if self.expect(",]", "array") == "]":
                return
            self.no_trailing_comma("]")

    def wrapper(self) -> Iterator[tuple[int, dict[str, Any] | Bad]]:
        """A top-level object: its one array of records streamed, or (no such array) the object as one record."""
        start = self.line
        self.expect("{", "object")
        record: dict[str, Any] = {}
        found: str | None = None
        self.skip_ws()
        if self.pos < len(self.buf) and self.buf[self.pos] == "}":
            self.pos += 1
        else:
            while True:
                _, key, _ = self.value()
                if not isinstance(key, str):
                    raise self.fail(self.line, "an object key is not a string")
                self.expect(":", "object")
                if found is None and key not in RECORD_KEYS and not RECORD_KEYS & record.keys() \
                        and self.peek(2) in ("[{", "[]"):
                    found = key
                    yield from self.array(f"{key!r} array")
                else:
                    record[key] = self.value()[1]
                if self.expect(",}", "object") == "}":
                    break
                self.no_trailing_comma("}")
        if found is not None and record and wrapped({found: [], **record}) != found:
            raise InputError(f"{self.f.uri}: a JSON object holding records under {found!r} and more data beside "
                             f"them ({', '.join(record)}); give the records as a JSON array or JSON lines")
        if found is None:
            yield start, record
        self.skip_ws()
        if self.pos < len(self.buf):
            raise InputError(f"{self.f.uri} line {self.line}: more JSON after the top-level object; give one JSON "
                             "array, one object, or JSON lines (one object per line)")


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
            reader = csv.DictReader(lines, fieldnames=reader.fieldnames, delimiter=delimiter)
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
