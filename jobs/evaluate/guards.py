"""Guard evaluations: extra suites scored for every model evaluate compares, so a finetune that wins on its
task but forgets what the base could do shows it as a negative delta.

Two kinds of suite (`evaluate.guards`, a list):
- `prompts`: a local (or s3://) JSONL / Parquet file of prompts with references (`prompt` or `messages`,
  `reference`, optional `id`), generated greedily with the model's chat template and scored with any of
  evaluate's reference metrics (exact_match, normalized_exact_match, token_f1, rouge_l);
- `lm_eval`: lm-evaluation-harness tasks (the `lm-eval` package), given as a folder of task YAML + JSONL files
  (`task_dir`, local or s3://) so it runs offline, or by hub name where the network allows. Scored through
  ftjobs' own engines by `EngineLM`: `generate_until` (vLLM or transformers, greedy, cut at the request's
  `until` strings) and `loglikelihood` (a transformers forward pass of the same weights and adapter:
  multiple-choice tasks). `loglikelihood_rolling` (perplexity tasks) is refused with a clear message.

Where: guards need a model, so they run inside evaluate, as the judge does (the infer image; `ftjobs k8s`
picks the `evaluate-judge` template when guards are set). Each predictions set's model is the one its infer
manifest names (a merge manifest, a model source, or base + adapter), loaded once per distinct model.

Results (the exact shape the promotion gate reads is in docs/guards.md):
  metrics.guards            {suite: {label: {metric: value}}}
  metrics.guard_comparisons {suite: {candidate label: {baseline, metrics: {metric: {baseline, candidate,
                             delta, ci95, examples}}}}}   (paired on the rows / docs both answered)
  metrics.guard_suites      {suite: {kind, metrics, margin, rows}}
and a section per suite in report.md / report.html.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from common import chat, metrics, storage
from common import manifest as mf
from common.config import JobConfig
from common.errors import ConfigError, InputError
from common.generate import EngineArgs, Sampling
from jobs.evaluate.comparison import bootstrap_interval, candidates_and_baselines, mean

LOG = logging.getLogger(__name__)


class Guard(JobConfig):
    """One guard suite."""

    name: str = Field(description="The suite's name: its key in metrics.guards and its report section.")
    kind: Literal["prompts", "lm_eval"] = Field(description="prompts: a JSONL/Parquet prompt set scored with "
                                                            "evaluate's metrics; lm_eval: lm-evaluation-harness "
                                                            "tasks.")
    prompts: str | None = Field(None, description="kind prompts: the file (local or s3://), one row per prompt: "
                                                  "`prompt` or `messages`, `reference`, optional `id`.")
    metrics: list[str] = Field(default_factory=lambda: ["exact_match"],
                               description="kind prompts: the metrics to score (evaluate's reference metrics).")
    tasks: list[str] = Field(default_factory=list, description="kind lm_eval: task (or group) names.")
    task_dir: str | None = Field(None, description="kind lm_eval: a folder (local or s3:// prefix) of task YAML and "
                                                   "data files; relative data_files resolve from it. None: the "
                                                   "harness's own (hub) tasks, which need the network.")
    num_fewshot: int | None = Field(None, ge=0, description="kind lm_eval: few-shot examples (None: the task's).")
    limit: int | None = Field(None, ge=1, description="Score at most this many rows / docs per task.")
    margin: float = Field(0.0, ge=0.0, description="How much a candidate may fall below its baseline on this "
                                                   "suite's metrics before the promotion gate counts it a "
                                                   "regression (recorded for the gate; evaluate only reports).")

    @model_validator(mode="after")
    def _kind(self) -> Guard:
        if self.kind == "prompts":
            if not self.prompts:
                raise ValueError(f"guard {self.name!r}: kind prompts needs `prompts` (a .jsonl or .parquet file)")
            unknown = [m for m in self.metrics if m not in metrics.REFERENCE_METRICS]
            if unknown or not self.metrics:
                raise ValueError(f"guard {self.name!r}: metrics {unknown or '[]'}: choose from "
                                 f"{', '.join(metrics.REFERENCE_METRICS)}")
        elif not self.tasks:
            raise ValueError(f"guard {self.name!r}: kind lm_eval needs `tasks` (names in task_dir or the hub)")
        return self


class GuardEngine(JobConfig):
    """How the guards' models run."""

    engine: Literal["vllm", "transformers"] = Field("transformers", description="Generation engine for the "
                                                    "guards (loglikelihood always runs a transformers forward).")
    engine_args: EngineArgs = Field(default_factory=EngineArgs, description="Engine settings.")
    max_tokens: int = Field(64, ge=1, description="Most new tokens per guard answer (lm_eval's max_gen_toks is "
                                                  "capped by it).")
    trust_remote_code: bool = Field(False, description="Allow model repos that ship their own code.")

    @property
    def sampling(self) -> Sampling:
        return Sampling(temperature=0.0, max_tokens=self.max_tokens)


def check_unique(guards: list[Guard]) -> None:
    names = [g.name for g in guards]
    if len(set(names)) != len(names):
        raise ValueError(f"guards: suite names must be unique, got {names}")


def inputs(guards: list[Guard]) -> list[mf.InputRef]:
    """Each suite's files as inputs of the evaluation (their sha256 is part of its identity)."""
    refs = []
    for g in guards:
        where = g.prompts if g.kind == "prompts" else g.task_dir
        if where is None:
            continue
        try:
            digest = (storage.sha256_uri(where) if g.kind == "prompts" else _folder_sha256(where))
        except FileNotFoundError:
            raise InputError(f"guard {g.name!r}: {where} does not exist") from None
        refs.append(mf.InputRef(uri=where, sha256=digest, stage=None, role=f"guard:{g.name}"))
    return refs


def _folder_sha256(prefix: str) -> str:
    objs = sorted(storage.list_objects(prefix), key=lambda o: o.rel)
    if not objs:
        raise FileNotFoundError(prefix)
    h = hashlib.sha256()
    for o in objs:
        h.update(f"{o.rel}\0{storage.sha256_uri(o.uri)}\n".encode())
    return h.hexdigest()


# --------------------------------------------------------------------------- running


@dataclass
class Results:
    """Per suite and label: the metric means, and the per-row (per-doc) values they came from."""

    values: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    rows: dict[str, dict[str, dict[str, dict[str, float]]]] = field(default_factory=dict)  # suite/label/id/metric
    comparisons: dict[str, dict[str, Any]] = field(default_factory=dict)
    suites: dict[str, dict[str, Any]] = field(default_factory=dict)


def run(guards: list[Guard], engine: GuardEngine, sets: list[dict[str, Any]], cache: Path,
        baseline_of: dict[str, str], resamples: int, seed: int) -> Results:
    """Every suite for every set's model (each distinct model loaded once), then the paired comparisons."""
    out = Results()
    served: dict[str, list[str]] = {}  # model key -> labels
    models_by_key: dict[str, mf.Loaded] = {}
    for s in sets:
        key = model_key(s["loaded"])
        served.setdefault(key, []).append(s["label"])
        models_by_key.setdefault(key, s["loaded"])
    with tempfile.TemporaryDirectory(prefix="ftjobs-guards-") as tmp:
        local = {g.name: fetch_suite(g, Path(tmp) / str(i)) for i, g in enumerate(guards)}
        for key, labels in served.items():
            model = Served(models_by_key[key], engine, cache)
            try:
                for g in guards:
                    scored = score_prompts(g, local[g.name], model) if g.kind == "prompts" else \
                        score_lm_eval(g, local[g.name], model)
                    for label in labels:
                        out.rows.setdefault(g.name, {})[label] = scored
            finally:
                model.close()
    for g in guards:
        names = g.metrics if g.kind == "prompts" else sorted({m for rows in out.rows[g.name].values()
                                                              for r in rows.values() for m in r})
        out.values[g.name] = {label: {m: mean([r[m] for r in rows.values() if m in r]) for m in names}
                              for label, rows in out.rows[g.name].items()}
        out.suites[g.name] = {"kind": g.kind, "metrics": names, "margin": g.margin,
                              "rows": max((len(r) for r in out.rows[g.name].values()), default=0)}
        out.comparisons[g.name] = compare(out.rows[g.name], names, sets, baseline_of, resamples, seed)
    return out


def compare(rows: dict[str, dict[str, dict[str, float]]], names: list[str], sets: list[dict[str, Any]],
            baseline_of: dict[str, str], resamples: int, seed: int) -> dict[str, Any]:
    """Each candidate against its baseline, paired on the rows (docs) both have."""
    out = {}
    for cand, base in candidates_and_baselines(sets, baseline_of).items():
        per: dict[str, Any] = {}
        for i, m in enumerate(names):
            shared = [rid for rid in rows[cand] if rid in rows[base] and m in rows[cand][rid] and m in rows[base][rid]]
            diffs = [rows[cand][rid][m] - rows[base][rid][m] for rid in shared]
            per[m] = {"baseline": mean([rows[base][r][m] for r in shared]),
                      "candidate": mean([rows[cand][r][m] for r in shared]), "delta": mean(diffs),
                      "ci95": bootstrap_interval(diffs, resamples, seed + 31 * i), "examples": len(diffs)}
        out[cand] = {"baseline": base, "metrics": per}
    return out


def model_key(loaded: mf.Loaded) -> str:
    info = mf.model_block(loaded)
    return json.dumps([info.model, info.adapter, getattr(info, "adapter_step", None)])


def fetch_suite(g: Guard, dest: Path) -> Path | None:
    """The suite's files in a local folder (a prompts file, or the task folder); None: hub tasks."""
    dest.mkdir(parents=True)
    if g.kind == "prompts":
        assert g.prompts is not None
        target = dest / Path(g.prompts.rstrip("/")).name
        storage.download_file(g.prompts, target)
        return target
    if g.task_dir is None:
        return None
    for obj in storage.list_objects(g.task_dir):
        storage.download_file(obj.uri, storage.safe_destination(dest, obj.rel))
    return dest


class Served:
    """A predictions set's model, ready to generate (ftjobs' engine) and to score continuations (transformers)."""

    def __init__(self, loaded: mf.Loaded, settings: GuardEngine, cache: Path):
        from common.generate import download_named, load_model, model_input, start

        info = mf.model_block(loaded)
        base = load_model(info.model, model_input(info.model), cache=cache,
                          trust_remote_code=settings.trust_remote_code, chat_template=info.chat_template)
        self.adapter_dir = None
        if info.adapter:
            adapter = mf.load(info.adapter, expect_stage=("train", "select"))
            step = getattr(info, "adapter_step", None)
            prefix = "adapter/" if step is None else f"candidates/step-{step:08d}/"
            self.adapter_dir = download_named(adapter, prefix, cache / "adapters" /
                                              f"{adapter.sha256[:16]}{'' if step is None else f'-step-{step:08d}'}")
        self.label = info.label or info.model
        self.path, self.tokenizer, self.fmt, self.settings = base.path, base.tokenizer, base.fmt, settings
        model = {"path": base.path, "adapter_dir": self.adapter_dir, "tokenizer": base.tokenizer}
        self.generate, self.max_len, _, self._close = start(settings.engine, settings, model)
        self._scorer: Any = None

    def scorer(self) -> Any:
        """The transformers model (with the adapter) for loglikelihood, loaded on first use."""
        if self._scorer is None:
            import torch
            from transformers import AutoModelForCausalLM

            net: Any = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=torch.float32,
                                                            trust_remote_code=self.settings.trust_remote_code)
            if self.adapter_dir is not None:
                from peft import PeftModel

                net = PeftModel.from_pretrained(net, str(self.adapter_dir))
            self._scorer = net.eval()
        return self._scorer

    def close(self) -> None:
        self._close()


def score_prompts(g: Guard, local: Path | None, model: Served) -> dict[str, dict[str, float]]:
    """Generate an answer per prompt with the model's chat template; score it with the suite's metrics."""
    assert local is not None
    rows = read_prompt_rows(local, g.prompts or str(local))[: g.limit]
    ids = [chat.encode_prompt(model.tokenizer, model.fmt, r["messages"], None) for r in rows]
    answers = model.generate(ids)
    scored = metrics.score_rows([{"id": r["id"], "completion": a[0][0], "reference": r["reference"]}
                                 for r, a in zip(rows, answers, strict=True)], metrics.Checks(), None)
    return {s["id"]: {m: s[m] for m in g.metrics if s.get(m) is not None} for s in scored}


def read_prompt_rows(local: Path, where: str) -> list[dict[str, Any]]:
    """{id, messages, reference} per row of a JSONL or Parquet guard file; a row without one is exit 3."""
    if local.suffix == ".parquet":
        import pyarrow.parquet as pq

        raw = pq.read_table(local).to_pylist()
    elif local.suffix == ".jsonl":
        raw = []
        for n, line in enumerate(local.read_text().splitlines(), start=1):
            if line.strip():
                try:
                    raw.append(json.loads(line))
                except ValueError as exc:
                    raise InputError(f"{where} line {n}: not JSON ({exc})") from None
    else:
        raise ConfigError(f"guard prompts {where}: use a .jsonl or .parquet file")
    rows = []
    for n, item in enumerate(raw):
        messages = item.get("messages") or ([{"role": "user", "content": item["prompt"]}]
                                            if isinstance(item.get("prompt"), str) else None)
        reference = item.get("reference")
        if messages and reference is None and messages[-1].get("role") == "assistant":
            messages, reference = messages[:-1], messages[-1]["content"]
        if not messages or not isinstance(reference, str):
            raise InputError(f"{where} row {n}: needs `prompt` (text) or `messages`, and `reference` (text); "
                             f"has {sorted(item)}")
        rows.append({"id": str(item.get("id", f"row-{n:08d}")), "messages": messages, "reference": reference})
    return rows


def score_lm_eval(g: Guard, local: Path | None, model: Served) -> dict[str, dict[str, float]]:
    """lm-evaluation-harness on the suite's tasks through `EngineLM`; per doc (`task/doc_id`) its metrics."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from jobs.evaluate.lm_harness import EngineLM

    manager = TaskManager(include_path=str(local), include_defaults=local is None) if local is not None \
        else TaskManager()
    where = contextlib.chdir(local) if local is not None else contextlib.nullcontext()
    with where:  # the task YAML's relative data_files resolve from its folder
        try:
            out = simple_evaluate(model=EngineLM(model), tasks=list(g.tasks), task_manager=manager,
                                  num_fewshot=g.num_fewshot, limit=g.limit, bootstrap_iters=0, log_samples=True)
        except KeyError as exc:
            raise ConfigError(f"guard {g.name!r}: lm-eval has no task {exc} (task_dir {g.task_dir}); name tasks "
                              "its YAML files define") from None
    per_doc: dict[str, dict[str, float]] = {}
    for task, samples in (out or {}).get("samples", {}).items():
        for sample in samples:
            values = {f"{task}/{m}": float(sample[m]) for m in sample.get("metrics", []) if m in sample}
            per_doc.setdefault(f"{task}/{sample['doc_id']}", {}).update(values)
    return per_doc


# --------------------------------------------------------------------------- report


def markdown(results: Results) -> str:
    """A report section per suite: each model's metrics, then each candidate vs its baseline with the CI."""
    lines = ["", "## Guard evaluations", ""]
    for suite, by_label in results.values.items():
        info = results.suites[suite]
        lines += [f"### {suite} ({info['kind']}, {info['rows']} rows)", "",
                  "| model | " + " | ".join(info["metrics"]) + " |",
                  "|---|" + "---|" * len(info["metrics"])]
        for label, vals in by_label.items():
            lines.append(f"| {label} | " + " | ".join(_pct(vals.get(m)) for m in info["metrics"]) + " |")
        for cand, comp in results.comparisons[suite].items():
            lines += ["", f"{cand} vs {comp['baseline']} (paired 95% CI):", ""]
            for m, c in comp["metrics"].items():
                flag = " **regression**" if c["delta"] is not None and c["delta"] < -info["margin"] else ""
                lines.append(f"- {m}: {_pts(c['delta'])} {_ci(c['ci95'])} on {c['examples']} shared rows{flag}")
        lines.append("")
    return "\n".join(lines) + "\n"


def html(results: Results) -> str:
    import html as h

    body = ["<section id='guards'><h2>Guard evaluations</h2>"]
    for suite, by_label in results.values.items():
        info = results.suites[suite]
        body.append(f"<h3>{h.escape(suite)} ({info['kind']}, {info['rows']} rows)</h3><table><tr><th>model</th>"
                    + "".join(f"<th>{h.escape(m)}</th>" for m in info["metrics"]) + "</tr>")
        for label, vals in by_label.items():
            body.append(f"<tr><td>{h.escape(label)}</td>"
                        + "".join(f"<td>{_pct(vals.get(m))}</td>" for m in info["metrics"]) + "</tr>")
        body.append("</table><ul>")
        for cand, comp in results.comparisons[suite].items():
            for m, c in comp["metrics"].items():
                body.append(f"<li>{h.escape(cand)} vs {h.escape(comp['baseline'])}, {h.escape(m)}: "
                            f"{_pts(c['delta'])} {_ci(c['ci95'])} on {c['examples']} shared rows</li>")
        body.append("</ul>")
    body.append("</section>")
    return "".join(body)


def add_to_html(page: str, results: Results) -> str:
    section = html(results)
    return page.replace("</body>", section + "</body>", 1) if "</body>" in page else page + section


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _pts(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f} pts"


def _ci(ci: list[float] | None) -> str:
    return "" if not ci else f"[{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]"
