"""One plan, two executors, and a stage declared once.

The same plan run by the local executor (a stand-in stage process, tests/jobs/fake_stage.py) and by the
Kubernetes executor (tests/k8s/fake_kubectl.py) starts the same step instances, each only after what it takes
from has finished, for a one-cell run and a 2x2 sweep. A toy stage (tests/toy_stage, registered through
FTJOBS_EXTRA_STAGES and nothing else) is planned as a step of a test chain, run locally as a real `ftjobs toy`
subprocess recording the run in its manifest, rendered as a Job and validated.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from common import config as cfg
from common import manifest as mf
from common import stages
from jobs import chain, k8s, pipeline, plan, sweep
from jobs.cli import main
from jobs.executors import Finished
from jobs.executors.kube import Kubectl, KubeExecutor
from jobs.executors.local import LocalExecutor
from tests.k8s import policy
from tests.k8s.test_submit import DIGEST
from tests.k8s.test_submit import cluster as cluster  # noqa: F401 - the fixture

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
FAKE_STAGE = REPO / "tests" / "jobs" / "fake_stage.py"
IMAGES = {k: f"ghcr.io/acme/ftjobs-{k}:0.1.0@{DIGEST}" for k in ("prepare", "train", "merge", "infer")}
RUN = {"base_model": "org/tiny-base", "data": ["s3://data/chats.jsonl"], "train": {"max_steps": 5}}


def name_of(inst: plan.Instance) -> str:
    return "leaderboard" if inst.final else inst.name


class Recorded:
    """Start and end of every instance, in the order the executor saw them."""

    events: list[tuple[str, str]]

    def begin(self, the_plan: plan.Plan, inst: plan.Instance) -> Any:
        self.events.append(("start", name_of(inst)))
        return super().begin(the_plan, inst)  # type: ignore[misc]

    def poll(self, the_plan: plan.Plan, inst: plan.Instance, handle: Any) -> Finished | None:
        finished = super().poll(the_plan, inst, handle)  # type: ignore[misc]
        if finished is not None:
            self.events.append(("end", name_of(inst)))
        return finished


class LocalRecorded(Recorded, LocalExecutor):
    def __init__(self) -> None:
        LocalExecutor.__init__(self, 2, command=lambda stage, args: [sys.executable, str(FAKE_STAGE), stage, *args])
        self.events = []


class KubeRecorded(Recorded, KubeExecutor):
    pass


def kube_executor(cluster: dict[str, Any]) -> KubeRecorded:
    docs = k8s.kustomize(Path(cluster["overlay"]))
    ex = KubeRecorded(docs=docs, kube=Kubectl(cluster["kubectl"], "ml-ci"), images=IMAGES, poll_s=0.01)
    ex.events = []
    return ex


def check_order(the_plan: plan.Plan, events: list[tuple[str, str]]) -> set[str]:
    """Every start came after the end of what the instance takes from; returns the instances started."""
    by_name = {name_of(i): i for i in the_plan.instances.values()}
    ended: set[str] = set()
    for kind, name in events:
        inst = by_name[name]
        if kind == "end":
            ended.add(name)
            continue
        if inst.final:
            deps = {n for n in by_name if n != "leaderboard"}
        else:
            deps = {the_plan.instances[k].name for k in inst.needs.values()} | {
                the_plan.instances[s.train].name for s in inst.served}
        assert deps <= ended, f"{name} started before {deps - ended} finished"
    assert all(i.status == "done" for i in the_plan.instances.values()), [
        (i.name, i.status, i.reason) for i in the_plan.instances.values()]
    return {name for kind, name in events if kind == "start"}


def run_both(make_plan: Any, cluster: dict[str, Any], tmp_path: Path) -> tuple[set[str], set[str]]:
    local_plan = make_plan(str(tmp_path / "local"))
    local_plan.write_sections()
    local = LocalRecorded()
    local.run(local_plan)
    kube_plan = make_plan(f"{cluster['root']}/cluster")
    kube_plan.write_sections()
    kube = kube_executor(cluster)
    kube.check(kube_plan)
    kube.run(kube_plan)
    return check_order(local_plan, local.events), check_order(kube_plan, kube.events)


def test_a_run_starts_the_same_steps_in_dependency_order_on_both_executors(cluster: dict[str, Any],
                                                                          tmp_path: Path) -> None:
    config = cfg.validate(chain.Config, RUN)
    local, kube = run_both(lambda prefix: pipeline.plan_run(config, prefix, "r1", local=False), cluster, tmp_path)
    assert local == kube == {"prepare", "infer-base", "train", "merge", "infer-finetuned", "evaluate"}


def test_a_2x2_sweep_starts_the_same_steps_in_dependency_order_on_both_executors(cluster: dict[str, Any],
                                                                                tmp_path: Path) -> None:
    conf = cfg.validate(sweep.Config, {**RUN, "matrix": {"train.learning_rate": [0.001, 0.002],
                                                          "train.lora.r": [8, 16]}})
    local, kube = run_both(lambda prefix: sweep.plan_sweep(conf, prefix, "s1", local=False), cluster, tmp_path)
    assert local == kube
    steps = sorted(name.split("-")[0] if name != "leaderboard" else name for name in local)
    # one prepare, one base inference, four trains, one engine serving the four adapters, the leaderboard
    assert steps == ["infer", "infer", "leaderboard", "prepare", "train", "train", "train", "train"]


def test_train_select_puts_select_between_train_and_merge_on_both_executors(cluster: dict[str, Any],
                                                                            tmp_path: Path) -> None:
    config = cfg.validate(chain.Config, {**RUN, "train": {"max_steps": 5, "select": {"metric": "token_f1"}}})
    local, kube = run_both(lambda prefix: pipeline.plan_run(config, prefix, "r1", local=False), cluster, tmp_path)
    assert local == kube == {"prepare", "infer-base", "train", "select", "merge", "infer-finetuned", "evaluate"}
    the_plan = pipeline.plan_run(config, str(tmp_path / "p"), "r1", local=False)
    merge = next(i for i in the_plan.instances.values() if i.step.name == "merge")
    assert "--input" in (args := the_plan.arguments(merge, stand_in=True))
    assert args[args.index("--input") + 1].endswith("/select/manifest.json")


def test_a_sweep_with_train_select_serves_each_cells_selected_adapter(tmp_path: Path) -> None:
    conf = cfg.validate(sweep.Config, {**RUN, "train": {"select": {"metric": "token_f1"}},
                                       "matrix": {"train.learning_rate": [0.001, 0.002]}})
    the_plan = sweep.plan_sweep(conf, str(tmp_path), "s1", local=False)
    served = [i for i in the_plan.instances.values() if i.served]
    assert len(served) == 1 and len(served[0].served) == 2
    assert {the_plan.instances[s.train].step.name for s in served[0].served} == {"select"}


# --------------------------------------------------------------------------- a toy stage, declared once

TOY_CHAIN = (chain.Step("toy-a", "toy", (), ()),
             chain.Step("toy-b", "toy", (chain.Take("input", "--input", "toy-a"),), ()))


@pytest.fixture
def toy(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(stages.EXTRA_ENV, "tests.toy_stage")  # this process and every subprocess it starts
    monkeypatch.setattr(chain, "CHAIN", TOY_CHAIN)
    monkeypatch.setattr(chain, "BY_NAME", {s.name: s for s in TOY_CHAIN})


def test_a_toy_stage_is_planned_run_rendered_and_validated(toy: None, tmp_path: Path) -> None:
    assert stages.get("toy").image == "prepare" and mf.PRODUCER["toy"] == "ftjobs toy"
    config = cfg.validate(chain.Config, {"base_model": "m", "data": ["d"]})
    the_plan = pipeline.plan_run(config, str(tmp_path / "runs" / "t1"), "t1", local=True)  # checks each step
    assert [i.name for i in the_plan.instances.values()] == ["toy-a", "toy-b"]
    the_plan.write_sections()
    LocalExecutor(2).run(the_plan)  # real `python -m jobs.cli toy ...` subprocesses
    a, b = (mf.load(str(i.manifest)) for i in the_plan.instances.values())
    assert (a.manifest.stage, a.manifest.run_id, b.manifest.run_id) == ("toy", "t1", "t1")
    assert [r.uri for r in b.manifest.inputs] == [a.uri]
    the_plan.record(0)
    # from a manifest to its run, and from the run id to every step, in a local store
    shown = CliRunner().invoke(main, ["show", b.uri, "--verify", "none"], catch_exceptions=False)
    assert shown.stdout.startswith(f"toy run t1  ({b.uri})"), shown.output
    listed = CliRunner().invoke(main, ["runs", "show", "t1", "--root", str(tmp_path)], catch_exceptions=False)
    assert listed.exit_code == 0, listed.output
    lines = listed.stdout.splitlines()
    assert lines[0] == f"run t1  ({tmp_path}/runs/t1)  exit 0"
    assert [line.split()[:2] for line in lines[1:]] == [["toy-a", "toy"], ["toy-b", "toy"]]
    runs = CliRunner().invoke(main, ["runs", "list", "--root", str(tmp_path)], catch_exceptions=False)
    assert runs.stdout.split()[:4] == ["t1", "run", "2", "steps"]
    # given the runs/ folder itself, the empty answer says where it looked and which root to use
    wrong = CliRunner().invoke(main, ["runs", "list", "--root", str(tmp_path / "runs")], catch_exceptions=False)
    assert (wrong.exit_code, wrong.stdout) == (0, "")
    assert f"no runs or sweeps under {tmp_path}/runs" in wrong.stderr and f"`--root {tmp_path}`" in wrong.stderr

    docs = k8s.kustomize(k8s.overlay_dir("base", None))
    template = copy.deepcopy(k8s.find_job(docs, "prepare"))  # the toy's Job template, given to the renderer
    for meta in (template["metadata"], template["spec"]["template"]["metadata"]):
        meta["labels"] = {**meta["labels"], k8s.STAGE_LABEL: "toy", "app.kubernetes.io/name": "ftjobs-toy"}
    template["metadata"]["name"] = "ftjobs-toy"
    inst = the_plan.instances[the_plan.cells[0].keys["toy-b"]]
    job, output = k8s.render_job([*docs, template], "toy", "t1", the_plan.arguments(inst, stand_in=True),
                                 images=IMAGES, env=the_plan.env(inst))
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert container["args"][0] == "toy" and container["image"] == IMAGES["prepare"] and output == inst.output
    assert {"name": "FTJOBS_RUN_ID", "value": "t1"} in container["env"]
    assert job["metadata"]["labels"][k8s.RUN_LABEL] == "t1"
    assert policy.violations(job, gpu=False) == []
    from tests.k8s.test_manifests import validate

    proc = validate([job], tmp_path / "toy.yaml")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_the_gpu_overlay_selects_the_templates_the_registry_says_need_a_gpu() -> None:
    patch = yaml.safe_load((REPO / "k8s/overlays/gpu/kustomization.yaml").read_text())["patches"]
    selectors = {p["target"]["labelSelector"] for p in patch if "labelSelector" in p.get("target", {})}
    wanted = f"ftjobs.dev/stage in ({','.join(stages.gpu_templates())})"
    assert wanted in selectors, (wanted, selectors)
    base = yaml.safe_load((REPO / "k8s/base/kustomization.yaml").read_text())["resources"]
    assert {f"job-{t}.yaml" for t in stages.templates()} <= set(base)


def test_a_run_with_promote_plans_the_champion_steps_with_the_pinned_champion(tmp_path: Path) -> None:
    """The registry's champion is pinned at plan time; infer-champion and promote are planned from CHAIN, with
    the champion and the registry's root as their run values, on both executors' arguments."""
    from common import registry

    root = tmp_path / "store"
    config = cfg.validate(chain.Config, {**RUN, "root": str(root), "promote": {"name": "tickets"}})
    prefix = f"{root}/runs/r1"
    first = pipeline.plan_run(config, prefix, "r1", local=False)
    assert "infer-champion" not in [i.name for i in first.instances.values()]  # no champion yet: a first version
    assert registry.champion("tickets", str(root)) is None
    promote = next(i for i in first.instances.values() if i.name == "promote")
    args = first.arguments(promote, stand_in=True)
    assert args[:5] == [f"{prefix}/merge/manifest.json", "--evaluation", f"{prefix}/evaluate/manifest.json",
                        "--root", str(root)]
    # A champion pinned for another run: its infer step answers with models:/tickets/3 under the same root.
    pinned = config.model_copy(update={"champion": "models:/tickets/3"})
    other = pipeline.plan_run(pinned, f"{root}/runs/r2", "r2", local=False)
    inst = next(i for i in other.instances.values() if i.name == "infer-champion")
    args = other.arguments(inst, stand_in=True)
    assert args[args.index("--model") + 1] == "models:/tickets/3" and args[args.index("--root") + 1] == str(root)
    evaluate = next(i for i in other.instances.values() if i.name == "evaluate")
    assert other.arguments(evaluate, stand_in=True).count("--label") == 3


def test_the_dpo_demo_plans_on_the_local_executor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """infer-train takes the run value train_split: the plan (not only each stage's command line) knows it."""
    monkeypatch.chdir(REPO)
    demo = cfg.load_config(chain.Config, file="demo/pipeline-dpo.yaml")
    local = pipeline.plan_run(demo, str(tmp_path / "runs/d"), "d", local=True)
    infer_train = next(i for i in local.instances.values() if i.name == "infer-train")
    args = local.arguments(infer_train, stand_in=True)
    assert args[args.index("--split") + 1] == "train"
    assert args[args.index("--model") + 1].endswith("merge/manifest.json")


def test_with_dpo_the_gate_judges_and_promote_takes_the_dpo_model_and_the_sweep_ranks_it(tmp_path: Path) -> None:
    """The run's last model is its candidate: with a `dpo` section, evaluate's gate judges the DPO model's
    predictions (promote.challenger = dpo_label), promote takes merge-dpo, and a sweep's leaderboard ranks each
    cell's infer-dpo predictions; without it, the finetuned model as before."""
    root = tmp_path / "store"
    dpo = {"pairs": {"metric": "exact_match"}, "dpo": {"objective": "dpo"}}
    config = cfg.validate(chain.Config, {**RUN, **dpo, "root": str(root), "promote": {"name": "tickets"}})
    section = config.section(chain.BY_NAME["evaluate"])
    assert section["promote"] == {"challenger": "dpo", "name": "tickets"}
    assert section["baseline_of"] == {"dpo": "finetuned", "finetuned": "base"}  # DPO against SFT, SFT against base
    run = pipeline.plan_run(config, f"{root}/runs/r1", "r1", local=False)
    promote = next(i for i in run.instances.values() if i.name == "promote")
    assert run.arguments(promote, stand_in=True)[0] == f"{root}/runs/r1/merge-dpo/manifest.json"
    chosen = cfg.validate(chain.Config, {**RUN, **dpo, "promote": {"name": "t", "challenger": "finetuned"}})
    assert chosen.section(chain.BY_NAME["evaluate"])["promote"]["challenger"] == "finetuned"  # a choice stays
    plain = cfg.validate(chain.Config, {**RUN, "promote": {"name": "t"}})
    assert "challenger" not in plain.section(chain.BY_NAME["evaluate"])["promote"]

    conf = cfg.validate(sweep.Config, {**RUN, **dpo, "matrix": {"dpo.preference.beta": [0.1, 0.5]}})
    board = sweep.plan_sweep(conf, str(tmp_path / "s"), "s1", local=False)
    for inst in board.instances.values():
        inst.status, inst.manifest = "done", f"<{inst.name}>"
    ranked = [board.finetuned(c) for c in board.cells]
    assert all(r.startswith("<infer-dpo-") for r in ranked) and len(set(ranked)) == 2


def test_a_learning_curve_scores_its_base_once(tmp_path: Path) -> None:
    """Cells that differ only in how much of the training split they keep (prepare.max_train_rows /
    train_fraction) have the same held-out split: one infer-base for all, and one base on the leaderboard."""
    curve = cfg.validate(sweep.Config, {**RUN, "matrix": {"prepare.max_train_rows": [60, 125],
                                                          "prepare.train_fraction": [0.5, 1.0]}})
    the_plan = sweep.plan_sweep(curve, str(tmp_path / "a"), "s1", local=False)
    names = [i.step.name for i in the_plan.instances.values()]
    assert names.count("prepare") == 4 and names.count("infer-base") == 1 and names.count("train") == 4
    base = next(i for i in the_plan.instances.values() if i.step.name == "infer-base")
    assert len(base.cells) == 4 and base.needs["prepare"] == the_plan.cells[0].keys["prepare"]
    # Another held-out split (eval_size) is another base run.
    other = cfg.validate(sweep.Config, {**RUN, "matrix": {"prepare.eval_size": [4, 8]}})
    names = [i.step.name for i in sweep.plan_sweep(other, str(tmp_path / "b"), "s2", local=False).instances.values()]
    assert names.count("infer-base") == 2
