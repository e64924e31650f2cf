"""The Dockerfiles and the compose rehearsal, checked without a Docker engine: hadolint,
the conventions the images promise (pinned bases, non-root, exec-form entrypoints,
writable caches), and every compose stage command against the stage CLIs it calls."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import types
import typing
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
DOCKERFILES = sorted((REPO / "docker").glob("*.Dockerfile")) + sorted((REPO / "docker/offline").glob("*.Dockerfile"))
STAGE_IMAGES = {"prepare": "prepare", "train": "train", "merge": "merge", "infer": "infer"}
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")
COMPOSE = REPO / "docker/docker-compose.yml"
STAGE_SERVICES = {"prepare": "prepare", "infer-base": "infer", "train": "train", "merge": "merge", "infer": "infer",
                  "evaluate": "evaluate"}


@pytest.mark.skipif(HADOLINT is None, reason="hadolint comes with the dev extra")
def test_hadolint_passes_on_every_dockerfile() -> None:
    import subprocess

    assert len(DOCKERFILES) == 5
    proc = subprocess.run([HADOLINT, *map(str, DOCKERFILES)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", STAGE_IMAGES)
def test_images_pin_bases_run_as_non_root_and_start_their_stage(stage: str) -> None:
    text = (REPO / f"docker/{stage}.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_DIGEST=@sha256:[0-9a-f]{64}$", text, re.M), "base pinned by digest"
    assert re.search(r"^ARG BASE_IMAGE=[\w./-]+:[\w.-]+$", text, re.M), "base pinned by tag"
    assert text.count("FROM ${BASE_IMAGE}${BASE_DIGEST}") == 2  # dependencies stage and runtime stage
    runtime = text[text.rindex("FROM "):]
    assert "USER 10001:10001" in runtime
    assert runtime.rstrip().endswith(f'ENTRYPOINT ["ftjobs", "{stage}"]')
    for var in ("HF_HOME=/cache/", "TRITON_CACHE_DIR=/cache/", "FTJOBS_CACHE=/cache/", "HOME=/tmp"):
        assert var in runtime, var
    # dependencies are installed from pyproject.toml alone, before the sources (and README) come in
    assert "COPY pyproject.toml /src/\n" in text
    assert text.index("COPY pyproject.toml") < text.index("COPY README.md") < text.index("COPY common")


def test_train_and_merge_share_their_dependency_layers() -> None:
    def deps(stage: str) -> str:
        text = (REPO / f"docker/{stage}.Dockerfile").read_text()
        return text[text.index("ARG BASE_IMAGE"):text.index("# ---- source")]

    train, merge = deps("train"), deps("merge").rstrip()
    # The same instructions up to merge's last: the second build reuses the first's layers; only then
    # does train add its own layer (the experiment trackers).
    assert train.startswith(merge)
    assert '"/src[train,tracking]"' in train[len(merge):] and "tracking" not in merge


def test_the_offline_stand_ins_carry_the_names_the_dockerfiles_and_compose_expect() -> None:
    script = (REPO / "docker/offline/build-base-standins.sh").read_text()
    tag = re.search(r'^PYTHON_TAG="([^"]+)"', script, re.M).group(1)
    moto = re.search(r'^MOTO_TAG="([^"]+)"', script, re.M).group(1)
    for stage in ("prepare", "train", "merge"):
        assert f"ARG BASE_IMAGE={tag}\n" in (REPO / f"docker/{stage}.Dockerfile").read_text()
    assert f"BASE_IMAGE={tag}" in (REPO / "docker/build-images.sh").read_text()  # the CPU infer base
    override = yaml.safe_load((REPO / "docker/compose.moto-s3.yml").read_text())
    assert override["services"]["minio"]["image"] == moto


def test_the_build_context_leaves_out_the_heavy_and_private_parts() -> None:
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and r[0] != "#"]
    assert rules[0] == "*"  # an allowlist: .venv, .git, runs/ never enter the context
    assert {"!common/", "!jobs/", "!pyproject.toml", "!README.md"} <= set(rules)


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def test_compose_stages_run_like_the_pods_and_chain_on_success() -> None:
    services = compose()["services"]
    for name in ["bucket-init", "seed", *STAGE_SERVICES]:
        svc = services[name]
        assert svc["user"] == "10001:10001" and svc["read_only"] is True, name
        assert svc["cap_drop"] == ["ALL"] and "no-new-privileges:true" in svc["security_opt"], name
        assert any(t.startswith("/tmp") for t in svc["tmpfs"]) and any(t.startswith("/cache") for t in svc["tmpfs"])
        assert svc["restart"] == "no"
    chain = {"bucket-init": ["minio"], "seed": ["bucket-init"], "prepare": ["seed"], "infer-base": ["prepare"],
             "train": ["prepare"], "merge": ["train"], "infer": ["merge", "infer-base"], "evaluate": ["infer"]}
    for name, deps in chain.items():
        assert sorted(services[name]["depends_on"]) == sorted(deps), name
        want = {"minio": "service_healthy"}
        for dep in deps:
            assert services[name]["depends_on"][dep]["condition"] == want.get(dep, "service_completed_successfully")
    minio = services["minio"]["image"]
    assert re.fullmatch(r"minio/minio:RELEASE\.[\w-]+@sha256:[0-9a-f]{64}", minio)
    assert "healthcheck" in services["minio"]


def substitute(value: str) -> str:
    """Compose's ${VAR:-default} / ${VAR-default} with the variables unset."""
    return re.sub(r"\$\{[A-Z_]+:?-([^}]*)\}", r"\1", value)


def known_key(model: type[BaseModel], path: list[str]) -> bool:
    field = model.model_fields.get(path[0])
    if field is None:
        return False
    if len(path) == 1:
        return True
    ann = field.annotation
    candidates = typing.get_args(ann) if isinstance(ann, types.UnionType) or typing.get_origin(ann) else (ann,)
    return any(isinstance(c, type) and issubclass(c, BaseModel) and known_key(c, path[1:]) for c in candidates)


@pytest.mark.parametrize("service", STAGE_SERVICES)
def test_compose_commands_match_the_stage_clis(service: str) -> None:
    svc = compose()["services"][service]
    stage = STAGE_SERVICES[service]
    args = [substitute(a) for a in svc["command"]]
    module = importlib.import_module(f"jobs.{stage}")
    ctx = module.command.make_context(stage, list(args))  # unknown options raise here
    for key in ctx.params.get("sets") or ():
        path = key.split("=", 1)[0].split(".")
        assert known_key(module.Config, path), f"{service}: --set {key}: no such config key"
    assert ctx.params.get("output") == f"s3://ftjobs/runs/rehearsal/{service}/"
    if stage == "evaluate":
        assert svc["entrypoint"] == ["ftjobs", "evaluate"]
