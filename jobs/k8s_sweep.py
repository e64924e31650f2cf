"""A sweep on Kubernetes: its cells' Jobs from the same chain declaration, and a driver Job that runs it in-cluster.

    ftjobs k8s submit --sweep sweep.yaml --sweep-id s1 --overlay gpu --images images.json [--queue team-a]
    ftjobs k8s render --sweep-driver --sweep sweep.yaml --sweep-id s1 --overlay gpu --images images.json \\
        | kubectl apply -f -

`submit --sweep` plans the sweep exactly as `ftjobs sweep` does (jobs/sweep.py: cells, shared step instances
keyed by their recipe, plain-LoRA cells served by one inference engine), checks every Job's arguments and
image, then creates each Job as soon as the steps it takes from have published: independent cells run at
once, and with `--queue` Kueue admits them as capacity allows. A failed Job fails the cells that need it and
no others; the final evaluate ranks the finished cells. Outputs go to `<FTJOBS_RUNS>/sweeps/<sweep_id>/`.

`render --sweep-driver` prints the objects that run that same `submit` inside the cluster, so a sweep
outlives the laptop or CI runner that started it: a ConfigMap with the sweep file, the images and the
rendered Job templates; a ServiceAccount with a namespaced Role that may create, get, list and watch Jobs
and nothing else; and a driver Job (PSS restricted, like every ftjobs pod) on the prepare image. The driver
holds no state: killed and restarted, it finds every finished step through the manifests and follows Jobs
that exist.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from typing import Any

import click
import yaml

from common import manifest as mf
from common.errors import EXIT_GATE, ConfigError
from jobs import chain, k8s, sweep

LOG = logging.getLogger(__name__)
DRIVER = "ftjobs-sweep-driver"
MOUNT = "/etc/ftjobs-sweep"


def sweep_prefix(docs: list[dict[str, Any]], sweep_id: str) -> str:
    return k8s.run_prefix(k8s.store_settings(docs), "sweeps") + f"/{sweep_id}"


def instance_tag(inst: sweep.Instance) -> str:
    step_tag = inst.step.name.removeprefix(inst.step.stage).strip("-")
    return "-".join(p for p in (step_tag, inst.key[:8]) if p)


def render_instance(sub: k8s.Submission, inst: sweep.Instance, args: list[str]) -> dict[str, Any]:
    extra = [a for key in dict.fromkeys((inst.step.stage, inst.step.name)) for a in sub.extra.get(key, [])]
    if inst.step.stage == "train":
        sub.check_fits(instance_tag(inst), [*args, *extra])
    job, _ = k8s.render_job(sub.docs, inst.step.stage, sub.run_id, [*args, *extra], tag=instance_tag(inst),
                            shards=sub.shards if inst.step.stage == "infer" else 1, images=sub.images,
                            queue=sub.queue, namespace=sub.namespace)
    image = job["spec"]["template"]["spec"]["containers"][0]["image"]
    if image.endswith("@" + k8s.PLACEHOLDER_DIGEST):
        raise ConfigError(f"{inst.step.name}: image {image} still carries the placeholder digest: pass --images "
                          "FILE or --image NAME=REF@sha256:... with the pushed digest (make images PUSH=REGISTRY).")
    return job


def submit_sweep(sub: k8s.Submission, config: sweep.Config) -> mf.Loaded:
    """Every step instance of the sweep as a Job, started when its inputs are published; then the leaderboard."""
    prefix = sweep_prefix(sub.docs, sub.run_id)
    cells = sweep.make_cells(config)
    for cell in cells:
        chain.check(cell.run)
    sweep.check_leaderboard(config)
    instances = sweep.plan(config, cells, prefix)
    click.echo(sweep.describe(config, cells, instances, sub.run_id, prefix), err=True)
    conf_dir = f"{prefix}/config"
    for inst in instances.values():  # every Job's arguments and image checked before the first one exists
        stand_ins = {instances[k].step.name: mf.manifest_uri(instances[k].output) for k in inst.needs.values()}
        render_instance(sub, inst, sweep.arguments(inst, stand_ins, instances, conf_dir)
                        if not inst.served else _served_stand_in(inst, instances, conf_dir, stand_ins))
    evaluate: sweep.Instance | None = None
    code = 1
    try:
        follow(sub, instances, conf_dir)
        inst, args, finished = sweep.leaderboard_step(config, cells, instances, prefix, conf_dir)
        if not finished:
            raise sweep.no_cell_finished(sub.run_id, instances)
        evaluate = inst
        job = render_instance(sub, inst, args)
        sub.kube.create(job)
        inst.status = "running"
        try:
            wait_one(sub, job["metadata"]["name"], inst)
        except k8s.StageFailed as exc:
            inst.status, inst.exit_code = "failed", exc.exit_code
            if exc.exit_code != EXIT_GATE:
                raise
        loaded = mf.load(inst.output, verify="size", expect_stage="evaluate")
        inst.manifest = loaded.uri
        verdict = (loaded.manifest.metrics.get("leaderboard") or {}).get("verdict")
        if verdict:
            click.echo(verdict, err=True)
        if inst.exit_code == EXIT_GATE:
            code = EXIT_GATE
            sweep.gate_failed(config, loaded)
        code = 0
        return loaded
    finally:
        sweep.record(prefix, sub.run_id, cells, instances, evaluate, code)


def _served_stand_in(inst: sweep.Instance, instances: dict[str, sweep.Instance], conf_dir: str,
                     stand_ins: dict[str, str]) -> list[str]:
    """A served inference's arguments as they will be once every adapter trained (to check them up front)."""
    trains = {t: instances[t] for _, t, _ in inst.served}
    saved = {t: (i.status, i.manifest) for t, i in trains.items()}
    for i in trains.values():
        i.status, i.manifest = "done", mf.manifest_uri(i.output)
    try:
        return sweep.arguments(inst, stand_ins, instances, conf_dir)
    finally:
        for t, i in trains.items():
            i.status, i.manifest = saved[t]


def follow(sub: k8s.Submission, instances: dict[str, sweep.Instance], conf_dir: str) -> None:
    """Create each instance's Job once its inputs are published; a failed Job blocks only what needs it."""
    pending = [i for i in instances.values() if i.status == "pending"]
    running: dict[str, tuple[sweep.Instance, float]] = {}  # Job name -> (instance, started)
    while pending or running:
        for inst in sweep.ready(pending, instances):
            args = sweep.arguments(inst, sweep.inputs_of(inst, instances), instances, conf_dir)
            job = render_instance(sub, inst, args)
            name = job["metadata"]["name"]
            created = sub.kube.create(job)
            LOG.info("%s job %s (%s)", "created" if created else "following existing", name, inst.output)
            inst.status, inst.log = "running", f"kubectl logs job/{name}"
            running[name] = (inst, time.monotonic())
            pending.remove(inst)
        for name, (inst, started) in list(running.items()):
            try:
                finished = k8s.job_state(sub.kube, name)
            except k8s.StageFailed as exc:
                inst.status, inst.exit_code = "failed", exc.exit_code
                LOG.error("%s#%s failed (exit %s): cells %s stop here", inst.step.name, inst.key[:6], exc.exit_code,
                          ", ".join(inst.cells))
                del running[name]
                continue
            if finished:
                inst.manifest = mf.load(inst.output, verify="size", expect_stage=inst.step.stage).uri
                inst.status, inst.exit_code = "done", 0
                del running[name]
            elif time.monotonic() - started > sub.timeout_s:
                raise k8s.StageFailed(f"Timed out after {sub.timeout_s:.0f}s waiting for Job {name}: it keeps "
                                      "running; re-run the same submit to follow it.")
        if pending or running:
            time.sleep(sub.poll_s)


def wait_one(sub: k8s.Submission, name: str, inst: sweep.Instance) -> None:
    started = time.monotonic()
    while not k8s.job_state(sub.kube, name):
        if time.monotonic() - started > sub.timeout_s:
            raise k8s.StageFailed(f"Timed out after {sub.timeout_s:.0f}s waiting for Job {name}")
        time.sleep(sub.poll_s)
    inst.status, inst.exit_code = "done", 0


# --------------------------------------------------------------------------- the driver Job


def render_driver(docs: list[dict[str, Any]], sweep_file: str, sweep_id: str, images: dict[str, str],
                  queue: str | None, namespace: str | None, shards: int) -> list[dict[str, Any]]:
    """ConfigMap, ServiceAccount, Role, RoleBinding and the driver Job that runs `submit --sweep` in-cluster."""
    from common import config as cfg

    config = cfg.load_config(sweep.Config, file=sweep_file, flags={"sweep_id": sweep_id})
    for cell in sweep.make_cells(config):
        chain.check(cell.run)
    if not mf.RUN_ID_RE.match(sweep_id):
        raise ConfigError(f"--sweep-id {sweep_id!r}: use 1-63 letters, digits, '.', '_' or '-'")
    template = copy.deepcopy(k8s.find_job(docs, "prepare"))
    ns = namespace or template["metadata"].get("namespace")
    name = k8s.job_name("sweep-driver", sweep_id)
    labels = {"app.kubernetes.io/part-of": "ftjobs", "app.kubernetes.io/name": DRIVER, k8s.RUN_LABEL: sweep_id}

    def meta(kind_name: str) -> dict[str, Any]:
        return {"name": kind_name, "labels": dict(labels), **({"namespace": ns} if ns else {})}

    files = {"sweep.yaml": yaml.safe_dump(config.model_dump(mode="json", exclude_none=True), sort_keys=False),
             "images.json": json.dumps(images, indent=2), "templates.yaml": k8s.dump_yaml(docs)}
    config_map = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta(name), "data": files}
    account = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": meta(DRIVER),
               "automountServiceAccountToken": True}
    role = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": meta(DRIVER),
            "rules": [{"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "list", "watch"]}]}
    binding = {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": meta(DRIVER),
               "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": DRIVER},
               "subjects": [{"kind": "ServiceAccount", "name": DRIVER, **({"namespace": ns} if ns else {})}]}
    job = template
    job["metadata"] = meta(name)
    spec = job["spec"]
    spec["suspend"] = False  # the driver itself is not queued: the cells' Jobs are
    spec["backoffLimit"] = 6  # a restarted driver resumes through the manifests
    spec["activeDeadlineSeconds"] = 14 * 86400
    spec.pop("completions", None), spec.pop("parallelism", None), spec.pop("completionMode", None)
    pod = spec["template"]
    pod.setdefault("metadata", {})["labels"] = dict(labels)
    pod_spec = pod["spec"]
    pod_spec["serviceAccountName"] = DRIVER
    pod_spec["automountServiceAccountToken"] = True  # kubectl in the pod talks to the API as the driver account
    pod_spec["volumes"] = [*pod_spec.get("volumes", []), {"name": "sweep", "configMap": {"name": name}}]
    container = next(c for c in pod_spec["containers"] if c["name"] == "job")
    container["volumeMounts"] = [*container.get("volumeMounts", []),
                                 {"name": "sweep", "mountPath": MOUNT, "readOnly": True}]
    container["image"] = images.get("prepare") or container["image"]  # the driver needs no torch
    if container["image"].endswith("@" + k8s.PLACEHOLDER_DIGEST):
        LOG.warning("the driver's image %s carries the placeholder digest: pass --images/--image before applying it",
                    container["image"])
    env = [e for e in container.get("env", []) if e["name"] != "FTJOBS_IMAGE"]
    container["env"] = [*env, {"name": "FTJOBS_IMAGE", "value": container["image"]},
                        {"name": "HOME", "value": "/tmp"}]  # kubectl keeps its cache under HOME
    container["command"] = ["ftjobs"]
    container["args"] = ["k8s", "submit", "--sweep", f"{MOUNT}/sweep.yaml", "--sweep-id", sweep_id,
                         "--images", f"{MOUNT}/images.json", "--templates", f"{MOUNT}/templates.yaml",
                         "--shards", str(shards), "--poll-s", "30", *(["--queue", queue] if queue else []),
                         *(["--namespace", ns] if ns else [])]
    container["resources"] = {"requests": {"cpu": "100m", "memory": "256Mi", "ephemeral-storage": "1Gi"},
                              "limits": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "1Gi"}}
    return [config_map, account, role, binding, job]
