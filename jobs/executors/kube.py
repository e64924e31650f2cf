"""The Kubernetes executor: each step instance of a plan a Job, created once what it takes from has published.

Every Job's arguments and image are checked before the first one exists (`check`: the stage's own command
line, no placeholder digests). Then the executor loop of `jobs/executors/__init__.py` creates each ready
instance's Job (a multi-node train's headless Service first), follows it through kubectl, and reads the
manifest the step published. Independent steps run at once; with `--queue` the Jobs are created suspended and
Kueue admits them as capacity allows. A Job that exists already (a re-run, or a restarted in-cluster driver)
is followed, not created again. `timeout_s` bounds each Job's wait: the Job keeps running, and the same
submit follows it.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any

from common import manifest as mf
from common.errors import EXIT_RETRYABLE, ConfigError, FtjobsError
from jobs import k8s
from jobs.executors import Executor, Finished
from jobs.plan import Instance, Plan

LOG = logging.getLogger(__name__)


class Kubectl:
    """The few kubectl calls `submit` makes, against one namespace."""

    def __init__(self, binary: str | None, namespace: str | None) -> None:
        self.bin = k8s.kubectl_bin(binary)
        self.ns = ["--namespace", namespace] if namespace else []

    def run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([self.bin, *self.ns, *args], input=stdin, capture_output=True, text=True,
                              check=False, timeout=300)
        if check and proc.returncode != 0:
            raise FtjobsError(f"kubectl {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")
        return proc

    def create(self, job: dict[str, Any]) -> bool:
        """Create the Job; False when a Job of that name exists already (a re-run of submit: follow it)."""
        proc = self.run("create", "-f", "-", stdin=k8s.dump_yaml([job]), check=False)
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


def job_state(kube: Kubectl, name: str) -> Finished | None:
    """None while the Job runs; how it ended (exit 0, or the stage's exit code and why) once it did."""
    status = kube.job_status(name)
    if condition(status, "Complete"):
        LOG.info("job %s complete", name)
        return Finished(0)
    failed = condition(status, "Failed")
    if failed:
        # A podFailurePolicy FailJob names the exit code in the condition ("... failed with exit code 3 matching
        # FailJob rule ..."): readable with permission on Jobs alone, as a sweep's driver Job has.
        said = re.search(r"exit code (\d+)", str(failed.get("message", "")))
        codes = [int(said.group(1))] if said else [c for c in kube.exit_codes(name) if c in (2, 3, 4)]
        code = codes[-1] if codes and codes[-1] in (2, 3, 4) else EXIT_RETRYABLE
        tail = kube.logs_tail(name)
        return Finished(code, None, f"Job {name} failed ({failed.get('reason')}: {failed.get('message', '')}); "
                                    f"exit code {code}. Last log lines:\n{tail}")
    return None


@dataclass
class KubeExecutor(Executor):
    """Creates and follows a plan's Jobs."""

    docs: list[dict[str, Any]]  # the rendered templates
    kube: Kubectl
    images: dict[str, str]
    shards: int = 1  # pods of each inference Indexed Job
    extra: dict[str, list[str]] = field(default_factory=dict)  # --stage-args by stage or step name
    queue: str | None = None
    namespace: str | None = None
    timeout_s: float = 48 * 3600
    poll_s: float = 10.0
    nodes: int = 1  # train's pods (render_multinode), and processes in each
    gpus_per_node: int | None = None
    max_parallel: int | None = None

    def render(self, plan: Plan, inst: Instance, args: list[str]) -> list[dict[str, Any]]:
        """The objects of one step, in the order to create them (the Job last); refused with a placeholder image."""
        extra = [a for key in dict.fromkeys((inst.step.stage, inst.step.name)) for a in self.extra.get(key, [])]
        args = [*args, *extra]
        if inst.step.stage == "train" and k8s.multinode("train", self.nodes, self.gpus_per_node, "job"):
            objs, _ = k8s.render_multinode(self.docs, plan.id, args, nodes=self.nodes,
                                           gpus_per_node=self.gpus_per_node, tag=inst.tag, images=self.images,
                                           queue=self.queue, namespace=self.namespace, env=plan.env(inst))
        else:
            job, _ = k8s.render_job(self.docs, inst.step.stage, plan.id, args, tag=inst.tag,
                                    shards=self.shards if inst.step.stage == "infer" else 1, images=self.images,
                                    queue=self.queue, namespace=self.namespace, env=plan.env(inst))
            objs = [job]
        unpinned = k8s.placeholder_images(objs)
        if unpinned:
            raise ConfigError(f"{inst.name}: image {', '.join(unpinned)} still carries the placeholder digest: "
                              f"{k8s.PLACEHOLDER_HINT}.")
        return objs

    def check(self, plan: Plan) -> None:
        """Every Job's arguments and image, checked before the first one exists (the leaderboard's section was
        checked when the sweep was planned)."""
        for inst in plan.instances.values():
            if not inst.final:
                self.render(plan, inst, plan.arguments(inst, stand_in=True))

    def start(self, plan: Plan, inst: Instance) -> tuple[str, float]:
        *companions, job = self.render(plan, inst, plan.arguments(inst))
        for obj in companions:  # a multi-node train's headless Service
            self.kube.create(obj)  # False: it exists already (a re-run of submit)
        name = job["metadata"]["name"]
        created = self.kube.create(job)
        LOG.info("%s job %s (%s)", "created" if created else "following existing", name, inst.output)
        inst.log = f"kubectl logs job/{name}"
        return name, time.monotonic()

    def poll(self, plan: Plan, inst: Instance, handle: tuple[str, float]) -> Finished | None:
        name, started = handle
        state = job_state(self.kube, name)
        if state is None:
            if time.monotonic() - started > self.timeout_s:
                return Finished(EXIT_RETRYABLE, None, f"Timed out after {self.timeout_s:.0f}s waiting for Job {name}: "
                                "it keeps running; re-run the same submit to follow it.")
            return None
        if state.exit_code != 0:
            return state
        loaded = mf.load(inst.output, verify="size", expect_stage=inst.step.stage)
        LOG.info("%s published %s", inst.name, loaded.uri)
        return Finished(0, loaded.uri)
