"""The stages, declared once: what every other part of ftjobs knows about a stage reads it from here.

    Stage(name, module, image, gpu, model_block)

- `name`: the `ftjobs <name>` command, the manifest's `stage`, the Job template's `ftjobs.dev/stage` label.
- `module`: the Python module whose `command` is the stage's click command (`jobs/cli.py` adds it; chain
  validation finds a stage's command line through it, without importing the CLI back).
- `image`: the container image its Job template runs (`ftjobs k8s --images` keys; evaluate shares the slim
  prepare image, synth runs its teacher in the infer image).
- `gpu`: its Job template asks for a GPU in the gpu overlay (the overlay's selector and the Kubernetes policy
  test read it).
- `model_block`: `"module:Class"` of the model section its manifest carries (`common.manifest.model_block`
  parses it; None: the plain `ModelBlock`).
- `variants`: further Job templates of the stage, with their own image and GPU (evaluate with a judge model
  runs `evaluate-judge`: the infer image, a GPU).

Module paths are strings, so `common/` never imports `jobs/`.

Extra stages (a plugin, or a test's toy stage) come from the modules named in the environment variable
`FTJOBS_EXTRA_STAGES` (comma-separated), each holding `STAGES = (Stage(...), ...)`: every process started
with it set, the stage subprocesses an executor starts included, knows them. `register()` adds one in the
current process.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from common.errors import ConfigError

EXTRA_ENV = "FTJOBS_EXTRA_STAGES"


@dataclass(frozen=True)
class Variant:
    """Another Job template of a stage, chosen by the stage's config (evaluate with a judge)."""

    template: str
    image: str
    gpu: bool


@dataclass(frozen=True)
class Stage:
    """One stage: its command, its image, its GPU need and the model section its manifest carries."""

    name: str
    module: str
    image: str
    gpu: bool = False
    model_block: str | None = None
    variants: tuple[Variant, ...] = ()

    @property
    def producer(self) -> str:
        """How a user produces this stage's manifest (what error messages tell them to run)."""
        return f"ftjobs {self.name}"


BUILTIN: tuple[Stage, ...] = (
    Stage("synth", "jobs.synth", "infer", gpu=True, model_block="common.manifest:SynthModel"),
    Stage("prepare", "jobs.prepare", "prepare", model_block="common.manifest:PrepareModel"),
    Stage("train", "jobs.train", "train", gpu=True, model_block="common.manifest:TrainModel"),
    Stage("merge", "jobs.merge", "merge", gpu=True, model_block="common.manifest:MergeModel"),
    Stage("infer", "jobs.infer", "infer", gpu=True, model_block="common.manifest:InferModel"),
    Stage("evaluate", "jobs.evaluate", "prepare", variants=(Variant("evaluate-judge", "infer", gpu=True),)),
    # select: the chosen checkpoint's adapter, read where a train manifest is (docs/selection.md)
    Stage("select", "jobs.select", "infer", gpu=True, model_block="common.manifest:TrainModel"),
    # promote writes the registry only (common/registry.py): the slim image, no GPU.
    Stage("promote", "jobs.models", "prepare"),
    # Preference pairs from a model's wrong answers on training prompts (docs/preference.md): CPU only, reads
    # Parquet and scores text, as evaluate does.
    Stage("pairs", "jobs.pairs", "prepare"),
)
_registered: dict[str, Stage] = {}


def register(stage: Stage) -> None:
    """Add a stage in this process (subprocesses learn it through FTJOBS_EXTRA_STAGES)."""
    _registered[stage.name] = stage


def _extra() -> list[Stage]:
    out: list[Stage] = []
    for name in filter(None, (m.strip() for m in os.environ.get(EXTRA_ENV, "").split(","))):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            raise ConfigError(f"{EXTRA_ENV}={os.environ[EXTRA_ENV]!r}: cannot import {name} ({exc}); name modules "
                              "that hold STAGES = (Stage(...), ...)") from None
        out += list(getattr(module, "STAGES", ()))
    return out


def all_stages() -> dict[str, Stage]:
    """Every stage by name: the built-in ones, then FTJOBS_EXTRA_STAGES', then those registered here."""
    return {s.name: s for s in (*BUILTIN, *_extra(), *_registered.values())}


def names() -> tuple[str, ...]:
    return tuple(all_stages())


def get(name: str) -> Stage:
    found = all_stages().get(name)
    if found is None:
        raise ConfigError(f"unknown stage {name!r}: expected one of {', '.join(names())}")
    return found


def producer(name: str) -> str:
    stage = all_stages().get(name)
    return stage.producer if stage else f"ftjobs {name}"


def templates() -> dict[str, Variant]:
    """Every Job template by its `ftjobs.dev/stage` label: each stage's own and its variants."""
    out: dict[str, Variant] = {}
    for s in all_stages().values():
        out[s.name] = Variant(s.name, s.image, s.gpu)
        out.update({v.template: v for v in s.variants})
    return out


def images() -> tuple[str, ...]:
    """The images the Job templates run (the keys `--images` takes)."""
    return tuple(dict.fromkeys(v.image for v in templates().values()))


def gpu_templates() -> tuple[str, ...]:
    return tuple(name for name, v in templates().items() if v.gpu)
