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
- no manifest yet: only the folders of attempts that are gone. Resume caches (train checkpoints, infer
  chunks) stay: they are keyed by the run's identity and verified by sha256 before use, whichever attempt
  wrote them.
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
    _started: str = field(default_factory=lambda: dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds"))

    @property
    def uri(self) -> str:
        return storage.join(folder(self.output, self.attempt_id), RECORD)

    def record(self, **more: Any) -> dict[str, Any]:
        return {"attempt": self.attempt_id, "stage": self.stage, "host": socket.gethostname(), "pid": os.getpid(),
                "started_at": self._started, "heartbeat_at": time.time(), **self.extra, **more}

    def beat(self, **more: Any) -> None:
        storage.write_bytes(self.uri, storage.json_bytes(self.record(**more)))

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


def alive(record: dict[str, Any] | None, now: float | None = None) -> bool:
    """An attempt whose record beat within STALE_S, unless it names a process of this host that is gone."""
    if not record:
        return False
    if (now if now is not None else time.time()) - float(record.get("heartbeat_at", 0)) >= STALE_S:
        return False
    if record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int):
        try:
            os.kill(record["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: it runs
            return True
    return True


@dataclass
class Collected:
    """What gc found: the objects it removed (or would), and why the rest stay."""

    removed: list[storage.ObjectInfo]
    kept_live: list[str]  # attempts still alive (no manifest yet), their folders untouched
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
        now = time.time()
        gone = set()
        for attempt_id, record in records(output).items():
            if attempt_id == keep_attempt or alive(record, now):
                live.append(attempt_id)
            else:
                gone.add(attempt_id)
        garbage = [o for o in objects if o.rel.startswith(f"{ROOT}/") and o.rel.split("/")[1] in gone]
    if not dry_run:
        for o in garbage:
            with contextlib.suppress(FileNotFoundError):
                storage.delete(o.uri)
        if not storage.is_s3(output):
            _remove_empty_folders(output)
    return Collected(removed=garbage, kept_live=sorted(live), published=published)


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
