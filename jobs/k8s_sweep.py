"""The in-cluster driver of a sweep on Kubernetes: the objects that run `ftjobs k8s submit --sweep` in a Job.

    ftjobs k8s render --sweep-driver --sweep sweep.yaml --sweep-id s1 --overlay gpu --images images.json \\
        | kubectl apply -f -

`submit --sweep` (jobs/k8s_cli.py) plans the sweep exactly as `ftjobs sweep` does (jobs/plan.py) and runs the
plan with the Kubernetes executor (jobs/executors/kube.py); the driver runs that same command in-cluster.

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
from typing import Any

import yaml

from common import manifest as mf
from common.errors import ConfigError
from jobs import chain, k8s, sweep

LOG = logging.getLogger(__name__)
DRIVER = "ftjobs-sweep-driver"
MOUNT = "/etc/ftjobs-sweep"


# --------------------------------------------------------------------------- the driver Job


def render_driver(docs: list[dict[str, Any]], sweep_file: str, sweep_id: str, images: dict[str, str],
                  queue: str | None, namespace: str | None, shards: int) -> list[dict[str, Any]]:
    """ConfigMap, ServiceAccount, Role, RoleBinding and the driver Job that runs `submit --sweep` in-cluster."""
    from common import config as cfg

    config = cfg.load_config(sweep.Config, file=sweep_file, flags={"sweep_id": sweep_id})
    for cell in sweep.make_cells(config):
        chain.check(cell.config)
    problem = mf.run_id_problem(sweep_id, "sweep id")
    if problem:
        raise ConfigError(f"--sweep-id {problem}")
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
    for image in k8s.placeholder_images([job]):
        LOG.warning("the driver's image %s carries the placeholder digest: %s before applying it", image,
                    k8s.PLACEHOLDER_HINT)
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
