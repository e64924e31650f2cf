"""Training checkpoints in the object store, and finding the one to resume from.

A checkpoint is a folder `<output>/checkpoints/step-NNNNNNNN/` with the
adapter (safetensors), optimizer, scheduler and RNG state, and `state.json`
(data position, counters, loss history). `COMPLETE.json` is written LAST and
lists every file's sha256 and size: a folder without it is an attempt that was
killed mid-upload and is ignored.

On resume, the newest checkpoint whose marker belongs to this run and whose
files all match the marker's sha256 is used; anything else is skipped for the
previous one, with a warning that says why. Files are verified after download
and before anything reads them, so a pickled optimizer state is only
unpickled (and then with `weights_only=True`) once its bytes are known good.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import storage
from common.manifest import now

LOG = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class Checkpoint:
    step: int
    uri: str
    local: Path
    marker: dict[str, Any]


def root(output: str) -> str:
    return storage.join(output, "checkpoints")


def step_uri(output: str, step: int) -> str:
    return storage.join(root(output), f"step-{step:08d}")


def steps_present(output: str) -> dict[int, set[str]]:
    """Checkpoint steps under the output prefix, each with the files it holds."""
    found: dict[int, set[str]] = {}
    for obj in storage.list_objects(root(output)):
        head, _, rest = obj.rel.partition("/")
        match = STEP_DIR.match(head)
        if match and rest:
            found.setdefault(int(match.group(1)), set()).add(rest)
    return found


def save(output: str, step: int, local_dir: Path, identity: str) -> str:
    """Upload every file in `local_dir` as checkpoint `step`, then its marker. Returns the folder URI."""
    uri = step_uri(output, step)
    files = {}
    for t in storage.upload_dir(local_dir, uri):
        files[t.rel] = {"sha256": t.sha256, "bytes": t.size}
    marker = {"step": step, "identity": identity, "created_at": now(), "files": files}
    storage.write_bytes(storage.join(uri, MARKER), storage.json_bytes(marker))
    return uri


def prune(output: str, keep: int) -> list[int]:
    """Delete all but the newest `keep` complete checkpoints, and unfinished ones older than those."""
    present = steps_present(output)
    complete = sorted((s for s, files in present.items() if MARKER in files), reverse=True)
    kept = set(complete[:keep])
    oldest_kept = min(kept) if kept else None
    removed = []
    for step, files in present.items():
        stale_complete = MARKER in files and step not in kept
        stale_partial = MARKER not in files and oldest_kept is not None and step < oldest_kept
        if stale_complete or stale_partial:
            storage.delete_prefix(step_uri(output, step))
            removed.append(step)
    return sorted(removed)


def latest(output: str, dest: Path, identity: str) -> Checkpoint | None:
    """Download and verify the newest usable checkpoint; None when there is none.

    A checkpoint written by a different run (other config or inputs) is not
    resumed from: the caller is told by the warning, and starts fresh only if
    no checkpoint of this run exists.
    """
    present = steps_present(output)
    for step in sorted(present, reverse=True):
        uri = step_uri(output, step)
        if MARKER not in present[step]:
            LOG.warning("checkpoint %s has no %s (killed while saving): skipping it", uri, MARKER)
            continue
        try:
            marker = json.loads(storage.read_bytes(storage.join(uri, MARKER)))
            files = marker["files"]
        except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
            LOG.warning("checkpoint %s has an unreadable marker (%s): skipping it", uri, exc)
            continue
        if marker.get("identity") != identity:
            LOG.warning("checkpoint %s belongs to a different run (other config or inputs): skipping it", uri)
            continue
        local = dest / f"step-{step:08d}"
        problem = _download_verified(uri, files, local)
        if problem:
            LOG.warning("checkpoint %s failed verification (%s): skipping it", uri, problem)
            continue
        return Checkpoint(step=step, uri=uri, local=local, marker=marker)
    return None


def _download_verified(uri: str, files: dict[str, Any], local: Path) -> str | None:
    for rel, want in sorted(files.items()):
        try:
            target = storage.safe_destination(local, rel)
            got = storage.download_file(storage.join(uri, rel), target)
        except FileNotFoundError:
            return f"{rel} is missing"
        except storage.InputError as exc:
            return str(exc)
        if got.sha256 != want.get("sha256") or got.size != want.get("bytes"):
            target.unlink(missing_ok=True)
            return f"{rel} has sha256 {got.sha256[:12]}..., the marker recorded {str(want.get('sha256'))[:12]}..."
    return None
