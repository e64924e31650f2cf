"""`ftjobs k8s submit --sweep` against the fake kubectl, and the in-cluster driver `render --sweep-driver`
prints: the cells' Jobs come from the same plan as `ftjobs sweep` (shared steps once, plain-LoRA cells
served by one inference Job), in the chain's order, a failed Job stops only its cell, and the driver's
objects validate offline with a Role that may do nothing but create, get, list and watch Jobs."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from common import config as cfg
from jobs import sweep
from jobs.cli import main
from tests.k8s import policy
from tests.k8s.test_manifests import validate
from tests.k8s.test_submit import DIGEST, created, job_args
from tests.k8s.test_submit import cluster as cluster  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration


def sweep_file(tmp_path: Path) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump({
        "base_model": "org/tiny-base", "data": ["s3://data/chats.jsonl"],
        "train": {"max_steps": 5}, "evaluate": {"fail_if_worse": "exact_match"},
        "matrix": {"train.learning_rate": [0.001, 0.002], "train.lora.r": [8, 16]},
        "include": [{"train.learning_rate": 0.005, "train.lora.modules_to_save": ["lm_head"]}]}))
    return path


def submit_sweep(cluster: dict[str, Any], path: Path, *extra: str) -> Any:
    return CliRunner().invoke(main, ["--log-format", "text", "k8s", "submit", "--sweep", str(path), "--sweep-id", "s1",
                                     "--kubectl", cluster["kubectl"], "--kustomize-dir", cluster["overlay"],
                                     "--images", cluster["images"], "--poll-s", "0.01", *extra],
                              catch_exceptions=False)


def test_submit_sweep_creates_each_shared_step_once_in_chain_order(cluster: dict[str, Any], tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    path = sweep_file(tmp_path)
    # The cell with lm_head in full cannot be served as a LoRA: it merges; make its train Job fail.
    conf = cfg.load_config(sweep.Config, file=str(path), flags={"sweep_id": "s1"})
    monkeypatch.setenv("FAKE_KUBE_FAIL", f"{plan_key(conf, 4)}:3")
    result = submit_sweep(cluster, path)
    # some but not all cells failed: exit 5, and the leaderboard is still published, its URI the last line
    assert result.exit_code == 5, result.output
    assert "1 of 5 cells failed" in result.stderr and "--allow-failed-cells" in result.stderr
    names = created(cluster)
    kinds = [n.split("-")[1] + ("-" + n.split("-")[2] if n.split("-")[2] in ("base", "finetuned") else "")
             for n in names]
    assert kinds[:2] == ["prepare", "infer-base"] and kinds.count("prepare") == 1 and kinds.count("infer-base") == 1
    assert kinds.count("train") == 5 and kinds.count("infer-finetuned") == 1  # one engine for the 4 LoRA cells
    assert "merge" not in kinds  # the only merging cell failed to train: its merge never started
    assert kinds[-1] == "evaluate"
    served = next(n for n in names if n.startswith("ftjobs-infer-finetuned"))
    args = job_args(cluster, served)
    assert args.count("--adapter") == 4 and args.count("--output") == 4 and args[:2] == ["--model", "org/tiny-base"]
    evaluate = job_args(cluster, names[-1])
    assert evaluate.count("--predictions") == 5  # the base and the 4 cells that finished
    record = json.loads(_read(f"{cluster['root']}/sweeps/s1/sweep.json"))
    assert [c["status"] for c in record["cells"]] == ["done"] * 4 + ["failed"]
    assert record["exit_code"] == 5
    # the leaderboard's evaluate is told every cell, the failed one with its step, exit code and reason
    (failed,) = record["failed"]
    assert (failed["label"], failed["step"], failed["exit_code"]) == (record["cells"][4]["label"], "train", 3)
    assert "PodFailurePolicy" in failed["reason"]
    board = yaml.safe_load(_read(evaluate[evaluate.index("--config") + 1]))["leaderboard"]
    assert board["failed"] == record["failed"] and len(board["cells"]) == 4
    assert result.stdout.strip().splitlines()[-1] == record["evaluate"]["manifest"]
    # every Job's manifest records the sweep as its run, and the cells it served
    from common import manifest as mf

    shared = mf.load(record["steps"][plan_key(conf, 0, "prepare", full=True)]["manifest"], verify="none").manifest
    assert shared.run_id == "s1" and shared.cells == [c["id"] for c in record["cells"]]
    again = submit_sweep(cluster, path, "--allow-failed-cells")  # a re-run follows the existing Jobs, creates none
    assert again.exit_code == 0, again.output
    assert len(created(cluster)) == len(names)


def plan_key(conf: sweep.Config, i: int, step: str = "train", full: bool = False) -> str:
    key = sweep.plan_sweep(conf, "s3://x", "s1", local=False).cells[i].keys[step]
    return key if full else key[:8]


def _read(uri: str) -> str:
    from common import storage

    return storage.read_text(uri)


def test_render_sweep_driver_validates_offline_with_jobs_only_rbac(tmp_path: Path) -> None:
    images = tmp_path / "images.json"
    images.write_text(json.dumps({k: f"ghcr.io/acme/ftjobs-{k}:0.1.0@{DIGEST}" for k in
                                  ("prepare", "train", "merge", "infer")}))
    result = CliRunner().invoke(main, ["--log-format", "text", "k8s", "render", "--sweep-driver", "--sweep",
                                       str(sweep_file(tmp_path)), "--sweep-id", "s1", "--overlay", "gpu",
                                       "--images", str(images), "--queue", "team-a"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert [d["kind"] for d in docs] == ["ConfigMap", "ServiceAccount", "Role", "RoleBinding", "Job"]
    config_map, account, role, binding, job = docs
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list",
                                                                                      "watch"]}]
    assert binding["subjects"][0]["name"] == account["metadata"]["name"] == job["spec"]["template"]["spec"][
        "serviceAccountName"]
    assert yaml.safe_load(config_map["data"]["sweep.yaml"])["matrix"]["train.lora.r"] == [8, 16]
    assert any(d.get("kind") == "Job" for d in yaml.safe_load_all(config_map["data"]["templates.yaml"]) if d)
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][:6] == ["k8s", "submit", "--sweep", "/etc/ftjobs-sweep/sweep.yaml", "--sweep-id", "s1"]
    assert "--queue" in container["args"] and container["image"].endswith(DIGEST)
    assert policy.violations(job, gpu=False, api_access=True) == []
    assert "automountServiceAccountToken" in "\n".join(policy.violations(job, gpu=False))  # only the driver may
    proc = validate(docs, tmp_path / "driver.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
