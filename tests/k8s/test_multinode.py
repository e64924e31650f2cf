"""`ftjobs k8s render train --nodes N --gpus-per-node G [--engine jobset]`: training on several pods.

No cluster runs here, so what is checked is what can be offline: the core objects (headless Service,
Indexed Job) validate strictly against Kubernetes 1.34 (kubernetes-validate), the JobSet against the
JobSet v1alpha2 schema (tests/k8s/jobset_schema.py) and its Job template as a core Job; every pod meets
the same policy as the single-pod Job (tests/k8s/policy.py); the rendezvous is wired as torchrun needs it
(pod i is `<job>-i.<service>`, node rank i, rank 0 the master), and what a pod runs parses with
torchrun's own parser and train's own command line."""

from __future__ import annotations

import copy
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from jobs import chain, k8s, launch
from jobs.cli import main
from tests.k8s import jobset_schema, policy

pytestmark = pytest.mark.unit

BIN = Path(sys.executable).parent
VALIDATE = shutil.which("kubernetes-validate", path=str(BIN)) or shutil.which("kubernetes-validate")
DIGEST = "sha256:" + "ef" * 32
IMAGES = {name: f"ghcr.io/acme/ftjobs-{name}:0.1.0@{DIGEST}" for name in ("prepare", "train", "merge", "infer")}
ARGS = ["--input", "s3://ftjobs/runs/r1/prepare/manifest.json", "--base-model", "meta-llama/Llama-3.1-8B"]


@pytest.fixture(scope="module")
def overlays() -> dict[str, list[dict[str, Any]]]:
    return {name: k8s.kustomize(k8s.overlay_dir(name, None)) for name in ("gpu", "local")}


def container(obj: dict[str, Any]) -> dict[str, Any]:
    (c,) = k8s._containers(obj)
    return c


def job_of(jobset: dict[str, Any]) -> dict[str, Any]:
    """A JobSet's replicated Job as the Job its controller creates (what kubernetes-validate can check)."""
    (rj,) = jobset["spec"]["replicatedJobs"]
    meta = {k: v for k, v in jobset["metadata"].items() if k in ("namespace", "labels", "annotations")}
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {**meta, "name": f"{jobset['metadata']['name']}-"
                                                                                  f"{rj['name']}-0"},
            "spec": rj["template"]["spec"]}


def validate(docs: list[dict[str, Any]], path: Path) -> subprocess.CompletedProcess[str]:
    if not VALIDATE:
        pytest.skip("kubernetes-validate comes with the dev extra (make install)")
    path.write_text(yaml.safe_dump_all(docs))
    return subprocess.run([VALIDATE, "--strict", "-k", "1.34.0", "--quiet", str(path)], capture_output=True,
                          text=True, timeout=120)


def pod_command(c: dict[str, Any], rank: int) -> list[str]:
    """The container's arguments as the kubelet passes them: $(VAR) expanded from the pod's env."""
    assert {"name": "FTJOBS_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath": k8s.COMPLETION_INDEX}}} in c["env"]
    return [a.replace("$(FTJOBS_NODE_RANK)", str(rank)) for a in c["args"]]


def test_indexed_job_and_headless_service_wire_torchrun_from_the_pod_hostnames(overlays, tmp_path):
    objs, output = k8s.render_multinode(overlays["gpu"], "r1", ARGS, nodes=3, gpus_per_node=8, images=IMAGES)
    network, service, job = objs
    assert network["kind"] == "NetworkPolicy"  # test_only_the_runs_own_pods_reach_its_ranks
    name = "ftjobs-train-r1"
    assert (service["kind"], job["kind"], service["metadata"]["name"], job["metadata"]["name"]) == (
        "Service", "Job", name, name)
    assert output == "s3://ftjobs/runs/r1/train/"
    # Headless, selecting exactly this Job's pods, published before they are Ready (rendezvous comes first).
    assert service["spec"]["clusterIP"] == "None" and service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert service["metadata"]["namespace"] == job["metadata"]["namespace"] == "ftjobs"
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    assert (spec["completionMode"], spec["completions"], spec["parallelism"]) == ("Indexed", 3, 3)
    assert spec["maxFailedIndexes"] == 0 and spec["backoffLimitPerIndex"] == 4 and "backoffLimit" not in spec
    assert pod["subdomain"] == name  # pod i resolves as <job>-i.<service>
    c = container(job)
    assert c["resources"]["limits"]["nvidia.com/gpu"] == c["resources"]["requests"]["nvidia.com/gpu"] == "8"
    assert c["image"] == IMAGES["train"] and c["command"] == ["ftjobs"]
    # What pod 2 runs: torchrun's options, parsed by torchrun, then train's arguments, parsed by train.
    argv = pod_command(c, 2)
    assert argv[0] == "launch"
    args = launch.torchrun_args(argv[1:], ["train"])
    assert (args.nnodes, args.nproc_per_node, args.node_rank) == ("3", "8", 2)
    assert (args.master_addr, args.master_port) == (f"{name}-0.{name}", k8s.RENDEZVOUS_PORT)
    assert args.shutdown_timeout == pod["terminationGracePeriodSeconds"] - k8s.SHUTDOWN_MARGIN_S
    assert args.training_script_args == ["train", *ARGS, "--output", output]
    conf = chain.validate_arguments("train", args.training_script_args[1:])
    assert conf.checkpoint.grace_seconds < args.shutdown_timeout
    # The same rules as the single-pod Job, and valid Kubernetes 1.34.
    assert policy.violations(job, gpu=True) == []
    proc = validate(objs, tmp_path / "multinode.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_one_node_of_several_gpus_is_one_pod_without_service(overlays):
    (job,), _ = k8s.render_multinode(overlays["gpu"], "r1", ARGS, nodes=1, gpus_per_node=4, images=IMAGES)
    c = container(job)
    assert c["args"][:c["args"].index("--")] == ["launch", "--nproc-per-node", "4", "--shutdown-timeout", "570",
                                                 "--standalone"]
    assert "completionMode" not in job["spec"] and c["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert policy.violations(job, gpu=True) == []


def test_cpu_overlay_runs_processes_on_cpu_pods(overlays, tmp_path):
    objs, _ = k8s.render_multinode(overlays["local"], "r1", ARGS, nodes=2, gpus_per_node=2, images=IMAGES)
    job = objs[-1]
    c = container(job)
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
    assert launch.torchrun_args(pod_command(c, 0)[1:], ["train"]).nproc_per_node == "2"
    assert policy.violations(job, gpu=False) == []
    assert validate(objs, tmp_path / "cpu.yaml").returncode == 0


def test_jobset_validates_against_its_schema_and_restarts_the_set_together(overlays, tmp_path):
    (network, jobset), _ = k8s.render_multinode(overlays["gpu"], "r1", ARGS, nodes=4, gpus_per_node=8,
                                                engine="jobset", images=IMAGES, queue="team-a")
    assert network["kind"] == "NetworkPolicy"
    name = "ftjobs-train-r1"
    assert (jobset["apiVersion"], jobset["kind"], jobset["metadata"]["name"]) == (k8s.JOBSET_API, "JobSet", name)
    spec = jobset["spec"]
    assert spec["suspend"] is True and jobset["metadata"]["labels"][k8s.QUEUE_LABEL] == "team-a"  # Kueue admits it
    assert spec["network"] == {"enableDNSHostnames": True, "publishNotReadyAddresses": True}
    (rj,) = spec["replicatedJobs"]
    child = rj["template"]["spec"]
    assert (rj["replicas"], child["completions"], child["parallelism"], child["backoffLimit"]) == (1, 4, 4, 0)
    assert "suspend" not in child and "ttlSecondsAfterFinished" not in child
    args = launch.torchrun_args(pod_command(container(jobset), 3)[1:], ["train"])
    # JobSet names pods <jobset>-<replicated job>-<job index>-<pod index> under the subdomain <jobset>.
    assert (args.nnodes, args.node_rank, args.master_addr) == ("4", 3, f"{name}-node-0-0.{name}")
    assert policy.jobset_violations(jobset, gpu=True) == []
    proc = validate([job_of(jobset)], tmp_path / "child.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    if not jobset_schema.available():
        pytest.skip("kubeflow-trainer-api (the JobSet API types) comes with the dev extra (make install)")
    assert jobset_schema.violations(jobset) == []
    # The schema is closed and typed: a misspelt or mistyped field is caught.
    bad = copy.deepcopy(jobset)
    bad["spec"]["failurePolicy"]["rules"][0]["onJobFailureReason"] = ["PodFailurePolicy"]
    bad["spec"]["replicatedJobs"][0]["replicas"] = "1"
    assert jobset_schema.violations(bad) == [
        "spec/failurePolicy/rules/0: Additional properties are not allowed ('onJobFailureReason' was unexpected)",
        "spec/replicatedJobs/0/replicas: '1' is not of type 'integer'"]


def test_the_jobset_policy_catches_drift(overlays):
    (_, good), _ = k8s.render_multinode(overlays["gpu"], "r1", ARGS, nodes=2, engine="jobset", images=IMAGES)

    def broken(mutate: Any) -> str:
        js = copy.deepcopy(good)
        mutate(js["spec"], js["spec"]["replicatedJobs"][0]["template"]["spec"])
        return "\n".join(policy.jobset_violations(js, gpu=True))

    assert "FailJobSet" in broken(lambda s, j: s["failurePolicy"].pop("rules"))
    assert "maxRestarts" in broken(lambda s, j: s["failurePolicy"].update(maxRestarts=0))
    assert "backoffLimit 0" in broken(lambda s, j: j.update(backoffLimit=3))
    assert "exit codes 2 and 3" in broken(lambda s, j: j["podFailurePolicy"]["rules"].pop(0))
    assert "readOnlyRootFilesystem" in broken(
        lambda s, j: j["template"]["spec"]["containers"][0]["securityContext"].update(readOnlyRootFilesystem=False))


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) == {"matchLabels"}  # no expressions: what it selects is read off its labels
    return all(labels.get(k) == v for k, v in selector["matchLabels"].items())


@pytest.mark.parametrize("engine", k8s.ENGINES)
def test_only_the_runs_own_pods_reach_its_ranks(overlays, tmp_path, engine):
    """The rendezvous port (and the ports gloo/NCCL open between ranks) admit the run's own training pods only:
    not another run's, not another step's of this run, not other namespaces'."""
    objs, _ = k8s.render_multinode(overlays["local"], "r1", ARGS, nodes=2, engine=engine, images=IMAGES)
    network = objs[0]
    assert network["kind"] == "NetworkPolicy" and network["metadata"]["namespace"] == "ftjobs"
    pod_labels = (objs[-1]["spec"]["template"]["metadata"]["labels"] if engine == "job" else
                  objs[-1]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["metadata"]["labels"])
    spec = network["spec"]
    assert spec["policyTypes"] == ["Ingress"] and selects(spec["podSelector"], pod_labels)
    (rule,) = spec["ingress"]
    (peer,) = rule["from"]
    assert set(peer) == {"podSelector"}  # no namespaceSelector, no ipBlock: this namespace's pods only
    assert selects(peer["podSelector"], pod_labels)
    other_run = dict(pod_labels, **{k8s.RUN_LABEL: "r2"})
    other_step = dict(pod_labels, **{k8s.STEP_LABEL: "infer-base"})
    assert not selects(peer["podSelector"], other_run) and not selects(peer["podSelector"], other_step)
    proc = validate([network], tmp_path / "netpol.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    single, _ = k8s.render_multinode(overlays["local"], "r1", ARGS, nodes=1, images=IMAGES)
    assert [o["kind"] for o in single] == ["Job"]  # one pod: no rendezvous between pods to guard


def cli(*args: str) -> Any:
    return CliRunner().invoke(main, ["--log-format", "text", *args], catch_exceptions=False)


def test_render_prints_the_network_policy_and_service_then_the_job() -> None:
    result = cli("k8s", "render", "train", "--run-id", "r1", "--overlay", "gpu", "--nodes", "2",
                 "--gpus-per-node", "8", "--image", f"train={IMAGES['train']}", "--", *ARGS)
    assert result.exit_code == 0, result.output
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout) if d] == ["NetworkPolicy", "Service", "Job"]
    result = cli("k8s", "render", "train", "--run-id", "r1", "--nodes", "2", "--engine", "jobset", "--", *ARGS)
    assert result.exit_code == 0, result.output
    assert [d["kind"] for d in yaml.safe_load_all(result.stdout) if d] == ["NetworkPolicy", "JobSet"]
    assert "placeholder digest" in result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["merge", "--run-id", "r1", "--nodes", "2", "--", "--input", "t"], "are for train only (got merge)"),
    (["infer", "--run-id", "r1", "--engine", "jobset", "--", "--model", "m", "--prompts", "p"],
     "are for train only (got infer)"),
    (["train", "--run-id", "r1", "--nodes", "0", "--", *ARGS], "--nodes 0 --gpus-per-node None: both must be >= 1"),
    (["train", "--run-id", "r1", "--nodes", "2", "--", *ARGS, "--set", "checkpoint.grace_seconds=580"],
     "checkpoint.grace_seconds 580 does not fit the pod's terminationGracePeriodSeconds 600"),
    (["train", "--run-id", "r1", "--engine", "mpi", "--", *ARGS], "Invalid value for '--engine'"),
    (["train", "--run-id", "r1", "--nodes", "2", "--gpu-per-node", "8", "--", *ARGS],
     "No such option '--gpu-per-node'"),
    (["train", "--run-id", "r1", "--nodes", "2", "--", *ARGS, "--nodes", "2"], "No such option '--nodes'"),
])
def test_multinode_mistakes_exit_2_and_name_the_fix(args: list[str], message: str) -> None:
    result = cli("k8s", "render", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert "Traceback" not in result.output
