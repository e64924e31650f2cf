"""One small interface over S3-compatible object stores and local folders.

A location is a URI: `s3://bucket/key...` (AWS S3, MinIO, any S3-compatible
store; endpoint from `S3_ENDPOINT_URL` or `AWS_ENDPOINT_URL`), or a local
path / `file://` URI (the embedded default, no server needed).

Every function takes URIs, so jobs never care which backend they talk to.
Writes are atomic on both: S3 objects appear whole, local files are written
to a temporary name and renamed. `put_if_absent` is a create-only write
(`If-None-Match: *` on S3, a hard link on local disks) that raises
`AlreadyExistsError` when the object is already there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any
from urllib.parse import unquote, urlparse

from common.errors import AlreadyExistsError, ConfigError, FtjobsError, InputError

CHUNK = 8 * 1024 * 1024
# Parallel, multipart transfers: 16 MiB parts, 8 parts in flight per file, and
# up to 8 files at once for folders. Tuned on loopback and S3 alike: bigger
# parts cut request overhead; more than ~8 streams per file stops paying off.
MULTIPART_THRESHOLD = 16 * 1024 * 1024
MULTIPART_CHUNKSIZE = 16 * 1024 * 1024
MAX_CONCURRENCY = 8
FILE_WORKERS = 8


@dataclass(frozen=True)
class ObjectInfo:
    """One listed object: its URI, its key relative to the listed prefix, and its size."""

    uri: str
    rel: str
    size: int


@dataclass(frozen=True)
class Transferred:
    """What one file transfer moved: where, how many bytes, and their sha256."""

    uri: str
    path: str
    rel: str
    size: int
    sha256: str


# --------------------------------------------------------------------------- URIs


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """`s3://bucket/a/b` -> (`bucket`, `a/b`)."""
    parsed = urlparse(uri)
    if parsed.scheme != "s3" or not parsed.netloc:
        raise ConfigError(f"Not an S3 URI: {uri!r}: expected s3://bucket/key")
    return parsed.netloc, parsed.path.lstrip("/")


def local_path(uri: str) -> Path:
    """A local path or file:// URI as a Path; other schemes are a config error."""
    if uri.startswith("file://"):
        return Path(unquote(urlparse(uri).path))
    scheme = urlparse(uri).scheme
    if scheme and len(scheme) > 1:  # a one-letter scheme is a Windows drive
        raise ConfigError(
            f"Unsupported storage URI scheme {scheme!r} in {uri!r}: expected s3://, file:// or a local path"
        )
    return Path(uri)


def join(base: str, *parts: str) -> str:
    """Join URI parts with `/`, the way both backends understand."""
    out = base.rstrip("/")
    for part in parts:
        part = part.strip("/")
        if part:
            out = f"{out}/{part}"
    return out


def parent(uri: str) -> str:
    return uri.rstrip("/").rsplit("/", 1)[0]


def normalize(uri: str) -> str:
    """Absolute, canonical form: s3 URIs unchanged, local paths made absolute."""
    if is_s3(uri):
        return uri
    return str(local_path(uri).expanduser().resolve())




def relpath_problem(rel: str) -> str | None:
    """Why `rel` is not a plain relative path under a folder or prefix (None when it is one).

    One rule for every key or artifact path joined to a destination: relative, '/'-separated, every
    segment a name. Refused: empty, absolute ('/x', 'C:x'), backslashes (a separator on Windows runners),
    empty segments ('a//b', 'a/'), '.' and '..' segments, and control characters.
    """
    if not rel:
        return "is empty"
    if rel.startswith("/") or (len(rel) > 1 and rel[1] == ":" and rel[0].isalpha()):
        return "is absolute"
    if "\\" in rel:
        return "holds a backslash"
    if any(ord(c) < 32 or ord(c) == 127 for c in rel):
        return "holds a control character"
    parts = rel.split("/")
    if "" in parts:
        return "has an empty segment ('//' or a trailing '/')"
    if ".." in parts:
        return "climbs out of its folder with '..'"
    if "." in parts:
        return "has a '.' segment"
    return None


def join_under(base: str, rel: str) -> str:
    """`base/rel` for a URI or local path, refusing a `rel` that is not a plain relative path (exit 3)."""
    problem = relpath_problem(rel)
    if problem:
        raise InputError(f"Refusing path {rel!r} under {base}: it {problem}; only plain relative paths are joined.")
    return f"{base.rstrip('/')}/{rel}"


def safe_destination(dest_dir: Path, rel: str) -> Path:
    """Where a key `rel` lands inside `dest_dir`; refuses keys that would escape it."""
    problem = relpath_problem(rel)
    if problem:
        raise InputError(f"Refusing object key {rel!r}: it {problem}, so it could land outside the destination "
                         f"folder {dest_dir}")
    target = (dest_dir / Path(*PurePosixPath(rel).parts)).resolve()
    root = dest_dir.resolve()
    if target != root and root not in target.parents:
        raise InputError(f"Refusing object key {rel!r}: it resolves outside {dest_dir}")
    return target


# --------------------------------------------------------------------------- S3 client

_client_lock = threading.Lock()
_clients: dict[tuple[str | None, str], Any] = {}


def endpoint_url() -> str | None:
    return os.environ.get("S3_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL") or None


def s3_client() -> Any:
    """A boto3 S3 client, shared per endpoint (clients are thread-safe).

    Retries use botocore's `standard` mode (5xx, throttling, dropped
    connections, with backoff). For endpoints other than AWS, checksums are
    only sent when an operation requires them: older MinIO releases reject
    the headers boto3 >= 1.36 sends by default.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url()
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1"
    key = (endpoint, region)
    with _client_lock:
        if key not in _clients:
            attempts = int(os.environ.get("FTJOBS_S3_MAX_ATTEMPTS", "6"))
            extra: dict[str, Any] = {}
            if endpoint:
                extra = {
                    "request_checksum_calculation": "when_required",
                    "response_checksum_validation": "when_required",
                    "s3": {"addressing_style": "path"},
                }
            config = Config(
                retries={"mode": "standard", "max_attempts": attempts},
                max_pool_connections=FILE_WORKERS * MAX_CONCURRENCY + 4,
                connect_timeout=10,
                read_timeout=120,
                **extra,
            )
            _clients[key] = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=region, config=config
            )
        return _clients[key]


def _transfer_config() -> Any:
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(
        multipart_threshold=MULTIPART_THRESHOLD,
        multipart_chunksize=MULTIPART_CHUNKSIZE,
        max_concurrency=MAX_CONCURRENCY,
        use_threads=True,
    )


def _error_code(exc: Exception) -> str:
    response = getattr(exc, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or str(
        response.get("ResponseMetadata", {}).get("HTTPStatusCode", "")
    )


def _not_found(exc: Exception) -> bool:
    return _error_code(exc) in {"404", "NoSuchKey", "NotFound", "NoSuchBucket"}


def _s3_error(exc: Exception, uri: str, action: str) -> FtjobsError:
    if type(exc).__name__ in {"NoCredentialsError", "PartialCredentialsError"}:  # a retry cannot fix these
        return ConfigError(f"No usable AWS credentials {action} {uri} ({exc}): set AWS_ACCESS_KEY_ID and "
                           "AWS_SECRET_ACCESS_KEY (the ftjobs-s3 Secret in Kubernetes), AWS_PROFILE, or give the "
                           "pod's ServiceAccount a cloud identity (IRSA / Pod Identity)")
    code = _error_code(exc)
    if code in {"NoSuchBucket"}:
        bucket = split_s3(uri)[0]
        return ConfigError(f"Bucket {bucket!r} does not exist ({action} {uri}): create it or fix the URI")
    if code in {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
        return ConfigError(f"Access denied {action} {uri} ({code}): check the credentials and bucket policy")
    return FtjobsError(f"S3 error {action} {uri}: {exc}")


# --------------------------------------------------------------------------- bytes and JSON


def read_bytes(uri: str) -> bytes:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return bytes(s3_client().get_object(Bucket=bucket, Key=key)["Body"].read())
        except Exception as exc:
            if _not_found(exc):
                raise FileNotFoundError(uri) from None
            raise _s3_error(exc, uri, "reading") from exc
    path = local_path(uri)
    return path.read_bytes()


def read_text(uri: str) -> str:
    return read_bytes(uri).decode("utf-8")


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def check_writable(prefix: str) -> None:
    """Fail before any work when a local output folder cannot be written.

    A mistyped volume path or a read-only root in a pod would otherwise surface only at the first
    upload, after the whole job ran. Folders created for the probe are removed again. S3 prefixes are
    not probed for permissions (a write needs no bucket-level permission, and a missing bucket is named at the
    first write), but for conditional writes: a store that ignores them is refused here, before any work.
    """
    if is_s3(prefix):
        check_conditional_writes(join(prefix, "manifest.json"))
        return
    path = local_path(prefix)
    top = path
    while not top.parent.exists() and top.parent != top:
        top = top.parent
    created = not path.exists()
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".ftjobs-write-check.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ConfigError(f"Cannot write under --output {prefix} ({exc.strerror or exc}: {exc.filename or path}). "
                          "Give a writable folder or an s3:// prefix.") from None
    if created:  # leave no empty folders behind if the job stops before writing
        for folder in (path, *path.parents):
            try:
                folder.rmdir()
            except OSError:
                break
            if folder == top:
                break


FOLDER_RACE_TRIES = 5


def _temp_beside(path: Path) -> tuple[int, str]:
    """A new temporary file in `path`'s folder (made when missing), open for writing: (fd, its path).

    Another process may remove the folder while it is still empty (a racing attempt's tidy removes empty
    folders under the output; seen in the racing-attempts test): the folder is then made again. Once the
    temporary file is in it, the folder is not empty and stays.
    """
    for tries in range(FOLDER_RACE_TRIES):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        except FileNotFoundError:
            if tries == FOLDER_RACE_TRIES - 1:
                raise
    raise AssertionError("unreachable")


def _atomic_local_write(path: Path, data: bytes) -> Path:
    fd, tmp = _temp_beside(path)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return Path(tmp)


def write_bytes(uri: str, data: bytes) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data)
        except Exception as exc:
            raise _s3_error(exc, uri, "writing") from exc
        return
    path = local_path(uri)
    tmp = _atomic_local_write(path, data)
    os.replace(tmp, path)


def json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=False, ensure_ascii=False, default=str) + "\n").encode()


def put_if_absent(uri: str, data: bytes) -> None:
    """Create-only write. Raises AlreadyExistsError if the object exists.

    S3: `If-None-Match: *` (412 when the key exists, 409 when a concurrent
    conditional write to the same key is in flight). Local: the data is
    written to a temporary file, then hard-linked into place, which fails
    atomically when the name is taken.
    """
    if is_s3(uri):
        bucket, key = split_s3(uri)
        check_conditional_writes(uri)
        try:
            s3_client().put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
        except Exception as exc:
            if _error_code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
                raise AlreadyExistsError(f"{uri} already exists (create-only write refused)") from None
            raise _s3_error(exc, uri, "creating") from exc
        return
    path = local_path(uri)
    tmp = _atomic_local_write(path, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise AlreadyExistsError(f"{uri} already exists (create-only write refused)") from None
    finally:
        tmp.unlink(missing_ok=True)


# Stores that ignore `If-None-Match: *` (some S3-compatible servers and gateways) would let a second writer
# overwrite a manifest silently. The first create-only write to a store in a process probes it; the verdict
# is kept per (endpoint, bucket). Local folders need no probe: the hard link is create-only by the kernel.
UNSAFE_STORE_ENV = "FTJOBS_ALLOW_UNSAFE_STORE"
PROBE_FOLDER = ".ftjobs-probe"
_probe_lock = threading.Lock()
_probed: dict[tuple[str | None, str], bool] = {}  # (endpoint, bucket) -> honours conditional writes


def check_conditional_writes(uri: str) -> None:
    """Refuse (exit 2) a store that accepts a second create-only write of one key, unless the user accepted the
    risk with FTJOBS_ALLOW_UNSAFE_STORE=1. Probed once per store and process, next to `uri` (where this job
    may write anyway), with an empty object that is removed again."""
    bucket, key = split_s3(uri)
    store = (endpoint_url(), bucket)
    with _probe_lock:
        if store not in _probed:
            _probed[store] = _probe(bucket, f"{key.rsplit('/', 1)[0] + '/' if '/' in key else ''}{PROBE_FOLDER}/"
                                            f"{os.getpid()}-{os.urandom(6).hex()}")
        honoured = _probed[store]
    if honoured:
        return
    where = f"bucket {bucket!r} at {store[0] or 'AWS S3'}"
    if os.environ.get(UNSAFE_STORE_ENV, "").lower() in ("1", "true", "yes"):
        logging.getLogger(__name__).warning(
            "%s ignores conditional writes; %s=1 accepts the risk: two attempts that publish at once may "
            "overwrite each other's manifest", where, UNSAFE_STORE_ENV)
        return
    raise ConfigError(
        f"The object store ({where}) ignores conditional writes: a second create-only write (If-None-Match: *) "
        "to one key was accepted instead of refused with 412. ftjobs relies on it so that no published manifest "
        "is ever overwritten by another attempt. Use a store that supports conditional writes, or set "
        f"{UNSAFE_STORE_ENV}=1 to run anyway and accept that risk (docs/storage.md).")


def _probe(bucket: str, key: str) -> bool:
    """Two create-only writes of one new key: True when the second is refused."""
    client = s3_client()
    uri = f"s3://{bucket}/{key}"
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
    except Exception as exc:
        raise _s3_error(exc, uri, "probing conditional writes at") from exc
    try:
        client.put_object(Bucket=bucket, Key=key, Body=b"", IfNoneMatch="*")
        return False
    except Exception as exc:
        if _error_code(exc) in {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}:
            return True
        raise _s3_error(exc, uri, "probing conditional writes at") from exc
    finally:
        try:
            client.delete_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - an empty probe object left behind costs nothing
            logging.getLogger(__name__).debug("could not remove the probe %s: %s", uri, exc)


def exists(uri: str) -> bool:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            s3_client().head_object(Bucket=bucket, Key=key)
            return True
        except Exception as exc:
            if _not_found(exc):
                return False
            raise _s3_error(exc, uri, "checking") from exc
    return local_path(uri).is_file()


def size(uri: str) -> int:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        try:
            return int(s3_client().head_object(Bucket=bucket, Key=key)["ContentLength"])
        except Exception as exc:
            if _not_found(exc):
                raise FileNotFoundError(uri) from None
            raise _s3_error(exc, uri, "checking") from exc
    return local_path(uri).stat().st_size


def delete(uri: str) -> None:
    if is_s3(uri):
        bucket, key = split_s3(uri)
        s3_client().delete_object(Bucket=bucket, Key=key)
        return
    local_path(uri).unlink(missing_ok=True)


def delete_prefix(uri: str) -> int:
    """Delete every object under a prefix (a folder). Returns how many."""
    objects = list_objects(uri)
    if is_s3(uri):
        bucket, _ = split_s3(uri)
        keys = [split_s3(o.uri)[1] for o in objects]
        for i in range(0, len(keys), 1000):
            batch = [{"Key": k} for k in keys[i : i + 1000]]
            s3_client().delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    else:
        shutil.rmtree(local_path(uri), ignore_errors=True)
    return len(objects)


def is_folder_marker(obj: ObjectInfo) -> bool:
    """An empty S3 key naming a folder (the listed prefix itself, or a key ending in '/'), as the AWS console and
    some sync tools create: no file to download."""
    return obj.size == 0 and (obj.rel == "" or obj.rel.endswith("/"))


def list_objects(prefix: str) -> list[ObjectInfo]:
    """Every object under `prefix` treated as a folder, sorted by key."""
    return sorted(iter_objects(prefix), key=lambda o: o.rel)


def iter_objects(prefix: str) -> Iterator[ObjectInfo]:
    base = prefix.rstrip("/")
    if is_s3(prefix):
        bucket, key = split_s3(base)
        key_prefix = f"{key}/" if key else ""
        paginator = s3_client().get_paginator("list_objects_v2")
        try:
            for page in paginator.paginate(Bucket=bucket, Prefix=key_prefix):
                for obj in page.get("Contents", []):
                    rel = obj["Key"][len(key_prefix) :]
                    yield ObjectInfo(uri=f"s3://{bucket}/{obj['Key']}", rel=rel, size=int(obj["Size"]))
        except Exception as exc:
            raise _s3_error(exc, prefix, "listing") from exc
        return
    root = local_path(base)
    if not root.is_dir():
        return
    # A folder or file another process removes while this walks (racing attempts tidying checkpoints) is
    # left out, as an S3 listing leaves out what is deleted: os.walk skips a folder it cannot scan. A link to
    # a folder is not followed (as rglob did not): a listing never reaches outside the prefix through one.
    for folder, _, names in os.walk(root):
        for name in (n for n in names if not n.endswith(".tmp")):
            path = Path(folder) / name
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                continue
            yield ObjectInfo(uri=str(path), rel=path.relative_to(root).as_posix(), size=size)


# --------------------------------------------------------------------------- files and folders


class _HashingReader:
    """Wraps a binary file; hashes bytes as the transfer reads them, in order."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.sha.update(data)
        self.size += len(data)
        return data


class _HashingWriter:
    """A write-only, non-seekable sink: s3transfer then writes parts in order,
    so the sha256 is computed while the download streams."""

    def __init__(self, f: IO[bytes]):
        self._f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self._f.write(data)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def sha256_uri(uri: str) -> str:
    """sha256 of an object, streamed (never held whole in memory)."""
    if not is_s3(uri):
        return sha256_file(local_path(uri))
    bucket, key = split_s3(uri)
    h = hashlib.sha256()
    try:
        body = s3_client().get_object(Bucket=bucket, Key=key)["Body"]
    except Exception as exc:
        if _not_found(exc):
            raise FileNotFoundError(uri) from None
        raise _s3_error(exc, uri, "reading") from exc
    for block in iter(lambda: body.read(CHUNK), b""):
        h.update(block)
    return h.hexdigest()


def upload_file(path: str | Path, uri: str) -> Transferred:
    """Copy a local file to `uri`; returns its size and sha256 (computed while streaming)."""
    path = Path(path)
    if is_s3(uri):
        bucket, key = split_s3(uri)
        with open(path, "rb") as f:
            reader = _HashingReader(f)
            try:
                s3_client().upload_fileobj(reader, bucket, key, Config=_transfer_config())
            except Exception as exc:
                raise _s3_error(exc, uri, "uploading") from exc
        return Transferred(uri, str(path), path.name, reader.size, reader.sha.hexdigest())
    dest = local_path(uri)
    fd, tmp = _temp_beside(dest)
    h = hashlib.sha256()
    n = 0
    with open(path, "rb") as src, os.fdopen(fd, "wb") as out:
        for block in iter(lambda: src.read(CHUNK), b""):
            h.update(block)
            n += len(block)
            out.write(block)
    os.replace(tmp, dest)
    return Transferred(str(dest), str(path), path.name, n, h.hexdigest())


def download_file(uri: str, path: str | Path) -> Transferred:
    """Copy `uri` to a local file atomically; returns its size and sha256."""
    path = Path(path)
    fd, tmp = _temp_beside(path)
    try:
        with os.fdopen(fd, "wb") as out:
            writer = _HashingWriter(out)
            if is_s3(uri):
                bucket, key = split_s3(uri)
                try:
                    s3_client().download_fileobj(bucket, key, writer, Config=_transfer_config())
                except Exception as exc:
                    if _not_found(exc):
                        raise FileNotFoundError(uri) from None
                    raise _s3_error(exc, uri, "downloading") from exc
            else:
                with open(local_path(uri), "rb") as src:
                    for block in iter(lambda: src.read(CHUNK), b""):
                        writer.write(block)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return Transferred(uri, str(path), path.name, writer.size, writer.sha.hexdigest())


def upload_dir(src_dir: str | Path, uri: str, workers: int = FILE_WORKERS) -> list[Transferred]:
    """Upload every file below `src_dir` under prefix `uri`, files in parallel."""
    src = Path(src_dir)
    files = sorted(p for p in src.rglob("*") if p.is_file())

    def one(p: Path) -> Transferred:
        rel = p.relative_to(src).as_posix()
        t = upload_file(p, join(uri, rel))
        return Transferred(t.uri, t.path, rel, t.size, t.sha256)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, files))


def download_dir(uri: str, dest_dir: str | Path, workers: int = FILE_WORKERS) -> list[Transferred]:
    """Download every object under prefix `uri` into `dest_dir`, files in parallel.

    Keys that would land outside `dest_dir` (`..`, absolute keys) are refused
    before anything is written; empty folder markers (`sub/`) are skipped.
    """
    dest = Path(dest_dir)
    objects = [o for o in list_objects(uri) if not is_folder_marker(o)]
    targets = [(o, safe_destination(dest, o.rel)) for o in objects]

    def one(item: tuple[ObjectInfo, Path]) -> Transferred:
        obj, target = item
        t = download_file(obj.uri, target)
        return Transferred(t.uri, t.path, obj.rel, t.size, t.sha256)

    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, targets))




def open_local(uri: str, cache_dir: str | Path) -> Path:
    """A local path for `uri`: the path itself when local, else a download into `cache_dir`."""
    if not is_s3(uri):
        return local_path(uri)
    bucket, key = split_s3(uri)
    target = safe_destination(Path(cache_dir), f"{bucket}/{key}")
    download_file(uri, target)
    return target
