"""Training checkpoints in the object store, and finding the one to resume from.

A checkpoint is a folder `<output>/checkpoints/step-NNNNNNNN-<attempt>/` with the
adapter (safetensors), optimizer, scheduler and RNG state, and `state.json`
(`TrainState`: data position, counters, loss history; `snapshot` writes it,
`restore` reads it back). `COMPLETE.json` is written LAST and lists every
file's sha256 and size: a folder without it is an attempt that was killed
mid-upload and is ignored.

On resume, the newest checkpoint whose marker belongs to this run and whose
files all match the marker's sha256 is used; anything else is skipped for the
previous one, with a warning that says why. With several processes, rank 0
chooses it and the others fetch that same folder (`fetch`): every process
resumes from one step. Files are verified after download
and before anything reads them, so a pickled optimizer state is only
unpickled (and then with `weights_only=True`) once its bytes are known good.
"""

from __future__ import annotations

import json
import logging
import random
import re
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from common import storage
from common.errors import FtjobsError, InputError
from common.manifest import now

LOG = logging.getLogger(__name__)

MARKER = "COMPLETE.json"
STEP_DIR = re.compile(r"^step-(\d{8})(?:-[A-Za-z0-9]+(?:-[A-Za-z0-9]+)*)?$")
# state.json's layout. Version 2 added per_step and world; version 1 (and checkpoints written before the version
# field existed, which count as 1) is read as having the config's micro-batches per step on this many processes.
STATE_VERSION = 2
READS = (1, 2)


@dataclass
class TrainState:
    """Where a training run stands: what a checkpoint saves as state.json and the manifest reports.

    `step` is also the data position: the loop derives the epoch and the micro-batch to start from it, so
    a resumed run replays the same batches in the same order. `per_step` (micro-batches per optimizer step,
    all processes together) is fixed by the run's first attempt: a resume on another number of processes
    keeps it, so each step still takes the same global batch and the schedule keeps its length.
    """

    step: int = 0                 # optimizer steps done
    tokens: int = 0               # real (non-padding) tokens seen
    trained_tokens: int = 0       # tokens with a loss target
    train_seconds: float = 0.0    # time inside optimizer steps, summed over attempts
    losses: list[dict[str, Any]] = field(default_factory=list)       # {step, loss, lr, tokens} per step
    eval_losses: list[dict[str, Any]] = field(default_factory=list)  # {step, loss} per evaluation
    attempts: int = 0             # runs of the job that trained on this state, the current one included
    run_id: str | None = None
    per_step: int | None = None   # micro-batches per optimizer step, all processes together (None: version 1)
    world: int | None = None      # processes of the attempt that saved it
    # What an objective keeps across attempts (jobs/train/objectives.py: the DPO reference's log-probabilities,
    # held-out reward history); absent from state.json when empty.
    extra: dict[str, Any] = field(default_factory=dict)

    def advance(self, *, loss: float, lr: float, tokens: int, trained_tokens: int, seconds: float) -> None:
        """Count one optimizer step and record its loss."""
        self.step += 1
        self.train_seconds += seconds
        self.tokens += tokens
        self.trained_tokens += trained_tokens
        self.losses.append({"step": self.step, "loss": round(loss, 6), "lr": lr, "tokens": self.tokens})

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        losses, evals = data.pop("losses"), data.pop("eval_losses")
        if not data["extra"]:
            data.pop("extra")
        return {"version": STATE_VERSION, **data, "loss": losses, "eval": evals}  # the keys state.json always had

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str) -> TrainState:
        version = data.get("version", 1)
        if version not in READS:
            raise InputError(f"{where} has state.json version {version}; this ftjobs reads versions "
                             f"{', '.join(map(str, READS))}. Resume with the ftjobs that wrote it, or delete the "
                             "checkpoints to train from the start.")
        try:
            state = cls(step=int(data["step"]), tokens=int(data["tokens"]), trained_tokens=int(data["trained_tokens"]),
                        train_seconds=float(data["train_seconds"]), losses=list(data["loss"]),
                        eval_losses=list(data["eval"]), attempts=int(data["attempts"]), run_id=data.get("run_id"),
                        extra=dict(data.get("extra") or {}))
            if version >= 2:
                state.per_step, state.world = int(data["per_step"]), int(data["world"])
                if state.per_step < 1 or state.world < 1:
                    raise ValueError(f"per_step {state.per_step} and world {state.world} must be >= 1")
            return state
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"{where}: state.json is not a training state ({type(exc).__name__}: {exc}). Delete "
                             "that checkpoint folder to resume from the one before it.") from None


@dataclass(frozen=True)
class Checkpoint:
    step: int
    uri: str
    local: Path
    marker: dict[str, Any]


def root(output: str) -> str:
    return storage.join(output, "checkpoints")


def folder_name(step: int, attempt: str | None = None) -> str:
    """`step-NNNNNNNN-<attempt>`: two attempts saving the same step never write into one folder."""
    return f"step-{step:08d}" + (f"-{attempt}" if attempt else "")


def present(output: str) -> dict[str, tuple[int, set[str]]]:
    """Checkpoint folders under the output prefix: name -> (step, the files it holds)."""
    found: dict[str, tuple[int, set[str]]] = {}
    for obj in storage.list_objects(root(output)):
        head, _, rest = obj.rel.partition("/")
        match = STEP_DIR.match(head)
        if match and rest:
            found.setdefault(head, (int(match.group(1)), set()))[1].add(rest)
    return found


def newest_first(folders: dict[str, tuple[int, set[str]]]) -> list[str]:
    return sorted(folders, key=lambda name: (folders[name][0], name), reverse=True)


def save(output: str, step: int, local_dir: Path, identity: str, attempt: str | None = None) -> str:
    """Upload every file in `local_dir` as checkpoint `step` of `attempt`, then its marker. Returns the folder."""
    uri = storage.join(root(output), folder_name(step, attempt))
    files = {}
    for t in storage.upload_dir(local_dir, uri):
        files[t.rel] = {"sha256": t.sha256, "bytes": t.size}
    marker = {"step": step, "identity": identity, "attempt": attempt, "created_at": now(), "files": files}
    storage.write_bytes(storage.join(uri, MARKER), storage.json_bytes(marker))
    return uri


def prune(output: str, keep: int) -> list[str]:
    """Delete all but the newest `keep` complete checkpoints (whichever attempts wrote them), and unfinished ones
    older than those."""
    folders = present(output)
    complete = [name for name in newest_first(folders) if MARKER in folders[name][1]]
    kept = complete[:keep]
    oldest_kept = min((folders[name][0] for name in kept), default=None)
    removed = []
    for name, (step, files) in folders.items():
        stale_complete = MARKER in files and name not in kept
        stale_partial = MARKER not in files and oldest_kept is not None and step < oldest_kept
        if stale_complete or stale_partial:
            storage.delete_prefix(storage.join(root(output), name))
            removed.append(name)
    return sorted(removed)


def complete_files(output: str) -> list[tuple[str, dict[str, Any]]]:
    """(path relative to the output, {sha256, bytes}) of every file of every complete checkpoint, from their
    markers: what a train manifest names when its checkpoints are kept."""
    out: list[tuple[str, dict[str, Any]]] = []
    for name, (_, files) in sorted(present(output).items()):
        if MARKER not in files:
            continue
        marker = json.loads(storage.read_bytes(storage.join(root(output), name, MARKER)))
        out += [(f"checkpoints/{name}/{rel}", want) for rel, want in sorted(marker["files"].items())]
    return out


def latest(output: str, dest: Path, identity: str) -> Checkpoint | None:
    """Download and verify the newest usable checkpoint, whichever attempt wrote it; None when there is none.

    A checkpoint written by a different run (other config or inputs) is not
    resumed from: the caller is told by the warning, and starts fresh only if
    no checkpoint of this run exists.
    """
    folders = present(output)
    for name in newest_first(folders):
        step, files_there = folders[name]
        uri = storage.join(root(output), name)
        if MARKER not in files_there:
            LOG.warning("checkpoint %s has no %s (killed while saving, or still being saved): skipping it", uri,
                        MARKER)
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
        local = dest / name
        problem = _download_verified(uri, files, local)
        if problem:
            LOG.warning("checkpoint %s failed verification (%s): skipping it", uri, problem)
            continue
        return Checkpoint(step=step, uri=uri, local=local, marker=marker)
    return None


def fetch(output: str, name: str, dest: Path, identity: str) -> Checkpoint:
    """Download and verify the checkpoint folder `name` (the one rank 0 chose); an error if it is not usable."""
    uri = storage.join(root(output), name)
    match = STEP_DIR.match(name)
    try:
        marker = json.loads(storage.read_bytes(storage.join(uri, MARKER)))
        files = marker["files"]
    except (ValueError, KeyError, TypeError, FileNotFoundError) as exc:
        raise CheckpointUnusable(f"checkpoint {uri}, which rank 0 resumes from, has no readable {MARKER} here "
                                 f"({type(exc).__name__}: {exc}); retry") from None
    problem = None if match and marker.get("identity") == identity else "it belongs to a different run"
    problem = problem or _download_verified(uri, files, dest / name)
    if problem:
        raise CheckpointUnusable(f"checkpoint {uri}, which rank 0 resumes from, failed here: {problem}; retry")
    return Checkpoint(step=int(match.group(1)) if match else -1, uri=uri, local=dest / name, marker=marker)


class CheckpointUnusable(FtjobsError):
    """Another process could not read the checkpoint rank 0 resumes from (exit 1: a retry reads it again)."""


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


# --------------------------------------------------------------------------- snapshot / restore


def write(output: str, identity: str, model: Any, optimizer: Any, scheduler: Any, state: TrainState,
          attempt: str | None = None) -> str:
    """Snapshot the training state into a temporary folder and save it as checkpoint `state.step`."""
    with tempfile.TemporaryDirectory(prefix="ftjobs-ckpt-") as local:
        snapshot(Path(local), model, optimizer, scheduler, state)
        return save(output, state.step, Path(local), identity, attempt)


def saved_state(ckpt: Checkpoint) -> TrainState:
    """The training state a downloaded, verified checkpoint holds (refused when unreadable or too new)."""
    return TrainState.from_json(json.loads((ckpt.local / "state.json").read_text()), ckpt.uri)


def snapshot(local: Path, model: Any, optimizer: Any, scheduler: Any, state: TrainState) -> None:
    """Everything a resume needs, as files: adapter (safetensors), optimizer, scheduler, RNG, state.json."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    trained = get_peft_model_state_dict(model) if hasattr(model, "peft_config") else model.state_dict()
    weights = {k: v.detach().to("cpu").contiguous().clone() for k, v in trained.items()}  # clone: tied weights
    save_file(weights, str(local / "adapter_model.safetensors"))
    torch.save(optimizer.state_dict(), local / "optimizer.pt")
    torch.save(scheduler.state_dict(), local / "scheduler.pt")
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, local / "rng.pt")
    py_state = random.getstate()
    if state.per_step is None or state.world is None:
        raise ValueError("the training state to save names no per_step and world")
    (local / "state.json").write_text(json.dumps({**state.to_json(), "python_rng": [py_state[0], list(py_state[1]),
                                                                                    py_state[2]]}))


def restore(local: Path, model: Any, optimizer: Any, scheduler: Any, rank: int, seed: int,
            where: str | None = None) -> TrainState:
    """Load a verified checkpoint (checksums were checked before any of these files is read)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    raw = json.loads((local / "state.json").read_text())
    state = TrainState.from_json(raw, where or str(local))  # refuse an unreadable state before touching the model
    weights = load_file(str(local / "adapter_model.safetensors"))
    if hasattr(model, "peft_config"):
        set_peft_model_state_dict(model, weights)
    else:  # method full: every weight
        model.load_state_dict(weights, strict=False)
    optimizer.load_state_dict(torch.load(local / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=True))
    rng = torch.load(local / "rng.pt", weights_only=True)
    if rank == 0:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        version, internal, gauss = raw["python_rng"]
        random.setstate((version, tuple(internal), gauss))
    else:  # other ranks' dropout streams are not saved: reseed them deterministically from the step
        torch.manual_seed(seed + 7919 * rank + state.step)
        random.seed(seed + 7919 * rank + state.step)
    return state
