"""Model sources: a Hugging Face id, an `s3://` prefix or a local folder.

`resolve(src)` returns a local folder holding the model, downloading it once
into a cache folder. Weights are accepted as safetensors only (pickled
`.bin` weights can execute code on load); `trust_remote_code` stays off
unless a config turns it on. `identity(src, path)` is what manifests record.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import storage
from common.errors import ConfigError, FtjobsError, InputError

LOG = logging.getLogger(__name__)

# What a model folder needs; everything else (pickles, onnx, gguf, images) is skipped.
ALLOW = ("*.safetensors", "*.safetensors.index.json", "*.json", "tokenizer*", "*.model", "*.tiktoken",
         "*.txt", "*.jinja", "merges.txt", "vocab.*")
# What loading only a tokenizer needs.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "chat_template.*", "*.model",
                   "*.tiktoken", "merges.txt", "vocab.*", "config.json", "generation_config.json")


def cache_root() -> Path:
    root = os.environ.get("FTJOBS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "ftjobs")
    return Path(root)


@dataclass(frozen=True)
class ModelRef:
    source: str          # what the user gave
    path: Path           # local folder
    revision: str | None  # HF commit, or sha256 of config+index for folders

    def identity(self) -> dict[str, Any]:
        return {"source": self.source, "revision": self.revision}


def looks_like_hf_id(src: str) -> bool:
    return (not storage.is_s3(src) and not src.startswith(("/", ".", "file://", "~"))
            and src.count("/") == 1 and not Path(src).exists())


def resolve(src: str, *, revision: str | None = None, cache_dir: str | Path | None = None,
            tokenizer_only: bool = False) -> ModelRef:
    """A local folder for a model source, downloaded once into the cache.

    `tokenizer_only`: fetch only tokenizer files (no weights needed or checked).
    """
    cache = Path(cache_dir) if cache_dir else cache_root() / "models"
    if storage.is_s3(src):
        key = hashlib.sha256(src.rstrip("/").encode()).hexdigest()[:16]
        dest = cache / (f"s3tok-{key}" if tokenizer_only else f"s3-{key}")
        marker = dest / ".ftjobs-complete"
        if not marker.exists():
            objects = [o for o in storage.list_objects(src)
                       if not o.rel.startswith(".") and not storage.is_folder_marker(o)]
            if tokenizer_only:
                objects = [o for o in objects if "/" not in o.rel and is_tokenizer_file(o.rel)]
            if not objects:
                raise InputError(f"No model files under {src}: check the prefix (is it the merge output's model/?)")
            LOG.info("downloading model %s -> %s (%d files)", src, dest, len(objects))
            if tokenizer_only:
                for o in objects:
                    storage.download_file(o.uri, storage.safe_destination(dest, o.rel))
            else:
                storage.download_dir(src, dest)
            marker.write_text(src)
        path = dest
    elif looks_like_hf_id(src):
        try:
            from huggingface_hub import snapshot_download

            path = Path(snapshot_download(src, revision=revision,
                                          allow_patterns=list(TOKENIZER_FILES if tokenizer_only else ALLOW),
                                          cache_dir=str(cache / "hf")))
        except Exception as exc:
            raise hub_error(exc, "model", src) from None
        revision = revision or path.name
    else:
        path = storage.local_path(src).expanduser()
        if not path.is_dir():
            raise InputError(f"Model folder {path} does not exist")
    if tokenizer_only:
        files = sorted(p for p in path.iterdir() if p.is_file() and is_tokenizer_file(p.name))
        if not any(not f.name.endswith("config.json") or f.name == "tokenizer_config.json" for f in files):
            raise InputError(f"{src} holds no tokenizer files (tokenizer.json, tokenizer_config.json, ...)")
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode() + b"\0" + f.read_bytes())
        return ModelRef(source=src, path=path, revision=revision or "sha256:" + h.hexdigest()[:16])
    check_folder(path, src)
    return ModelRef(source=src, path=path, revision=revision or folder_revision(path))


def hub_error(exc: Exception, kind: str, name: str,
              fix: str = "Give a local folder or an s3:// prefix, or set HF_TOKEN for gated models.") -> FtjobsError:
    """A failed Hugging Face Hub fetch of `kind` (model, dataset) `name`: permanent (no such repo, gated,
    offline by choice) is exit 3, a network failure is worth retrying (exit 1). A name that looks like a
    mistyped local path says so."""
    what, error = f"{kind} {name!r}", f"{type(exc).__name__}: {exc}"
    typo = f" There is no local folder {name} either: if you meant one, check the path." if "/" in name else ""
    permanent = type(exc).__name__ in {"RepositoryNotFoundError", "GatedRepoError", "RevisionNotFoundError",
                                       "EntryNotFoundError", "HFValidationError", "DatasetNotFoundError",
                                       "FileNotFoundError"}
    offline = any(os.environ.get(v, "").lower() in ("1", "true", "yes")
                  for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))
    if permanent or offline:
        return InputError(f"Could not fetch {what} from the Hugging Face Hub ({error}).{typo} {fix}")
    return FtjobsError(f"Could not reach the Hugging Face Hub for {what} ({error}).{typo} This may pass: "
                       f"retry. {fix}")


def is_tokenizer_file(name: str) -> bool:
    import fnmatch

    return any(fnmatch.fnmatch(name, pattern) for pattern in TOKENIZER_FILES)


def check_folder(path: Path, src: str) -> None:
    """A loadable model folder: config.json that parses, safetensors whose headers match their sizes.

    Checked before any engine starts, so a broken download is a clear exit 3 instead of a traceback from
    deep inside transformers or vLLM.
    """
    if not (path / "config.json").exists():
        raise InputError(f"{src} has no config.json: not a transformers model folder")
    read_config(path)
    weights = sorted(path.glob("*.safetensors"))
    if not weights:
        pickles = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = f" (found pickled weights {pickles[:3]}: convert them to safetensors)" if pickles else ""
        raise InputError(f"{src} has no .safetensors weights{hint}; ftjobs loads safetensors only")
    for f in weights:
        safetensors_header(f, src)


@dataclass(frozen=True)
class SafetensorsHeader:
    """A safetensors file's header, read without loading any tensor."""

    start: int                          # offset of the first tensor byte
    raw: bytes                          # the header JSON as stored (what folder_revision hashes)
    tensors: dict[str, dict[str, Any]]  # name -> {"dtype", "shape", "data_offsets"}, in file order


def safetensors_header(f: Path, src: str) -> SafetensorsHeader:
    """The header of a safetensors file, after checking the file holds all it declares.

    The one reader of the format's header (8-byte little-endian length, then JSON): model folders are
    checked and fingerprinted with it, and merge plans its output from it.
    """
    size = f.stat().st_size
    problem = None
    raw, tensors = b"", {}
    with open(f, "rb") as fh:
        head = fh.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            problem = f"its header claims {n} bytes in a {size}-byte file"
        else:
            raw = fh.read(n)
            try:
                tensors = {k: t for k, t in json.loads(raw).items() if k != "__metadata__"}
                end = max((t["data_offsets"][1] for t in tensors.values()), default=0)
                if any(not isinstance(t["dtype"], str) or not isinstance(t["shape"], list) for t in tensors.values()):
                    raise ValueError("a tensor entry lacks a dtype string or a shape list")
            except (ValueError, TypeError, KeyError, IndexError, AttributeError) as exc:
                problem = f"its header is not valid safetensors JSON ({exc})"
            else:
                if 8 + n + end != size:
                    problem = f"its tensors need {8 + n + end} bytes but the file has {size}"
    if problem:
        raise InputError(f"{src}: {f.name} is truncated or corrupt ({problem}). Re-download the model, or re-run "
                         "the stage that wrote it.")
    return SafetensorsHeader(start=8 + n, raw=raw, tensors=tensors)


def parameter_count(path: Path) -> int:
    """The model's parameters as its checkpoint stores them (headers only; a tied head counts once).

    The model size a sweep's leaderboard reports: counting a loaded 4-bit model's parameters would give
    the packed element count instead.
    """
    import math

    seen: dict[str, int] = {}
    for f in sorted(path.glob("*.safetensors")):
        for name, t in safetensors_header(f, str(path)).tensors.items():
            seen[name] = math.prod(t["shape"])
    return sum(seen.values())


SAMPLES_PER_FILE = 16
SAMPLE_BYTES = 1 << 16


def folder_revision(path: Path) -> str:
    """A content id for a local model folder.

    sha256 over config.json, the weight index, and per safetensors file its size, header (names, shapes,
    dtypes) and 16 evenly spaced 64 KiB samples of the tensor bytes. A different model of the same shape,
    a fine-tuned copy or a partial re-download gets another id, at the cost of 1 MiB of reads per file
    (hashing every byte would cost ~10 s per 16 GB on each stage). A change confined to bytes between
    samples is not seen: the manifests' sha256 cover the files ftjobs itself writes.
    """
    h = hashlib.sha256()
    for name in ("config.json", "model.safetensors.index.json"):
        f = path / name
        if f.exists():
            h.update(f.read_bytes())
    for f in sorted(path.glob("*.safetensors")):
        header = safetensors_header(f, str(path))
        start, size = header.start, f.stat().st_size
        h.update(f"{f.name}:{size}".encode() + header.raw)
        span = size - start
        with open(f, "rb") as fh:
            for i in range(SAMPLES_PER_FILE):
                fh.seek(start + (span - SAMPLE_BYTES) * i // (SAMPLES_PER_FILE - 1) if span > SAMPLE_BYTES else start)
                h.update(fh.read(SAMPLE_BYTES))
    return "sha256:" + h.hexdigest()[:16]


def read_config(path: Path) -> dict[str, Any]:
    try:
        data = json.loads((path / "config.json").read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise InputError(f"{path / 'config.json'} is not valid JSON ({exc}): re-download the model") from None
    if not isinstance(data, dict):
        raise InputError(f"{path / 'config.json'} holds {type(data).__name__}, not a JSON object: not a model "
                         "config; re-download the model")
    return data


def is_quantized(path: Path) -> str | None:
    """The quantization method a saved model carries, if any."""
    q = read_config(path).get("quantization_config")
    return (q or {}).get("quant_method") if q else None


def check_trust_remote_code(path: Path, trust: bool) -> None:
    auto = read_config(path).get("auto_map")
    if auto and not trust:
        raise ConfigError(
            f"Model at {path} needs custom code (auto_map: {sorted(auto)}); ftjobs does not run remote code "
            "unless the config sets trust_remote_code: true"
        )
