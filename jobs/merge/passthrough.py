"""merge of a full finetune: nothing to fold in, so the trained model passes through unchanged.

A train manifest whose model block says `method: full` carries `model/` (safetensors, config) and
`tokenizer/` instead of an adapter. merge publishes the same weight files byte for byte (same sha256) with
the tokenizer files beside them in `model/`, the folder infer and vLLM load, and a model block that says
`mode: passthrough`. Nothing is rounded or re-saved, so no check has anything to compare.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from common import manifest as mf
from common import stage, storage
from common.errors import InputError

MODEL_DIR = "model"


def is_full(train: mf.Loaded) -> bool:
    return (train.manifest.model or {}).get("method") == "full"


def publish(config: Any, train: mf.Loaded, attempt: stage.Attempt, started: float) -> stage.Outcome:
    """Copy the train run's model/ and tokenizer/ (verified) into this attempt's model/; the outcome."""
    info = mf.TrainModel.model_validate(train.manifest.model)
    work = Path(tempfile.mkdtemp(prefix="ftjobs-merge-pass-"))
    try:
        out = work / MODEL_DIR
        arts = train.manifest.artifacts_named("model/") + train.manifest.artifacts_named("tokenizer/")
        for art in arts:
            name = art.name.split("/", 1)[1]
            mf.fetch_artifact(train, art, storage.safe_destination(out, name))
        if not any(out.glob("*.safetensors")) or not (out / "config.json").exists():
            raise InputError(f"{train.uri} says method full but has no model/*.safetensors and model/config.json "
                             "artifacts: re-run train")
        weights = {a.name: a.sha256 for a in arts if a.name.endswith(".safetensors")}
        attempt.writer.add_dir(out, MODEL_DIR)
        model_bytes = sum(p.stat().st_size for p in out.glob("*.safetensors"))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    model_info = mf.MergeModel(
        base_model=info.base_model, base_revision=info.base_revision, mode="passthrough",
        dtype=(info.quantization or {}).get("compute_dtype"), template_hash=info.template_hash,
        chat_template=info.chat_template, tokenizer=info.tokenizer, quantization={}, lora=None,
    ).model_dump(mode="json")
    stats = {"mode": "passthrough", "model_bytes": model_bytes, "weights_sha256": weights}
    timings = {"total": time.monotonic() - started}
    return stage.Outcome(stats=stats, metrics={}, timings=timings, model=model_info)



