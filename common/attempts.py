"""Attempts: each try at a stage writes where no other try can, says while it is alive, and leaves garbage
that `gc` can tell from published data.

Kubernetes can run two tries of one stage at once: a pod on an unreachable node keeps running while its
replacement starts, an Indexed Job index is retried, two CI runs target one run id. The manifest is
created once (`If-None-Match: *`), but that protects the manifest, not the files it names. So, as the
Hadoop/S3A manifest committer does, every attempt writes its artifacts under its own folder

    <output>/attempts/<attempt id>/...

and the manifest that wins names exactly that attempt's files. A losing or zombie attempt can only add
files under its own folder: it can never change a byte a published manifest names.

While it runs, an attempt rewrites its own record `attempts/<id>/attempt.json` every `HEARTBEAT_S`
seconds (nobody else writes it, so no write contends), and removes it when it ends, however it ends (the
manifest names the attempt that won). An attempt is gone when its record is missing, was not rewritten
for `STALE_S` seconds (a SIGKILLed pod, an unreachable node), or names a process on this host that no
longer runs (a killed run on a laptop is not waited for).

What may be removed (`gc`, also run by every later attempt at the prefix):
- the output holds a manifest: whatever the manifest does not name in the folders ftjobs owns there
  (`attempts/`, `checkpoints/`, `shards/`): resume caches, losers' and zombies' folders;
- no manifest yet: only the folders of attempts that are certainly over: no record (it ended), a process of
  this host that is gone, or a record silent for `REMOVE_AFTER_S`, far longer than `STALE_S`. Resume caches
  (train checkpoints, infer chunks) stay: they are keyed by the run's identity and verified by sha256 before
  use, whichever attempt wrote them.

Why two limits: a silent attempt may only be paused (a frozen node, a long GC pause, a store outage that made
its beats fail) and come back to publish. `STALE_S` lets others stop waiting for it; removing its files needs
more. The attempt itself refuses to publish once it was silent for `REMOVE_AFTER_S - STALE_S` (see
`safe_to_publish`), so a folder another attempt may have decided to remove is never published; the `STALE_S`
margin between the two covers clocks that disagree between hosts and the time from that check to the
create-only write. Before publishing, the attempt also checks that every file it names is there with its size.
`docs/attempts.md` says what to do with an output stuck behind a manifest that names missing files anyway.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from common import storage

LOG = logging.getLogger(__name__)
ROOT = "attempts"
RECORD = "attempt.json"
# Test and operations knobs: how often an attempt says it is alive, and when silence means it is gone.
HEARTBEAT_S = float(os.environ.get("FTJOBS_HEARTBEAT_S", "15"))
STALE_S = float(os.environ.get("FTJOBS_ATTEMPT_STALE_S", "300"))
# When a silent attempt's folder may be removed: 4x STALE_S (20 minutes by default), see the module docstring.
REMOVE_AFTER_S = float(os.environ.get("FTJOBS_ATTEMPT_REMOVE_AFTER_S", str(4 * STALE_S)))
# The folders ftjobs writes beside what manifests name: gc never looks elsewhere, so an --output that also
# holds a user's own files (raw data next to prepare's output, say) keeps them.
OWNED = (ROOT, "checkpoints", "shards", "candidates")  # candidates: train.select's kept adapters


def new_id() -> str:
    """Sortable by start time, unique without coordination: `20261202T101500Z-3fa9c2`."""
    return dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ-") + os.urandom(3).hex()


def folder(output: str, attempt_id: str) -> str:
    return storage.join(output, ROOT, attempt_id)


def path_of(attempt_id: str) -> str:
    """The attempt's folder relative to the output: where its artifacts' paths start."""
    return f"{ROOT}/{attempt_id}"


@dataclass
class Heartbeat:
    """The attempt's record, rewritten in the background while the attempt runs."""

    output: str
    attempt_id: str
    stage: str
    extra: dict[str, Any] = field(default_factory=dict)
    interval: float = HEARTBEAT_S
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: threading.Thread | None = field(default=None, repr=False)
    _made_output: bool = field(default=False, repr=False)
    _last_ok: float = field(default_factory=time.monotonic, repr=False)  # the last beat that reached the store
    _started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"))

    @property
    def uri(self) -> str:
        return storage.join(folder(self.output, self.attempt_id), RECORD)

    def record(self, **more: Any) -> dict[str, Any]:
        return {"attempt": self.attempt_id, "stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(),
                "started_at": self._started, "heartbeat_at": time.time(), **self.extra, **more}

    def beat(self, **more: Any) -> None:
        storage.write_bytes(self.uri, storage.json_bytes(self.record(**more)))
        self._last_ok = time.monotonic()

    def silent_s(self) -> float:
        """Seconds since the last beat that reached the store: what other attempts see as this one's silence."""
        return time.monotonic() - self._last_ok

    def safe_to_publish(self) -> str | None:
        """None when no other attempt can have decided to remove this attempt's folder; else why not.

        Checked before a last beat, so the silence measured is the one others saw. See the module docstring.
        """
        silent = self.silent_s()
        if silent >= REMOVE_AFTER_S - STALE_S:
            return (f"attempt {self.attempt_id} was silent for {silent:.0f} s (its heartbeat did not reach "
                    f"{self.uri}); after {REMOVE_AFTER_S - STALE_S:.0f} s another attempt may be removing its files")
        self.beat()  # fresh again: from here on nobody decides to remove it
        return None

    def __enter__(self) -> Heartbeat:
        self._made_output = not storage.is_s3(self.output) and not storage.local_path(self.output).exists()
        self.beat()  # synchronously: an unwritable store fails here, before any work
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{self.attempt_id}", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - a missed beat is a warning; STALE_S is many beats
                LOG.warning("attempt %s: heartbeat to %s failed: %s", self.attempt_id, self.uri, exc)

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        with contextlib.suppress(Exception):  # the attempt's outcome matters more than its record
            storage.delete(self.uri)
            if not storage.is_s3(self.uri):  # no empty folders left behind by a refused run
                here = storage.local_path(folder(self.output, self.attempt_id))
                _remove_empty_folders(str(here))
                for path in (here, here.parent, *((here.parent.parent,) if self._made_output else ())):
                    with contextlib.suppress(OSError):
                        path.rmdir()


def records(output: str) -> dict[str, dict[str, Any] | None]:
    """Every attempt folder under the output with its record (None: no readable record)."""
    found: dict[str, dict[str, Any] | None] = {}
    for obj in storage.list_objects(storage.join(output, ROOT)):
        attempt_id, _, rest = obj.rel.partition("/")
        found.setdefault(attempt_id, None)
        if rest == RECORD:
            try:
                found[attempt_id] = dict(storage.read_json(obj.uri))
            except (FileNotFoundError, ValueError):
                pass
    return found


def over(record: dict[str, Any] | None, now: float | None = None) -> bool:
    """An attempt that can never publish: it ended (no record), its process on this host is gone, or it was
    silent for REMOVE_AFTER_S. Only such an attempt's folder is removed before a manifest exists."""
    if not record:
        return True
    if (now if now is not None else time.time()) - float(record.get("heartbeat_at", 0)) >= REMOVE_AFTER_S:
        return True
    return _process_gone(record)


def _process_gone(record: dict[str, Any]) -> bool:
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return True
        except PermissionError:  # another user's process: it runs
            return False
    return False


def alive(record: dict[str, Any] | None, now: float | None = None) -> bool:
    """An attempt whose record beat within STALE_S, unless it names a process of this host that is gone."""
    if not record:
        return False
    if (now if now is not None else time.time()) - float(record.get("heartbeat_at", 0)) >= STALE_S:
        return False
    return not _process_gone(record)


@dataclass
class Collected:
    """What gc found: the objects it removed (or would), and why the rest stay."""

    removed: list[storage.ObjectInfo]
    kept_live: list[str]  # attempts that may still publish (no manifest yet), their folders untouched
    published: bool

    @property
    def bytes(self) -> int:
        return sum(o.size for o in self.removed)


def collect(output: str, *, dry_run: bool = True, keep_attempt: str | None = None) -> Collected:
    """Remove (or list, with dry_run) what no manifest at `output` names and no live attempt still needs."""
    from common import manifest as mf

    objects = storage.list_objects(output)
    published = storage.exists(mf.manifest_uri(output))
    live: list[str] = []
    if published:
        loaded = mf.load(output, verify="none")
        named = {a.path for a in loaded.manifest.artifacts}
        garbage = [o for o in objects if o.rel.split("/")[0] in OWNED and o.rel not in named]
    else:
        gone = set()
        for attempt_id, record in records(output).items():
            if attempt_id != keep_attempt and over(record):
                gone.add(attempt_id)
            else:
                live.append(attempt_id)
        garbage = [o for o in objects if o.rel.startswith(f"{ROOT}/") and o.rel.split("/")[1] in gone]
    if not dry_run:
        if not published:  # each record read again right before its folder goes: listing a big prefix takes a
            still_over = {a: over(_record_of(output, a)) for a in sorted({o.rel.split("/")[1] for o in garbage})}
            garbage = [o for o in garbage if still_over[o.rel.split("/")[1]]]  # while, and it may have beaten
        for o in garbage:
            with contextlib.suppress(FileNotFoundError):
                storage.delete(o.uri)
        if not storage.is_s3(output):
            _remove_empty_folders(output)
    return Collected(removed=garbage, kept_live=sorted(live), published=published)


def _record_of(output: str, attempt_id: str) -> dict[str, Any] | None:
    try:
        return dict(storage.read_json(storage.join(folder(output, attempt_id), RECORD)))
    except (FileNotFoundError, ValueError):
        return None


def missing(output: str, artifacts: list[Any]) -> list[str]:
    """What of `artifacts` (manifest Artifacts) is not at the output with its recorded size, one line each.

    Sizes, not hashes: what the race with another attempt's tidy-up removes is whole files, and the attempt's
    own folder has no other writer. (S3 ETags are MD5 or per-part digests, not the sha256 a manifest records,
    so comparing them would need a second record per file for no case this check misses.)
    """
    problems = []
    for art in artifacts:
        uri = storage.join_under(output, art.path)
        try:
            size = storage.size(uri)
        except FileNotFoundError:
            problems.append(f"{art.path}: missing")
            continue
        if size != art.bytes:
            problems.append(f"{art.path}: {size} bytes, {art.bytes} written")
    return problems


def unpublish_broken(output: str, *, dry_run: bool = True) -> str:
    """Move aside a manifest that names files that are not there (an output stuck for good); what was done.

    Only a manifest whose size check fails is moved: to `manifest.broken-<time>.json` beside it, kept for
    the record and never touched by gc. The output is then unfinished again: the next run at it publishes.
    """
    from common import manifest as mf
    from common.errors import ChecksumError, InputError

    uri = mf.manifest_uri(output)
    try:
        loaded = mf.load(uri, verify="none")
    except InputError as exc:
        raise InputError(f"{output}: nothing to unpublish ({exc})") from None
    problems = missing(output, loaded.manifest.artifacts)
    if not problems:
        raise InputError(f"{uri} names no missing file: it is a healthy published run, and gc never removes one.")
    aside = storage.join(output, f"manifest.broken-{new_id()}.json")
    if not dry_run:
        data = storage.read_bytes(uri)
        storage.put_if_absent(aside, data)
        if storage.read_bytes(aside) != data:
            raise ChecksumError(f"Could not keep a copy of {uri} at {aside}: left it in place")
        storage.delete(uri)
    return (f"{'moved' if not dry_run else 'would move'} {uri} to {aside}: it names "
            f"{len(problems)} file(s) that are not there ({'; '.join(problems[:5])})")


def _remove_empty_folders(output: str) -> None:
    root = storage.local_path(output)
    for path in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        with contextlib.suppress(OSError):  # only empty ones go
            path.rmdir()


def tidy(output: str, *, keep_attempt: str | None = None) -> None:
    """Best-effort gc by a later run at the prefix: a failure to tidy never fails the run."""
    try:
        found = collect(output, dry_run=False, keep_attempt=keep_attempt)
    except Exception as exc:  # noqa: BLE001 - garbage left behind costs storage, not correctness
        LOG.warning("could not remove unreferenced files under %s: %s (run `ftjobs gc %s --apply`)", output, exc,
                    output)
        return
    if found.removed:
        LOG.info("removed %d unreferenced file(s) (%d bytes) under %s left by earlier attempts", len(found.removed),
                 found.bytes, output, extra={"removed": [o.rel for o in found.removed[:50]]})
