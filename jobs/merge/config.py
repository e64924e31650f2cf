"""merge's config: what `ftjobs merge` reads from its --config, --set and flags (every field documented).

The job that reads it is `jobs/merge/job.py`; the check's rule and its constants live in `checks.py`.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from common import manifest as mf
from common import storage
from common.config import JobConfig
from jobs.merge.checks import DEFAULT_PROMPTS

SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*$", re.IGNORECASE)
UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
         "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_size(value: str | int) -> int:
    """'5GB' (10^9), '512MiB' (2^20), or a plain byte count."""
    if isinstance(value, int):
        return value
    m = SIZE_RE.match(value)
    if not m:
        raise ValueError(f"expected a size like '5GB', '512MiB' or a byte count, got {value!r}")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "b").lower()])


class Checks(JobConfig):
    """What is verified before the manifest is published."""

    generation: bool = Field(True, description="Compare greedy generation of the saved merged model with the "
                             "unmerged base + adapter. Needs the model in memory once; when it does not fit the "
                             "memory budget the check is skipped and the reason recorded.")
    prompts: list[str] = Field(default_factory=lambda: list(DEFAULT_PROMPTS), description="User messages, "
                               "rendered with the training chat template, used for the generation check.")
    max_new_tokens: int = Field(16, ge=0, le=512, description="Greedy tokens the unmerged model generates per "
                                "prompt, whose positions are compared too. 0: the prompts' positions only, one "
                                "batched forward per model (the cheapest check; see docs/merge.md).")
    logit_atol: float | None = Field(None, gt=0, description="float32 merges (the strict comparison): largest "
                                     "|logit| difference accepted where a greedy choice differs; default 1e-3. "
                                     "16-bit merges are judged against their own rounding instead "
                                     "(docs/merge.md).")

    @model_validator(mode="after")
    def _prompts(self) -> Checks:
        if self.generation and not [p for p in self.prompts if p.strip()]:
            raise ValueError("checks.generation is on but checks.prompts is empty: give at least one prompt "
                             "or set checks.generation: false")
        return self


class Config(JobConfig):
    """Merge job configuration."""

    input: str = Field(description="Train manifest URI (or the train output prefix that holds it).")
    output: str = Field(description="Output prefix: model/ and manifest.json are written under it.")
    base_model: str | None = Field(None, description="Where to read the base model instead of the source the "
                                   "train manifest names (e.g. an s3:// mirror). Its revision must match.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Dtype of the merged weights. auto: the base checkpoint's dtype (float16 becomes "
        "float32 on CPU). float32 keeps W + s*B@A exactly (twice the bytes of a 16-bit base; worth it for a "
        "small base) and is checked strictly; a 16-bit dtype rounds it and is checked against what that "
        "rounding explains. The merge itself is computed in float32 per tensor in sharded mode.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to merge and check; auto: cuda "
                                                   "when available.")
    base_weights: Literal["original", "nf4_roundtrip"] = Field(
        "original", description="original: merge into the 16-bit base. nf4_roundtrip: merge into "
        "dequantize(quantize(W)) with the adapter's 4-bit settings, the weights training actually saw.")
    mode: Literal["auto", "in_memory", "sharded"] = Field(
        "auto", description="in_memory: load the whole model, peft merge. sharded: stream the checkpoint "
        "tensor by tensor with bounded memory. auto: sharded for plain LoRA, otherwise in_memory.")
    max_shard_size: str = Field("5GB", description="Largest output safetensors file ('5GB', '500MB', bytes). "
                                "Smaller shards download in parallel; vLLM and transformers read either.")
    max_memory: str | None = Field(None, description="Memory budget for mode/check decisions ('16GB'); default: "
                                   "available RAM (or free GPU memory on cuda).")
    trust_remote_code: bool = Field(False, description="Allow models that ship custom code (auto_map).")
    checks: Checks = Field(default_factory=Checks, description="Checks run before publishing.")

    @field_validator("max_shard_size", "max_memory")
    @classmethod
    def _size(cls, value: str | None) -> str | None:
        if value is not None and parse_size(value) <= 0:
            raise ValueError("must be positive")
        return value

    @model_validator(mode="after")
    def _cross(self) -> Config:
        if self.dtype == "float16" and self.device == "cpu":
            raise ValueError("dtype float16 on device cpu: CPU float16 matmuls are slow and lose precision; "
                             "use bfloat16 or float32 on CPU")
        if storage.normalize(self.output).rstrip("/") == storage.normalize(mf.as_manifest_uri(self.input)).rsplit(
                "/", 1)[0]:
            raise ValueError("output is the train output prefix: give merge its own --output")
        return self
