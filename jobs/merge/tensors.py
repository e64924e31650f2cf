"""Safetensors without loading a model: list a checkpoint's tensors, plan output shards, stream a file out.

merge writes every output file through `write_safetensors`, tensor by tensor, so its peak memory is one
tensor whatever the model's size, and the sha256 the manifest needs is computed on the way out.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import struct
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import models
from common.errors import InputError
from jobs.merge.checks import MergeCheckError

SAFE_DTYPES = {"float32": "F32", "bfloat16": "BF16", "float16": "F16", "float64": "F64", "int64": "I64",
               "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8", "bool": "BOOL"}
SAFE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
TORCH_NAME = {v: k for k, v in SAFE_DTYPES.items()}


@dataclass(frozen=True)
class TensorInfo:
    name: str
    file: str          # base checkpoint file it lives in
    shape: tuple[int, ...]
    dtype: str         # safetensors dtype code, as stored in the base
    offset: int = -1   # where its bytes start in `file` (-1: not a stored tensor, e.g. a head untied on merge)

    def out_dtype(self, dtype: str) -> str:
        return SAFE_DTYPES[dtype] if self.dtype in ("F32", "BF16", "F16", "F64") else self.dtype

    def nbytes(self, dtype: str) -> int:
        return math.prod(self.shape) * SAFE_BYTES[self.out_dtype(dtype)]


def read_checkpoint(path: Path) -> list[TensorInfo]:
    """Names, shapes and dtypes of every tensor in a safetensors checkpoint, from headers only
    (`common.models.safetensors_header`, which also refuses a truncated file)."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = sorted(p.name for p in path.glob("*.safetensors"))
    out = []
    for fname in files:
        header = models.safetensors_header(path / fname, str(path))
        for name, meta in header.tensors.items():
            if meta["dtype"] not in SAFE_BYTES:
                raise InputError(f"{path / fname}: tensor {name} has dtype {meta['dtype']}, which merge does not "
                                 "handle (already quantized?). Give the 16-bit base.")
            out.append(TensorInfo(name, fname, tuple(meta["shape"]), meta["dtype"],
                                  header.start + meta["data_offsets"][0]))
    if not out:
        raise InputError(f"{path} holds no safetensors tensors")
    return out


def plan_shards(tensors: list[TensorInfo], dtype: str, max_bytes: int) -> list[list[TensorInfo]]:
    """Group tensors, in checkpoint order, into output files of at most max_bytes (one big tensor may exceed)."""
    shards: list[list[TensorInfo]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes(dtype) > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes(dtype)
    return shards


def shard_names(n: int) -> list[str]:
    return ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def write_safetensors(path: Path, infos: list[TensorInfo], dtype: str, produce: Callable[[TensorInfo], Any],
                      timings: dict[str, float] | None = None) -> str:
    """Stream one safetensors file: header first (shapes are known), then each tensor as `produce` makes it.

    Peak memory is one tensor; the sha256 is computed on the way out (its seconds are added to
    timings["hash"]). Written to a temporary name and renamed.
    """
    import torch

    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in infos:
        n = t.nbytes(dtype)
        header[t.name] = {"dtype": t.out_dtype(dtype), "shape": list(t.shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    h = hashlib.sha256()
    hash_s = 0.0

    def digest(data: Any) -> None:
        nonlocal hash_s
        start = time.perf_counter()
        h.update(data)
        hash_s += time.perf_counter() - start

    tmp = path.with_name(f".{path.name}.tmp")
    # Two threads beside this one: one hashes tensor i while the other writes it, and this thread produces
    # tensor i+1 (hashlib, file writes and torch's kernels all release the GIL). sha256 is the longest of the
    # three (about 1.4 GB/s here), so it runs on its own rather than after each write. At most one tensor
    # waits for them, so peak memory stays about two tensors.
    with (open(tmp, "wb") as f, ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-hash") as hasher,
          ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-write") as writer):
        for chunk in (struct.pack("<Q", len(blob)), blob):
            digest(chunk)
            f.write(chunk)
        pending: list[Future[Any]] = []
        for t in infos:
            tensor = produce(t)
            want = getattr(torch, TORCH_NAME[t.out_dtype(dtype)])
            if tuple(tensor.shape) != t.shape:
                raise MergeCheckError(f"merged tensor {t.name} has shape {tuple(tensor.shape)}; the base has {t.shape}")
            data = tensor.detach().to("cpu", want).contiguous().reshape(-1).view(torch.uint8).numpy()
            for done in pending:
                done.result()
            pending = [hasher.submit(digest, data), writer.submit(f.write, data)]
        for done in pending:
            done.result()
    os.replace(tmp, path)
    if timings is not None:
        timings["hash"] = timings.get("hash", 0.0) + hash_s
    return h.hexdigest()


def read_tensor(f: io.BufferedReader, info: TensorInfo, where: Path) -> Any:
    """One stored tensor, read into memory of its own (a plain read, not a memory map).

    A merge updates every weight in place: on a copy-on-write map of the file each page it touches faults
    and is copied by the kernel (measured: 11.5 s of a 1.6 GB merge, against 0.9 s for reading the same
    bytes into fresh memory).
    """
    import torch

    tensor = torch.empty(info.shape, dtype=getattr(torch, TORCH_NAME[info.dtype]))
    buf: Any = tensor.reshape(-1).view(torch.uint8).numpy()
    f.seek(info.offset)
    if f.readinto(buf) != buf.nbytes:
        raise InputError(f"{where}: tensor {info.name} ends past the end of the file (truncated?); re-download "
                         "the base model")
    return tensor


def finite_check(name: str, tensor: Any) -> str | None:
    import torch

    if not tensor.is_floating_point():
        return None
    # The norm is a reduction with no temporary: finite means every value is. Only when it is not (a NaN,
    # an Inf, or values so large their squares overflow) is the exact elementwise test run.
    if math.isfinite(float(torch.linalg.vector_norm(tensor))) or bool(torch.isfinite(tensor).all()):
        return None
    bad = ~torch.isfinite(tensor)
    idx = tuple(int(i) for i in bad.nonzero()[0])
    return (f"{name} has {int(bad.sum())} NaN/Inf values (first at index {idx}: {tensor[idx].item()}); "
            "the adapter or base holds non-finite weights")


def tensors_float(info: TensorInfo) -> bool:
    return info.dtype in ("F32", "BF16", "F16", "F64")

