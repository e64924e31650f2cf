"""What a pod of a multi-process train needs beyond the single-process Job (`k8s.render_multinode` calls it),
for every strategy (ddp and fsdp alike): nothing else is added.

- /dev/shm: NCCL moves data between the GPUs of one pod through shared memory, and the pod's default
  /dev/shm (the `dshm` emptyDir, medium Memory, from k8s/base) must hold its buffers for every process:
  its sizeLimit grows to SHM_PER_PROCESS x processes when that is more than the overlay's. Memory-backed
  emptyDirs count against the pod's memory limit only as far as they are written.
- NCCL variables users commonly need (GPU pods only; a value the overlay already sets is kept):
  NCCL_DEBUG=WARN (why a collective failed, in the pod log), TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (a dead peer
  fails the collective instead of hanging until activeDeadlineSeconds), and across pods
  NCCL_SOCKET_IFNAME=eth0 (bootstrap over the pod network, not a loopback or bridge interface NCCL may pick).
- The rendezvous (torchrun's master address and port, node rank from the completion index) stays in
  `render_multinode`, beside the headless Service it needs.
"""

from __future__ import annotations

from typing import Any

SHM_PER_PROCESS_GI = 2
NCCL_ENV = {"NCCL_DEBUG": "WARN", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1"}
NCCL_ACROSS_PODS = {"NCCL_SOCKET_IFNAME": "eth0"}


def prepare_pod(pod: dict[str, Any], container: dict[str, Any], procs: int, nodes: int, gpus: bool) -> None:
    """Size /dev/shm for `procs` processes and set the NCCL variables (GPU pods), in place."""
    for volume in pod.get("volumes") or []:
        if volume["name"] == "dshm" and volume.get("emptyDir", {}).get("medium") == "Memory":
            wanted = SHM_PER_PROCESS_GI * procs
            if _gi(volume["emptyDir"].get("sizeLimit")) < wanted:
                volume["emptyDir"]["sizeLimit"] = f"{wanted}Gi"
    if not gpus:
        return
    env = container.setdefault("env", [])
    have = {e["name"] for e in env}
    wanted_env = {**NCCL_ENV, **(NCCL_ACROSS_PODS if nodes > 1 else {})}
    env += [{"name": k, "value": v} for k, v in wanted_env.items() if k not in have]


def _gi(quantity: str | None) -> float:
    """A memory quantity in GiB (Gi, Mi or plain bytes; absent: 0)."""
    if not quantity:
        return 0.0
    units = {"Gi": 1.0, "Mi": 1 / 1024, "Ti": 1024.0}
    for suffix, scale in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * scale
    return float(quantity) / 2**30
