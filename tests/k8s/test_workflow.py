"""The CI retrain workflow: valid against GitHub's workflow schema (check-jsonschema's
vendored copy, offline), and in step with the commands it calls."""

from __future__ import annotations

import ast
import re
import shlex
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from jobs import k8s, k8s_cli

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
WORKFLOW = REPO / ".github/workflows/retrain.yml"
CHECK = shutil.which("check-jsonschema", path=str(Path(sys.executable).parent)) or shutil.which("check-jsonschema")


def lint(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHECK, "--builtin-schema", "vendor.github-workflows", str(path)], capture_output=True,
                          text=True, timeout=120)


@pytest.fixture(scope="module")
def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


@pytest.mark.skipif(CHECK is None, reason="check-jsonschema comes with the dev extra")
def test_workflow_matches_the_github_schema(tmp_path: Path) -> None:
    assert lint(WORKFLOW).returncode == 0, lint(WORKFLOW).stdout
    broken = yaml.safe_load(WORKFLOW.read_text())
    del broken["jobs"]["retrain"]["runs-on"]
    broken["jobs"]["retrain"]["timeout-minutes"] = "forever"
    (tmp_path / "broken.yml").write_text(yaml.safe_dump(broken))
    assert lint(tmp_path / "broken.yml").returncode != 0


def steps_running(workflow: dict, needle: str) -> list[str]:
    return [s["run"] for job in workflow["jobs"].values() for s in job["steps"] if needle in s.get("run", "")]


def command_options(run: str, prefix: str) -> list[str]:
    line = " ".join(part.strip().rstrip("\\") for part in run.splitlines())
    start = line.index(prefix)
    return [w for w in shlex.split(line[start:].split("|")[0]) if w.startswith("--")]


def test_workflow_calls_only_options_the_cli_has(workflow: dict) -> None:
    submit_opts = {o for p in k8s_cli.submit.params for o in p.opts}
    render_opts = {o for p in k8s_cli.render.params for o in p.opts}
    (submit,) = steps_running(workflow, "ftjobs k8s submit")
    used = command_options(submit, "ftjobs k8s submit")
    assert set(used) <= submit_opts, set(used) - submit_opts
    assert {"--images", "--fail-if-worse", "--run-id", "--summary", "--overlay"} <= set(used)
    (setup,) = steps_running(workflow, "ftjobs k8s render")
    assert set(command_options(setup, "ftjobs k8s render")) <= render_opts


def test_workflow_builds_every_image_and_publishes_the_report_even_when_the_gate_fails(workflow: dict) -> None:
    images = workflow["jobs"]["images"]["strategy"]["matrix"]["image"]
    assert sorted(images) == sorted(set(k8s.IMAGE_OF.values()))
    for image in images:
        assert (REPO / f"docker/{image}.Dockerfile").is_file()
    assert workflow["jobs"]["retrain"]["needs"] == "images"
    publish = next(s for s in workflow["jobs"]["retrain"]["steps"] if s.get("name") == "Publish the report")
    assert publish["if"].startswith("always()")
    for run in steps_running(workflow, "python - <<'PY'"):  # the embedded scripts at least parse
        body = re.search(r"<<'PY'\n(.*?)\nPY", run, re.S)
        assert body, run
        ast.parse(textwrap.dedent(body.group(1)))
