"""The manifest contract that links the stages.

Each stage writes its data under its own output prefix, then `manifest.json`
**last**, create-only. A prefix without a manifest is an unfinished attempt:
ignored and safe to overwrite. A manifest is never rewritten.

A manifest records the stage, run id, created time, code version, the
resolved config and its hash, the input manifests (URI + sha256), every
artifact (URI, sha256, bytes, rows), stats, metrics and timings. Readers
verify artifacts against it before trusting them.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import re
import subprocess
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from common import stages, storage
from common.errors import AlreadyExistsError, ChecksumError, FtjobsError, InputError, OutputTakenError

LOG = logging.getLogger(__name__)
# 2: `run_id` is the run (or sweep) that made the step, the same in every step of it (1: a random id per
# manifest); `cells` names the sweep cells a step served. Version 1 manifests read as they are.
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
MANIFEST_NAME = "manifest.json"


def __getattr__(name: str) -> Any:
    # STAGES: the registry's names (common/stages.py), read when asked for: an extra stage's module imports
    # this one, so the registry cannot be read while it is being imported.
    if name == "STAGES":
        return stages.names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class _Producers(Mapping[str, str]):
    """`ftjobs <stage>` for each stage of the registry: what an error message tells a user to run."""

    def __getitem__(self, name: str) -> str:
        if name not in stages.all_stages():
            raise KeyError(name)
        return stages.producer(name)

    def __iter__(self) -> Iterator[str]:
        return iter(stages.names())

    def __len__(self) -> int:
        return len(stages.names())


PRODUCER: Mapping[str, str] = _Producers()


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Artifact(_Frozen):
    """One file a stage produced."""

    name: str = Field(description="Logical name, e.g. 'train' or 'adapter_model.safetensors'.")
    path: str = Field(description="Path relative to the manifest's prefix; readers resolve it from there.")
    uri: str = Field(description="Where it was written (absolute).")
    sha256: str = Field(description="sha256 of the bytes.")
    bytes: int = Field(description="Size in bytes.")
    rows: int | None = Field(default=None, description="Row count, for tables.")


class InputRef(_Frozen):
    """An input this stage read: another stage's manifest, or a raw file."""

    uri: str = Field(description="Manifest URI (or raw data URI for prepare).")
    sha256: str = Field(description="sha256 of the manifest (or raw file) bytes as read.")
    stage: str | None = Field(default=None, description="Stage that produced it; None for raw data.")
    role: str = Field(default="input", description="What the input is for, e.g. 'data', 'model', 'adapter'.")


class CodeVersion(_Frozen):
    package: str
    git_sha: str | None = None
    image: str | None = None


class Manifest(_Frozen):
    schema_version: int = SCHEMA_VERSION
    stage: str
    run_id: str = Field(description="The run (or sweep) that made this step: the same id in every step of it "
                                    "(`ftjobs runs show RUN_ID` lists them); a stage run alone gets a new one.")
    cells: list[str] = Field(default_factory=list, description="The sweep cells this step served (a step shared "
                                                               "by equal recipes serves several); [] outside a sweep.")
    created_at: str
    code: CodeVersion
    config: dict[str, Any]
    config_hash: str
    inputs: list[InputRef] = Field(default_factory=list)
    artifacts: list[Artifact] = Field(default_factory=list)
    stats: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    timings: dict[str, float] = Field(default_factory=dict)
    # For model-producing stages and everything downstream of them.
    model: dict[str, Any] = Field(default_factory=dict, description="Base model, revision, template hash ...")
    attempt: str | None = Field(default=None, description="The attempt whose files this manifest names "
                                                           "(they live under attempts/<attempt>/).")

    def artifact(self, name: str) -> Artifact:
        for a in self.artifacts:
            if a.name == name:
                return a
        raise InputError(
            f"{self.stage} manifest has no artifact {name!r} (has: {', '.join(a.name for a in self.artifacts)})"
        )

    def artifacts_named(self, prefix: str) -> list[Artifact]:
        return [a for a in self.artifacts if a.name.startswith(prefix)]


@dataclass
class Loaded:
    """A manifest as read: where from, its bytes' sha256, and the parsed model."""

    uri: str
    sha256: str
    manifest: Manifest

    @property
    def prefix(self) -> str:
        return storage.parent(self.uri)

    def resolve(self, artifact: Artifact) -> str:
        """The artifact's location, resolved relative to where the manifest was read."""
        return storage.join(self.prefix, artifact.path)

    def artifact_uri(self, name: str) -> str:
        """Where the artifact of that name is (raises InputError naming the manifest when it has none)."""
        return self.resolve(self.manifest.artifact(name))

    def ref(self, role: str = "input") -> InputRef:
        return InputRef(uri=self.uri, sha256=self.sha256, stage=self.manifest.stage, role=role)


# --------------------------------------------------------------------------- model blocks, typed per stage
# A manifest's `model` section says which model (and template) its outputs belong to. The stage that writes
# it builds one of these, and a stage that reads it parses it through the same class, so a key written
# under one name and read under another fails in a test, not in a user's run. Unknown keys are kept.


class ModelBlock(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    template_hash: str | None = Field(None, description="sha256 of the chat template the outputs were made with.")
    chat_template: str | None = Field(None, description="The chat template text.")
    tokenizer: dict[str, Any] | None = Field(None, description="common.chat.tokenizer_identity of the tokenizer.")


class PrepareModel(ModelBlock):
    """prepare, when it tokenized: the tokenizer and template the token ids and labels were made with."""

    tokenizer_source: str | None = None
    tokenizer_revision: str | None = None
    train_on: str | None = None
    max_length: int | None = None


class LoraBlock(BaseModel):
    model_config = ConfigDict(frozen=True, extra="allow")

    r: int
    alpha: float
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"
    modules_to_save: list[str] = Field(default_factory=list)

    @field_validator("modules_to_save", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        return [] if value is None else value  # peft's own spelling of "none"


class TrainModel(ModelBlock):
    """train: the adapter's base model and how it was trained on it."""

    base_model: str
    base_revision: str | None = None
    template_hash: str
    quantization: dict[str, Any] = Field(default_factory=dict)
    lora: LoraBlock


class MergeModel(ModelBlock):
    """merge: the merged model's origin (base, adapter) and how it was merged."""

    base_model: str
    base_revision: str | None = None
    base_source: str | None = None
    adapter_sha256: str | None = None
    dtype: str | None = None
    base_weights: str | None = None
    mode: str | None = None
    template_hash: str
    quantization: dict[str, Any] = Field(default_factory=dict)
    lora: LoraBlock | None = None


class InferModel(ModelBlock):
    """infer: what answered the prompts (the model source or merge manifest, an adapter, the engine)."""

    model: str
    adapter: str | None = None
    base_model: str | None = None
    revision: str | None = None
    engine: str | None = None
    label: str | None = None


class SynthModel(ModelBlock):
    """synth: which teacher wrote the examples (and which judge accepted them), in which format."""

    teacher: str
    teacher_base_model: str | None = None
    teacher_revision: str | None = None
    teacher_template_hash: str | None = None
    engine: str | None = None
    format: str | None = None
    judge: str | None = None


def model_block_class(stage: str) -> type[ModelBlock]:
    """The class that parses a stage's model section, as the registry names it (ModelBlock when none)."""
    import importlib

    found = stages.all_stages().get(stage)
    if found is None or found.model_block is None:
        return ModelBlock
    module, _, name = found.model_block.partition(":")
    cls: type[ModelBlock] = getattr(importlib.import_module(module), name)
    return cls


def model_block(loaded: Loaded) -> Any:
    """The manifest's model section, parsed by its stage's class; a section that does not fit is exit 3."""
    cls = model_block_class(loaded.manifest.stage)
    try:
        return cls.model_validate(loaded.manifest.model)
    except Exception as exc:  # pydantic's ValidationError, named for the file it came from
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
                             for e in getattr(exc, "errors", lambda: [])()) or str(exc)
        raise InputError(f"{loaded.uri}: its model section is not what `{PRODUCER.get(loaded.manifest.stage)}` "
                         f"writes ({problems}). Re-run that stage with this ftjobs.") from None


# --------------------------------------------------------------------------- helpers


def package_version() -> str:
    """The installed ftjobs version (`0+unknown` when run from a tree that was never installed)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("ftjobs")
    except PackageNotFoundError:
        return "0+unknown"


def code_version() -> CodeVersion:
    pkg = package_version()
    sha = os.environ.get("FTJOBS_GIT_SHA")
    if not sha:
        try:
            here = Path(__file__).resolve().parent
            sha = subprocess.run(
                ["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5, check=False
            ).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            sha = None
    return CodeVersion(package=pkg, git_sha=sha, image=os.environ.get("FTJOBS_IMAGE"))


def canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode()


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(canonical_json(config)).hexdigest()


def identity(config_hash_: str, inputs: Iterable[InputRef]) -> str:
    """What makes two attempts 'the same run': config plus input bytes."""
    h = hashlib.sha256(config_hash_.encode())
    for ref in sorted(inputs, key=lambda r: (r.role, r.uri)):
        h.update(f"{ref.role}:{ref.sha256}".encode())
    return h.hexdigest()


def now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def manifest_uri(prefix: str) -> str:
    return storage.join(prefix, MANIFEST_NAME)


def as_manifest_uri(uri: str) -> str:
    """Accept either a manifest URI or the prefix that holds one."""
    return uri if uri.rstrip("/").endswith(".json") else manifest_uri(uri)


# --------------------------------------------------------------------------- artifacts


@dataclass
class ArtifactWriter:
    """Collects artifacts as a stage writes them under its output prefix.

    With `base` (an attempt's folder, `attempts/<id>`), files go under `<prefix>/<base>/` and their
    recorded paths start with it: readers resolve them from the manifest, wherever they are.
    """

    prefix: str
    base: str = ""
    artifacts: list[Artifact] = field(default_factory=list)

    def rel(self, path: str) -> str:
        """The path as the manifest records it, relative to the prefix."""
        return f"{self.base}/{path.strip('/')}" if self.base else path.strip("/")

    def uri(self, path: str) -> str:
        return storage.join(self.prefix, self.rel(path))

    def add_file(self, local: str | Path, path: str, name: str | None = None, rows: int | None = None) -> Artifact:
        t = storage.upload_file(local, self.uri(path))
        return self._record(name or path, self.rel(path), t.uri, t.sha256, t.size, rows)

    def add_bytes(self, data: bytes, path: str, name: str | None = None, rows: int | None = None) -> Artifact:
        storage.write_bytes(self.uri(path), data)
        return self._record(name or path, self.rel(path), self.uri(path), hashlib.sha256(data).hexdigest(),
                            len(data), rows)

    def add_dir(self, local_dir: str | Path, path: str, name_prefix: str | None = None) -> list[Artifact]:
        out = []
        for t in storage.upload_dir(local_dir, self.uri(path)):
            rel = f"{path.strip('/')}/{t.rel}"
            name = f"{name_prefix}{t.rel}" if name_prefix is not None else rel
            out.append(self._record(name, self.rel(rel), t.uri, t.sha256, t.size, None))
        return out

    def add_existing(self, path: str, name: str | None = None, rows: int | None = None,
                     sha256: str | None = None) -> Artifact:
        """Record an object already written under the writer's folder (hashing it unless given)."""
        uri = self.uri(path)
        digest = sha256 or storage.sha256_uri(uri)
        return self._record(name or path, self.rel(path), uri, digest, storage.size(uri), rows)

    def add_shared(self, rel: str, name: str, sha256: str, size: int) -> Artifact:
        """Record a file outside the attempt's folder, at `rel` under the prefix, whose bytes are already known
        (train's kept checkpoints, which any attempt of the run may have written and every attempt resumes from)."""
        return self._record(name, rel, storage.join(self.prefix, rel), sha256, size, None)

    def _record(self, name: str, path: str, uri: str, sha: str, size: int, rows: int | None) -> Artifact:
        art = Artifact(name=name, path=path, uri=uri, sha256=sha, bytes=size, rows=rows)
        self.artifacts = [a for a in self.artifacts if a.name != name] + [art]
        return art


# --------------------------------------------------------------------------- publish / load


def build(
    *,
    stage: str,
    run_id: str,
    config: dict[str, Any],
    inputs: list[InputRef],
    artifacts: list[Artifact],
    cells: list[str] | None = None,
    stats: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    timings: dict[str, float] | None = None,
    model: dict[str, Any] | None = None,
    attempt: str | None = None,
) -> Manifest:
    return Manifest(
        stage=stage,
        run_id=run_id,
        cells=cells or [],
        created_at=now(),
        code=code_version(),
        config=config,
        config_hash=config_hash(config),
        inputs=inputs,
        artifacts=artifacts,
        stats=stats or {},
        metrics=metrics or {},
        timings={k: round(v, 4) for k, v in (timings or {}).items()},
        model=model or {},
        attempt=attempt,
    )


def publish(prefix: str, manifest: Manifest) -> str:
    """Write the manifest last, create-only. Returns its URI.

    Raises AlreadyExistsError when another attempt published first: exactly
    one writer wins a race.
    """
    uri = manifest_uri(prefix)
    data = storage.json_bytes(manifest.model_dump(mode="json"))
    try:
        storage.put_if_absent(uri, data)
    except AlreadyExistsError:
        raise AlreadyExistsError(
            f"Another attempt already published {uri}; this one's results were not recorded. "
            f"Run `ftjobs show {uri}` to see the winner."
        ) from None
    return uri


def parse(uri: str, data: bytes) -> Manifest:
    try:
        raw = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputError(f"{uri} is not valid JSON ({exc}); it is not a ftjobs manifest") from None
    if not isinstance(raw, dict) or "stage" not in raw:
        raise InputError(f"{uri} is not a ftjobs manifest (no 'stage' field)")
    version = raw.get("schema_version")
    if version not in READABLE_VERSIONS:
        raise InputError(
            f"{uri} has manifest schema version {version!r}; this ftjobs reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}. "
            "Re-run the stage that produced it with this version of ftjobs."
        )
    try:
        return Manifest.model_validate(raw)
    except Exception as exc:
        raise InputError(f"{uri} is not a valid ftjobs manifest: {exc}") from None


def load(
    uri: str,
    *,
    verify: Literal["none", "size", "full"] = "size",
    expect_stage: str | tuple[str, ...] | None = None,
    expect_sha256: str | None = None,
) -> Loaded:
    """Read a manifest (URI of the file or its prefix) and verify its artifacts.

    `size` (default) checks that every artifact exists with the recorded byte
    count: cheap. `full` re-hashes every artifact's bytes.
    """
    uri = as_manifest_uri(uri)
    try:
        data = storage.read_bytes(uri)
    except FileNotFoundError:
        hint = ""
        if isinstance(expect_stage, str):
            hint = f" Run `{PRODUCER.get(expect_stage, expect_stage)}` to produce it, or check the URI."
        raise InputError(f"No manifest at {uri}: that stage has not finished there.{hint}") from None
    except (NotADirectoryError, IsADirectoryError):  # a data file given where a stage's output belongs
        given = uri.removesuffix("/" + MANIFEST_NAME)
        hint = (f" For raw data run `ftjobs prepare --source {given} ...` first." if expect_stage in ("prepare", None)
                else "")
        raise InputError(f"{given} is a file, not a manifest or a stage's output prefix: pass the output of "
                         f"the stage that produces this input.{hint}") from None
    digest = hashlib.sha256(data).hexdigest()
    if expect_sha256 and digest != expect_sha256:
        raise ChecksumError(
            f"{uri} changed since it was recorded as an input (sha256 {digest[:12]}..., expected "
            f"{expect_sha256[:12]}...). Manifests are never rewritten: something replaced it."
        )
    manifest = parse(uri, data)
    if expect_stage is not None:
        allowed = (expect_stage,) if isinstance(expect_stage, str) else expect_stage
        if manifest.stage not in allowed:
            raise InputError(
                f"{uri} is a {manifest.stage} manifest; expected {' or '.join(allowed)}. "
                f"Pass the output of `{PRODUCER.get(allowed[0], allowed[0])}`."
            )
    loaded = Loaded(uri=uri, sha256=digest, manifest=manifest)
    if verify != "none":
        verify_artifacts(loaded, full=verify == "full")
    return loaded


def verify_artifact(loaded: Loaded, artifact: Artifact, *, full: bool = False) -> None:
    where = loaded.resolve(artifact)
    try:
        actual_size = storage.size(where)
    except FileNotFoundError:
        raise ChecksumError(
            f"Artifact {artifact.name!r} listed in {loaded.uri} is missing at {where}. "
            f"Re-run `{PRODUCER.get(loaded.manifest.stage, loaded.manifest.stage)}` into a fresh prefix."
        ) from None
    if actual_size != artifact.bytes:
        raise ChecksumError(
            f"Artifact {artifact.name!r} at {where} has {actual_size} bytes; its manifest recorded "
            f"{artifact.bytes}. It was modified after publishing."
        )
    if full:
        actual = storage.sha256_uri(where)
        if actual != artifact.sha256:
            raise ChecksumError(
                f"Artifact {artifact.name!r} at {where} has sha256 {actual[:16]}...; its manifest recorded "
                f"{artifact.sha256[:16]}... It was modified or corrupted after publishing."
            )


def verify_artifacts(loaded: Loaded, *, full: bool = False) -> None:
    for artifact in loaded.manifest.artifacts:
        verify_artifact(loaded, artifact, full=full)


def fetch_artifact(loaded: Loaded, artifact: Artifact, dest: str | Path) -> Path:
    """Download an artifact and check its sha256 against the manifest (always full)."""
    t = storage.download_file(loaded.resolve(artifact), dest)
    if t.sha256 != artifact.sha256:
        Path(dest).unlink(missing_ok=True)
        raise ChecksumError(
            f"Artifact {artifact.name!r} from {loaded.uri} has sha256 {t.sha256[:16]}...; the manifest "
            f"recorded {artifact.sha256[:16]}... Refusing to use it."
        )
    return Path(dest)


def check_output(prefix: str, *, stage: str, config: dict[str, Any], inputs: list[InputRef]) -> Loaded | None:
    """The 'already done' rule, checked before a stage does any work.

    Returns the existing manifest when this prefix already holds a finished run
    of the same stage, config and inputs (the caller exits 0, "already done").
    Raises OutputTakenError when it holds a different run. Returns None when
    there is no manifest: an unfinished attempt is safe to overwrite.
    """
    uri = manifest_uri(prefix)
    if not storage.exists(uri):
        storage.check_writable(prefix)
        return None
    existing = load(uri, verify="size")
    m = existing.manifest
    want = identity(config_hash(config), inputs)
    have = identity(m.config_hash, m.inputs)
    if m.stage == stage and want == have:
        return existing
    diff = _config_diff(m.config, config) if m.stage == stage else []
    if diff and _same_bytes(m.inputs, inputs) and all(_same_place(_at(m.config, k), _at(config, k)) for k in diff):
        # `./data/x.jsonl`, `data/x.jsonl` and `/abs/data/x.jsonl` name one file, `s3://b/p/` and `s3://b/p` one
        # prefix, a stage's prefix and its manifest.json one input: the same run.
        LOG.info("already done: %s (the same local paths, spelled differently: %s)", uri, ", ".join(diff))
        return existing
    detail = f"; config differs at: {', '.join(diff[:8])}" if diff else (
        "; its inputs differ" if m.stage == stage else f" (a {m.stage} run)")
    raise OutputTakenError(
        f"{prefix} already holds a finished {m.stage} run {m.run_id}{detail}. "
        "Choose another --output (or a new run id); manifests are never overwritten."
    )


def _same_bytes(a: Iterable[InputRef], b: Iterable[InputRef]) -> bool:
    return sorted((r.role, r.sha256) for r in a) == sorted((r.role, r.sha256) for r in b)


def _at(config: Any, dotted: str) -> Any:
    for part in dotted.split(".") if dotted != "<root>" else []:
        config = config.get(part) if isinstance(config, dict) else None
    return config


def _same_place(a: Any, b: Any) -> bool:
    """Equal, or local paths to the same existing file or folder (lists and dicts element by element)."""
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_place(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_place(a[k], b[k]) for k in a)
    if a == b:
        return True
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    if _spelling(a) == _spelling(b):
        return True
    if storage.is_s3(a) or storage.is_s3(b):
        return False
    try:
        pa, pb = storage.local_path(_spelling(a)).expanduser(), storage.local_path(_spelling(b)).expanduser()
        return pa.exists() and pa.resolve() == pb.resolve()
    except (OSError, ValueError, FtjobsError):
        return False


def _spelling(uri: str) -> str:
    """One spelling of a location: no trailing slash, a stage's prefix and its manifest.json alike."""
    return uri.rstrip("/").removesuffix("/" + MANIFEST_NAME)


def _config_diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for key in sorted(set(a) | set(b)):
            out += _config_diff(a.get(key), b.get(key), f"{path}.{key}" if path else key)
        return out
    return [] if a == b else [path or "<root>"]


# A run id names the run's folders (<root>/runs/<run_id>/) and, on Kubernetes, its Jobs and labels: one rule
# for the pipeline and `ftjobs k8s`, so a run started with one can be continued with the other. It is a valid
# label value, and neither '/' nor '..' can take a folder outside its root.
RUN_ID_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,61}[A-Za-z0-9])?$")


def new_run_id() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y%m%d-%H%M%S-") + os.urandom(3).hex()


def run_id_problem(value: str, what: str = "run id") -> str | None:
    """Why `value` is not a run id (None when it is one): the rule's one message, for every command that takes one."""
    if RUN_ID_RE.match(value):
        return None
    return (f"{value!r} is not a {what}: use 1-63 letters, digits, '.', '_' or '-', starting and ending with a "
            "letter or digit (it names the run's folder under the store root and, on Kubernetes, its Jobs and "
            "labels)")


# What an executor tells every step it starts (the run's id; in a sweep also the cells the step serves), so the
# step's manifest records them. A stage run alone has neither and records a new run id of its own.
RUN_ID_ENV = "FTJOBS_RUN_ID"
CELLS_ENV = "FTJOBS_CELLS"


def current_run_id() -> str:
    """The run this process works for: FTJOBS_RUN_ID when an executor started it, else a new id."""
    return os.environ.get(RUN_ID_ENV) or new_run_id()


def current_cells() -> list[str]:
    return [c for c in os.environ.get(CELLS_ENV, "").split(",") if c]
