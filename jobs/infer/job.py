"""infer: sharded, resumable offline batch inference (vLLM, or transformers where vLLM is missing).

Reads
  --model    a merge manifest (its `model/` artifacts are downloaded checksum-verified), or any
             model source (Hugging Face id, s3:// prefix, local folder);
  --adapter  optionally a train manifest: its LoRA adapter is served on top of --model (a base
             model source) as a vLLM `LoRARequest`;
  --prompts  a prepare manifest (its `eval` split by default: the conversation up to the last
             assistant turn is the prompt, that turn is the reference), or a Parquet / JSONL file
             with a `messages` or `prompt` column (names set in `columns`).
Prompts are rendered with the chat template recorded upstream (`common.chat`) and passed to the
engine as token ids; a template that differs from the model's is refused unless `force_template`.

Writes, under --output
  plan.json                            what this run is (create-only; every shard checks it)
  shards/<IIIII>/chunk-NNNNN.parquet   each written whole; a killed pod loses at most one chunk
  shards/<IIIII>/DONE.json             create-only shard marker with the chunks' sha256
  predictions/part-NNNNN.parquet       one part per shard, assembled by whichever shard ends last
  manifest.json                        stage "infer", published last, create-only
Rows: id, sample, prompt, tools (JSON text), completion, reference, finish_reason, prompt_tokens, completion_tokens,
model, adapter, sampling (JSON), error (per row, e.g. a prompt longer than max_model_len).

Shard I of N comes from `--shard I/N`, or from `JOB_COMPLETION_INDEX` (Kubernetes Indexed Jobs)
plus `num_shards`. Re-running skips finished shards and finished chunks; `--finalize` only
assembles (given only --output, it finalizes the run recorded in plan.json). Every input row
appears exactly once in the output (n times with `sampling.n: n`).
stdout: the manifest URI, or this shard's DONE.json marker while other shards are still running.
Code: this module (config, run, shards, finalize, CLI); `inputs.py` (model, prompts, template check);
`common.generate` (the settings and the vLLM and transformers engines, shared with synth and the judge).

    ftjobs infer --model s3://ml-data/runs/r1/merge --prompts s3://ml-data/runs/r1/prepare \\
        --output s3://ml-data/runs/r1/infer --shard 0/4 --set sampling.temperature=0
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import Field, model_validator

from common import attempts, chat, data, models, stage, storage
from common import config as cfg
from common import manifest as mf
from common.config import JobConfig, dump
from common.errors import AlreadyExistsError, ChecksumError, ConfigError, FtjobsError
from common.generate import EngineArgs, Sampling
from common.runner import config_options, execute
from jobs.infer.inputs import (
    Columns,
    load_model_input,
    load_prompts_input,
    load_rows,
    prepare_model,
    resolve_registered,
    template_check,
)

STAGE = "infer"
LOG = logging.getLogger(__name__)
# Test and demo hook: seconds to sleep after each written chunk, so a pod can be killed mid-shard on purpose.
PAUSE_ENV = "FTJOBS_INFER_CHUNK_PAUSE_S"


class Serve(JobConfig):
    """One more LoRA adapter on the same base, with its own output."""

    adapter: str = Field(description="Train manifest of the adapter.")
    adapter_step: int | None = Field(None, ge=0, description="Serve that train run's candidate adapter of this "
                                                              "step (train.select) instead of its adapter/.")
    output: str = Field(description="Its output prefix: its own plan, chunks and manifest, exactly as its own "
                                    "infer run would write them.")


class Config(JobConfig):
    """ftjobs infer: batch generation over a prompt set, sharded and resumable."""

    model: str | None = Field(None, description="Merge manifest (URI or its prefix), a registered model "
                                                "(models:/NAME for the champion, models:/NAME/VERSION), or a model "
                                                "source: HF id, s3:// prefix, local folder. Required, except with "
                                                "`finalize`.")
    root: str | None = Field(None, description="Store root whose models/ registry resolves a models:/ model; "
                                               "None: $FTJOBS_ROOT, else '.'.")
    adapter: str | None = Field(None, description="Train manifest whose LoRA adapter is served on top of "
                                                  "`model` (a base model source), or a select manifest (the "
                                                  "chosen checkpoint's adapter).")
    adapter_step: int | None = Field(None, ge=0, description="Serve the train run's candidate adapter of this "
                                     "step (`candidates/step-NNNNNNNN/`, kept by train.select) instead of its "
                                     "adapter/ (docs/selection.md).")
    prompts: str | None = Field(None, description="Prepare manifest (URI or prefix), or a .parquet / .jsonl file. "
                                                  "Required, except with `finalize`.")
    output: str = Field(..., description="Output prefix (s3:// or local).")
    split: str = Field("eval", description="Which split of a prepare manifest to generate for.")
    columns: Columns = Field(default_factory=Columns, description="Column names for plain prompt files.")
    engine: Literal["vllm", "transformers"] = Field("vllm", description="vllm: fast batched serving; "
                                                                        "transformers: `generate`, no vLLM needed.")
    engine_args: EngineArgs = Field(default_factory=EngineArgs, description="Engine settings.")
    sampling: Sampling = Field(default_factory=Sampling, description="Sampling settings.")
    chat_template: str | None = Field(None, description="Override the template (builtin name or Jinja text); "
                                                        "None: the one recorded upstream.")
    force_template: bool = Field(False, description="Run although the prompts' or the model's recorded chat "
                                                    "template differs from the one used.")
    force_base: bool = Field(False, description="Serve the adapter although `model` is not the base it was "
                                                "trained on.")
    trust_remote_code: bool = Field(False, description="Allow model repos that ship their own code.")
    num_shards: int = Field(1, ge=1, description="How many shards split the prompts (Kubernetes Indexed Job "
                                                 "completions).")
    shard: int | None = Field(None, ge=0, description="This process's shard; None: JOB_COMPLETION_INDEX, else 0.")
    chunk_rows: int = Field(256, ge=1, description="Prompts per chunk: the unit of resume (smaller: less lost "
                                                   "on a kill, more objects).")
    finalize: bool = Field(False, description="Only assemble finished shards and publish the manifest; without "
                                              "model and prompts, the run is the one in the output's plan.json.")
    cache_dir: str | None = Field(None, description="Where downloaded models go; None: $FTJOBS_CACHE or "
                                                    "~/.cache/ftjobs.")
    also: list[Serve] = Field(default_factory=list, description="More LoRA adapters on the same base (`model`), "
                              "served by the same engine (vLLM: one LoRARequest each, all loaded at once), each "
                              "written to its own output with its own manifest: a sweep's cells without a merge "
                              "and an engine start each.")

    @model_validator(mode="after")
    def _check(self) -> Config:
        missing = [k for k in ("model", "prompts") if getattr(self, k) is None]
        if missing and not (self.finalize and len(missing) == 2):
            raise ValueError(f"{' and '.join(missing)}: required, but not given (--finalize alone may leave out "
                             "both: it finalizes the run recorded in the output's plan.json)")
        if self.shard is not None and self.shard >= self.num_shards:
            raise ValueError(f"shard {self.shard} is out of range for num_shards {self.num_shards} "
                             f"(shards are numbered 0..{self.num_shards - 1})")
        if storage.normalize(self.output).rstrip("/") in {storage.normalize(x).rstrip("/")
                                                          for x in (self.model, self.prompts)
                                                          if x is not None and not x.startswith("models:/")}:
            raise ValueError("output must be a prefix of its own, not the model's or the prompts' location")
        if self.also:
            if self.adapter is None or self.finalize:
                raise ValueError("also: more adapters need the first one (adapter) and a base model, and are "
                                 "generated, not finalized (finalize each output on its own)")
            outputs = [storage.normalize(o).rstrip("/") for o in (self.output, *(a.output for a in self.also))]
            if len(set(outputs)) != len(outputs):
                raise ValueError("also: every adapter needs an output of its own")
        return self

    def single(self, adapter: str, output: str, adapter_step: int | None = None) -> Config:
        """The config one of the served adapters would have in an infer run of its own (same identity)."""
        return Config.model_validate(self.model_dump() | {"adapter": adapter, "output": output, "also": [],
                                                          "adapter_step": adapter_step})


# --------------------------------------------------------------------------- the job


def run(config: Config) -> stage.Result:
    """Generate this shard's chunks; the last shard to finish publishes the manifest."""
    out = config.output
    if config.finalize and config.model is None:
        return finalize_from_plan(out)
    config = resolve_registered(config)
    if config.also:
        return run_served(config)
    identity, model_in, adapter_in, prompts_in = read_inputs(config)
    if config.finalize:
        return stage.run(identity, lambda attempt: finalize(config, attempt, read_plan(out), wait=False))
    return stage.run(identity, lambda attempt: generate_shard(config, attempt, model_in, adapter_in, prompts_in),
                     record={"shard": shard_index(config)})


def read_inputs(config: Config) -> tuple[stage.Identity, Any, mf.Loaded | None, Any]:
    """The run's identity and its inputs (model, adapter, prompts), read and checked."""
    # What makes shards "the same run": the config without where this process stands or caches files.
    identity_config = dump(config) | {"shard": None, "finalize": False, "cache_dir": None}
    assert config.model is not None and config.prompts is not None  # Config requires both unless finalize alone
    model_in = load_model_input(config.model)
    adapter_in = mf.load(config.adapter, expect_stage=("train", "select")) if config.adapter else None
    prompts_in = load_prompts_input(config.prompts)
    inputs: list[mf.InputRef] = [ref for ref in (model_in.ref("model") if model_in else None,
                                                 adapter_in.ref("adapter") if adapter_in else None,
                                                 prompts_in if isinstance(prompts_in, mf.InputRef)
                                                 else prompts_in.ref("data")) if ref is not None]
    return stage.Identity(STAGE, config.output, identity_config, inputs), model_in, adapter_in, prompts_in


def run_served(config: Config) -> stage.Result:
    """Several adapters on one base through one engine; each output is published as its own run would be.

    Outputs already done are skipped; the engine starts once, with every adapter still to generate, at the
    first chunk that needs it. stdout is the first output's manifest (or marker).
    """
    singles = [config.single(config.adapter or "", config.output, config.adapter_step)] + [
        config.single(a.adapter, a.output, a.adapter_step) for a in config.also]
    reads = [read_inputs(single) for single in singles]
    todo = [(single, read) for single, read in zip(singles, reads, strict=True)
            if stage.already_done(read[0]) is None]
    engine = SharedEngine(config, [(single, read[1], read[2]) for single, read in todo])
    results = []
    try:
        for single, (identity, model_in, adapter_in, prompts_in) in zip(singles, reads, strict=True):
            def work(attempt: stage.Attempt, c: Config = single, m: Any = model_in, a: Any = adapter_in,
                     p: Any = prompts_in) -> stage.Outcome | stage.Pending:
                return generate_shard(c, attempt, m, a, p, engine)

            results.append(stage.run(identity, work, record={"shard": shard_index(single)}))
    finally:
        engine.close()
    LOG.info("served %d adapters from one engine (%d generated here): %s", len(singles), len(todo),
             ", ".join(str(getattr(r, "uri", r)) for r in results))
    return results[0]


class SharedEngine:
    """One engine for several adapters on the same base, started when the first chunk needs it."""

    def __init__(self, config: Config, runs: list[tuple[Config, Any, mf.Loaded | None]]):
        self.config, self.runs = config, runs
        self.engine: Any = None
        self.dirs: list[Path] = []

    def bind(self, model: dict[str, Any]) -> tuple[Any, int, str]:
        """generate() for this model's adapter, its context length and the engine's version."""
        if self.engine is None:
            from common.generate import start_transformers, start_vllm

            cache = Path(self.config.cache_dir) if self.config.cache_dir else models.cache_root()
            self.dirs = [prepare_model(c, m, a, cache)["adapter_dir"] for c, m, a in self.runs]
            served = model | {"adapter_dirs": self.dirs}
            start = start_vllm if self.config.engine == "vllm" else start_transformers
            self.engine = start(self.config, served)
            LOG.info("one %s engine serves %d adapters on %s", self.config.engine, len(self.dirs), model["path"])
        generate, max_len, version, _ = self.engine
        index = self.dirs.index(model["adapter_dir"])
        return (lambda batch: generate(batch, adapter=index)), max_len, version

    def close(self) -> None:
        if self.engine is not None:
            self.engine[3]()


def generate_shard(config: Config, attempt: stage.Attempt, model_in: Any, adapter_in: mf.Loaded | None,
                   prompts_in: Any, shared: SharedEngine | None = None) -> stage.Outcome | stage.Pending:
    """This shard's chunks (skipping finished ones), its marker, then finalize when it is the last."""
    out = config.output
    s = config.sampling
    if s.temperature > 0 and s.seed is None:
        # vLLM's defaults, as configured nowhere: say so, since shards and resumed chunks then come from
        # different random draws, and evaluate compares what it is given.
        LOG.warning("sampling at temperature %g without a seed: completions are random, and shards and resumed "
                    "chunks are not reproducible. Set sampling.temperature: 0 for greedy completions (what "
                    "evaluate should compare), or sampling.seed: N for reproducible samples.", s.temperature)
    shard = shard_index(config)
    marker = storage.join(out, "shards", f"{shard:05d}", "DONE.json")
    if not storage.exists(marker) and not await_turn(out, shard, attempt.id, marker):
        LOG.info("shard %d was finished by another attempt while this one waited", shard)
    if storage.exists(marker):
        LOG.info("shard %d is already finished", shard)
        return finalize(config, attempt, read_plan(out), wait=True, marker=marker)

    cache = Path(config.cache_dir) if config.cache_dir else models.cache_root()
    model = prepare_model(config, model_in, adapter_in, cache)
    rows = load_rows(config, prompts_in)
    template_check(config, model, prompts_in)
    ident = attempt.identity
    # config and inputs: what `--finalize --output` alone needs to publish the manifest the shards would.
    plan = {"run": ident.key, "rows": len(rows), "num_shards": config.num_shards, "chunk_rows": config.chunk_rows,
            "model": model["identity"], "started_at": mf.now(), "config": ident.config,
            "inputs": [ref.model_dump(mode="json") for ref in ident.inputs]}
    plan = claim_plan(out, plan)

    lo, hi = shard_bounds(len(rows), shard, config.num_shards)
    mine = rows[lo:hi]
    chunks = [mine[i:i + config.chunk_rows] for i in range(0, len(mine), config.chunk_rows)]
    shard_dir = storage.join(out, "shards", f"{shard:05d}")
    finished = {o.rel for o in storage.list_objects(shard_dir)}
    todo = [k for k in range(len(chunks)) if f"chunk-{k:05d}.parquet" not in finished]
    LOG.info("shard %d/%d: rows %d..%d, %d chunks, %d already written", shard, config.num_shards, lo, hi,
             len(chunks), len(chunks) - len(todo))
    if todo:
        generate_chunks(config, model, chunks, todo, shard_dir, shard, shared)
    write_marker(marker, shard_dir, shard, len(chunks), len(mine) * config.sampling.n)
    return finalize(config, attempt, plan, wait=True, marker=marker)


def finalize_from_plan(out: str) -> stage.Result:
    """`--finalize --output URI` alone: the config and inputs are the ones the shards recorded in plan.json."""
    plan = read_plan(out)
    if "config" not in plan or "inputs" not in plan:
        raise ConfigError(f"{storage.join(out, 'plan.json')} was written by an older ftjobs and does not record "
                          "the run's config: finalize with the shards' own command line plus --finalize (the same "
                          "--model, --prompts, --config and --set)")
    inputs = [mf.InputRef.model_validate(ref) for ref in plan["inputs"]]
    config = cfg.validate(Config, plan["config"] | {"output": out, "finalize": True},
                          source=storage.join(out, "plan.json"))
    LOG.info("finalizing the run in %s: model %s, prompts %s, %d shards", storage.join(out, "plan.json"),
             config.model, config.prompts, plan["num_shards"])
    identity = stage.Identity(STAGE, out, plan["config"], inputs)
    return stage.run(identity, lambda attempt: finalize(config, attempt, plan, wait=False))


def await_turn(out: str, shard: int, attempt_id: str, marker: str) -> bool:
    """Wait while another live attempt works on this shard; True once it is this attempt's turn.

    Two attempts of one shard (a retried index, a replacement pod beside one on an unreachable node) would
    otherwise both spend the compute. Each attempt's heartbeat record says which shard it works on; the
    earliest-started live one works, the others wait until its marker appears (False: nothing left to do)
    or its heartbeat goes silent for FTJOBS_ATTEMPT_STALE_S (then the next one takes over, reusing every
    chunk already written). Should two both work anyway (clocks far apart, a partitioned pod that comes
    back), chunks are written create-only: the first copy of each stands and the results are the same.
    """
    waited = False
    while True:
        if storage.exists(marker):
            return False
        now = time.time()
        live = sorted((rec.get("started_at", ""), aid) for aid, rec in attempts.records(out).items()
                      if rec and rec.get("shard") == shard and (aid == attempt_id or attempts.alive(rec, now)))
        owner = live[0][1] if live else attempt_id
        if owner == attempt_id:
            if waited:
                LOG.info("shard %d: taking over from the attempt that went silent", shard)
            return True
        if not waited:
            LOG.info("shard %d is being worked on by live attempt %s: waiting for its marker (or its heartbeat to "
                     "stop for %.0fs)", shard, owner, attempts.STALE_S)
        waited = True
        time.sleep(min(attempts.HEARTBEAT_S, 5.0))


def shard_index(config: Config) -> int:
    if config.shard is not None:
        return config.shard
    env = os.environ.get("JOB_COMPLETION_INDEX")
    if env is None:
        if config.num_shards > 1:
            raise ConfigError(f"num_shards is {config.num_shards} but no shard was given: pass --shard I/N or run "
                              "as a Kubernetes Indexed Job (JOB_COMPLETION_INDEX)")
        return 0
    if not env.isdigit() or int(env) >= config.num_shards:
        raise ConfigError(f"JOB_COMPLETION_INDEX={env!r} is not a shard of num_shards {config.num_shards}: set "
                          "the Indexed Job's completions to num_shards")
    return int(env)


def shard_bounds(total: int, shard: int, num_shards: int) -> tuple[int, int]:
    """Contiguous, deterministic row ranges: shard I gets rows [I*total//N, (I+1)*total//N)."""
    return shard * total // num_shards, (shard + 1) * total // num_shards


# --------------------------------------------------------------------------- plan, chunks, markers


def claim_plan(out: str, plan: dict[str, Any]) -> dict[str, Any]:
    """plan.json is created once; later shards and attempts must describe the same run."""
    uri = storage.join(out, "plan.json")
    try:
        storage.put_if_absent(uri, storage.json_bytes(plan))
        return plan
    except AlreadyExistsError:
        have = storage.read_json(uri)
    if (have.get("run"), have.get("rows"), have.get("num_shards")) != (plan["run"], plan["rows"], plan["num_shards"]):
        raise ConfigError(f"{out} holds unfinished shards of a different run (config, inputs or num_shards "
                          f"differ; see {uri}). Choose another --output, or delete {out} to start over.")
    return dict(have)


def read_plan(out: str) -> dict[str, Any]:
    try:
        return dict(storage.read_json(storage.join(out, "plan.json")))
    except FileNotFoundError:
        raise FtjobsError(f"{out} has no plan.json: no shard has started there yet. Run the shards first "
                          "(ftjobs infer --shard I/N ...), then --finalize.") from None


def generate_chunks(config: Config, model: dict[str, Any], chunks: list[list[dict[str, Any]]], todo: list[int],
                    shard_dir: str, shard: int, shared: SharedEngine | None = None) -> None:
    from common.generate import start_transformers, start_vllm
    from common.logs import Progress

    if shared is not None:
        generate, max_len, version = shared.bind(model)
        close: Any = lambda: None  # noqa: E731 - the shared engine closes once, after every adapter
    else:
        generate, max_len, version, close = (start_vllm if config.engine == "vllm" else start_transformers)(config,
                                                                                                          model)
    tokenizer, fmt = model["tokenizer"], model["fmt"]
    sampling_json = json.dumps(config.sampling.model_dump(mode="json"), sort_keys=True)
    ident = model["identity"]
    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    progress = Progress(f"infer shard {shard}", total=sum(len(chunks[k]) for k in todo), unit="rows")
    tokens, gen_s = 0, 0.0
    for k in todo:
        if storage.exists(storage.join(shard_dir, f"chunk-{k:05d}.parquet")):  # another attempt got there first
            continue
        rows = list(chunks[k])
        ids: list[list[int] | None] = []
        for i, row in enumerate(rows):
            enc = chat.encode_prompt(tokenizer, fmt, row["prompt"], row["tools"]) if row["error"] is None else None
            if enc is not None and len(enc) >= max_len:  # vLLM needs room for at least one new token
                rows[i] = row | {"error": f"prompt has {len(enc)} tokens; max_model_len is {max_len}: raise "
                                          "engine_args.max_model_len or shorten the prompt", "n_prompt": len(enc)}
                enc = None
            ids.append(enc)
        live = [i for i, x in enumerate(ids) if x is not None]
        t0 = time.monotonic()
        results = generate([ids[i] for i in live]) if live else []
        elapsed = time.monotonic() - t0
        by_row = dict(zip(live, results, strict=True))
        out_rows = []
        for i, row in enumerate(rows):
            samples = by_row.get(i) or [("", 0, "error")] * config.sampling.n
            for s, (text, n_tok, finish) in enumerate(samples):
                out_rows.append({
                    "id": row["id"], "sample": s, "prompt": row["prompt"], "tools": data.tools_json(row["tools"]),
                    "completion": text,
                    "reference": row["reference"], "finish_reason": finish,
                    "prompt_tokens": len(ids[i] or []) if ids[i] is not None else row.get("n_prompt", 0),
                    "completion_tokens": n_tok, "model": ident["model"], "adapter": ident["adapter"],
                    "sampling": sampling_json, "error": row["error"] if ids[i] is None else None,
                })
        n_tok = sum(r["completion_tokens"] for r in out_rows)
        tokens, gen_s = tokens + n_tok, gen_s + elapsed
        meta = {"generate_s": elapsed, "completion_tokens": n_tok, "engine": config.engine,
                "engine_version": version}
        chunk = storage.join(shard_dir, f"chunk-{k:05d}.parquet")
        try:  # create-only: a chunk another attempt wrote first stands (see await_turn)
            storage.put_if_absent(chunk, predictions_parquet(out_rows, meta))
        except AlreadyExistsError:
            LOG.info("chunk %d of shard %d was written by another attempt first; keeping it", k, shard)
        progress.update(len(rows), tok_s=tokens / gen_s if gen_s else 0.0)
        if pause:
            time.sleep(pause)
    progress.close()
    close()


def predictions_parquet(rows: list[dict[str, Any]], meta: dict[str, Any]) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = data.PREDICTIONS.with_metadata({"ftjobs": json.dumps(meta)})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), buf, compression="zstd")
    return buf.getvalue()


def write_marker(marker: str, shard_dir: str, shard: int, n_chunks: int, expect_rows: int) -> None:
    import pyarrow.parquet as pq

    chunks, meta_total = [], Counter()  # type: ignore[var-annotated]
    for k in range(n_chunks):
        uri = storage.join(shard_dir, f"chunk-{k:05d}.parquet")
        data = storage.read_bytes(uri)
        pf = pq.ParquetFile(io.BytesIO(data))
        meta = json.loads(pf.schema_arrow.metadata[b"ftjobs"])
        meta_total.update({"generate_s": meta["generate_s"], "completion_tokens": meta["completion_tokens"]})
        chunks.append({"path": f"chunk-{k:05d}.parquet", "sha256": hashlib.sha256(data).hexdigest(),
                       "bytes": len(data), "rows": pf.metadata.num_rows, "engine": meta["engine"],
                       "engine_version": meta["engine_version"]})
    rows = sum(c["rows"] for c in chunks)
    if rows != expect_rows:
        raise FtjobsError(f"shard {shard}: chunks hold {rows} rows, expected {expect_rows}; delete {shard_dir} "
                          "and re-run the shard")
    body = {"shard": shard, "rows": rows, "chunks": chunks, "generate_s": meta_total["generate_s"],
            "completion_tokens": meta_total["completion_tokens"], "finished_at": mf.now()}
    try:
        storage.put_if_absent(marker, storage.json_bytes(body))
        LOG.info("shard %d finished: %d rows, marker %s", shard, rows, marker)
    except AlreadyExistsError:
        LOG.info("shard %d was finished by another attempt (%s)", shard, marker)


def finalize(config: Config, attempt: stage.Attempt, plan: dict[str, Any], *, wait: bool,
             marker: str = "") -> stage.Outcome | stage.Pending:
    """Assemble predictions/part-NNNNN from every shard's chunks, for the manifest (exactly one publishes).

    While other shards are unfinished, a shard that `wait`s returns its marker as Pending: the last one
    to finish (or `--finalize`) assembles.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    t0 = time.monotonic()
    out, n = config.output, plan["num_shards"]
    markers = {i: storage.join(out, "shards", f"{i:05d}", "DONE.json") for i in range(n)}
    missing = [i for i, uri in markers.items() if not storage.exists(uri)]
    if missing:
        if wait:
            return stage.Pending(marker, f"shard marker: {marker} (not a manifest: waiting for shards {missing}; the "
                                         f"last one to finish publishes {mf.manifest_uri(out)})")
        raise FtjobsError(f"cannot finalize {out}: shards {missing} of {n} have not finished (no DONE.json). "
                          "Run them (ftjobs infer --shard I/N ...) and finalize again.")
    writer = attempt.writer
    stats = Counter()  # type: ignore[var-annotated]
    finish, keys, shard_stats, timings = Counter(), set(), [], {}  # type: ignore[var-annotated]
    for i, uri in markers.items():
        done = storage.read_json(uri)
        tables = []
        for c in done["chunks"]:
            chunk = storage.read_bytes(storage.join(out, "shards", f"{i:05d}", c["path"]))
            if hashlib.sha256(chunk).hexdigest() != c["sha256"]:
                raise ChecksumError(f"shard {i} {c['path']} changed after its shard finished (sha256 differs "
                                    f"from {uri}); delete {storage.parent(uri)} and re-run shard {i}")
            tables.append(pq.read_table(io.BytesIO(chunk)).replace_schema_metadata(None))
        table = pa.concat_tables(tables) if tables else data.PREDICTIONS.empty_table()
        for row_id, sample in zip(table.column("id").to_pylist(), table.column("sample").to_pylist(), strict=True):
            if (row_id, sample) in keys:
                raise FtjobsError(f"prediction for id {row_id!r} (sample {sample}) appears twice; delete {out} "
                                  "and re-run")
            keys.add((row_id, sample))
        part = f"predictions/part-{i:05d}"
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        writer.add_bytes(buf.getvalue(), f"{part}.parquet", name=part, rows=table.num_rows)
        errors = sum(e is not None for e in table.column("error").to_pylist())
        finish.update(table.column("finish_reason").to_pylist())
        p_tok = sum(table.column("prompt_tokens").to_pylist())
        c_tok = sum(table.column("completion_tokens").to_pylist())
        stats.update({"predictions": table.num_rows, "errors": errors, "prompt_tokens": p_tok,
                      "completion_tokens": c_tok, "generate_s": done["generate_s"]})
        engines = sorted({f"{c['engine']} {c['engine_version']}" for c in done["chunks"]})
        shard_stats.append({"shard": i, "rows": table.num_rows, "errors": errors, "completion_tokens": c_tok,
                            "generate_s": round(done["generate_s"], 4), "chunks": len(done["chunks"]),
                            "tokens_per_s": round(c_tok / done["generate_s"], 2) if done["generate_s"] else None,
                            "engine": engines, "finished_at": done["finished_at"]})
        timings[f"shard_{i:05d}_generate_s"] = done["generate_s"]
    expect = plan["rows"] * config.sampling.n
    if len(keys) != expect:
        raise FtjobsError(f"shards hold {len(keys)} predictions but the plan has {expect}; delete {out} and re-run")
    gen_s = stats["generate_s"]
    result = {"rows": plan["rows"], "predictions": stats["predictions"], "errors": stats["errors"],
              "prompt_tokens": stats["prompt_tokens"], "completion_tokens": stats["completion_tokens"],
              "tokens_per_s": round(stats["completion_tokens"] / gen_s, 2) if gen_s else None,
              "finish_reasons": dict(finish), "num_shards": n, "shards": shard_stats}
    timings |= {"generate_s": gen_s, "finalize_s": time.monotonic() - t0}
    LOG.info("assembled %d predictions, %d errors, %.1f tokens/s", result["predictions"], result["errors"],
             result["tokens_per_s"] or 0.0)
    return stage.Outcome(stats=result, timings=timings, model=plan["model"])


# --------------------------------------------------------------------------- command line


def _shard_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    try:
        i, n = (int(x) for x in value.split("/"))
    except ValueError:
        raise click.BadParameter(f"{value!r}: expected I/N, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise click.BadParameter(f"{value!r}: shard I must be in 0..N-1")
    return i, n


@click.command(name="infer")
@click.option("--model", metavar="MODEL_MANIFEST_OR_SRC",
              help="Merge manifest, or a model source (HF id, s3:// prefix, folder).")
@click.option("--adapter", "adapters", multiple=True, metavar="TRAIN_MANIFEST",
              help="Train manifest: serve its LoRA adapter on top of --model. Repeat it, with one --output each, "
                   "to serve several adapters from one engine (each output gets its own manifest).")
@click.option("--prompts", metavar="PREPARE_MANIFEST_OR_FILE", help="Prepare manifest, or a .parquet / .jsonl file.")
@click.option("--output", "outputs", multiple=True, metavar="URI",
              help="Output prefix (s3:// or local); one per --adapter when several are given.")
@click.option("--shard", callback=_shard_option, metavar="I/N",
              help="This process's shard of N (default: JOB_COMPLETION_INDEX with num_shards).")
@click.option("--engine", type=click.Choice(["vllm", "transformers"]), help="Generation engine (default vllm).")
@click.option("--split", type=click.Choice(["train", "eval"]), help="Split of a prepare manifest (default eval).")
@click.option("--root", help="Store root whose models/ registry resolves --model models:/NAME[/VERSION] "
                             "(default $FTJOBS_ROOT, else '.').")
@click.option("--finalize", is_flag=True, default=None,
              help="Only assemble finished shards and publish. `--finalize --output URI` alone finalizes the run "
                   "recorded in URI/plan.json.")
@config_options(example="sampling.temperature=0")
def command(model: str | None, adapters: tuple[str, ...], prompts: str | None, outputs: tuple[str, ...],
            shard: tuple[int, int] | None, engine: str | None, split: str | None, root: str | None,
            finalize: bool | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """Generate completions for a prompt set, sharded and resumable.

    stdout: the manifest URI. A shard that is not the last to finish prints its shard marker
    (<output>/shards/<IIIII>/DONE.json) instead; the last one (or --finalize) publishes the manifest.
    """
    import sys

    if len(adapters) > 1 and len(adapters) != len(outputs):
        raise ConfigError(f"{len(adapters)} --adapter but {len(outputs)} --output: give one --output per --adapter "
                          "(each served adapter writes its own predictions and manifest)")
    if len(adapters) <= 1 and len(outputs) > 1:
        raise ConfigError("several --output need as many --adapter (one output per served adapter)")
    also = [{"adapter": a, "output": o} for a, o in zip(adapters[1:], outputs[1:], strict=True)] or None
    flags = {"model": model, "adapter": adapters[0] if adapters else None, "prompts": prompts,
             "output": outputs[0] if outputs else None, "also": also, "engine": engine, "split": split, "root": root,
             "finalize": finalize or None, "shard": shard[0] if shard else None,
             "num_shards": shard[1] if shard else None}
    execute(sys.modules[__name__], config_file, sets, flags)
