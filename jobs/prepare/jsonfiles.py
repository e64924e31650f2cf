"""Reading JSON files: JSON lines, a JSON array, or an object wrapping one (`{"data": [...]}`).

Readers stream: JSON lines are read one at a time (up to `max_line_bytes`), arrays element by element (a
broken element stops the file: nothing after it can be found), the values of a wrapper object one by one.
A reader yields `(line, record)`; a line that cannot be read yields `(line, Bad)` and the caller decides
(fatal unless `skip_bad_lines`). Whatever fails while a line is decoded and parsed (bad UTF-8, bad JSON,
nesting deeper than Python's recursion limit, strings holding lone UTF-16 surrogates such as `\ud800`, which
are not text) is a Bad line, never a crash; a leading UTF-8 byte-order mark is skipped.
"""

from __future__ import annotations

import io
import itertools
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from common.errors import InputError

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


def read_lines(fh: IO[bytes], max_line_bytes: int, undecoded: bool = False
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


def read_json(fh: IO[bytes], uri: str, max_line_bytes: int, undecoded: bool = False, lines_only: bool = False
          ) -> Iterator[tuple[int, dict[str, Any] | bytes | Bad]]:
    """A JSON array decoded element by element; a JSON object wrapping one (`wrapped`), its array decoded the
    same way; a file of JSON lines named .json is read as lines (a line that is a wrapper gives its records).
    With `lines_only` (a .jsonl file) only an array is looked for (as `datasets` reads one, whatever the name)."""
    buffered = fh if isinstance(fh, io.BufferedReader) else io.BufferedReader(fh)  # type: ignore[type-var]
    head = buffered.peek(4096)[:4096].lstrip()
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    if lines_only and not head.startswith(b"["):
        yield from read_lines(buffered, max_line_bytes, undecoded)
        return
    first_line = head.split(b"\n", 1)[0] if b"\n" in head else None
    if head.startswith(b"[") or (first_line is not None and head.startswith(b"{")
                                 and not isinstance(parse_json_line(first_line), dict)):
        yield from _JsonStream(buffered, uri, max_line_bytes).top()  # one value over several lines
        return
    lines = read_lines(buffered, max_line_bytes, undecoded=True)  # JSON lines; the first says if they are wrappers
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

    def __init__(self, buffered: IO[bytes], uri: str, max_line_bytes: int):
        self.text = io.TextIOWrapper(buffered, encoding="utf-8-sig", errors="strict")
        self.uri, self.max_line_bytes = uri, max_line_bytes
        self.decoder = json.JSONDecoder()
        self.buf, self.pos, self.line = "", 0, 1

    def top(self) -> Iterator[tuple[int, dict[str, Any] | Bad]]:
        self.skip_ws()
        if self.buf[self.pos] == "[":
            yield from self.array("array")
        else:
            yield from self.wrapper()

    def fail(self, line: int, what: str) -> InputError:
        return InputError(f"{self.uri} line {line}: {what}; a JSON file cannot be read past it. Fix the file or "
                          "convert it to JSON lines (then skip_bad_lines can drop bad lines).")

    def more(self) -> bool:
        try:
            chunk = self.text.read(READ_CHUNK)
        except UnicodeDecodeError as exc:
            raise InputError(f"{self.uri} near line {self.line}: invalid UTF-8 ({exc.reason}); a JSON file cannot "
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
            raise InputError(f"{self.uri} line {self.line}: a comma before the closing {closing!r}; JSON allows no "
                             "trailing comma. Remove it.")

    def expect(self, chars: str, where: str) -> str:
        self.skip_ws()
        if self.pos >= len(self.buf):
            raise InputError(f"{self.uri} line {self.line}: the JSON {where} is truncated")
        ch = self.buf[self.pos]
        if ch not in chars:
            raise InputError(f"{self.uri} line {self.line}: expected {' or '.join(map(repr, chars))} in the JSON "
                             f"{where}, got {ch!r}")
        self.pos += 1
        return ch

    def too_long(self, line: int) -> InputError:
        return InputError(f"{self.uri} line {line}: a JSON value is longer than max_line_bytes "
                          f"({self.max_line_bytes:,}); raise it or split the record")

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
                    raise self.too_long(start) from None
                if not self.more():
                    raise self.fail(start + exc.lineno - 1, f"not valid JSON ({exc.msg})") from None
        if end - self.pos > self.max_line_bytes:  # whole in the buffer, but over the limit all the same
            raise self.too_long(start)
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
            raise InputError(f"{self.uri}: a JSON object holding records under {found!r} and more data beside "
                             f"them ({', '.join(record)}); give the records as a JSON array or JSON lines")
        if found is None:
            yield start, record
        self.skip_ws()
        if self.pos < len(self.buf):
            raise InputError(f"{self.uri} line {self.line}: more JSON after the top-level object; give one JSON "
                             "array, one object, or JSON lines (one object per line)")
