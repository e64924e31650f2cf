"""`ftjobs k8s render`: the Job printed for one run, checked field by field, and the
mistakes it refuses (exit 2 with a message that names the fix)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from jobs import k8s
from jobs.cli import main

pytestmark = pytest.mark.unit

DIGEST = "sha256:" + "12" * 32
TRAIN_REF = f"ghcr.io/acme/ftjobs-train:0.1.0@{DIGEST}"


@pytest.fixture(scope="module")
def gpu_docs() -> list[dict[str, Any]]:
    return k8s.kustomize(k8s.overlay_dir("gpu", None))


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["--log-format", "text", *args], catch_exceptions=False)


def test_render_train_for_a_sample_run_field_by_field(tmp_path: Path) -> None:
    images = tmp_path / "images.json"
    images.write_text(json.dumps({"train": TRAIN_REF}))
    result = cli("k8s", "render", "train", "--run-id", "20261128-1200-ab12", "--overlay", "gpu",
                 "--images", str(images), "--", "--input", "s3://ml/runs/20261128-1200-ab12/prepare/manifest.json",
                 "--base-model", "meta-llama/Llama-3.1-8B", "--set", "lora.r=32")
    assert result.exit_code == 0, result.output
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    meta, spec = job["metadata"], job["spec"]
    pod = spec["template"]["spec"]
    (c,) = pod["containers"]
    assert job["kind"] == "Job" and job["apiVersion"] == "batch/v1"
    assert meta["name"] == "ftjobs-train-20261128-1200-ab12"
    assert meta["namespace"] == "ftjobs"
    assert meta["labels"]["ftjobs.dev/run-id"] == "20261128-1200-ab12"
    assert meta["labels"]["ftjobs.dev/stage"] == "train"
    assert spec["template"]["metadata"]["labels"]["ftjobs.dev/run-id"] == "20261128-1200-ab12"
    assert meta["annotations"]["ftjobs.dev/output"] == "s3://ftjobs/runs/20261128-1200-ab12/train/"
    assert spec["suspend"] is False
    assert c["command"] == ["ftjobs"]
    assert c["args"] == ["train", "--input", "s3://ml/runs/20261128-1200-ab12/prepare/manifest.json",
                         "--base-model", "meta-llama/Llama-3.1-8B", "--set", "lora.r=32",
                         "--output", "s3://ftjobs/runs/20261128-1200-ab12/train/"]
    assert c["image"] == TRAIN_REF
    assert {"name": "FTJOBS_IMAGE", "value": TRAIN_REF} in c["env"]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["terminationGracePeriodSeconds"] >= 300
    assert spec["backoffLimit"] >= 1 and spec["activeDeadlineSeconds"] == 86400
    assert "placeholder" not in result.stderr


def test_sharded_infer_is_an_indexed_job_with_num_shards(gpu_docs: list[dict[str, Any]]) -> None:
    job, output = k8s.render_job(gpu_docs, "infer", "r7", ["--model", "m", "--prompts", "p"], tag="base", shards=4)
    spec = job["spec"]
    assert job["metadata"]["name"] == "ftjobs-infer-base-r7"
    assert output == "s3://ftjobs/runs/r7/infer-base/"
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 4, 4)
    assert spec["backoffLimitPerIndex"] >= 1
    assert spec["podFailurePolicy"]["rules"][0]["action"] == "FailIndex"
    assert spec["template"]["spec"]["containers"][0]["args"][-2:] == ["--set", "num_shards=4"]


def test_explicit_output_queue_and_long_run_ids(gpu_docs: list[dict[str, Any]]) -> None:
    job, output = k8s.render_job(gpu_docs, "merge", "x" * 63, ["--input", "t", "--output=s3://b/elsewhere/"],
                                 queue="team-a")
    assert output == "s3://b/elsewhere/"
    assert job["spec"]["template"]["spec"]["containers"][0]["args"].count("--output=s3://b/elsewhere/") == 1
    assert len(job["metadata"]["name"]) <= k8s.MAX_JOB_NAME  # room for "-<index>" pod hostnames
    assert job["metadata"]["labels"][k8s.QUEUE_LABEL] == "team-a"
    assert job["spec"]["suspend"] is True  # Kueue un-suspends it when admitted
    other, _ = k8s.render_job(gpu_docs, "merge", "x" * 62 + "y", ["--input", "t"])
    assert other["metadata"]["name"] != job["metadata"]["name"]


def test_setup_prints_the_shared_objects_and_no_jobs() -> None:
    result = cli("k8s", "render", "--setup", "--overlay", "local")
    assert result.exit_code == 0, result.output
    kinds = sorted(d["kind"] for d in yaml.safe_load_all(result.stdout) if d)
    assert kinds == ["ConfigMap", "Namespace", "Secret", "ServiceAccount"]


@pytest.mark.parametrize(("args", "message"), [
    (["train", "--run-id", "bad id!"], "--run-id 'bad id!'"),
    # a tag names the output prefix (<runs>/<run>/<stage>-<tag>/): it may not climb out of the run's folder
    (["prepare", "--run-id", "r1", "--tag", "../../other-run/prepare", "--", "--source", "s3://b/d.jsonl"],
     "--tag '../../other-run/prepare'"),
    (["prepare", "--run-id", "r1", "--tag", "a b", "--", "--source", "s3://b/d.jsonl"], "--tag 'a b'"),
    (["prepare", "--run-id", "r1", "--shards", "2"], "only infer is sharded"),
    (["infer", "--run-id", "r1", "--", "--shard", "0/2"], "use --shards N"),
    (["train", "--run-id", "r1", "--image", "train=ghcr.io/acme/ftjobs-train:latest"], "is not pinned"),
    (["train", "--run-id", "r1", "--image", "evaluate=x:1@" + DIGEST], "evaluate runs in the prepare image"),
    (["train"], "Pass STAGE and --run-id"),
    (["train", "--run-id", "r1", "--kustomize-dir", "/nonexistent"], "has no kustomization.yaml"),
    # the stage's arguments are checked as the pod would check them, before a Job exists
    (["train", "--nodez", "2", "--run-id", "r1", "--", "--input", "i", "--base-model", "m"],
     "No such option '--nodez'"),
    (["train", "--run-id", "r1", "--", "--input", "i", "--base-model", "m", "--lora-r", "8"],
     "No such option '--lora-r'"),
    (["train", "--run-id", "r1", "--", "--input", "i", "--base-model", "m", "--set", "lora.rr=8"],
     "unknown key 'lora.rr' (from --set lora.rr=8); did you mean 'r'?"),
    (["train", "--run-id", "r1", "--", "--input", "i"], "base_model: required, but not given"),
    (["train", "--run-id", "r1", "--", "--input", "i", "--base-model", "m", "--config", "/nonexistent.yaml"],
     "Config file /nonexistent.yaml does not exist"),
])
def test_mistakes_exit_2_and_name_the_fix(args: list[str], message: str) -> None:
    result = cli("k8s", "render", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output


def test_placeholder_digests_are_flagged_on_render() -> None:
    result = cli("k8s", "render", "evaluate", "--run-id", "r1", "--", "--predictions", "p")
    assert result.exit_code == 0
    assert "placeholder digest" in result.stderr
    (job,) = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert job["spec"]["template"]["spec"]["containers"][0]["image"].endswith(k8s.PLACEHOLDER_DIGEST)


def test_help_works_for_every_k8s_command() -> None:
    for args in (["k8s", "--help"], ["k8s", "render", "--help"], ["k8s", "submit", "--help"]):
        result = cli(*args)
        assert result.exit_code == 0 and "Usage" in result.output
