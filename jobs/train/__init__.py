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

One pod, several GPUs (data parallel; only rank 0 writes to the store):

    accelerate launch --num_processes 8 -m jobs.cli train --input ... --base-model ... --output ...

The loop is written out here (torchtune-style) rather than handed to HF
Trainer, so checkpoints hold the exact data position and a resumed run
replays the same batches in the same order. Packed rows of `max_seq_length`
tokens keep every example's own position ids, so no compute goes to padding
and no attention crosses examples (see `jobs/train/packing.py`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Literal

import click
from pydantic import Field, model_validator

from common import manifest as mf
from common import models, storage
from common.chat import TrainOn
from common.config import JobConfig, dump
from common.errors import EXIT_RETRYABLE, ConfigError, InputError, Preempted
from common.logs import Progress
from common.runner import config_options, execute

LOG = logging.getLogger(__name__)
STAGE = "train"


# --------------------------------------------------------------------------- config


class Quantization(JobConfig):
    mode: Literal["nf4", "fp4", "none"] = Field(
        "nf4", description="4-bit base weights (nf4: QLoRA's NormalFloat4; fp4) or none (16/32-bit LoRA).")
    double_quant: bool = Field(True, description="Quantize the quantization constants too (~0.4 bit/param saved).")
    compute_dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto", description="Matmul dtype. auto: bfloat16 on CUDA that supports it, float16 on older CUDA, "
                            "float32 on CPU.")


class Lora(JobConfig):
    r: int = Field(16, ge=1, le=1024, description="LoRA rank: higher = more capacity, more memory.")
    alpha: float = Field(32, gt=0, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: str | list[str] = Field(
        "all-linear", description="Modules that get adapters: 'all-linear' (every linear layer but the "
                                  "output head) or a list of module names, e.g. [q_proj, v_proj].")
    modules_to_save: list[str] = Field(
        default_factory=list, description="Modules trained in full and saved with the adapter, e.g. [lm_head].")

    @model_validator(mode="after")
    def _targets(self) -> Lora:
        if isinstance(self.target_modules, str) and self.target_modules != "all-linear":
            raise ValueError(f"target_modules: expected 'all-linear' or a list of module names, "
                             f"got {self.target_modules!r}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ValueError("target_modules: an empty list trains nothing; use 'all-linear' or name modules")
        return self


class Checkpointing(JobConfig):
    every_steps: int | None = Field(200, ge=1, description="Checkpoint every N optimizer steps (null: never).")
    every_minutes: float | None = Field(
        30, gt=0, description="Also checkpoint when this many minutes passed since the last one (null: never).")
    keep: int = Field(2, ge=1, description="Keep the newest K complete checkpoints; older ones are deleted.")
    grace_seconds: float = Field(
        120, gt=0, description="After SIGTERM: finish the step, checkpoint, and exit 1 within this many "
                               "seconds (hard exit when it runs out). Keep it below the pod's "
                               "terminationGracePeriodSeconds.")
    delete_on_success: bool = Field(True, description="Delete the checkpoints once the manifest is published.")


class Config(JobConfig):
    input: str = Field(description="The prepare manifest (URI of manifest.json or its prefix).")
    base_model: str = Field(description="Hugging Face id, s3:// prefix or local folder of the base model.")
    output: str = Field(description="Output prefix (s3://bucket/... or a local folder).")
    base_revision: str | None = Field(None, description="Hub revision (branch, tag or commit) of the base model.")
    trust_remote_code: bool = Field(False, description="Allow a model's custom Python code (off: safer).")
    cache_dir: str | None = Field(None, description="Where models are downloaded (default ~/.cache/ftjobs).")
    chat_template: str | None = Field(
        None, description="Override the tokenizer's chat template: 'chatml' or the Jinja text. Must match "
                          "what prepare used when the data is pre-tokenized.")
    retokenize: bool = Field(
        False, description="When the prepare run was tokenized for another tokenizer or template, tokenize "
                           "its messages here instead of refusing.")
    train_on: TrainOn = Field("assistant", description="Tokens with a loss when tokenizing here: assistant, "
                                                        "last_assistant or all.")
    quantization: Quantization = Field(default_factory=Quantization, description="Base weight quantization.")
    lora: Lora = Field(default_factory=Lora, description="LoRA adapter settings.")
    max_seq_length: int = Field(2048, ge=16, description="Tokens per packed row; longer examples are dropped "
                                                          "(pre-tokenized) or truncated at a turn boundary.")
    max_drop_fraction: float = Field(0.1, ge=0.0, le=1.0, description="Fail (exit 3) when more than this "
                                     "fraction of the train split is dropped (too long for max_seq_length, no "
                                     "trainable tokens): a mistyped max_seq_length should not quietly train on "
                                     "half the data. 1.0 turns the check off.")
    batch_size: int = Field(4, ge=1, description="Packed rows per micro-batch per device.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    learning_rate: float = Field(2e-4, gt=0, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    warmup_ratio: float | None = Field(None, ge=0, lt=1, description="Warmup as a fraction of steps "
                                                                     "(default 0.03 when warmup_steps is unset).")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup in steps (instead of warmup_ratio).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Gradient clipping norm (null: no clipping).")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (ignored when max_steps is set).")
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps in total (overrides epochs).")
    seed: int = Field(42, description="Seed for LoRA init, dropout and data order.")
    gradient_checkpointing: bool = Field(True, description="Recompute activations in backward: far less "
                                                           "memory for ~30% more compute.")
    optimizer: Literal["auto", "adamw_torch", "adamw_8bit", "paged_adamw_8bit"] = Field(
        "auto", description="auto: paged_adamw_8bit (bitsandbytes) on CUDA, adamw_torch on CPU.")
    attention: Literal["sdpa", "eager", "flash_attention_2"] = Field(
        "sdpa", description="Attention implementation the model is loaded with.")
    packing: Literal["position_ids", "mask"] = Field(
        "position_ids", description="How packed examples are kept apart: position_ids (transformers builds "
                                    "the block mask; flash-attention runs varlen) or mask (an explicit 4D mask).")
    eval_every: int | None = Field(None, ge=1, description="Eval loss every N steps (and always at the end "
                                                           "when the data has an eval split).")
    checkpoint: Checkpointing = Field(default_factory=Checkpointing, description="Checkpoints and preemption.")
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="Tracking tool, configured by its own environment variables.")
    run_name: str | None = Field(None, description="Name shown in the tracking tool (default: the run id).")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("set warmup_ratio or warmup_steps, not both")
        if self.packing == "mask" and self.attention == "flash_attention_2":
            raise ValueError("packing: mask needs attention sdpa or eager; flash_attention_2 packs through "
                             "position_ids (set packing: position_ids)")
        return self


# --------------------------------------------------------------------------- the job


def run(config: Config) -> mf.Loaded:
    started = time.monotonic()
    timings: dict[str, float] = {}
    prep = mf.load(config.input, verify="size", expect_stage="prepare")
    inputs = [prep.ref("data")]
    resolved = dump(config)
    done = mf.check_output(config.output, stage=STAGE, config=resolved, inputs=inputs)
    if done is not None:
        LOG.info("already done: %s", done.uri)
        return done
    identity = mf.run_identity(mf.config_hash(resolved), inputs)

    stop = _install_sigterm(config.checkpoint.grace_seconds)
    try:
        return _train(config, prep, inputs, resolved, identity, stop, started, timings)
    finally:
        stop.restore()


def _train(config: Config, prep: mf.Loaded, inputs: list[mf.InputRef], resolved: dict[str, Any], identity: str,
           stop: _StopFlag, started: float, timings: dict[str, float]) -> mf.Loaded:
    import torch
    from accelerate import Accelerator
    from transformers import AutoTokenizer

    from common import chat
    from jobs.train import checkpoints, data, packing
    from jobs.train.tracking import Tracker

    cuda = torch.cuda.is_available()
    accelerator = Accelerator(cpu=not cuda)
    rank, world, main = accelerator.process_index, accelerator.num_processes, accelerator.is_main_process
    device = accelerator.device
    torch.manual_seed(config.seed)
    random.seed(config.seed)

    # ---- base model source and tokenizer
    t = time.monotonic()
    with accelerator.main_process_first():
        ref = models.resolve(config.base_model, revision=config.base_revision, cache_dir=config.cache_dir)
    models.check_trust_remote_code(ref.path, config.trust_remote_code)
    if models.is_quantized(ref.path):
        raise ConfigError(f"{config.base_model} is already quantized ({models.is_quantized(ref.path)}); train "
                          "from the 16-bit base model")
    tokenizer = AutoTokenizer.from_pretrained(str(ref.path), trust_remote_code=config.trust_remote_code)
    fmt = chat.chat_format(tokenizer, config.chat_template)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    # ---- data: verified shards -> examples -> packed rows
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
    rows = packing.pack([len(e) for e in train_ex], config.max_seq_length)
    eval_rows = packing.pack([len(e) for e in eval_ex], config.max_seq_length)
    eval_batches = [eval_rows[i:i + config.batch_size] for i in range(0, len(eval_rows), config.batch_size)]
    per_step = config.grad_accum * world
    batches_per_epoch = math.ceil(len(rows) / config.batch_size)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / per_step))
    total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
    warmup = config.warmup_steps if config.warmup_steps is not None else round(
        (config.warmup_ratio if config.warmup_ratio is not None else 0.03) * total_steps)
    packed_tokens = sum(len(e) for e in train_ex)
    density = packed_tokens / (len(rows) * config.max_seq_length)
    LOG.info("data: %d train examples (%s) in %d packed rows of %d tokens (%.1f%% full), %d eval examples; "
             "%d steps (%d per epoch)", len(train_ex), source, len(rows), config.max_seq_length, 100 * density,
             len(eval_ex), total_steps, steps_per_epoch)
    timings["load_data_s"] = time.monotonic() - t

    # ---- model: 4-bit base + LoRA
    t = time.monotonic()
    model, compute_dtype, quant = _load_model(config, ref.path, device, cuda)
    trainable, total_params = _count_params(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer, optimizer_name = _optimizer(config, params, cuda)
    from transformers import get_scheduler

    scheduler = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=warmup,
                              num_training_steps=total_steps)
    unwrapped = model
    if world > 1:
        model = accelerator.prepare_model(model, device_placement=False)
    timings["load_model_s"] = time.monotonic() - t

    # ---- resume from the newest complete, verified checkpoint of this run
    state: dict[str, Any] = {"step": 0, "tokens": 0, "trained_tokens": 0, "train_seconds": 0.0,
                             "loss": [], "eval": [], "attempts": 0}
    resumed_from = None
    with tempfile.TemporaryDirectory(prefix="ftjobs-ckpt-") as tmp:
        ckpt = checkpoints.latest(config.output, Path(tmp), identity)
        if ckpt is not None:
            state = _restore(ckpt.local, unwrapped, optimizer, scheduler, rank, config.seed)
            resumed_from = ckpt.step
            LOG.info("resuming from %s (step %d of %d)", ckpt.uri, ckpt.step, total_steps)
    state["attempts"] += 1
    run_id = os.environ.get("FTJOBS_RUN_ID") or state.get("run_id") or mf.new_run_id()
    state["run_id"] = run_id

    tracker = Tracker(config.report_to, config.run_name or run_id, resolved, enabled=main)
    autocast = (torch.autocast("cuda", dtype=compute_dtype) if cuda and compute_dtype != torch.float32
                else contextlib.nullcontext())
    with_mask = config.packing == "mask"

    def to_device(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(device, non_blocking=True) for k, v in batch.items()}

    def all_sum(*values: float) -> list[float]:
        if world == 1:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        return accelerator.reduce(tensor, reduction="sum").tolist()

    def evaluate() -> float | None:
        if not eval_batches:
            return None
        model.eval()
        loss_sum, count = 0.0, 0
        with torch.no_grad(), autocast:
            for i in range(rank, len(eval_batches), world):
                s, n = packing.loss_sum(model, to_device(packing.collate(eval_batches[i], eval_ex, pad_id,
                                                                         with_mask)))
                loss_sum, count = loss_sum + float(s), count + n
        model.train()
        loss_sum, count = all_sum(loss_sum, count)
        return loss_sum / max(count, 1)

    def save_checkpoint(step: int) -> str | None:
        t_save = time.monotonic()
        uri = None
        if main:
            with tempfile.TemporaryDirectory(prefix="ftjobs-ckpt-") as local:
                _snapshot(Path(local), unwrapped, optimizer, scheduler, state)
                uri = checkpoints.save(config.output, step, Path(local), identity)
            removed = checkpoints.prune(config.output, config.checkpoint.keep)
            LOG.info("checkpoint saved: %s (%.1fs)%s", uri, time.monotonic() - t_save,
                     f"; removed steps {removed}" if removed else "", extra={"checkpoint": uri, "step": step})
        accelerator.wait_for_everyone()
        return uri

    # ---- the loop
    if stop.requested:
        raise Preempted("SIGTERM arrived before training started; nothing to save. Re-run the same command.")
    step = state["step"]
    model.train()
    progress = Progress("train", total=total_steps - step, unit="steps")
    last_ckpt = time.monotonic()
    epoch_cached, batches = -1, []
    t_train = time.monotonic()
    while step < total_steps:
        epoch, in_epoch = divmod(step, steps_per_epoch)
        if epoch != epoch_cached:
            batches, epoch_cached = packing.micro_batches(rows, config.batch_size, config.seed, epoch), epoch
        first = in_epoch * per_step
        everyone = [batches[(first + j) % len(batches)] for j in range(per_step)]
        mine = everyone[rank::world]
        step_tokens = sum(packing.count_tokens(b, train_ex)[0] for b in everyone)
        step_trained = sum(packing.count_tokens(b, train_ex)[1] for b in everyone)
        t_step = time.monotonic()
        loss_total = 0.0
        for k, mb in enumerate(mine):
            sync = world == 1 or k == len(mine) - 1
            with (contextlib.nullcontext() if sync else accelerator.no_sync(model)), autocast:
                s, _ = packing.loss_sum(model, to_device(packing.collate(mb, train_ex, pad_id, with_mask)))
                # Sum over tokens / all tokens of the step: every trained token weighs the same, however the
                # tokens fall into micro-batches and ranks (DDP averages gradients, hence * world).
                (s * (world / step_trained)).backward()
            loss_total += float(s.detach())
        grad_norm = None
        if config.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        (loss_total,) = all_sum(loss_total)
        loss = loss_total / step_trained
        seconds = time.monotonic() - t_step
        state["train_seconds"] += seconds
        state["tokens"] += step_tokens
        state["trained_tokens"] += step_trained
        state["step"] = step
        lr = scheduler.get_last_lr()[0]
        state["loss"].append({"step": step, "loss": round(loss, 6), "lr": lr, "tokens": state["tokens"]})
        tok_s = step_tokens / seconds if seconds > 0 else 0.0
        progress.update(1, step=step, loss=loss, tok_s=round(tok_s))
        scalars = {"train/loss": loss, "train/lr": lr, "train/tokens_per_s": tok_s}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        if config.eval_every and step % config.eval_every == 0 and step < total_steps:
            t_eval = time.monotonic()
            eval_loss = evaluate()
            timings["eval_s"] = timings.get("eval_s", 0.0) + time.monotonic() - t_eval
            if eval_loss is not None:
                state["eval"].append({"step": step, "loss": round(eval_loss, 6)})
                scalars["eval/loss"] = eval_loss
                LOG.info("step %d eval loss %.4f", step, eval_loss)
        tracker.log(scalars, step)

        stopping = stop.requested
        if world > 1:
            stopping = all_sum(float(stopping))[0] > 0
        due = (config.checkpoint.every_steps and step % config.checkpoint.every_steps == 0) or (
            config.checkpoint.every_minutes and time.monotonic() - last_ckpt >= 60 * config.checkpoint.every_minutes)
        if step < total_steps and (stopping or due):
            uri = save_checkpoint(step)
            last_ckpt = time.monotonic()
            if stopping:
                progress.close()
                tracker.close()
                raise Preempted(f"Stopped by SIGTERM after step {step} of {total_steps}; state saved to {uri}. "
                                "Re-run the same command to resume from it.")
    progress.close()
    timings["train_s"] = time.monotonic() - t_train

    t_eval = time.monotonic()
    final_eval = evaluate()
    if final_eval is not None and (not state["eval"] or state["eval"][-1]["step"] != step):
        state["eval"].append({"step": step, "loss": round(final_eval, 6)})
        tracker.log({"eval/loss": final_eval}, step)
    timings["eval_s"] = timings.get("eval_s", 0.0) + time.monotonic() - t_eval
    tracker.close()
    peak = _peak_memory(cuda, device)

    # ---- outputs (rank 0 only), manifest last
    out_uri = mf.manifest_uri(config.output)
    if main:
        t = time.monotonic()
        writer = mf.ArtifactWriter(config.output)
        with tempfile.TemporaryDirectory(prefix="ftjobs-train-") as tmp:
            local = Path(tmp)
            unwrapped.peft_config["default"].base_model_name_or_path = config.base_model
            unwrapped.save_pretrained(str(local / "adapter"), safe_serialization=True)
            (local / "adapter" / "README.md").unlink(missing_ok=True)  # peft's boilerplate model card
            tokenizer.chat_template = fmt.template
            tokenizer.save_pretrained(str(local / "tokenizer"))
            writer.add_dir(local / "adapter", "adapter")
            writer.add_dir(local / "tokenizer", "tokenizer")
            curve = {"train": state["loss"], "eval": state["eval"]}
            writer.add_bytes(storage.json_bytes(curve), "loss_curve.json")
            _plot(curve, local / "loss_curve.png", config.base_model)
            writer.add_file(local / "loss_curve.png", "loss_curve.png")
        timings["save_s"] = time.monotonic() - t
        timings["wall_s"] = time.monotonic() - started
        train_seconds = state["train_seconds"]
        metrics = {
            "final_train_loss": state["loss"][-1]["loss"],
            "first_train_loss": state["loss"][0]["loss"],
            "eval_loss": final_eval,
            "eval_loss_series": state["eval"],
            "steps": step,
            "tokens_trained": state["tokens"],
            "target_tokens_trained": state["trained_tokens"],
            "effective_tokens_per_s": state["tokens"] / train_seconds if train_seconds else None,
            "train_seconds": train_seconds,
            "peak_memory_bytes": peak["bytes"],
            "peak_memory_kind": peak["kind"],
            "wall_s": timings["wall_s"],
        }
        stats = {
            "train": train_stats,
            "eval": eval_stats,
            "data_source": source,
            "packing": {"mode": config.packing, "attention": config.attention, "rows": len(rows),
                        "row_tokens": config.max_seq_length, "density": round(density, 4),
                        "padding_free": True},
            "steps": {"total": total_steps, "per_epoch": steps_per_epoch, "warmup": warmup},
            "world_size": world,
            "resumed_from_step": resumed_from,
            "attempts": state["attempts"],
            "optimizer": optimizer_name,
            "params": {"trainable": trainable, "total": total_params},
            "device": torch.cuda.get_device_name(device) if cuda else "cpu",
        }
        model_info = {
            "base_model": config.base_model,
            "base_revision": ref.revision,
            "template_hash": fmt.hash,
            "chat_template": fmt.template,
            "tokenizer": chat.tokenizer_identity(tokenizer),
            "quantization": quant,
            "lora": {"r": config.lora.r, "alpha": config.lora.alpha, "dropout": config.lora.dropout,
                     "target_modules": config.lora.target_modules, "modules_to_save": config.lora.modules_to_save},
        }
        manifest = mf.build(stage=STAGE, run_id=run_id, config=resolved, inputs=inputs, artifacts=writer.artifacts,
                            stats=stats, metrics=metrics, timings=timings, model=model_info)
        out_uri = mf.publish(config.output, manifest)
        if config.checkpoint.delete_on_success:
            storage.delete_prefix(checkpoints.root(config.output))
        LOG.info("trained %d steps: loss %.4f -> %.4f, %s tokens/s", step, metrics["first_train_loss"],
                 metrics["final_train_loss"], f"{metrics['effective_tokens_per_s'] or 0:,.0f}")
    accelerator.wait_for_everyone()
    return mf.load(out_uri, verify="none")


# --------------------------------------------------------------------------- pieces


def _load_model(config: Config, path: Path, device: Any, cuda: bool) -> tuple[Any, Any, dict[str, Any]]:
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    q = config.quantization
    if q.compute_dtype != "auto":
        dtype = getattr(torch, q.compute_dtype)
    elif cuda:
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        dtype = torch.float32
    kwargs: dict[str, Any] = {"dtype": dtype, "attn_implementation": config.attention,
                              "trust_remote_code": config.trust_remote_code,
                              "device_map": {"": device.index if cuda else "cpu"}}
    quant: dict[str, Any] = {"mode": q.mode, "compute_dtype": str(dtype).removeprefix("torch.")}
    if q.mode != "none":
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type=q.mode, bnb_4bit_use_double_quant=q.double_quant,
            bnb_4bit_compute_dtype=dtype)
        quant.update({"method": "bitsandbytes", "bits": 4, "double_quant": q.double_quant})
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), **kwargs)
    except (OSError, ValueError) as exc:
        raise InputError(f"Could not load base model {config.base_model}: {exc}") from None
    if q.mode != "none" and not cuda:
        # bitsandbytes 0.50 on CPUs with AVX512-BF16: the first forward in eval mode (our eval loss) repacks
        # the 4-bit weights for an inference kernel that has no autograd, and they stay repacked, so later
        # training steps silently lose the gradient through every base layer. Keep the trainable layout.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    gc_kwargs = {"use_reentrant": False}
    if q.mode != "none":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=config.gradient_checkpointing,
                                                gradient_checkpointing_kwargs=gc_kwargs)
    elif config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gc_kwargs)
        model.enable_input_require_grads()
    model.config.use_cache = False
    lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                      target_modules=config.lora.target_modules, modules_to_save=config.lora.modules_to_save or None,
                      bias="none", task_type="CAUSAL_LM")
    try:
        model = get_peft_model(model, lora)
    except ValueError as exc:
        raise ConfigError(f"LoRA settings do not fit {config.base_model}: {exc}") from None
    return model, dtype, quant


def _count_params(model: Any) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


def _optimizer(config: Config, params: list[Any], cuda: bool) -> tuple[Any, str]:
    import torch

    name = config.optimizer
    if name == "auto":
        name = "paged_adamw_8bit" if cuda else "adamw_torch"
    if name == "adamw_torch":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay), name
    if not cuda:
        raise ConfigError(f"optimizer {name} needs CUDA (bitsandbytes' 8-bit optimizers); use adamw_torch on CPU")
    import bitsandbytes as bnb

    cls = bnb.optim.PagedAdamW8bit if name == "paged_adamw_8bit" else bnb.optim.AdamW8bit
    return cls(params, lr=config.learning_rate, weight_decay=config.weight_decay), name


def _snapshot(local: Path, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]) -> None:
    """Everything a resume needs, as files: adapter (safetensors), optimizer, scheduler, RNG, state.json."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    weights = {k: v.detach().to("cpu").contiguous() for k, v in get_peft_model_state_dict(model).items()}
    save_file(weights, str(local / "adapter_model.safetensors"))
    torch.save(optimizer.state_dict(), local / "optimizer.pt")
    torch.save(scheduler.state_dict(), local / "scheduler.pt")
    rng: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    torch.save(rng, local / "rng.pt")
    py_state = random.getstate()
    (local / "state.json").write_text(json.dumps({**state, "python_rng": [py_state[0], list(py_state[1]),
                                                                          py_state[2]]}))


def _restore(local: Path, model: Any, optimizer: Any, scheduler: Any, rank: int, seed: int) -> dict[str, Any]:
    """Load a verified checkpoint (checksums were checked before any of these files is read)."""
    import torch
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    set_peft_model_state_dict(model, load_file(str(local / "adapter_model.safetensors")))
    optimizer.load_state_dict(torch.load(local / "optimizer.pt", weights_only=True, map_location="cpu"))
    scheduler.load_state_dict(torch.load(local / "scheduler.pt", weights_only=True))
    state = json.loads((local / "state.json").read_text())
    rng = torch.load(local / "rng.pt", weights_only=True)
    if rank == 0:
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(rng["cuda"])
        version, internal, gauss = state.pop("python_rng")
        random.setstate((version, tuple(internal), gauss))
    else:  # other ranks' dropout streams are not saved: reseed them deterministically from the step
        state.pop("python_rng", None)
        torch.manual_seed(seed + 7919 * rank + state["step"])
        random.seed(seed + 7919 * rank + state["step"])
    return state


def _peak_memory(cuda: bool, device: Any) -> dict[str, Any]:
    if cuda:
        import torch

        return {"bytes": int(torch.cuda.max_memory_allocated(device)), "kind": "cuda_max_allocated"}
    import resource

    return {"bytes": int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024, "kind": "cpu_max_rss"}


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


class _StopFlag:
    """SIGTERM: ask the loop to stop after the current step; hard-exit if the grace period runs out."""

    def __init__(self, grace_seconds: float):
        self.grace_seconds = grace_seconds
        self.requested = False
        self._previous: Any = None
        self._timer: threading.Timer | None = None

    def handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            return
        self.requested = True
        LOG.warning("SIGTERM: finishing the current step, then checkpointing (grace %.0fs)", self.grace_seconds)
        self._timer = threading.Timer(self.grace_seconds, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def _expire(self) -> None:
        LOG.error("grace period of %.0fs ran out before the checkpoint finished; exiting (the last complete "
                  "checkpoint will be used)", self.grace_seconds)
        logging.shutdown()
        os._exit(EXIT_RETRYABLE)

    def restore(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _install_sigterm(grace_seconds: float) -> _StopFlag:
    flag = _StopFlag(grace_seconds)
    if threading.current_thread() is threading.main_thread():
        flag._previous = signal.signal(signal.SIGTERM, flag.handle)
    return flag


# --------------------------------------------------------------------------- CLI


@click.command("train")
@click.option("--input", "input_", metavar="URI", help="The prepare manifest (manifest.json or its prefix).")
@click.option("--base-model", metavar="SRC", help="Hugging Face id, s3:// prefix or local folder.")
@click.option("--output", metavar="URI", help="Output prefix for the adapter, checkpoints and manifest.")
@config_options(example="lora.r=32")
def command(input_: str | None, base_model: str | None, output: str | None, config_file: str | None,
            sets: tuple[str, ...]) -> None:
    """QLoRA-finetune a base model on a prepare manifest's data; resumes from checkpoints after preemption."""
    execute(sys.modules[__name__], config_file, sets, {"input": input_, "base_model": base_model, "output": output})
