"""`ftjobs k8s submit`: the whole chain as Jobs, each fed the manifest the previous one
published. No cluster runs here, so kubectl is tests/k8s/fake_kubectl.py: it runs each
Job at once by publishing a real manifest for its stage on the real test S3 server; the
chain logic, the store reads and the exit codes under test are submit's own."""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from common import lineage as lin
from common import storage
from jobs.cli import main

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
DIGEST = "sha256:" + "cd" * 32


@pytest.fixture
def cluster(tmp_path: Path, s3_root: str, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    real = shutil.which("kubectl", path=str(Path(sys.executable).parent)) or shutil.which("kubectl")
    if not real:
        pytest.skip("kubectl comes with the dev extra")
    state = tmp_path / "cluster"
    state.mkdir()
    kubectl = tmp_path / "kubectl"
    kubectl.write_text(f"#!/bin/sh\nexec {sys.executable} {REPO / 'tests/k8s/fake_kubectl.py'} \"$@\"\n")
    kubectl.chmod(kubectl.stat().st_mode | stat.S_IEXEC)
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump({
        "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "namespace": "ml-ci",
        "resources": [os.path.relpath(REPO / "k8s/base", overlay)],
        "configMapGenerator": [{"name": "ftjobs-store", "behavior": "merge", "literals": [f"FTJOBS_RUNS={s3_root}"],
                                "options": {"disableNameSuffixHash": True}}]}))
    images = tmp_path / "images.json"
    images.write_text(json.dumps({k: f"ghcr.io/acme/ftjobs-{k}:0.1.0@{DIGEST}"
                                  for k in ("prepare", "train", "merge", "infer")}))
    monkeypatch.setenv("FAKE_KUBE_STATE", str(state))
    monkeypatch.setenv("FAKE_KUBE_REAL", real)
    monkeypatch.delenv("FAKE_KUBE_FAIL", raising=False)
    return {"state": state, "kubectl": str(kubectl), "overlay": str(overlay), "images": str(images),
            "root": s3_root, "summary": tmp_path / "summary.json"}


def submit(cluster: dict[str, Any], *extra: str, images: bool = True) -> Any:
    args = ["--log-format", "text", "k8s", "submit", "--run-id", "r1", "--kubectl", cluster["kubectl"],
            "--kustomize-dir", cluster["overlay"], "--source", "s3://data/chats.jsonl", "--base-model", "tiny-base",
            "--shards", "2", "--fail-if-worse", "exact_match", "--poll-s", "0.01", "--summary",
            str(cluster["summary"]), "--stage-args", "train=--set max_steps=5", *extra]
    if images:
        args += ["--images", cluster["images"]]
    return CliRunner().invoke(main, args, catch_exceptions=False)


def created(cluster: dict[str, Any]) -> list[str]:
    log = cluster["state"] / "created.log"
    return log.read_text().split() if log.exists() else []


def job_args(cluster: dict[str, Any], name: str) -> list[str]:
    return json.loads((cluster["state"] / f"{name}.json").read_text())["args"]


def job_env(cluster: dict[str, Any], name: str) -> dict[str, str]:
    return json.loads((cluster["state"] / f"{name}.json").read_text())["env"]


def test_submit_runs_the_chain_feeding_each_stage_the_previous_manifest(cluster: dict[str, Any]) -> None:
    result = submit(cluster)
    assert result.exit_code == 0, result.output
    root = cluster["root"]
    # The chain's order (jobs/chain.py): the base model's predictions start as soon as prepare published,
    # beside training, not after the merge.
    assert created(cluster) == ["ftjobs-prepare-r1", "ftjobs-infer-base-r1", "ftjobs-train-r1", "ftjobs-merge-r1",
                                "ftjobs-infer-finetuned-r1", "ftjobs-evaluate-r1"]
    assert result.stdout.strip().splitlines()[-1] == f"{root}/r1/evaluate/manifest.json"
    assert job_args(cluster, "ftjobs-train-r1") == [
        "--input", f"{root}/r1/prepare/manifest.json", "--base-model", "tiny-base", "--output", f"{root}/r1/train",
        "--config", f"{root}/r1/config/train.yaml", "--set", "max_steps=5"]
    # every Job is told the run it belongs to, so its step's manifest records it
    assert job_env(cluster, "ftjobs-train-r1")["FTJOBS_RUN_ID"] == "r1"
    assert storage.read_text(f"{root}/r1/pipeline.json")
    assert job_args(cluster, "ftjobs-infer-finetuned-r1")[:4] == [
        "--model", f"{root}/r1/merge/manifest.json", "--prompts", f"{root}/r1/prepare/manifest.json"]
    assert job_args(cluster, "ftjobs-infer-base-r1")[:2] == ["--model", "tiny-base"]
    assert json.loads((cluster["state"] / "ftjobs-infer-finetuned-r1.json").read_text())["completions"] == 2
    assert job_args(cluster, "ftjobs-evaluate-r1")[:8] == [
        "--predictions", f"{root}/r1/infer-base/manifest.json", "--label", "base",
        "--predictions", f"{root}/r1/infer-finetuned/manifest.json", "--label", "finetuned"]
    # --fail-if-worse went into evaluate's section, which its Job reads through --config
    assert yaml.safe_load(storage.read_bytes(f"{root}/r1/config/evaluate.yaml")) == {"fail_if_worse": "exact_match"}
    # The manifests really link up in the store: evaluate's lineage reaches prepare through both infers.
    tree = lin.lineage(f"{root}/r1/evaluate/manifest.json", verify="size")
    assert lin.all_ok(tree)
    summary = json.loads(cluster["summary"].read_text())
    assert list(summary) == ["prepare", "infer-base", "train", "merge", "infer-finetuned", "evaluate"]
    # every kubectl call looked in the namespace the overlay puts the Jobs in
    assert set((cluster["state"] / "namespaces.log").read_text().split()) == {"ml-ci"}


def test_submit_reads_the_pipeline_run_config(cluster: dict[str, Any], tmp_path: Path) -> None:
    conf = tmp_path / "run.yaml"
    conf.write_text("base_model: tiny-base\ndata: [s3://data/chats.jsonl]\nlabels: [before, after]\n"
                    "baseline: false\ntrain: {lora: {r: 4}}\n")
    result = CliRunner().invoke(main, ["--log-format", "text", "k8s", "submit", "--run-id", "r2", "--config",
                                       str(conf), "--kubectl", cluster["kubectl"], "--kustomize-dir",
                                       cluster["overlay"], "--images", cluster["images"], "--poll-s", "0.01"],
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "ftjobs-infer-base-r2" not in created(cluster)
    assert job_args(cluster, "ftjobs-evaluate-r2")[:4] == [
        "--predictions", f"{cluster['root']}/r2/infer-finetuned/manifest.json", "--label", "after"]
    assert yaml.safe_load(storage.read_bytes(f"{cluster['root']}/r2/config/train.yaml")) == {"lora": {"r": 4}}


@pytest.mark.parametrize(("extra", "message"), [
    (["--stage-args", "train=--max-stepz 5"], "No such option '--max-stepz'"),
    (["--stage-args", "merge=--set dtyp=bfloat16"], "unknown key 'dtyp'"),
    (["--set", "train.lora.rr=4"], "unknown key 'lora.rr'"),
])
def test_a_mistyped_stage_argument_creates_no_job(cluster: dict[str, Any], extra: list[str], message: str) -> None:
    result = submit(cluster, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.stderr
    assert created(cluster) == []


def test_submit_again_follows_the_existing_jobs(cluster: dict[str, Any]) -> None:
    assert submit(cluster).exit_code == 0
    again = submit(cluster)
    assert again.exit_code == 0, again.output
    assert len(created(cluster)) == 6  # nothing new was created
    assert "following existing" in again.stderr


def test_multinode_train_creates_its_service_then_its_indexed_job(cluster: dict[str, Any]) -> None:
    result = submit(cluster, "--nodes", "2", "--gpus-per-node", "2")
    assert result.exit_code == 0, result.output
    names = created(cluster)
    assert names.index("service/ftjobs-train-r1") == names.index("ftjobs-train-r1") - 1  # the Service first
    state = json.loads((cluster["state"] / "ftjobs-train-r1.json").read_text())
    assert state["completions"] == 2
    command = state["command"]
    assert command[:command.index("--")] == [
        "launch", "--nproc-per-node", "2", "--shutdown-timeout", "570", "--nnodes", "2", "--node-rank",
        "$(FTJOBS_NODE_RANK)", "--master-addr", "ftjobs-train-r1-0.ftjobs-train-r1", "--master-port", "29500"]
    # the stage's own arguments are the single-pod Job's, and the chain went on from train's manifest
    assert job_args(cluster, "ftjobs-train-r1")[4:6] == ["--output", f"{cluster['root']}/r1/train"]
    assert "merge" in json.loads(cluster["summary"].read_text())
    service = json.loads((cluster["state"] / "service-ftjobs-train-r1.json").read_text())
    assert service["metadata"]["namespace"] == "ml-ci" and service["spec"]["clusterIP"] == "None"
    again = submit(cluster, "--nodes", "2", "--gpus-per-node", "2")  # follows the Service and the Job
    assert again.exit_code == 0, again.output
    assert created(cluster) == names


def test_bad_input_stops_the_chain_with_the_stage_exit_code(cluster: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_KUBE_FAIL", "train:3")
    result = submit(cluster)
    assert result.exit_code == 3
    assert created(cluster) == ["ftjobs-prepare-r1", "ftjobs-infer-base-r1", "ftjobs-train-r1"]
    assert "Job ftjobs-train-r1 failed (PodFailurePolicy" in result.stderr
    assert "last log line of job/ftjobs-train-r1" in result.stderr
    # the baseline ran beside training and finished; nothing after train was created
    assert list(json.loads(cluster["summary"].read_text())) == ["prepare", "infer-base"]


def test_a_failed_gate_exits_4_and_still_records_the_report(cluster: dict[str, Any],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FAKE_KUBE_FAIL", "evaluate:4")
    result = submit(cluster)
    assert result.exit_code == 4
    assert json.loads(cluster["summary"].read_text())["evaluate"] == f"{cluster['root']}/r1/evaluate/manifest.json"


def test_placeholder_digests_never_reach_a_cluster(cluster: dict[str, Any]) -> None:
    result = submit(cluster, images=False)
    assert result.exit_code == 2
    assert "placeholder digest" in result.stderr
    assert created(cluster) == []
