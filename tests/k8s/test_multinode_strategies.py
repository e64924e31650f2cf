"""`ftjobs k8s render train --nodes N` for every strategy and method: what a pod gets beyond the single-pod Job
is the rendezvous (tests/k8s/test_multinode.py), /dev/shm sized for its processes and, on GPU pods, the NCCL
variables users commonly need (jobs/k8s_train.py), and nothing else. Checked offline as test_multinode.py
does: strict Kubernetes 1.34 validation, the pod policy, torchrun's parser and train's own command line."""

from __future__ import annotations

import pytest

from jobs import chain, k8s, k8s_train, launch
from tests.k8s import policy
from tests.k8s.test_multinode import ARGS, IMAGES, container, overlays, pod_command, validate  # noqa: F401

pytestmark = pytest.mark.unit


def shm(job: dict) -> str:
    (vol,) = [v for v in job["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert vol["emptyDir"]["medium"] == "Memory"
    return vol["emptyDir"]["sizeLimit"]


@pytest.mark.parametrize("method", ["qlora", "lora", "full"])
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_every_strategy_renders_a_valid_multinode_job_with_nccl_settings(overlays, tmp_path, method,  # noqa: F811
                                                                         strategy):
    args = [*ARGS, "--set", f"method={method}", "--set", f"strategy={strategy}"]
    objs, _ = k8s.render_multinode(overlays["gpu"], "r1", args, nodes=2, gpus_per_node=8, images=IMAGES)
    job = objs[-1]
    c = container(job)
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert {k: env[k] for k in ("NCCL_DEBUG", "TORCH_NCCL_ASYNC_ERROR_HANDLING", "NCCL_SOCKET_IFNAME")} == {
        "NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1", "NCCL_SOCKET_IFNAME": "eth0"}
    assert shm(job) == "16Gi"  # 2 GiB x 8 processes: the gpu overlay's 16Gi already holds it
    command = pod_command(c, 1)
    parsed = launch.torchrun_args(command[1:], ["train"])
    assert (parsed.nproc_per_node, parsed.nnodes, parsed.node_rank) == ("8", "2", 1)
    resolved = chain.validate_arguments("train", parsed.training_script_args[1:])
    assert (resolved.strategy, resolved.method) == (strategy, method)
    assert policy.violations(job, gpu=True) == []
    if strategy == "fsdp" and method == "qlora":  # one strict validation is enough: the shape does not vary
        assert validate(objs, tmp_path / "fsdp.yaml").returncode == 0


def test_one_pod_gets_no_cross_pod_interface_and_cpu_pods_no_nccl(overlays, tmp_path):  # noqa: F811
    (job,), _ = k8s.render_multinode(overlays["gpu"], "r1", [*ARGS, "--set", "strategy=fsdp"], nodes=1,
                                     gpus_per_node=16, images=IMAGES)
    env = {e["name"] for e in container(job)["env"]}
    assert "NCCL_DEBUG" in env and "NCCL_SOCKET_IFNAME" not in env
    assert shm(job) == f"{k8s_train.SHM_PER_PROCESS_GI * 16}Gi"  # more processes than the overlay's 16Gi holds
    objs, _ = k8s.render_multinode(overlays["local"], "r1", [*ARGS, "--set", "strategy=fsdp"], nodes=2,
                                   gpus_per_node=2, images=IMAGES)
    assert not {e["name"] for e in container(objs[-1])["env"]} & {"NCCL_DEBUG", "NCCL_SOCKET_IFNAME"}
    assert policy.violations(objs[-1], gpu=False) == []
    assert validate(objs, tmp_path / "cpu.yaml").returncode == 0


def test_launch_takes_nproc_as_nproc_per_node():
    parsed = launch.torchrun_args(["--nproc", "2", "--standalone", "--", "train", "--set", "strategy=fsdp"],
                                  ["train"])
    assert parsed.nproc_per_node == "2" and parsed.training_script_args == ["train", "--set", "strategy=fsdp"]
