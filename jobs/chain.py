"""The chain, declared once: which steps run, in which order, and what each takes from the ones before.

    synth            optional (a `synth:` section): a teacher writes examples from the data as seeds
    prepare          raw data (+ synth's examples) -> canonical Parquet (tokenized with the base model's tokenizer)
    infer-base       the base model answers the eval prompts
    train            LoRA / QLoRA adapter
    select           optional (a `train.select` section): the checkpoints train kept as candidates, scored on
                     the eval prompts, the best one's adapter carried forward (docs/selection.md)
    merge            adapter (the selected one, with select) folded into the 16-bit base
    infer-finetuned  the merged model answers the same prompts
    infer-train      optional (a `pairs:` section): the merged model answers the TRAINING prompts
    pairs            optional (`pairs:`): its wrong answers become preference pairs (reference preferred)
    prepare-preference optional (`preference_data:`): preference files -> preference pairs
    train-dpo        optional (a `dpo:` section over `train`): DPO/ORPO from the SFT adapter (init_adapter) on
                     the pairs (from `pairs` or `prepare-preference`)
    merge-dpo, infer-dpo  optional (`dpo:`): the DPO adapter merged, answering the held-out prompts
    infer-champion   optional (a `promote:` section and a champion): the registry's champion answers the same prompts
    evaluate         base vs finetuned (vs champion, vs dpo): report.md / report.html; with `promote:` the champion gate
    promote          optional (a `promote:` section): the finetuned model becomes models:/NAME's champion when
                     evaluate's verdict says so (docs/registry.md)

Each step names its stage, the inputs the chain wires into it (an earlier step's manifest, or a value of
the run such as the base model) with the stage's command-line flag and config key for each, and the
sections of the run config that make up its own config. `jobs/plan.py` plans `CHAIN` for every executor
(`ftjobs pipeline` and `ftjobs sweep`: subprocesses; `ftjobs k8s submit`: Jobs), and config validation reads
it; nothing else lists the steps. A step's name is its one spelling everywhere: its output folder
`<run>/<step>/`, `pipeline.json`, Job names, logs.

A run config section may not set what the chain wires (a step's inputs and its output): such a key is
refused naming it, since it would be overridden silently otherwise.
"""

from __future__ import annotations

import datetime as dt
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import yaml
from pydantic import Field, field_validator, model_validator

from common import manifest as mf
from common import storage
from common.config import JobConfig
from common.errors import ConfigError

# The run config's fields a step may take, beside earlier steps' manifests ("champion" and "root": the
# pinned champion and the registry's root, see pin_champion; `train_split` is the constant "train":
# infer-train answers the training prompts, and a section cannot point it at the held-out ones).
RUN_VALUES = ("base_model", "data", "champion", "root", "preference_data", "train_split")
CHAMPION_LABEL = "champion"  # the champion's predictions set in evaluate (the default of promote.champion)


@dataclass(frozen=True)
class Take:
    """One input the chain wires into a step; never set from the step's own config section."""

    key: str  # the stage's config field it sets ("sources", "input")
    flag: str  # the stage's command-line flag that sets it ("--source", "--input")
    source: str  # an earlier step's name (its manifest URI), or one of RUN_VALUES
    when: str | None = None  # a boolean field of the run config that turns it on ("tokenize")
    unless: str | None = None  # a step that replaces this input when the run takes it (merge: select, else train)
    label: int | None = None  # evaluate: also pass `--label labels[label]` (which side; 2: the champion)


@dataclass(frozen=True)
class Step:
    """One step of the chain."""

    name: str
    stage: str
    takes: tuple[Take, ...]
    sections: tuple[str, ...]  # run config sections merged (later wins) into the step's config
    baseline: bool = False  # the base model's side of the comparison: may be left out (`--no-baseline`)
    optional: str | None = None  # run config sections (`a|b.c`): the step runs only when one of them is set
    nested: tuple[str, ...] = ()  # run config sections given to the step under their own name (evaluate's promote)

    def wanted(self, config: Config) -> bool:
        """Whether a run of `config` takes this step (the baseline and optional steps may be left out)."""
        return not (self.baseline and not config.baseline) and not (self.optional and not any(
            section_set(config, name) for name in self.optional.split("|")))

    @property
    def wired(self) -> tuple[str, ...]:
        """The config keys the chain sets itself: what a section may not set."""
        keys = [t.key for t in self.takes] + (["labels"] if any(t.label is not None for t in self.takes) else [])
        return tuple(dict.fromkeys([*keys, "output"]))

    def needs(self) -> tuple[str, ...]:
        """The earlier steps whose manifests this one takes."""
        return tuple(dict.fromkeys(t.source for t in self.takes if t.source not in RUN_VALUES))


CHAIN: tuple[Step, ...] = (
    # synth's seeds are the run's data; prepare then reads both, so "seeds only" and "seeds + synthetic" are
    # two runs (or sweep cells) that differ only in the synth section.
    Step("synth", "synth", (Take("seeds", "--seeds", "data"),), ("synth",), optional="synth"),
    Step("prepare", "prepare", (Take("sources", "--source", "data"), Take("sources", "--source", "synth"),
                                Take("tokenizer", "--tokenizer", "base_model", when="tokenize")), ("prepare",)),
    Step("infer-base", "infer", (Take("model", "--model", "base_model"), Take("prompts", "--prompts", "prepare")),
         ("infer", "infer_base"), baseline=True),
    Step("train", "train", (Take("input", "--input", "prepare"), Take("base_model", "--base-model", "base_model")),
         ("train",)),
    # select scores the checkpoints train kept (train.select) and names the best; merge then takes its adapter.
    Step("select", "select", (Take("train", "--train", "train"), Take("prompts", "--prompts", "prepare"),
                              Take("baseline", "--baseline", "infer-base")), ("select",),
         optional="train.select"),
    Step("merge", "merge", (Take("input", "--input", "select"), Take("input", "--input", "train", unless="select")),
         ("merge",)),
    Step("infer-finetuned", "infer", (Take("model", "--model", "merge"), Take("prompts", "--prompts", "prepare")),
         ("infer", "infer_finetuned")),
    # Preference steps (docs/preference.md): pairs from the SFT model's mistakes on training prompts and/or
    # preference files, then DPO (or ORPO) starting from the SFT adapter, evaluated beside base and SFT.
    Step("infer-train", "infer", (Take("model", "--model", "merge"), Take("prompts", "--prompts", "prepare"),
                                  Take("split", "--split", "train_split")), ("infer", "infer_train"),
         optional="pairs"),
    Step("pairs", "pairs", (Take("predictions", "--predictions", "infer-train"),), ("pairs",), optional="pairs"),
    Step("prepare-preference", "prepare", (Take("sources", "--source", "preference_data"),
                                           Take("tokenizer", "--tokenizer", "base_model", when="tokenize")),
         ("prepare", "prepare_preference"), optional="preference_data"),
    Step("train-dpo", "train", (Take("input", "--input", "pairs"), Take("input", "--input", "prepare-preference"),
                                Take("base_model", "--base-model", "base_model"),
                                Take("init_adapter", "--init-adapter", "train")), ("train", "dpo"), optional="dpo"),
    Step("merge-dpo", "merge", (Take("input", "--input", "train-dpo"),), ("merge",), optional="dpo"),
    Step("infer-dpo", "infer", (Take("model", "--model", "merge-dpo"), Take("prompts", "--prompts", "prepare")),
         ("infer", "infer_finetuned"), optional="dpo"),
    # The champion answers with the finetuned model's settings, so the two differ only in the model.
    Step("infer-champion", "infer", (Take("model", "--model", "champion"), Take("prompts", "--prompts", "prepare"),
                                     Take("root", "--root", "root")), ("infer", "infer_finetuned"),
         optional="champion"),
    Step("evaluate", "evaluate", (Take("predictions", "--predictions", "infer-base", label=0),
                                  Take("predictions", "--predictions", "infer-finetuned", label=1),
                                  Take("predictions", "--predictions", "infer-champion", label=2),
                                  Take("predictions", "--predictions", "infer-dpo", label=3)), ("evaluate",),
         nested=("promote",)),
    # A positional take (flag ""): `ftjobs promote MERGE_MANIFEST --evaluation ... --root ...`.
    # The run's last model is the candidate: the DPO model when the run trains one, else the finetuned one (and
    # evaluate's gate judges that same model: Config.section sets promote.challenger to dpo_label).
    Step("promote", "promote", (Take("manifest", "", "merge-dpo"), Take("manifest", "", "merge", unless="merge-dpo"),
                                Take("evaluation", "--evaluation", "evaluate"),
                                Take("root", "--root", "root")), (), optional="promote"),
)
STEP_NAMES = tuple(s.name for s in CHAIN)
BY_NAME = {s.name: s for s in CHAIN}
SECTIONS = tuple(dict.fromkeys(name for s in CHAIN for name in s.sections))


# --------------------------------------------------------------------------- the run config


class Config(JobConfig):
    """A run of the chain: where, which model, which data, and each step's own config section."""

    root: str = Field(".", description="Store root (local folder or s3://bucket/prefix); the run writes under "
                                       "<root>/runs/<run_id>/<step>/.")
    run_id: str | None = Field(None, description="Run id; the same id resumes a run (finished steps are "
                                                 "skipped). Default: a new one.")
    base_model: str = Field(description="Base model source: Hugging Face id, s3:// prefix or local folder.")
    data: list[str | dict[str, Any]] = Field(description="Raw data files or URIs for prepare (JSONL, CSV, Parquet, "
                                             "...); an item may be a mapping with prepare's per-source settings, "
                                             "e.g. {path: synth.jsonl, weight: 0.25, repeat: true} (docs/prepare.md, "
                                             "Mixing).")
    tokenize: bool = Field(True, description="Let prepare tokenize with the base model's tokenizer (train then "
                                             "reads the token ids as they are).")
    baseline: bool = Field(True, description="Run the base model's predictions (infer-base) and compare against "
                                             "them; false: evaluate scores the finetuned model alone.")
    labels: tuple[str, str] = Field(("base", "finetuned"), description="Report labels for the two infer runs.")
    dpo_label: str = Field("dpo", description="Report label of the DPO model's predictions (with a `dpo` section).")
    synth: dict[str, Any] = Field(default_factory=dict, description="synth's config section (teacher, format, "
                                                                    "num_prompts, ...); set: synth runs before "
                                                                    "prepare, with the data as seeds, and prepare "
                                                                    "reads its examples beside the data.")
    prepare: dict[str, Any] = Field(default_factory=dict, description="prepare's config section.")
    train: dict[str, Any] = Field(default_factory=dict, description="train's config section.")
    merge: dict[str, Any] = Field(default_factory=dict, description="merge's config section.")
    infer: dict[str, Any] = Field(default_factory=dict, description="infer's config section, for both runs.")
    infer_base: dict[str, Any] = Field(default_factory=dict, description="Overrides of `infer` for the base run.")
    infer_finetuned: dict[str, Any] = Field(default_factory=dict,
                                            description="Overrides of `infer` for the finetuned run.")
    evaluate: dict[str, Any] = Field(default_factory=dict, description="evaluate's config section.")
    select: dict[str, Any] = Field(default_factory=dict, description="select's config section (infer, evaluate, "
                                   "metric), used when train.select is set "
                                   "(docs/selection.md).")
    promote: dict[str, Any] = Field(default_factory=dict, description="The champion gate (name, metric, margin, "
                                    "guards; docs/registry.md): evaluate also compares with the registry's "
                                    "champion of `name`, and the finetuned model becomes the champion only "
                                    "through that gate.")
    champion: str | None = Field(None, description="The champion this run is compared with (models:/NAME/VERSION). "
                                                   "Default: pinned when the run starts (the registry's champion "
                                                   "of promote.name, recorded in <run>/champion.json so a re-run "
                                                   "compares with the same one); none: the name's first version.")
    pairs: dict[str, Any] = Field(default_factory=dict, description="pairs' config section; set: the SFT model "
                                  "answers the training prompts (infer-train, `infer` + `infer_train`) and its wrong "
                                  "answers become preference pairs for train-dpo.")
    preference_data: list[str] = Field(default_factory=list, description="Preference files (docs/preference.md) "
                                       "for train-dpo, prepared by prepare-preference (`prepare` + "
                                       "`prepare_preference` sections).")
    infer_train: dict[str, Any] = Field(default_factory=dict, description="Overrides of `infer` for infer-train.")
    prepare_preference: dict[str, Any] = Field(default_factory=dict,
                                               description="Overrides of `prepare` for the preference data.")
    dpo: dict[str, Any] = Field(default_factory=dict, description="Overrides of `train` for train-dpo (e.g. "
                                "objective: dpo, preference: {beta: 0.1}); set: DPO from the SFT adapter, merged, "
                                "answering the held-out prompts, and evaluated beside base and finetuned.")
    stop_after: str | None = Field(None, description=f"Stop after this step (one of {', '.join(STEP_NAMES)}).")
    max_parallel: int = Field(2, ge=1, description="Steps run at once by the local executor (infer-base beside "
                                                   "train; a sweep's cells side by side); each gets cores / "
                                                   "max_parallel threads. Kubernetes runs what is ready at once.")

    @field_validator("run_id", mode="before")
    @classmethod
    def _run_id_text(cls, value: Any) -> Any:
        # `--set run_id=42` and `run_id: 2024-05-01` reach here as YAML int and date; as typed, they are names.
        if isinstance(value, int | dt.date) and not isinstance(value, bool):
            return str(value)
        return value

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, value: str | None) -> str | None:
        # It becomes a folder under <root>/runs/: a '/' or '..' would write outside the root.
        problem = mf.run_id_problem(value) if value is not None else None
        if problem:
            raise ValueError(problem)
        return value

    @field_validator("data")
    @classmethod
    def _data(cls, value: list[str | dict[str, Any]]) -> list[str | dict[str, Any]]:
        if not value:
            raise ValueError("give at least one data file")
        for i, item in enumerate(value):
            if isinstance(item, dict) and not isinstance(item.get("path"), str):
                raise ValueError(f"data[{i}] is a mapping without a path: give {{path: FILE, weight: ..., ...}}")
        return value

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.stop_after is not None and self.stop_after not in STEP_NAMES:
            raise ValueError(f"stop_after={self.stop_after!r}: expected one of {', '.join(STEP_NAMES)}")
        if self.labels[0] == self.labels[1]:
            raise ValueError(f"labels must differ, got {list(self.labels)}")
        if self.promote and CHAMPION_LABEL in self.labels:
            raise ValueError(f"labels {list(self.labels)}: {CHAMPION_LABEL!r} is the champion's set when `promote` "
                             "is set; choose other labels")
        if self.champion is not None and not self.promote:
            raise ValueError("champion is set but promote is not: the champion is compared with only through the "
                             "gate; add a promote section (name, metric) or drop champion")
        if self.dpo and bool(self.pairs) == bool(self.preference_data):
            raise ValueError("a `dpo` section trains on preference pairs: set `pairs` (pairs from the finetuned "
                             "model's mistakes on training prompts) or `preference_data` (preference files), one "
                             "of them" + (", not both" if self.pairs else ""))
        if self.dpo_label in self.labels:
            raise ValueError(f"dpo_label {self.dpo_label!r} is one of labels {list(self.labels)}; give it another")
        for step in CHAIN:
            for section in step.sections:
                taken = [k for k in step.wired if k in getattr(self, section)]
                if taken:
                    raise ValueError(f"section `{section}` sets {', '.join(taken)}: the chain wires "
                                     f"{'that' if len(taken) == 1 else 'those'} into step {step.name} itself "
                                     f"({wiring(step, taken)}); remove {'it' if len(taken) == 1 else 'them'}")
        return self

    @property
    def train_split(self) -> str:
        """The split infer-train answers (RUN_VALUES): always the training prompts."""
        return "train"

    def run_values(self) -> dict[str, Any]:
        """Every RUN_VALUES field, as the run config gives it (plan.values makes local paths absolute)."""
        return {name: (list(v) if isinstance(v := getattr(self, name), list) else v) for name in RUN_VALUES}

    def section(self, step: Step) -> dict[str, Any]:
        """The step's own config: its sections merged key by key, later wins (infer, then infer_base)."""
        merged: dict[str, Any] = {}
        for name in step.sections:
            merged = deep_merge(merged, getattr(self, name))
        for name in step.nested:
            if getattr(self, name):
                merged = deep_merge(merged, {name: getattr(self, name)})
        if step.name == "evaluate" and self.dpo:
            merged = self._with_dpo(merged)
        return merged

    def _with_dpo(self, evaluate: dict[str, Any]) -> dict[str, Any]:
        """evaluate of a run that trains DPO: the DPO model is compared with the SFT model it started from (the
        SFT model with the base, when there is one), and the gate judges the model promote takes, the DPO one."""
        out = dict(evaluate)
        if self.baseline and "baseline_of" not in out:
            out["baseline_of"] = {self.dpo_label: self.labels[1], self.labels[1]: self.labels[0]}
        if "promote" in out:
            out["promote"] = {"challenger": self.dpo_label, **out["promote"]}
        return out


def section_set(config: Config, dotted: str) -> bool:
    """Whether the run config sets the (nested) section `dotted`, e.g. `synth` or `train.select`."""
    value: Any = config
    for part in dotted.split("."):
        value = getattr(value, part, None) if not isinstance(value, dict) else value.get(part)
    return bool(value)


def deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`; nested mappings merge (infer_base: {sampling: {max_tokens: 8}} keeps the
    temperature `infer` set), anything else is replaced."""
    out = dict(base)
    for key, value in over.items():
        out[key] = deep_merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def wiring(step: Step, keys: list[str]) -> str:
    said = []
    for t in step.takes:
        if t.key in keys:
            optional = BY_NAME[t.source].optional if t.source in BY_NAME else None
            said.append(f"{t.key} from {'the run config' if t.source in RUN_VALUES else 'step'} {t.source}"
                        + (f" when the run config has a `{optional}` section" if optional else ""))
    if "labels" in keys:
        said.append("labels from the run config's labels")
    if "output" in keys:
        said.append("output <run>/" + step.name)
    return "; ".join(dict.fromkeys(said))


def steps(config: Config) -> list[Step]:
    """The steps this run takes, in order: the baseline and optional steps only when wanted, none after
    stop_after."""
    out = []
    for step in CHAIN:
        if not step.wanted(config):
            continue
        out.append(step)
        if step.name == config.stop_after:
            break
    return out


def arguments(step: Step, config: Config, done: dict[str, str], values: dict[str, Any] | None = None) -> list[str]:
    """The stage's command-line arguments for what the chain wires (not --output or --config).

    `done` maps earlier steps to their manifest URIs; a step left out of the run (the baseline, synth
    without its section) is left out of the arguments too. `values` overrides the run values (e.g. local
    paths made absolute).
    """
    run_values = {**config.run_values(), **(values or {})}
    left_out = {s.name for s in CHAIN if not s.wanted(config)}
    args: list[str] = []
    for take in step.takes:
        if take.when and not getattr(config, take.when):
            continue
        if take.source in left_out or (take.unless and take.unless not in left_out):
            continue
        value = run_values[take.source] if take.source in RUN_VALUES else done[take.source]
        for item in value if isinstance(value, list) else [value]:
            args += [take.flag, argument(take, item)] if take.flag else [argument(take, item)]
        if take.label is not None:
            args += ["--label", (*config.labels, CHAMPION_LABEL, config.dpo_label)[take.label]]
    return args


def argument(take: Take, item: Any) -> str:
    """One value on a stage's command line. A data source given as a mapping (prepare's per-source settings:
    weight, max_rows, ...) goes to prepare's --source as JSON; a step that takes files only gets its path."""
    if isinstance(item, dict):
        return json.dumps(item, sort_keys=True) if take.key == "sources" else str(item["path"])
    return str(item)


# --------------------------------------------------------------------------- checking a step before it exists


def stage_command(stage: str) -> click.Command:
    """The stage's click command, found through the stage registry's module (no import of the CLI)."""
    import importlib

    from common import stages

    command = getattr(importlib.import_module(stages.get(stage).module), "command", None)
    if not isinstance(command, click.Command):
        raise ConfigError(f"stage {stage}: module {stages.get(stage).module} has no click `command`")
    return command


def validate_arguments(stage: str, args: list[str]) -> Any:
    """Parse a stage's arguments with the stage's own command line and config model, without running it.

    Exactly what the stage does at start: unknown options, unknown `--set` keys, a config file that is
    missing or holds unknown keys, and missing required settings are ConfigErrors (exit 2) that name them.
    Returns the resolved config.
    """
    from common.runner import VALIDATE_ONLY, VALIDATED

    command = stage_command(stage)
    try:
        ctx = command.make_context(f"ftjobs {stage}", list(args))
    except click.UsageError as exc:
        raise ConfigError(f"ftjobs {stage} {' '.join(args)}: {exc.format_message()} (see `ftjobs {stage} "
                          "--help` for what it accepts)") from None
    ctx.meta[VALIDATE_ONLY] = True
    with ctx:
        command.invoke(ctx)
    return ctx.meta[VALIDATED]


def check(config: Config) -> dict[str, Any]:
    """Validate every step's config now (unknown keys, bad values), not after an hour of training.

    Each step's section goes through the stage's own command line, as its `--config`, with stand-ins for
    the earlier steps' manifests. Returns each step's resolved stage config.
    """
    stand_ins = {s.name: f"<{s.name} manifest>" for s in CHAIN}
    resolved = {}
    with tempfile.TemporaryDirectory(prefix="ftjobs-check-") as tmp:
        for step in steps(config):
            path = Path(tmp) / f"{step.name}.yaml"
            path.write_text(yaml.safe_dump(config.section(step), sort_keys=True))
            args = arguments(step, config, stand_ins) + ["--output", f"<{step.name} output>", "--config", str(path)]
            try:
                resolved[step.name] = validate_arguments(step.stage, args)
            except ConfigError as exc:
                sections = " + ".join(f"`{s}`" for s in step.sections)
                text = str(exc).replace(f" (in {path})", "")
                raise ConfigError(f"run config, section {sections} (step {step.name}): {text}") from None
    return resolved


def write_sections(config: Config, prefix: str, chosen: list[Step]) -> dict[str, str]:
    """Each step's config section as `<run prefix>/config/<step>.yaml`: what its `--config` points at."""
    out = {}
    for step in chosen:
        uri = storage.join(prefix, "config", f"{step.name}.yaml")
        storage.write_bytes(uri, yaml.safe_dump(config.section(step), sort_keys=True).encode())
        out[step.name] = uri
    return out


# --------------------------------------------------------------------------- the champion a run is compared with


def pin_champion(config: Config, prefix: str) -> Config:
    """The run with its champion pinned: the registry's champion of promote.name when the run first started.

    Recorded create-only in `<run prefix>/champion.json`: a re-run (after a failure, or after this run's own
    promotion moved the champion) compares with the same champion, so its finished steps stay "already
    done". The registry's root is the store root the run writes under (`<root>/runs/<run_id>`).
    """
    from common import registry
    from common.errors import AlreadyExistsError

    if not config.promote:
        return config
    root = storage.parent(storage.parent(prefix))
    name = str(config.promote.get("name") or "")
    registry.check_name(name)
    uri = storage.join(prefix, "champion.json")
    if config.champion is None and not storage.exists(uri):
        current = registry.champion(name, root)
        record = {"name": name, "champion": f"{registry.SCHEME}{name}/{current.version.version}" if current else None,
                  "pinned_at": mf.now()}
        try:
            storage.put_if_absent(uri, storage.json_bytes(record))
        except AlreadyExistsError:
            pass  # another start of the same run pinned it first: that one stands
    pinned = config.champion if config.champion is not None else storage.read_json(uri)["champion"]
    return config.model_copy(update={"champion": pinned, "root": root})
