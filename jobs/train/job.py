"""ftjobs train: QLoRA finetuning (bitsandbytes 4-bit + peft LoRA) that survives preemption.

Reads: a prepare manifest (its Parquet shards are checksum-verified) and a
base model (Hugging Face id, s3:// prefix or local folder; safetensors only).

Writes under --output:
- `adapter/adapter_model.safetensors`, `adapter/adapter_config.json` (artifacts `adapter/<file>`)
- `tokenizer/<file>`: the base tokenizer carrying the chat template that was trained on
- `loss_curve.json` (train loss per step, eval loss per evaluation) and `loss_curve.png`
- `checkpoints/step-NNNNNNNN/` while it runs (removed after success unless configured)
- `manifest.json`, last: base model and revision, quantization and LoRA settings,
  template hash, packing mode, tokens trained, tokens/s, peak memory, wall time.

    ftjobs train --input s3://ml/ftjobs/runs/r1/prepare/manifest.json \\
        --base-model meta-llama/Llama-3.2-1B-Instruct --output s3://ml/ftjobs/runs/r1/train \\
        --config configs/train.yaml --set lora.r=32

Several processes (data parallel: GPUs of one pod, or pods of a multi-node Job; only rank 0 writes to the
store): `ftjobs launch` is torchrun with ftjobs' exit codes kept (`jobs/launch.py`)

    ftjobs launch --nproc-per-node 8 -- train --input ... --base-model ... --output ...

Each optimizer step takes grad_accum x processes micro-batches of `batch_size` packed rows, split across
the processes (`packing.step_share`), and the adapter's gradients are summed over them once per step. A
resume keeps the step size of the run's first attempt on any number of processes (state.json `per_step`).

The loop is written out here (torchtune-style) rather than handed to HF
Trainer, so checkpoints hold the exact data position and a resumed run
replays the same batches in the same order. Packed rows of `max_seq_length`
tokens keep every example's own position ids, so no compute goes to padding
and no attention crosses examples (see `jobs/train/packing.py`).
"""

from __future__ import annotations

import logging
import math
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import click

from common import chat, models, stage, storage
from common import manifest as mf
from common.config import dump
from common.errors import ConfigError, InputError, Preempted
from common.logs import Progress
from common.runner import config_options, execute
from jobs.train import checkpoints, fsdp, objectives, segments, selection, strategy
from jobs.train.config import Checkpointing, Config, Lora, Quantization  # noqa: F401 (tests and tools read them here too)
from jobs.train.data import TrainData
from jobs.train.model import count_params, load_model, make_optimizer, peak_memory
from jobs.train.signals import StopFlag, install_sigterm
from jobs.train.trainer import Fitted, Schedule, Superseded, Trainer

LOG = logging.getLogger(__name__)
STAGE = "train"


# --------------------------------------------------------------------------- the job
#
# run: the stage skeleton (common.stage: already done?, manifest published last) around `train`, whose
# three phases pass a `Trainer`:
#   setup        -> tokenizer, data, step schedule, model + LoRA, optimizer, resume from a checkpoint
#   fit          -> optimizer steps from the state's step to the total; evals, checkpoints, SIGTERM
#   save_outputs -> adapter, tokenizer and loss curve through the attempt's writer (rank 0)


def run(config: Config) -> stage.Result:
    """Train an adapter on the prepare run at `config.input`; returns the published (or already done) manifest."""
    started = time.monotonic()
    prep = mf.load(config.input, verify="size", expect_stage=("prepare", "pairs"))
    objectives.check_data(config, prep)
    identity = stage.Identity(STAGE, config.output, dump(config), [prep.ref("data"), *objectives.extra_inputs(config)])
    stop = install_sigterm(config.checkpoint.grace_seconds)
    try:
        result = stage.run(identity, lambda attempt: train(config, prep, attempt, stop, started))
    finally:
        stop.restore()
    if isinstance(result, mf.Loaded) and config.checkpoint.delete_on_success:
        storage.delete_prefix(checkpoints.root(config.output))  # the run is published: nothing left to resume
    return result


def train(config: Config, prep: mf.Loaded, attempt: stage.Attempt, stop: StopFlag,
          started: float) -> stage.Outcome | stage.Result:
    """setup -> fit -> save_outputs; rank 0's outcome becomes the manifest, other ranks leave it to rank 0."""
    trainer = setup(config, prep, attempt.identity.key, attempt.identity.config, attempt.id)
    try:
        fitted = fit(trainer, stop)
        if trainer.superseded():
            raise Superseded
    except Superseded:
        # A zombie or a losing racer: it stops here and writes nothing more (the winner's checkpoints stay).
        trainer.tracker.close()
        return stage.winner(attempt.identity)
    weights = fsdp.full_weights(trainer) if trainer.sharded else None  # a collective: before rank 0 saves
    if trainer.main:
        save_outputs(trainer, attempt.writer, weights)
    trainer.accelerator.wait_for_everyone()  # the last collective: rank 0 publishes alone after it
    if not trainer.main:
        return stage.Pending(mf.manifest_uri(config.output),
                             f"rank {trainer.rank}: training done; rank 0 publishes the manifest")
    trainer.timings["wall_s"] = time.monotonic() - started
    outcome = _outcome(trainer, fitted)
    LOG.info("trained %d steps: loss %.4f -> %.4f, %s tokens/s", trainer.state.step,
             outcome.metrics["first_train_loss"], outcome.metrics["final_train_loss"],
             f"{outcome.metrics['effective_tokens_per_s'] or 0:,.0f}")
    return outcome


def setup(config: Config, prep: mf.Loaded, identity: str, resolved: dict[str, Any], attempt: str) -> Trainer:
    """Everything the loop needs, resumed from the newest checkpoint of this run when there is one."""
    import torch
    from accelerate import Accelerator

    from jobs.train.tracking import Tracker

    timings: dict[str, float] = {}
    cuda = torch.cuda.is_available()
    if not cuda:
        from common.resources import limit_torch_threads

        limit_torch_threads()  # torch's default is the node's cores, not the pod's CPU limit
    accelerator = Accelerator(cpu=not cuda)
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    t = time.monotonic()
    base, tokenizer, fmt = _base_and_tokenizer(config, accelerator)
    train_data = _load_data(config, prep, tokenizer, fmt)
    timings["load_data_s"] = time.monotonic() - t

    with tempfile.TemporaryDirectory(prefix="ftjobs-ckpt-") as tmp:
        t = time.monotonic()
        ckpt = _checkpoint_to_resume(config.output, identity, accelerator, Path(tmp))
        saved = checkpoints.saved_state(ckpt) if ckpt is not None else None  # its step count fixes the schedule
        schedule = _schedule(config, train_data, accelerator.num_processes, saved)
        timings["resume_s"] = time.monotonic() - t
        LOG.info("data: %d train examples (%s) in %d packed rows of %d tokens (%.1f%% full), %d eval examples; "
                 "%d steps (%d per epoch) of %d micro-batches of %d rows on %d process(es)", len(train_data.train),
                 train_data.source, len(train_data.rows), config.max_seq_length, 100 * train_data.density,
                 len(train_data.eval), schedule.total, schedule.steps_per_epoch, schedule.per_step,
                 config.batch_size, accelerator.num_processes)

        t = time.monotonic()
        strategy.refuse_on_device(config, cuda)
        peft_model, compute_dtype, quant = load_model(config, base.path, accelerator.device, cuda)
        objective = objectives.setup(config, peft_model)
        param_counts = count_params(peft_model)
        if fsdp.active(config, accelerator.num_processes):
            peft_model = fsdp.shard(peft_model, config, compute_dtype, cuda)
        params = [p for p in peft_model.parameters() if p.requires_grad]
        optimizer, optimizer_name = make_optimizer(config, params, cuda)
        from transformers import get_scheduler  # here, so load_model_s counts its import as it always did

        scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=schedule.warmup,
                                  num_training_steps=schedule.total)
        timings["load_model_s"] = time.monotonic() - t

        state = checkpoints.TrainState()
        if ckpt is not None and config.strategy == "fsdp":
            state = fsdp.restore(ckpt.local, peft_model, optimizer, scheduler, config, accelerator.process_index,
                                 where=ckpt.uri)
        elif ckpt is not None:
            state = checkpoints.restore(ckpt.local, peft_model, optimizer, scheduler, accelerator.process_index,
                                        config.seed, where=ckpt.uri)
        if ckpt is not None:
            LOG.info("resuming from %s (step %d of %d)", ckpt.uri, ckpt.step, schedule.total)
    resumed_from = ckpt.step if ckpt is not None else None
    state.attempts += 1
    state.per_step, state.world = schedule.per_step, accelerator.num_processes
    state.run_id = os.environ.get(mf.RUN_ID_ENV) or state.run_id or mf.new_run_id()
    tracker = Tracker(config.report_to, config.run_name or state.run_id, resolved,
                      enabled=accelerator.is_main_process)
    trainer = Trainer(config=config, accelerator=accelerator, base=base, tokenizer=tokenizer, fmt=fmt,
                      data=train_data, schedule=schedule, peft_model=peft_model, params=params,
                      param_counts=param_counts, optimizer=optimizer,
                      optimizer_name=optimizer_name, scheduler=scheduler, compute_dtype=compute_dtype, quant=quant,
                      identity=identity, attempt=attempt, state=state, resumed_from=resumed_from, tracker=tracker,
                      timings=timings, objective=objective)
    trainer.broadcast_parameters()
    return trainer


def _checkpoint_to_resume(output: str, identity: str, accelerator: Any,
                          dest: Path) -> checkpoints.Checkpoint | None:
    """The newest usable checkpoint of this run, downloaded and verified; None to start from step 0.

    Rank 0 chooses and the others fetch the folder it chose: one process finding a checkpoint unusable
    where rank 0 did not must not let the processes resume from different steps.
    """
    if accelerator.num_processes == 1:
        return checkpoints.latest(output, dest, identity)
    from accelerate.utils import broadcast_object_list

    chosen = checkpoints.latest(output, dest, identity) if accelerator.is_main_process else None
    name = broadcast_object_list([chosen.local.name if chosen is not None else None], from_process=0)[0]
    if accelerator.is_main_process or name is None:
        return chosen
    return checkpoints.fetch(output, name, dest, identity)


def _base_and_tokenizer(config: Config, accelerator: Any) -> tuple[models.ModelRef, Any, chat.ChatFormat]:
    """The base model's local folder (fetched by one process first) and its tokenizer and chat format."""
    from transformers import AutoConfig, AutoTokenizer

    from jobs.train import packing

    with accelerator.main_process_first():
        base = models.resolve(config.base_model, revision=config.base_revision, cache_dir=config.cache_dir)
    models.check_trust_remote_code(base.path, config.trust_remote_code)
    if models.is_quantized(base.path):
        raise ConfigError(f"{config.base_model} is already quantized ({models.is_quantized(base.path)}); train "
                          "from the 16-bit base model")
    refused = packing.refusal(AutoConfig.from_pretrained(str(base.path), trust_remote_code=config.trust_remote_code),
                              config.packing)
    if refused:
        raise ConfigError(f"{config.base_model}: {refused}")
    tokenizer = AutoTokenizer.from_pretrained(str(base.path), trust_remote_code=config.trust_remote_code)
    return base, tokenizer, chat.chat_format(tokenizer, config.chat_template)


def _load_data(config: Config, prep: mf.Loaded, tokenizer: Any, fmt: chat.ChatFormat) -> TrainData:
    """Verified shards -> examples -> packed rows; refuses a split that would drop too much or train nothing."""
    from jobs.train import data, packing

    if config.objective != "sft":
        return objectives.load_data(config, prep, tokenizer, fmt)
    source = data.choose_source(prep, tokenizer, fmt, base_model=config.base_model, retokenize=config.retokenize)
    load_args: dict[str, Any] = {"source": source, "tokenizer": tokenizer, "fmt": fmt,
                                 "max_seq_length": config.max_seq_length, "train_on": config.train_on}
    train_ex, train_stats = data.load(prep, "train", **load_args)
    eval_ex, eval_stats = data.load(prep, "eval", **load_args)
    dropped = sum(train_stats["dropped"].values())
    if train_ex and dropped > config.max_drop_fraction * train_stats["rows"]:
        reasons = ", ".join(f"{k} {v}" for k, v in sorted(train_stats["dropped"].items()))
        raise InputError(f"train would drop {dropped} of {train_stats['rows']} rows of {prep.uri} "
                         f"({100 * dropped / train_stats['rows']:.1f}% > max_drop_fraction "
                         f"{config.max_drop_fraction:g}): {reasons}. Raise max_seq_length (now "
                         f"{config.max_seq_length}), fix the data, or raise max_drop_fraction.")
    if not train_ex:
        raise InputError(f"The train split of {prep.uri} has no trainable examples "
                         f"({train_stats['rows']} rows; dropped: {train_stats['dropped'] or 'none'}). "
                         "Check max_seq_length and the prepare run.")
    separate = config.packing == "none"
    eval_rows = packing.pack([len(e) for e in eval_ex], config.max_seq_length, separate)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrainData(source=source, train=train_ex, eval=eval_ex, train_stats=train_stats, eval_stats=eval_stats,
                     rows=packing.pack([len(e) for e in train_ex], config.max_seq_length, separate),
                     row_tokens=config.max_seq_length,
                     eval_batches=[eval_rows[i:i + config.batch_size]
                                   for i in range(0, len(eval_rows), config.batch_size)], pad_id=pad_id)


def _schedule(config: Config, train_data: TrainData, world: int,
              saved: checkpoints.TrainState | None = None) -> Schedule:
    """Steps and micro-batches per step: grad_accum x processes on a fresh start, the checkpoint's on a resume."""
    per_step = config.grad_accum * world
    if saved is not None and saved.per_step is not None:
        if saved.per_step != per_step or saved.world != world:
            uneven = (f"; {world} processes share {saved.per_step} micro-batches unevenly"
                      if saved.per_step % world else "")
            LOG.warning("checkpoint step %d was saved by %d process(es) taking %d micro-batches per step; resuming "
                        "on %d process(es) with the same %d micro-batches per step (%s per process, whatever "
                        "grad_accum says), so every step takes the same global batch and the schedule keeps its "
                        "length%s", saved.step, saved.world, saved.per_step, world, saved.per_step,
                        f"{saved.per_step / world:g}", uneven)
        per_step = saved.per_step
    batches_per_epoch = math.ceil(len(train_data.rows) / config.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / per_step))
    total = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(
        (config.warmup_ratio if config.warmup_ratio is not None else 0.03) * total)
    return Schedule(per_step=per_step, steps_per_epoch=steps_per_epoch, total=total, warmup=warmup)


# --------------------------------------------------------------------------- fit


def fit(t: Trainer, stop: StopFlag) -> Fitted:
    """Optimizer steps from the state's step to the total, evaluating and checkpointing on the way.

    SIGTERM: the step in flight finishes, a checkpoint is saved, and Preempted (exit 1) ends the attempt.
    """
    if stop.requested:
        raise Preempted("SIGTERM arrived before training started; nothing to save. Re-run the same command.")
    total, ckpt = t.schedule.total, t.config.checkpoint
    t.peft_model.train()
    progress = Progress("train", total=total - t.state.step, unit="steps")
    last_ckpt = started = time.monotonic()
    stopped_early = False
    while t.state.step < total:
        scalars = t.train_step()
        step = t.state.step
        progress.update(1, step=step, loss=scalars["train/loss"], tok_s=round(scalars["train/tokens_per_s"]))
        eval_loss = None
        if t.config.eval_every and step % t.config.eval_every == 0 and step < total:
            eval_loss = t.timed_eval()
            if eval_loss is not None:
                scalars["eval/loss"] = eval_loss
                LOG.info("step %d eval loss %.4f", step, eval_loss)
        t.tracker.log(scalars, step)
        stopped_early = t.keep_candidate(eval_loss)
        if stopped_early:
            LOG.info("early stopping at step %d: %d evaluations without a new best held-out loss", step,
                     selection.since_best(t.state.eval_losses, t.config.early_stopping.min_delta))  # type: ignore
            break

        stopping = t.all_sum(float(stop.requested))[0] > 0  # any process asked to stop: all stop
        due = (ckpt.every_steps and step % ckpt.every_steps == 0) or (
            ckpt.every_minutes and time.monotonic() - last_ckpt >= 60 * ckpt.every_minutes)
        if step < total and (stopping or due):
            uri = t.save_checkpoint()
            last_ckpt = time.monotonic()
            if stopping:
                progress.close()
                t.tracker.close()
                if not t.main:  # its own line: rank 0's says where the state went
                    raise Preempted(f"rank {t.rank}: stopped with the other processes after step {step}")
                raise Preempted(f"Stopped by SIGTERM after step {step} of {total}; state saved to {uri}. "
                                "Re-run the same command to resume from it.")
    progress.close()
    t.timings["train_s"] = time.monotonic() - started

    eval_loss = t.timed_eval()  # always at the end, when there is an eval split
    if eval_loss is not None:
        t.tracker.log({"eval/loss": eval_loss}, t.state.step)
    t.tracker.close()
    return Fitted(eval_loss=eval_loss, peak_memory=peak_memory(t.cuda, t.accelerator.device),
                  stopped_early=stopped_early)


# --------------------------------------------------------------------------- outputs


def save_outputs(t: Trainer, writer: mf.ArtifactWriter, weights: dict[str, Any] | None = None) -> None:
    """adapter/ (method full: model/), tokenizer/ (with the chat template trained on), loss_curve.json and .png,
    through the writer. `weights`: the trained weights gathered whole (fsdp), else the model's own."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="ftjobs-train-") as tmp:
        local = Path(tmp)
        adapter_step = None
        if strategy.method_of(t.config) == "full":
            strategy.save_full_model(t.peft_model, local / "model", t.compute_dtype, weights)
            writer.add_dir(local / "model", "model")
        else:
            t.peft_model.peft_config["default"].base_model_name_or_path = t.config.base_model
            adapter_step = t.last_candidate()  # with early stopping: the best-loss step's weights go into adapter/
            t.peft_model.save_pretrained(str(local / "adapter"), safe_serialization=True, state_dict=weights)
            (local / "adapter" / "README.md").unlink(missing_ok=True)  # peft's boilerplate model card
            writer.add_dir(local / "adapter", "adapter")
        t.tokenizer.chat_template = t.fmt.template
        t.tokenizer.save_pretrained(str(local / "tokenizer"))
        writer.add_dir(local / "tokenizer", "tokenizer")
        if adapter_step is not None:
            t.candidates = selection.publish(writer, t.config.output, (local / "adapter" / "adapter_config.json")
                                             .read_bytes())
        curve = {"train": t.state.losses, "eval": t.state.eval_losses}
        writer.add_bytes(storage.json_bytes(curve), "loss_curve.json")
        _plot(curve, local / "loss_curve.png", t.config.base_model)
        writer.add_file(local / "loss_curve.png", "loss_curve.png")
    if not t.config.checkpoint.delete_on_success:  # kept: then the manifest names them, and gc keeps them
        for rel, want in checkpoints.complete_files(t.config.output):
            writer.add_shared(rel, rel, want["sha256"], want["bytes"])
    t.timings["save_s"] = time.monotonic() - started


def _outcome(t: Trainer, fitted: Fitted) -> stage.Outcome:
    """What the manifest records beside the artifacts: metrics, stats, the model block, timings."""
    import torch

    config, state, train_data = t.config, t.state, t.data
    metrics = {
        "final_train_loss": state.losses[-1]["loss"],
        "first_train_loss": state.losses[0]["loss"],
        "eval_loss": fitted.eval_loss,
        "eval_loss_series": state.eval_losses,
        "steps": state.step,
        "tokens_trained": state.tokens,
        "target_tokens_trained": state.trained_tokens,
        "effective_tokens_per_s": state.tokens / state.train_seconds if state.train_seconds else None,
        "train_seconds": state.train_seconds,
        "peak_memory_bytes": fitted.peak_memory["bytes"],
        "peak_memory_kind": fitted.peak_memory["kind"],
        "wall_s": t.timings["wall_s"],
    }
    if t.candidates is not None:
        metrics["selection"] = selection.summary(t.candidates, state.eval_losses, state.step,
                                                 config.early_stopping, fitted.stopped_early)
    stats = {
        "train": train_data.train_stats,
        "eval": train_data.eval_stats,
        "data_source": train_data.source,
        "packing": {"mode": config.packing, "attention": config.attention, "rows": len(train_data.rows),
                    "per_example_attention": segments.in_use(t.peft_model),
                    "row_tokens": config.max_seq_length, "density": round(train_data.density, 4),
                    "padding_free": True},
        "steps": {"total": t.schedule.total, "per_epoch": t.schedule.steps_per_epoch, "warmup": t.schedule.warmup,
                  "micro_batches": t.schedule.per_step, "rows_per_micro_batch": config.batch_size},
        "world_size": t.world,
        "resumed_from_step": t.resumed_from,
        "attempts": state.attempts,
        "optimizer": t.optimizer_name,
        "params": {"trainable": t.param_counts[0], "total": t.param_counts[1],
                   "base": models.parameter_count(t.base.path)},
        "device": torch.cuda.get_device_name(t.accelerator.device) if t.cuda else "cpu",
    }
    method = strategy.method_of(config)
    if t.objective is not None:
        t.objective.report(t, metrics, stats)
    model_info = mf.TrainModel(
        base_model=config.base_model, base_revision=t.base.revision, template_hash=t.fmt.hash,
        chat_template=t.fmt.template, tokenizer=chat.tokenizer_identity(t.tokenizer), quantization=t.quant,
        method=method, strategy=config.strategy,
        lora=None if method == "full" else mf.LoraBlock(
            r=config.lora.r, alpha=config.lora.alpha, dropout=config.lora.dropout,
            target_modules=config.lora.target_modules, modules_to_save=config.lora.modules_to_save),
    ).model_dump(mode="json")
    return stage.Outcome(run_id=state.run_id, stats=stats, metrics=metrics, timings=t.timings, model=model_info)


# --------------------------------------------------------------------------- pieces


def _plot(curve: dict[str, Any], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot([p["step"] for p in curve["train"]], [p["loss"] for p in curve["train"]], label="train", lw=1)
    if curve["eval"]:
        ax.plot([p["step"] for p in curve["eval"]], [p["loss"] for p in curve["eval"]], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (per target token)")
    ax.set_title(f"ftjobs train: {title}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


@click.command("train")
@click.option("--input", "input_", metavar="URI", help="The prepare manifest (manifest.json or its prefix).")
@click.option("--base-model", metavar="SRC", help="Hugging Face id, s3:// prefix or local folder.")
@click.option("--output", metavar="URI", help="Output prefix for the adapter, checkpoints and manifest.")
@click.option("--init-adapter", metavar="TRAIN_MANIFEST", help="Start from this train run's adapter (SFT, then DPO).")
@config_options(example="lora.r=32")
def command(input_: str | None, base_model: str | None, output: str | None, init_adapter: str | None,
            config_file: str | None, sets: tuple[str, ...]) -> None:
    """QLoRA-finetune a base model on a prepare manifest's data; resumes from checkpoints after preemption."""
    execute(sys.modules[__name__], config_file, sets, {"input": input_, "base_model": base_model, "output": output,
                                                       "init_adapter": init_adapter})
