"""The rules every ftjobs pod template must meet, as one function the tests apply to
every overlay and every rendered run.

- Pod Security Standards "restricted" (https://kubernetes.io/docs/concepts/security/pod-security-standards/):
  non-root, no privilege escalation, all capabilities dropped, RuntimeDefault seccomp,
  no host namespaces/paths/ports, only the restricted volume types.
- Ours: read-only root filesystem with emptyDirs for /tmp, the caches and /dev/shm;
  requests and limits; the exit-code contract in podFailurePolicy; retry and cleanup
  settings; images pinned by tag and digest.

Local-build convention for image digests: our own images (`.../ftjobs-<image>`) may carry
the placeholder digest `sha256:` + 64 zeros in the templates, because their digest exists
only once a build has pushed them; `ftjobs k8s render --images` fills it in and
`ftjobs k8s submit` refuses to create a Job that still has it. Any other image must be
pinned by a real digest.
"""

from __future__ import annotations

import re
from typing import Any

from common import stages

PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
PINNED = re.compile(r"^(?P<repo>[^\s@:]+(?::\d+)?(?:/[^\s@:]+)*)"  # registry[:port]/path
                    r":(?P<tag>[\w][\w.-]{0,127})@(?P<digest>sha256:[0-9a-f]{64})$")
OWN_IMAGE = re.compile(r"(^|/)ftjobs-(prepare|train|merge|infer)$")
ALLOWED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                   "secret"}
CACHE_ENV = ("HF_HOME", "TRITON_CACHE_DIR", "FTJOBS_CACHE", "XDG_CACHE_HOME")
MIN_GRACE = {"train": 300}  # seconds to write a checkpoint on SIGTERM
GPU_STAGES = stages.gpu_templates()  # Job templates that run a model (common/stages.py)


def image_violations(image: str) -> list[str]:
    m = PINNED.match(image)
    if not m:
        return [f"image {image!r} is not pinned as NAME:TAG@sha256:DIGEST"]
    if m["digest"] == PLACEHOLDER_DIGEST and not OWN_IMAGE.search(m["repo"]):
        return [f"image {image!r}: the placeholder digest is only for our own ftjobs-* images"]
    return []


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def violations(job: dict[str, Any], *, gpu: bool | None = None, jobset_child: bool = False,
               api_access: bool = False) -> list[str]:
    """Everything wrong with one Job; [] when it meets the policy. gpu: also check the GPU pool settings.

    jobset_child: the Job is a JobSet's replicated Job (`jobset_violations`): its pods' failures fail it at
    once (backoffLimit 0) and the JobSet retries the whole set, so it fails on 2 and 3 with FailJob.
    api_access: the one pod that talks to the Kubernetes API (a sweep's driver) mounts its account's token.
    """
    out: list[str] = []
    name = job.get("metadata", {}).get("name", "?")
    stage = job.get("metadata", {}).get("labels", {}).get("ftjobs.dev/stage", "?")
    spec = job.get("spec", {})
    pod = spec.get("template", {}).get("spec", {})
    psc = pod.get("securityContext") or {}

    def bad(msg: str) -> None:
        out.append(f"{name}: {msg}")

    # -- Job: the exit-code contract, retries, cleanup
    rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
    fail_action = "FailIndex" if spec.get("completionMode") == "Indexed" and not jobset_child else "FailJob"
    no_retry = set()
    for r in rules:
        codes = r.get("onExitCodes") or {}
        if r.get("action") == fail_action and codes.get("operator") == "In":
            no_retry |= set(codes.get("values") or [])
    if not {2, 3} <= no_retry:
        bad(f"podFailurePolicy must {fail_action} on exit codes 2 and 3 (has {sorted(no_retry)})")
    if not any(r.get("action") == "Ignore" and any(c.get("type") == "DisruptionTarget" and c.get("status") == "True"
                                                  for c in r.get("onPodConditions") or []) for r in rules):
        bad("podFailurePolicy must Ignore the DisruptionTarget pod condition")
    if jobset_child and spec.get("backoffLimit") != 0:
        bad("a JobSet's Job needs backoffLimit 0 (the JobSet's failurePolicy retries the set)")
    elif not jobset_child and spec.get("completionMode") == "Indexed" and not spec.get("backoffLimitPerIndex"):
        bad("an Indexed Job needs backoffLimitPerIndex")
    if spec.get("podReplacementPolicy") != "Failed":
        bad("podReplacementPolicy must be Failed")
    if not spec.get("activeDeadlineSeconds", 0) > 0:
        bad("activeDeadlineSeconds must be set")
    if spec.get("ttlSecondsAfterFinished") is None and not jobset_child:  # a JobSet sets it for its Jobs
        bad("ttlSecondsAfterFinished must be set")
    if pod.get("restartPolicy") != "Never":
        bad("restartPolicy must be Never (podFailurePolicy needs it)")
    grace = pod.get("terminationGracePeriodSeconds")
    if grace is None or grace < MIN_GRACE.get(stage, 30):
        bad(f"terminationGracePeriodSeconds {grace} is too short for {stage} (>= {MIN_GRACE.get(stage, 30)})")

    # -- Pod: restricted profile
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if pod.get(key):
            bad(f"{key} is not allowed")
    if not api_access and pod.get("automountServiceAccountToken") is not False:
        bad("automountServiceAccountToken must be false (RBAC-free jobs)")
    volumes = {v["name"]: v for v in pod.get("volumes") or []}
    for v in volumes.values():
        kinds = set(v) - {"name"}
        if not kinds <= ALLOWED_VOLUMES:
            bad(f"volume {v['name']} uses {sorted(kinds - ALLOWED_VOLUMES)}, not allowed by the restricted profile")
    for c in (pod.get("initContainers") or []) + (pod.get("containers") or []):
        cname = c.get("name")
        sc = c.get("securityContext") or {}
        if sc.get("privileged"):
            bad(f"container {cname} is privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            bad(f"container {cname}: allowPrivilegeEscalation must be false")
        caps = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or []):
            bad(f"container {cname}: capabilities must drop ALL")
        if set(caps.get("add") or []) - {"NET_BIND_SERVICE"}:
            bad(f"container {cname}: adds capabilities {caps.get('add')}")
        if sc.get("runAsNonRoot", psc.get("runAsNonRoot")) is not True:
            bad(f"container {cname}: runAsNonRoot must be true")
        if sc.get("runAsUser", psc.get("runAsUser")) == 0:
            bad(f"container {cname}: runAsUser 0")
        seccomp = (sc.get("seccompProfile") or psc.get("seccompProfile") or {}).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            bad(f"container {cname}: seccompProfile must be RuntimeDefault (is {seccomp})")
        if any(p.get("hostPort") for p in c.get("ports") or []):
            bad(f"container {cname}: hostPort is not allowed")

        # -- ours: read-only root, writable emptyDirs where the libraries write
        if sc.get("readOnlyRootFilesystem") is not True:
            bad(f"container {cname}: readOnlyRootFilesystem must be true")
        mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts") or []}
        writable = [p for p, v in mounts.items() if "emptyDir" in volumes.get(v, {}) and not
                    any(m.get("readOnly") for m in c.get("volumeMounts") if m["mountPath"] == p)]
        for path in ("/tmp", "/dev/shm"):
            if path not in writable:
                bad(f"container {cname}: {path} must be a writable emptyDir")
        shm = volumes.get(mounts.get("/dev/shm", ""), {}).get("emptyDir") or {}
        if shm.get("medium") != "Memory":
            bad(f"container {cname}: /dev/shm must be an emptyDir with medium Memory")
        env = {e["name"]: e.get("value") for e in c.get("env") or []}
        for key in CACHE_ENV:
            if not env.get(key) or not _under(env[key], writable):
                bad(f"container {cname}: {key}={env.get(key)!r} is not under a writable emptyDir")
        for v in volumes.values():
            if "emptyDir" in v and not (v["emptyDir"] or {}).get("sizeLimit"):
                bad(f"volume {v['name']}: an emptyDir needs a sizeLimit")

        # -- requests and limits
        res = c.get("resources") or {}
        for kind in ("requests", "limits"):
            for key in ("cpu", "memory", "ephemeral-storage"):
                if key not in (res.get(kind) or {}):
                    bad(f"container {cname}: resources.{kind}.{key} must be set")
        wants_gpu = "nvidia.com/gpu" in (res.get("limits") or {})
        if gpu is True and stage in GPU_STAGES:
            if not wants_gpu:
                bad(f"container {cname}: {stage} needs limits nvidia.com/gpu")
            if (res.get("requests") or {}).get("nvidia.com/gpu") != (res.get("limits") or {}).get("nvidia.com/gpu"):
                bad(f"container {cname}: nvidia.com/gpu requests must equal limits")
            if not pod.get("nodeSelector") or not any(t.get("key") == "nvidia.com/gpu" for t in
                                                       pod.get("tolerations") or []):
                bad(f"{stage} needs a GPU nodeSelector and the nvidia.com/gpu toleration")
        elif wants_gpu and (gpu is False or stage not in GPU_STAGES):
            bad(f"container {cname}: {stage} asks for a GPU it does not use")

        out.extend(f"{name}: {v}" for v in image_violations(c.get("image", "")))
    return out


def jobset_violations(jobset: dict[str, Any], *, gpu: bool | None = None) -> list[str]:
    """Everything wrong with a JobSet that runs one stage: the JobSet's own retry rules, and each replicated
    Job's as `violations` checks them (the pod policy is the same as a plain Job's)."""
    out: list[str] = []
    name = jobset.get("metadata", {}).get("name", "?")
    spec = jobset.get("spec", {})
    policy = spec.get("failurePolicy") or {}
    if not policy.get("maxRestarts", 0) >= 1:
        out.append(f"{name}: failurePolicy.maxRestarts must be >= 1 (a preempted node restarts the set)")
    if not any(r.get("action") == "FailJobSet" and "PodFailurePolicy" in (r.get("onJobFailureReasons") or [])
               for r in policy.get("rules") or []):
        out.append(f"{name}: failurePolicy must FailJobSet on a Job failed by its podFailurePolicy (exit 2, 3, 4)")
    if spec.get("ttlSecondsAfterFinished") is None:
        out.append(f"{name}: ttlSecondsAfterFinished must be set")
    for rj in spec.get("replicatedJobs") or []:
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {**jobset["metadata"], **rj["template"].get(
            "metadata", {}), "name": f"{name}-{rj['name']}"}, "spec": rj["template"]["spec"]}
        out += violations(job, gpu=gpu, jobset_child=True)
    return out
