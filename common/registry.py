"""The model registry: named models in the object store, each a list of versions and a champion pointer.

Layout under `<root>/models/<name>/` (root: a local folder or s3://bucket/prefix, the same root runs use):

    versions/<n>.json      one record per promoted model (create-only): the merge (or train) manifest's URI and
                           sha256, its run id, the evaluate manifest that admitted it, who promoted it and when
    champion/<seq>.json    the champion pointer's history (create-only, seq zero-padded): each names a version;
                           the highest seq is the champion

Moving the champion is creating `champion/<seq+1>.json` with `If-None-Match: *` (S3) or a hard link (local):
of two promotions that read the same champion, exactly one creates the next pointer; the other gets
`ChampionMoved` (exit 4) and a message naming the winner. Nothing is ever rewritten, so `rollback` is a new
pointer to an older version, and the whole history stays readable.

`models:/NAME` names the champion, `models:/NAME/VERSION` one version; `resolve` turns either into the version
record after checking that its manifest and the files it lists are still there (a champion whose files were
deleted is reported, never silently replaced by another version).
"""

from __future__ import annotations

import getpass
import json
import logging
import os
import socket
import sys
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from common import manifest as mf
from common import storage
from common.errors import AlreadyExistsError, ConfigError, FtjobsError, GateFailed, InputError

LOG = logging.getLogger(__name__)
SCHEME = "models:/"
ROOT_ENV = "FTJOBS_ROOT"
# The stages whose manifests name a model a registry may hold: a merged model, or an adapter on its base.
MODEL_STAGES = ("merge", "train")
# CI variables recorded with a promotion, so a version says which workflow run admitted it.
CI_ENV = ("GITHUB_RUN_ID", "GITHUB_RUN_ATTEMPT", "GITHUB_WORKFLOW", "GITHUB_REPOSITORY", "GITHUB_SHA",
          "GITHUB_REF", "GITHUB_ACTOR", "CI_PIPELINE_ID", "CI_JOB_ID", "BUILD_ID")
SEQ_WIDTH = 8


class ChampionMoved(GateFailed):
    """Another promotion (or rollback) moved the champion first: this one is refused, not retried."""


class _Record(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Promoter(_Record):
    """Who or what promoted a version."""

    user: str | None = Field(None, description="The OS user that ran the command.")
    host: str | None = Field(None, description="The machine (or pod) it ran on.")
    command: str = Field(description="The command line.")
    ci: dict[str, str] = Field(default_factory=dict, description="CI variables (GITHUB_RUN_ID, ...) when set.")


class Version(_Record):
    """versions/<n>.json: one model admitted under a name."""

    name: str = Field(description="The registry name.")
    version: int = Field(ge=1, description="1, 2, ...: the order versions were recorded in.")
    manifest: str = Field(description="URI of the merge (or train) manifest of the model.")
    manifest_sha256: str = Field(description="sha256 of that manifest's bytes when it was promoted.")
    stage: Literal["merge", "train"] = Field(description="merge: a merged model; train: an adapter on its base.")
    run_id: str = Field(description="The run id in that manifest.")
    base_model: str | None = Field(None, description="The base model it was finetuned from.")
    evaluation: str | None = Field(None, description="URI of the evaluate manifest that admitted it (None: "
                                                     "promoted by hand without a gate).")
    evaluation_sha256: str | None = Field(None, description="sha256 of that evaluate manifest.")
    promoted_at: str = Field(description="UTC time of the promotion.")
    promoted_by: Promoter = Field(description="Who or what promoted it.")
    note: str | None = Field(None, description="Free text given with --note.")


class Pointer(_Record):
    """champion/<seq>.json: from this seq on, `version` is the champion."""

    name: str
    seq: int = Field(ge=1, description="The pointer's place in the history; the highest is the champion.")
    version: int = Field(ge=1, description="The version that is champion from this pointer on.")
    action: Literal["promote", "rollback"]
    previous: int | None = Field(None, description="The version that was champion before (None: the first).")
    at: str
    by: Promoter


class Champion(BaseModel):
    """The champion as read: its pointer (with seq), its version record, and where they live."""

    model_config = ConfigDict(frozen=True)

    pointer: Pointer
    version: Version


# --------------------------------------------------------------------------- names and places


def default_root() -> str:
    return os.environ.get(ROOT_ENV) or "."


def is_ref(src: str | None) -> bool:
    return bool(src) and str(src).startswith(SCHEME)


def parse_ref(ref: str) -> tuple[str, int | None]:
    """`models:/NAME` -> (NAME, None); `models:/NAME/3` -> (NAME, 3)."""
    body = ref[len(SCHEME):].strip("/")
    name, _, version = body.partition("/")
    check_name(name)
    if not version:
        return name, None
    if not version.isdigit() or int(version) < 1:
        raise ConfigError(f"{ref!r}: the version must be a number 1, 2, ... (models:/{name}/VERSION), or left out "
                          f"for the champion (models:/{name})")
    return name, int(version)


def check_name(name: str) -> str:
    if not mf.RUN_ID_RE.match(name or ""):
        raise ConfigError(f"{name!r} is not a model name: use 1-63 letters, digits, '.', '_' or '-', starting and "
                          "ending with a letter or digit (it names the folder <root>/models/<name>/)")
    return name


def folder(root: str, name: str) -> str:
    return storage.join(root, "models", check_name(name))


def names(root: str) -> list[str]:
    """Every name with at least one version under `<root>/models/`."""
    found = {o.rel.split("/", 1)[0] for o in storage.list_objects(storage.join(root, "models"))
             if "/versions/" in f"/{o.rel}" and o.rel.endswith(".json")}
    return sorted(found)


def _unknown(name: str, root: str) -> ConfigError:
    known = names(root)
    listed = ", ".join(known) if known else "none yet"
    return ConfigError(f"no model named {name!r} in the registry at {storage.join(root, 'models')} (names: {listed}). "
                       f"Promote one with `ftjobs promote MERGE_MANIFEST --name {name} --root {root}`, or pass the "
                       "--root that holds it (default $FTJOBS_ROOT, else '.').")


def promoter() -> Promoter:
    try:
        user: str | None = getpass.getuser()
    except (KeyError, OSError):  # a container user without a passwd entry
        user = os.environ.get("USER")
    return Promoter(user=user, host=socket.gethostname() or None, command=" ".join(["ftjobs", *sys.argv[1:]]),
                    ci={k: os.environ[k] for k in CI_ENV if os.environ.get(k)})


# --------------------------------------------------------------------------- reading


def _numbered(prefix: str) -> list[tuple[int, str]]:
    out = []
    for obj in storage.list_objects(prefix):
        stem = obj.rel.removesuffix(".json")
        if obj.rel.endswith(".json") and "/" not in obj.rel and stem.isdigit():
            out.append((int(stem), obj.uri))
    return sorted(out)


def versions(name: str, root: str) -> list[Version]:
    """Every version of `name`, oldest first; an unknown name is exit 2 listing the names."""
    found = [_read(Version, uri) for _, uri in _numbered(storage.join(folder(root, name), "versions"))]
    if not found:
        raise _unknown(name, root)
    return found


def version(name: str, number: int, root: str) -> Version:
    uri = storage.join(folder(root, name), "versions", f"{number}.json")
    try:
        return _read(Version, uri)
    except FileNotFoundError:
        have = [v.version for v in versions(name, root)]
        raise ConfigError(f"{name} has no version {number} (versions: {', '.join(map(str, have))}); see "
                          f"`ftjobs models show {name}`") from None


def history(name: str, root: str) -> list[Pointer]:
    """The champion pointers, oldest first."""
    return [_read(Pointer, uri) for _, uri in _numbered(storage.join(folder(root, name), "champion"))]


def champion(name: str, root: str) -> Champion | None:
    """The current champion, or None when the name has versions but none was ever champion (or no versions)."""
    pointers = _numbered(storage.join(folder(root, name), "champion"))
    if not pointers:
        return None
    pointer = _read(Pointer, pointers[-1][1])
    return Champion(pointer=pointer, version=version(name, pointer.version, root))


def _read(cls: type[Any], uri: str) -> Any:
    data = storage.read_bytes(uri)  # FileNotFoundError travels: callers say what is missing
    try:
        return cls.model_validate(json.loads(data))
    except Exception as exc:
        raise InputError(f"{uri} is not a registry record ftjobs can read ({exc}); it was written by something "
                         "else or edited by hand. Records are never rewritten: remove it only if you know "
                         "why.") from None


def resolve(ref: str, root: str | None = None, *, verify: Literal["size", "full"] = "size") -> Version:
    """`models:/NAME` (the champion) or `models:/NAME/VERSION`, checked: its manifest and files are still there.

    Unknown name or version: ConfigError (exit 2) listing what exists. A version whose files are gone: an
    InputError (exit 3) that says so and how to recover; the champion is never silently replaced.
    """
    root = root or default_root()
    name, number = parse_ref(ref)
    if number is None:
        current = champion(name, root)
        if current is None:
            versions(name, root)  # exit 2 listing the names when the name is unknown
            raise ConfigError(f"{name} has versions but no champion yet: name one (models:/{name}/VERSION) or "
                              f"promote one (`ftjobs models rollback {name} --to VERSION` sets it)")
        found = current.version
    else:
        found = version(name, number, root)
    check_files(found, verify=verify)
    LOG.info("%s -> %s version %d: %s", ref, name, found.version, found.manifest)
    return found


def check_files(v: Version, *, verify: Literal["size", "full"] = "size") -> mf.Loaded:
    """The version's manifest, unchanged since promotion, with every file it lists."""
    try:
        return mf.load(v.manifest, verify=verify, expect_sha256=v.manifest_sha256)
    except InputError as exc:
        others = f"`ftjobs models rollback {v.name} --to VERSION` to make another version champion, or promote a " \
                 "new model"
        raise InputError(f"{SCHEME}{v.name} version {v.version} cannot be served: its files are gone or changed "
                         f"({exc}). It is not replaced silently: restore the files, or use {others}.") from None


# --------------------------------------------------------------------------- writing


def check_promotable(manifest: str, *, verify: Literal["size", "full"] = "full") -> mf.Loaded:
    """A finished merge (or train) manifest whose files verify; anything else is exit 3 naming it."""
    try:
        loaded = mf.load(manifest, verify=verify)
    except InputError as exc:
        raise InputError(f"cannot promote {manifest}: {exc}") from None
    if loaded.manifest.stage not in MODEL_STAGES:
        raise InputError(f"cannot promote {loaded.uri}: it is a {loaded.manifest.stage} manifest; a registry holds "
                         "models: pass the output of `ftjobs merge` (or `ftjobs train` for an adapter)")
    if not loaded.manifest.artifacts_named("model/" if loaded.manifest.stage == "merge" else "adapter/"):
        raise InputError(f"cannot promote {loaded.uri}: it lists no model files; is it a finished "
                         f"`ftjobs {loaded.manifest.stage}` run?")
    return loaded


def record_version(name: str, loaded: mf.Loaded, root: str, *, evaluation: mf.Loaded | None = None,
                   note: str | None = None) -> Version:
    """A new versions/<n>.json for the model (create-only; the next free number), or the one already recorded
    for the same manifest bytes and evaluation (a re-run after a kill)."""
    base = storage.join(folder(root, name), "versions")
    existing = _numbered(base)
    for _, uri in existing:
        v = _read(Version, uri)
        if v.manifest_sha256 == loaded.sha256 and v.evaluation_sha256 == (evaluation.sha256 if evaluation else None):
            return v
    number = existing[-1][0] + 1 if existing else 1
    block = loaded.manifest.model
    while True:
        v = Version(name=name, version=number, manifest=loaded.uri, manifest_sha256=loaded.sha256,
                    stage=loaded.manifest.stage, run_id=loaded.manifest.run_id, base_model=block.get("base_model"),
                    evaluation=evaluation.uri if evaluation else None,
                    evaluation_sha256=evaluation.sha256 if evaluation else None, promoted_at=mf.now(),
                    promoted_by=promoter(), note=note)
        try:
            storage.put_if_absent(storage.join(base, f"{number}.json"), storage.json_bytes(v.model_dump(mode="json")))
            return v
        except AlreadyExistsError:  # another promotion recorded this number first: versions just count on
            number += 1


def move_champion(name: str, number: int, root: str, *, expect: Champion | None,
                  action: Literal["promote", "rollback"]) -> Pointer:
    """Create champion/<seq+1>.json naming `number`, where seq is the pointer `expect` was read from.

    Create-only: when another promotion created that seq first, this one is refused (ChampionMoved, exit 4)
    and the champion it set stands.
    """
    seq = expect.pointer.seq + 1 if expect else 1
    pointer = Pointer(name=name, seq=seq, version=number, action=action,
                      previous=expect.version.version if expect else None, at=mf.now(), by=promoter())
    uri = storage.join(folder(root, name), "champion", f"{seq:0{SEQ_WIDTH}d}.json")
    try:
        storage.put_if_absent(uri, storage.json_bytes(pointer.model_dump(mode="json")))
    except AlreadyExistsError:
        now = champion(name, root)
        who = (f"version {now.version.version} ({now.version.manifest}, by {now.pointer.by.user or '?'}@"
               f"{now.pointer.by.host or '?'} at {now.pointer.at})") if now else "another version"
        raise ChampionMoved(f"{name}: another {action} moved the champion first: {who} is champion (pointer seq "
                            f"{seq}). This one (version {number}) was not made champion; it was compared with "
                            f"{_said(expect)}, which is no longer the champion: run the gate again against the "
                            "new champion.") from None
    LOG.info("%s: champion is now version %d (pointer %s)", name, number, uri)
    return pointer


def _said(c: Champion | None) -> str:
    return f"version {c.version.version}" if c else "no champion"


def promote(manifest: str, name: str, root: str, *, evaluation: str | None = None, note: str | None = None,
            expect_champion: str | None | Literal[False] = False, verify: Literal["size", "full"] = "full",
            ) -> tuple[Version, Pointer | None]:
    """Record the model as a version of `name` and make it champion.

    `expect_champion`: the manifest URI of the champion the model was compared with (None: there was none);
    when the champion is another one now, the promotion is refused (ChampionMoved). False: whatever is
    champion now (a promotion by hand). Returns the version and the new pointer (None when it already is
    the champion: a re-run).
    """
    check_name(name)
    loaded = check_promotable(manifest, verify=verify)
    admitted = mf.load(evaluation, verify="size", expect_stage="evaluate") if evaluation else None
    current = champion(name, root)
    if expect_champion is not False:
        seen = current.version.manifest if current else None
        if current is not None and current.version.manifest_sha256 == loaded.sha256:
            pass  # this model already is champion (a re-run after the pointer was written)
        elif _spelling(seen) != _spelling(expect_champion):
            raise ChampionMoved(f"{name}: the champion changed since the evaluation {evaluation} compared with it "
                                f"(it compared with {expect_champion or 'no champion'}; the champion is now "
                                f"{_said(current)}{f' ({seen})' if seen else ''}). Nothing was promoted: run the "
                                "gate again against the new champion.")
    v = record_version(name, loaded, root, evaluation=admitted, note=note)
    if current is not None and current.version.version == v.version:
        LOG.info("%s version %d already is the champion", name, v.version)
        return v, None
    return v, move_champion(name, v.version, root, expect=current, action="promote")


def rollback(name: str, to: int, root: str) -> Pointer:
    """Make an earlier version champion again (a new pointer; the history keeps every move)."""
    target = version(name, to, root)
    check_files(target)
    current = champion(name, root)
    if current is not None and current.version.version == to:
        raise ConfigError(f"{name} version {to} already is the champion; nothing to roll back")
    return move_champion(name, to, root, expect=current, action="rollback")


def _spelling(uri: str | None) -> str | None:
    if uri is None:
        return None
    return storage.normalize(mf.as_manifest_uri(uri))


def describe(name: str, root: str) -> dict[str, Any]:
    """What `ftjobs models show` prints: every version, the champion and the pointer history, and whether the
    champion's files are still there."""
    all_versions = versions(name, root)
    current = champion(name, root)
    problem = None
    if current is not None:
        try:
            check_files(current.version)
        except FtjobsError as exc:
            problem = str(exc)
    return {"name": name, "root": root, "champion": current.version.version if current else None,
            "champion_problem": problem, "versions": [v.model_dump(mode="json") for v in all_versions],
            "history": [p.model_dump(mode="json") for p in history(name, root)]}

