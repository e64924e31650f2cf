"""train's side of checkpoint selection: candidate adapters kept as artifacts, and early stopping on held-out loss.

`select: {metric, among: checkpoints, every, keep}` keeps the adapter of every `every`-th step (default: the
checkpoint interval) as a candidate, and always the last step's. They are uploaded while training runs to
`<output>/candidates/step-NNNNNNNN/` (the adapter's safetensors and `candidate.json`, written last, with its
sha256), so a resumed run keeps those it already saved; the manifest names each kept one as the artifacts
`candidates/step-NNNNNNNN/adapter_model.safetensors` and `.../adapter_config.json`, which `ftjobs select`
serves as LoRA adapters (one engine, every candidate an adapter) and scores on the held-out prompts.
Train itself never picks by the metric: it has no generations to score. Its manifest's `metrics.selection`
lists the candidates with their held-out loss.

`early_stopping: {patience, min_delta}` stops when `patience` evaluations in a row (every `eval_every` steps)
did not lower the held-out loss by more than `min_delta` below the best so far. Every evaluation that sets a
new best saves that step's adapter as a candidate, so the published `adapter/` is the best-loss step's (its
step and loss are recorded beside the last step's in `metrics.selection`). Both decisions are read from the
evaluation history in the training state, so a resumed run makes the same ones.

See docs/selection.md.
"""

from __future__ import annotations

import json
import logging
import re
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pydantic import Field

from common import storage
from common.config import JobConfig

if TYPE_CHECKING:
    from common import manifest as mf

LOG = logging.getLogger(__name__)
FOLDER = "candidates"
MARKER = "candidate.json"
WEIGHTS = "adapter_model.safetensors"
STEP_DIR = re.compile(r"^step-(\d{8})$")


class Select(JobConfig):
    """Keep checkpoints' adapters as candidates; `ftjobs select` scores them and names the best."""

    metric: str = Field("exact_match", description="The metric `ftjobs select` ranks the candidates by (one that "
                                                   "evaluate computes: exact_match, token_f1, rouge_l, ...).")
    among: Literal["checkpoints"] = Field("checkpoints", description="What the candidates are: the adapters of "
                                                                     "steps saved while training.")
    every: int | None = Field(None, ge=1, description="A candidate every N optimizer steps (default: "
                                                      "checkpoint.every_steps, else eval_every). The last step is "
                                                      "always one.")
    keep: int | None = Field(None, ge=1, description="At most this many candidates besides the last step's (the "
                                                     "newest are kept, and the best held-out loss one with "
                                                     "early_stopping); None: all. Each costs one adapter's bytes.")


class EarlyStopping(JobConfig):
    """Stop when the held-out loss stops falling; publish the best-loss step's adapter."""

    patience: int = Field(ge=1, description="Evaluations in a row without a new best (by more than min_delta) "
                                            "before training stops.")
    min_delta: float = Field(0.0, ge=0.0, description="How much lower than the best so far an eval loss must be "
                                                      "to count as a new best.")


def every(select: Select | None, checkpoint_every: int | None, eval_every: int | None) -> int | None:
    """The candidate interval in steps (None: no periodic candidates)."""
    if select is None:
        return None
    return select.every or checkpoint_every or eval_every


def best(evals: list[dict[str, Any]], min_delta: float) -> tuple[int, float] | None:
    """(step, loss) of the best evaluation: the first that no later one beats by more than min_delta."""
    found: tuple[int, float] | None = None
    for point in evals:
        if found is None or point["loss"] < found[1] - min_delta:
            found = (int(point["step"]), float(point["loss"]))
    return found


def since_best(evals: list[dict[str, Any]], min_delta: float) -> int:
    """Evaluations after the best one: early stopping's patience counter."""
    top = best(evals, min_delta)
    return 0 if top is None else sum(1 for p in evals if p["step"] > top[0])


def should_stop(stopping: EarlyStopping | None, evals: list[dict[str, Any]]) -> bool:
    return stopping is not None and since_best(evals, stopping.min_delta) >= stopping.patience


def is_new_best(stopping: EarlyStopping | None, evals: list[dict[str, Any]], step: int) -> bool:
    top = best(evals, stopping.min_delta) if stopping is not None else None
    return top is not None and top[0] == step


# --------------------------------------------------------------------------- candidates in the store


def root(output: str) -> str:
    return storage.join(output, FOLDER)


def folder(step: int) -> str:
    return f"step-{step:08d}"


def save(output: str, step: int, model: Any, eval_loss: float | None = None) -> str:
    """Upload the adapter's weights at `step` as a candidate, its marker last. Returns the folder."""
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    uri = storage.join(root(output), folder(step))
    with tempfile.TemporaryDirectory(prefix="ftjobs-cand-") as tmp:
        local = Path(tmp) / WEIGHTS
        save_file({k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()},
                  str(local))
        sent = storage.upload_file(local, storage.join(uri, WEIGHTS))
    marker = {"step": step, "eval_loss": eval_loss, "files": {WEIGHTS: {"sha256": sent.sha256, "bytes": sent.size}}}
    storage.write_bytes(storage.join(uri, MARKER), storage.json_bytes(marker))
    return uri


def present(output: str) -> dict[int, dict[str, Any]]:
    """Complete candidates under the output: step -> marker."""
    found: dict[int, dict[str, Any]] = {}
    for obj in storage.list_objects(root(output)):
        head, _, rest = obj.rel.partition("/")
        match = STEP_DIR.match(head)
        if match and rest == MARKER:
            found[int(match.group(1))] = json.loads(storage.read_bytes(storage.join(root(output), obj.rel)))
    return found


def prune(output: str, keep: int | None, protect: set[int]) -> list[int]:
    """Delete all but the newest `keep` candidates (never those in `protect`); returns the steps removed."""
    if keep is None:
        return []
    steps = sorted(present(output), reverse=True)
    doomed = [s for s in steps[keep:] if s not in protect]
    for step in doomed:
        storage.delete_prefix(storage.join(root(output), folder(step)))
    return sorted(doomed)


def load_into(output: str, step: int, model: Any) -> None:
    """Put candidate `step`'s weights (sha256-checked) into the model: the best-loss step, before saving adapter/."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    from common.errors import ChecksumError

    marker = present(output)[step]
    want = marker["files"][WEIGHTS]
    with tempfile.TemporaryDirectory(prefix="ftjobs-cand-") as tmp:
        got = storage.download_file(storage.join(root(output), folder(step), WEIGHTS), Path(tmp) / WEIGHTS)
        if got.sha256 != want["sha256"]:
            raise ChecksumError(f"candidate {folder(step)} under {root(output)} changed after it was saved (sha256 "
                                "differs from its candidate.json); re-run train")
        set_peft_model_state_dict(model, load_file(str(Path(tmp) / WEIGHTS)))


def publish(writer: mf.ArtifactWriter, output: str, adapter_config: bytes) -> list[int]:
    """Name every complete candidate in the manifest (weights where training left them, config beside them)."""
    steps = []
    for step, marker in sorted(present(output).items()):
        want = marker["files"][WEIGHTS]
        name = f"{FOLDER}/{folder(step)}"
        writer.add_shared(f"{name}/{WEIGHTS}", f"{name}/{WEIGHTS}", want["sha256"], want["bytes"])
        writer.add_bytes(adapter_config, f"{name}/adapter_config.json")
        steps.append(step)
    return steps


def summary(steps: list[int], evals: list[dict[str, Any]], last: int, stopping: EarlyStopping | None,
            stopped_early: bool) -> dict[str, Any]:
    """What the manifest's metrics.selection records: the candidates and, with early stopping, both steps."""
    loss_at = {int(p["step"]): p["loss"] for p in evals}
    out: dict[str, Any] = {"candidates": [{"step": s, "eval_loss": loss_at.get(s)} for s in steps],
                           "last_step": last, "last_eval_loss": loss_at.get(last), "adapter_step": last}
    if stopping is not None:
        top = best(evals, stopping.min_delta)
        out |= {"early_stopping": stopping.model_dump(), "stopped_early": stopped_early,
                "best_step": top[0] if top else None, "best_eval_loss": top[1] if top else None,
                "adapter_step": top[0] if top else last}
    return out
