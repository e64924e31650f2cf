"""`ftjobs k8s render|submit`: print one stage's Kubernetes objects, or run a whole chain or sweep on a cluster.

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
    # a sweep: the same plan as `ftjobs sweep`, as Jobs (or in-cluster: render --sweep-driver)
    ftjobs k8s submit --sweep sweep.yaml --sweep-id s1 --overlay gpu --images images.json [--queue team-a]

`render` prints what jobs/k8s.py renders. `submit` builds the plan (jobs/plan.py, as `ftjobs pipeline` and
`ftjobs sweep` do), checks every Job's arguments (the stage's own command line: exit 2 naming a mistake) and
image (no placeholder digest), and hands the plan to the Kubernetes executor (jobs/executors/kube.py). Outputs
go to `<FTJOBS_RUNS>/<run_id>/<step>/` (a sweep: `<FTJOBS_RUNS>/sweeps/<sweep_id>/<step>/<key>/`; FTJOBS_RUNS
from the overlay's ConfigMap). Exit codes: a stage's own code when it failed with 2, 3 or 4; a sweep's 5 when
some cells failed; 2 for usage; 1 otherwise.
"""

from __future__ import annotations

import json
import logging
import shlex
from pathlib import Path
from typing import Any

import click

from common import manifest as mf
from common import stages
from common.errors import ConfigError
from jobs import chain, pipeline, sweep
from jobs.executors.kube import Kubectl, KubeExecutor
from jobs.k8s import (
    ENGINES,
    OVERLAYS,
    PLACEHOLDER_HINT,
    dump_yaml,
    kustomize,
    load_templates,
    multinode,
    overlay_dir,
    parse_images,
    placeholder_images,
    render_job,
    render_multinode,
    run_prefix,
    setup_objects,
    store_settings,
)

LOG = logging.getLogger(__name__)


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
@click.argument("stage", required=False, metavar="[STAGE]")
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
    for image in placeholder_images(objs[-1:]):
        LOG.warning("image %s carries the placeholder digest: %s before creating it", image, PLACEHOLDER_HINT)
    click.echo(dump_yaml(objs), nl=False)


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
@click.option("--allow-failed-cells", "allow_failed_cells", is_flag=True, default=None,
              help="With --sweep: exit 0 when some cells failed and the others finished (default: exit 5).")
@click.option("--timeout-s", type=float, default=48 * 3600, show_default=True, help="Per Job.")
@click.option("--poll-s", type=float, default=10.0, show_default=True, help="Seconds between status checks.")
@click.option("--summary", metavar="FILE", help="Also write {step: manifest URI} as JSON here (for CI).")
@click.option("--nodes", type=int, default=1, show_default=True, metavar="N",
              help="train on N pods (a headless Service + an Indexed Job; rank 0 publishes).")
@click.option("--gpus-per-node", type=int, metavar="G", help="train's processes (GPUs) per pod (default: the "
                                                              "overlay's GPUs per pod, or 1).")
@_common_options
def submit(run_id: str | None, sweep_file: str | None, sweep_id: str | None, templates: str | None,
           config_file: str | None, sets: tuple[str, ...], sources: tuple[str, ...],
           base_model: str | None, shards: int, baseline: bool | None, fail_if_worse: str | None,
           stage_args: tuple[str, ...], allow_failed_cells: bool | None, timeout_s: float, poll_s: float,
           summary: str | None, nodes: int,
           gpus_per_node: int | None, overlay: str, kustomize_dir: str | None, image_pairs: tuple[str, ...],
           images_file: str | None, queue: str | None, namespace: str | None, kubectl: str | None) -> None:
    """Run the chain (prepare, infer-base, train, merge, infer-finetuned, evaluate) as Jobs.

    Each Job starts once the steps it takes from have published, fed their manifests; each step's config
    section goes to <FTJOBS_RUNS>/<run_id>/config/<step>.yaml. Prints the evaluate manifest URI last.
    With --nodes/--gpus-per-node, train runs as `render --nodes` prints it: its Service, then its Job.
    Needs the store credentials locally too: it writes the sections and reads each published manifest.
    """
    from common import config as cfg

    docs = load_templates(templates) if templates else kustomize(overlay_dir(overlay, kustomize_dir), kubectl)
    # kubectl must look where the Jobs are created: the overlay's namespace unless told otherwise.
    namespace = namespace or next((d["metadata"].get("namespace") for d in docs if d.get("kind") == "Job"), None)
    executor = KubeExecutor(docs=docs, kube=Kubectl(kubectl, namespace), images=parse_images(image_pairs, images_file),
                            shards=shards, extra=stage_args_map(stage_args), queue=queue, namespace=namespace,
                            timeout_s=timeout_s, poll_s=poll_s, nodes=nodes, gpus_per_node=gpus_per_node)
    gate = (f"evaluate.fail_if_worse={fail_if_worse}",) if fail_if_worse else ()
    if sweep_file:
        if run_id or config_file or sources or base_model:
            raise ConfigError("--sweep takes the whole sweep from its file: drop --run-id, --config, --source and "
                              "--base-model (use --sweep-id and --set)")
        flags = {"sweep_id": sweep_id, "baseline": baseline, "allow_failed_cells": allow_failed_cells}
        click.echo(submit_sweep(executor, cfg.load_config(sweep.Config, file=sweep_file, sets=(*sets, *gate),
                                                          flags=flags), summary).uri)
        return
    if not run_id:
        raise ConfigError("Pass --run-id (one run of the chain) or --sweep FILE (a sweep).")
    config = cfg.load_config(chain.Config, file=config_file, sets=(*sets, *gate),
                             flags={"run_id": run_id, "base_model": base_model, "data": list(sources) or None,
                                    "baseline": baseline})
    click.echo(submit_run(executor, config, run_id, summary).uri)


def submit_run(executor: KubeExecutor, config: chain.Config, run_id: str, summary: str | None) -> mf.Loaded:
    """The run's plan, checked whole, then its Jobs; `summary` gets {step: manifest URI} (also on a failure)."""
    the_plan = pipeline.plan_run(config, run_prefix(store_settings(executor.docs), run_id), run_id, local=False)
    click.echo(the_plan.describe(), err=True)
    the_plan.write_sections()
    executor.check(the_plan)  # every Job's arguments and image, before the first one exists
    try:
        return pipeline.execute_plan(the_plan, executor, config)
    finally:
        if summary:
            done = {i.step.name: i.manifest for i in the_plan.instances.values() if i.manifest}
            Path(summary).write_text(json.dumps(done, indent=2) + "\n")


def submit_sweep(executor: KubeExecutor, conf: sweep.Config, summary: str | None) -> mf.Loaded:
    """The sweep's plan under <FTJOBS_RUNS>/sweeps/<sweep_id>, checked whole, then its Jobs and leaderboard."""
    the_id = conf.sweep_id or mf.new_run_id()
    prefix = run_prefix(store_settings(executor.docs), "sweeps") + f"/{the_id}"
    the_plan = sweep.plan_sweep(conf, prefix, the_id, local=False)
    click.echo(the_plan.describe(), err=True)
    the_plan.write_sections()
    executor.check(the_plan)
    try:
        return sweep.execute_plan(the_plan, executor, conf)
    finally:
        final = the_plan.final
        if summary:
            Path(summary).write_text(json.dumps({"sweep_id": the_id, "evaluate": final.manifest if final else None},
                                                indent=2) + "\n")


def stage_args_map(items: tuple[str, ...]) -> dict[str, list[str]]:
    """`--stage-args` by stage (every step of it) or by step name (`infer-base='...'`)."""
    names = set(stages.names()) | set(chain.STEP_NAMES)
    out: dict[str, list[str]] = {}
    for item in items:
        key, sep, rest = item.partition("=")
        if not sep or key not in names:
            raise ConfigError(f"--stage-args {item!r}: expected STAGE='ARGS' or STEP='ARGS' with STAGE one of "
                              f"{', '.join(stages.names())} and STEP one of {', '.join(chain.STEP_NAMES)}, "
                              "e.g. train='--set max_steps=100'.")
        out.setdefault(key, []).extend(shlex.split(rest))
    return out
