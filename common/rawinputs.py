"""Raw input files (infer's prompts, synth's seeds) read once: hashed while they are fetched, parsed from that copy.

A raw file's sha256 is part of the run's identity, so it is needed before the "already done" check, and its
rows are needed later, in the work. Hashing the source and then reading it again costs two reads (two
downloads from S3) and, worse, lets the file change in between: the manifest would record one set of bytes
and the run would use another. `fetch` copies the source once into a private folder of this process,
hashing as it streams (S3 objects as they download, local files as they are copied), and the work parses
that copy (`local_copy(uri, sha256)`): the bytes parsed are the bytes recorded. The copies go when the
process ends.
"""

from __future__ import annotations

import atexit
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path

from common import storage
from common.errors import ChecksumError, InputError

_lock = threading.Lock()
_copies: dict[tuple[str, str], Path] = {}  # (uri, sha256) -> the private copy holding exactly those bytes
_folder: list[Path] = []


@dataclass(frozen=True)
class Fetched:
    """A raw file's private local copy and the sha256 of its bytes."""

    uri: str
    path: Path
    sha256: str


def fetch(uri: str, what: str = "Input file") -> Fetched:
    """Copy the file at `uri` (one read, hashed while it streams); a missing file is an InputError naming it."""
    with _lock:
        dest = _private_folder() / f"{len(_copies):05d}-{uri.rstrip('/').rsplit('/', 1)[-1]}"
    try:
        t = storage.download_file(uri, dest)  # local sources too: copied and hashed in one pass
    except (FileNotFoundError, IsADirectoryError):
        raise InputError(f"{what} {uri} does not exist") from None
    with _lock:
        _copies[(uri, t.sha256)] = Path(t.path)
    return Fetched(uri=uri, path=Path(t.path), sha256=t.sha256)


def local_copy(uri: str, sha256: str, what: str = "Input file") -> Path:
    """The copy of `uri` whose bytes have this sha256: the one `fetch` made, or a fresh fetch that must match."""
    with _lock:
        path = _copies.get((uri, sha256))
    if path is not None and path.is_file():
        return path
    fetched = fetch(uri, what)
    if fetched.sha256 != sha256:
        raise ChecksumError(f"{what} {uri} changed since this run recorded it (sha256 {fetched.sha256[:12]}..., "
                            f"recorded {sha256[:12]}...). Re-run to use the new file.")
    return fetched.path


def _private_folder() -> Path:
    if not _folder:
        _folder.append(Path(tempfile.mkdtemp(prefix="ftjobs-raw-")))
        atexit.register(shutil.rmtree, _folder[0], True)
    return _folder[0]
