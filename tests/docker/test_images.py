"""The prepare image as a container, the way compose and Kubernetes run it (non-root,
read-only root filesystem, tmpfs caches, no capabilities), against the real S3 test
server on the host: prepare, then evaluate on predictions made on the host, and the
compose file as the installed compose tool reads it.

Needs a Docker engine (marker `docker`; .ci/run starts one). The image is built once by
.ci/run (or here, if missing) with docker/build-images.sh; nothing is pulled.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from common import lineage as lin
from common import manifest as mf
from common import storage

pytestmark = pytest.mark.docker

REPO = Path(__file__).resolve().parents[2]
IMAGE = os.environ.get("FTJOBS_PREPARE_IMAGE", "ftjobs-prepare:0.1.0")


def docker(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def image() -> str:
    if not shutil.which("docker") or docker("info", timeout=30).returncode != 0:
        pytest.skip("no Docker engine (.ci/run starts one)")
    if docker("image", "inspect", IMAGE, timeout=30).returncode != 0:
        env = dict(os.environ, IMAGES="prepare", VARIANT="cpu")
        if docker("image", "inspect", "python:3.11-slim-bookworm", timeout=30).returncode == 0:
            env["OFFLINE"] = "1"  # the stand-in base is there: no registry needed
        if Path("/etc/ssl/certs/ca-certificates.crt").is_file():
            env.setdefault("BUILD_CA", "/etc/ssl/certs/ca-certificates.crt")
        proc = subprocess.run([str(REPO / "docker/build-images.sh")], env=env, capture_output=True, text=True,
                              timeout=1500)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return IMAGE


def run_job(image: str, *args: str, entrypoint: str | None = None) -> subprocess.CompletedProcess[str]:
    """docker run as the pod runs: host network to reach the loopback S3 server."""
    env = ["-e", f"S3_ENDPOINT_URL={os.environ['S3_ENDPOINT_URL']}", "-e", "AWS_ACCESS_KEY_ID=testing",
           "-e", "AWS_SECRET_ACCESS_KEY=testing", "-e", "AWS_REGION=us-east-1", "-e", "FTJOBS_LOG_FORMAT=json",
           "-e", "HF_HUB_OFFLINE=1"]
    tmpfs = "mode=1777,uid=10001,gid=10001"  # as docker-compose.yml mounts them
    hardening = ["--read-only", "--tmpfs", f"/tmp:{tmpfs}", "--tmpfs", f"/cache:{tmpfs}", "--user", "10001:10001",
                 "--cap-drop", "ALL", "--security-opt", "no-new-privileges:true", "--init", "--network", "host"]
    ep = ["--entrypoint", entrypoint] if entrypoint else []
    return docker("run", "--rm", *hardening, *env, *ep, image, *args)


@pytest.fixture(scope="module")
def seeded(image: str, s3_endpoint: str, tiny_model: Path) -> str:
    root = f"s3://ftjobs-test/docker/{os.urandom(4).hex()}"
    storage.upload_dir(tiny_model, f"{root}/model")
    rows = []
    words = "red green blue cat dog bird tree house car road".split()
    for i in range(40):
        ws = [words[i % 10], words[(3 * i + 1) % 10], str(i)]  # unique rows: prepare drops duplicates
        rows.append({"instruction": f"Reverse the words: {' '.join(ws)}", "input": "",
                     "output": " ".join(reversed(ws)), "id": f"r{i}"})
    storage.write_bytes(f"{root}/data.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())
    return root


def test_the_image_is_slim_and_runs_as_non_root(image: str) -> None:
    who = docker("run", "--rm", "--entrypoint", "id", image, "-u")
    assert who.stdout.strip() == "10001"
    no_torch = docker("run", "--rm", "--entrypoint", "python", image, "-c",
                      "import importlib.util as u, sys; sys.exit(u.find_spec('torch') is not None)")
    assert no_torch.returncode == 0, "the prepare image must not carry torch"
    helped = docker("run", "--rm", image, "--help")
    assert helped.returncode == 0 and "--tokenizer" in helped.stdout


def test_prepare_and_evaluate_run_as_containers_against_s3(image: str, seeded: str, tiny_model: Path,
                                                           subprocess_env: dict[str, str]) -> None:
    prep = run_job(image, "--source", f"{seeded}/data.jsonl", "--tokenizer", f"{seeded}/model",
                   "--output", f"{seeded}/prepare/", "--set", "eval_size=6", "--set", "workers=1")
    assert prep.returncode == 0, prep.stderr[-3000:]
    prep_uri = prep.stdout.strip().splitlines()[-1]
    assert prep_uri == f"{seeded}/prepare/manifest.json"
    loaded = mf.load(prep_uri, verify="full", expect_stage="prepare")
    assert loaded.manifest.code.image == IMAGE  # FTJOBS_IMAGE baked in at build time
    assert loaded.manifest.stats  # rows counted, dropped counted

    again = run_job(image, "--source", f"{seeded}/data.jsonl", "--tokenizer", f"{seeded}/model",
                    "--output", f"{seeded}/prepare/", "--set", "eval_size=6", "--set", "workers=1")
    assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] == prep_uri  # already done

    # Predictions come from the host (the infer image is not built in this tier), base vs "candidate".
    preds = []
    for name, tokens in (("base", "4"), ("candidate", "6")):
        cmd = [sys.executable, "-m", "jobs.cli", "infer", "--model", str(tiny_model), "--prompts", prep_uri,
               "--engine", "transformers", "--output", f"{seeded}/infer-{name}/",
               "--set", f"sampling.max_tokens={tokens}"]
        out = subprocess.run(cmd, env=subprocess_env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        preds.append(out.stdout.strip().splitlines()[-1])

    ev = run_job(image, "evaluate", "--predictions", preds[0], "--predictions", preds[1], "--label", "base",
                 "--label", "candidate", "--output", f"{seeded}/evaluate/", entrypoint="ftjobs")
    assert ev.returncode == 0, ev.stderr[-3000:]
    report = mf.load(ev.stdout.strip().splitlines()[-1], verify="full", expect_stage="evaluate")
    assert any(a.name.endswith("report.md") or a.path.endswith("report.md") for a in report.manifest.artifacts)
    assert lin.all_ok(lin.lineage(report.uri, verify="size"))


def test_bad_input_in_a_container_exits_3_with_a_message(image: str, seeded: str) -> None:
    missing = run_job(image, "--source", f"{seeded}/nope.jsonl", "--output", f"{seeded}/prepare-missing/")
    assert missing.returncode == 3, missing.stderr[-2000:]
    assert "nope.jsonl" in missing.stderr
    assert "Traceback" not in missing.stderr
    assert not storage.exists(f"{seeded}/prepare-missing/manifest.json")


def test_the_gpu_infer_build_refuses_a_base_without_the_locks_vllm_and_torch(image: str) -> None:
    """The GPU infer image's dependency stage, built on the slim stand-in instead of vllm/vllm-openai (which
    cannot be pulled here): the lock's packages install, then verify-env stops the build because the base
    lacks the vLLM and torch releases the lock pins. With vLLM's image the same step passes or names the
    difference; it is the one part of that image this machine can build."""
    if docker("image", "inspect", "python:3.11-slim-bookworm", timeout=30).returncode != 0:
        pytest.skip("no stand-in base (docker/offline/build-base-standins.sh builds it)")
    ca, host_ca = REPO / "docker/build-ca/ca.crt", Path("/etc/ssl/certs/ca-certificates.crt")
    added = not ca.exists() and host_ca.is_file()
    if added:  # as docker/build-images.sh does: pip in a build trusts the host's CA bundle
        shutil.copy(host_ca, ca)
    try:
        env = dict(os.environ, DOCKER_BUILDKIT="0")
        proc = subprocess.run(["docker", "build", "--network", "host", "--target", "deps", "--build-arg",
                               "BASE_IMAGE=python:3.11-slim-bookworm", "--build-arg", "BASE_DIGEST=",
                               "-f", "docker/infer.Dockerfile", "-t", "ftjobs-infer-deps:refused", "."],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=1500)
    finally:
        if added:
            ca.unlink(missing_ok=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    assert "the installed packages and /src/requirements/lock-gpu.txt disagree" in out, out[-3000:]
    pins = dict(re.findall(r"^(vllm|torch)==(\S+)$", (REPO / "requirements/lock-gpu.txt").read_text(), re.M))
    assert sorted(pins) == ["torch", "vllm"]
    for name, version in pins.items():
        assert f"{name}=={version} is pinned and needed (the base image) but not installed" in out, out[-3000:]
    # everything else the infer extra needs was installed at its pin: those are the only two problems
    assert "(2 problems)" in out, out[-3000:]


def compose_tool() -> list[str] | None:
    if shutil.which("docker") and docker("compose", "version", timeout=30).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_config_resolves_with_every_override() -> None:
    tool = compose_tool()
    if tool is None:
        pytest.skip("neither docker compose nor docker-compose is installed")
    for extra in ([], ["-f", "compose.moto-s3.yml"], ["-f", "compose.gpu.yml"]):
        proc = subprocess.run([*tool, "-f", "docker-compose.yml", *extra, "config"], cwd=REPO / "docker",
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        assert "ftjobs-prepare:0.1.0" in proc.stdout
        if extra[-1:] == ["compose.moto-s3.yml"]:
            assert "ftjobs-moto-s3:5.2.5" in proc.stdout and "minio/minio" not in proc.stdout
        if extra[-1:] == ["compose.gpu.yml"]:
            assert "nvidia" in proc.stdout
