"""What train's phases share (`Trainer`: model, optimizer, data, schedule, state) and its step: the SFT
step and eval, gradients summed over processes, candidates and checkpoints. Built by `job.setup`, run by
`job.fit`."""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from common import chat, models, storage
from common import manifest as mf
from jobs.train import checkpoints, fsdp, objectives, selection
from jobs.train.config import Config
from jobs.train.data import TrainData

if TYPE_CHECKING:
    from jobs.train.packing import Example


LOG = logging.getLogger(__name__)
GRAD_BUCKET = 1 << 24  # gradient elements per all-reduce (64 MiB of float32)


@dataclass(frozen=True)
class Schedule:
    """How many optimizer steps, and which micro-batches each one takes."""

    per_step: int          # micro-batches per optimizer step, all processes together (fixed by the first attempt)
    steps_per_epoch: int
    total: int
    warmup: int

    def position(self, step: int) -> tuple[int, int]:
        """(epoch, step within it) of `step`: the data position a checkpoint's step stands for."""
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        return epoch, in_epoch


@dataclass(frozen=True)
class Fitted:
    """What fit leaves for publish besides the training state."""

    eval_loss: float | None
    peak_memory: dict[str, Any]
    stopped_early: bool = False


@dataclass
class Trainer:
    """What the phases share: model and optimizer, data, schedule, the accelerator, and the training state."""

    config: Config
    accelerator: Any
    base: models.ModelRef
    tokenizer: Any
    fmt: chat.ChatFormat
    data: TrainData
    schedule: Schedule
    peft_model: Any        # what forward and backward run on, and what checkpoints and the adapter hold
    params: list[Any]      # the trainable parameters
    param_counts: tuple[int, int]  # (trainable, all)
    optimizer: Any
    optimizer_name: str
    scheduler: Any
    compute_dtype: Any
    quant: dict[str, Any]  # the manifest's quantization block
    identity: str          # config + inputs: whose checkpoints this run may resume from
    attempt: str           # names this attempt's checkpoint folders
    state: checkpoints.TrainState
    resumed_from: int | None
    tracker: Any
    timings: dict[str, float]
    candidates: list[int] | None = None  # the candidate steps save_outputs published (select / early_stopping)
    _epoch_batches: tuple[int, list[Any]] = (-1, [])
    objective: objectives.PreferenceObjective | None = None  # dpo/orpo: its step and eval replace SFT's

    @property
    def rank(self) -> int:
        return int(self.accelerator.process_index)

    @property
    def world(self) -> int:
        return int(self.accelerator.num_processes)

    @property
    def main(self) -> bool:
        return bool(self.accelerator.is_main_process)

    @property
    def sharded(self) -> bool:
        return fsdp.active(self.config, self.world)

    @property
    def cuda(self) -> bool:
        return self.accelerator.device.type == "cuda"

    def autocast(self) -> Any:
        import torch

        if self.cuda and self.compute_dtype != torch.float32:
            return torch.autocast("cuda", dtype=self.compute_dtype)
        return contextlib.nullcontext()

    def batch(self, rows: list[list[int]], examples: list[Example]) -> dict[str, Any]:
        """One micro-batch of packed rows as tensors on this process's device."""
        from jobs.train import packing

        tensors = packing.collate(rows, examples, self.data.pad_id, self.config.packing == "mask")
        return {k: v.to(self.accelerator.device, non_blocking=True) for k, v in tensors.items()}

    def all_sum(self, *values: float) -> list[float]:
        """Sum over processes (the values themselves on one)."""
        if self.world == 1:
            return list(values)
        import torch

        tensor = torch.tensor(values, dtype=torch.float64, device=self.accelerator.device)
        return self.accelerator.reduce(tensor, reduction="sum").tolist()

    def step_batches(self, step: int, rank: int = 0, world: int = 1) -> list[Any]:
        """Process `rank`'s micro-batches of optimizer step `step` (with the defaults: every process's)."""
        from jobs.train import packing

        epoch, in_epoch = self.schedule.position(step)
        if self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, packing.micro_batches(self.data.rows, self.config.batch_size,
                                                                 self.config.seed, epoch))
        return packing.step_share(self._epoch_batches[1], self.schedule.per_step, in_epoch, rank, world)

    def train_step(self) -> dict[str, float]:
        """One optimizer step on this process's share of the step's micro-batches; returns what to log."""
        import torch

        if self.objective is not None:
            return self.objective.train_step(self)
        from jobs.train import packing

        examples = self.data.train
        counts = [packing.count_tokens(b, examples) for b in self.step_batches(self.state.step)]
        step_tokens, step_trained = sum(c[0] for c in counts), sum(c[1] for c in counts)
        started = time.monotonic()
        loss_total = 0.0
        for mb, real in self.my_batches(self.state.step):
            with self.autocast():
                s, _ = packing.loss_sum(self.peft_model, self.batch(mb, examples))
                # Sum over tokens / all tokens of the step, on every process: every trained token weighs the
                # same however the tokens fall into micro-batches and processes, and the gradients' sum over
                # processes is the whole step's gradient. A stand-in batch (fsdp) counts zero.
                (s / step_trained * float(real)).backward()
            loss_total += float(s.detach()) * real
        if not self.sharded:  # FSDP reduce-scatters the gradients itself, summed (jobs/train/fsdp.py)
            self.sum_gradients()
        grad_norm = None
        if self.config.max_grad_norm:
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.config.max_grad_norm)
            grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        (loss_total,) = self.all_sum(loss_total)
        loss, seconds, lr = loss_total / step_trained, time.monotonic() - started, self.scheduler.get_last_lr()[0]
        self.state.advance(loss=loss, lr=lr, tokens=step_tokens, trained_tokens=step_trained, seconds=seconds)
        scalars = {"train/loss": loss, "train/lr": lr,
                   "train/tokens_per_s": step_tokens / seconds if seconds > 0 else 0.0}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        return scalars

    def my_batches(self, step: int) -> list[tuple[Any, bool]]:
        """This process's micro-batches of `step`, each flagged real. Sharded, every process runs as many as
        the busiest one (FSDP's gathers are collectives): the short ones repeat the step's first batch."""
        mine = self.step_batches(step, self.rank, self.world)
        if not self.sharded:
            return [(mb, True) for mb in mine]
        rounds = max(len(self.step_batches(step, r, self.world)) for r in range(self.world))
        return fsdp.stand_in(mine, rounds, self.step_batches(step)[0])

    def sum_gradients(self) -> None:
        """Sum the trainable parameters' gradients over processes, once per optimizer step.

        Not DDP: the loss runs the decoder and the output head directly (`packing.loss_sum`, to keep [B, L, V]
        logits out of memory), which never passes through DDP's forward, so DDP would sync nothing. One
        all-reduce per bucket of adapter gradients instead; a process without a micro-batch in this step (an
        epoch's last step can hold fewer than there are processes) adds zeros. Every process then clips and
        steps the same summed gradient, so the replicas stay equal.
        """
        if self.world == 1:
            return
        import torch
        import torch.distributed as dist

        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        bucket: list[Any] = []
        size = 0
        for i, p in enumerate(self.params):
            bucket.append(p.grad)
            size += p.grad.numel()
            if size >= GRAD_BUCKET or i == len(self.params) - 1:
                flat = torch.cat([g.reshape(-1) for g in bucket])
                dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                at = 0
                for g in bucket:
                    g.copy_(flat[at:at + g.numel()].view_as(g))
                    at += g.numel()
                bucket, size = [], 0

    def broadcast_parameters(self) -> None:
        """Rank 0's trainable weights on every process, before the first step (as DDP does at start)."""
        if self.world == 1 or self.sharded:  # sharded: every process loaded the same weights and seed
            return
        import torch.distributed as dist

        for p in self.params:
            dist.broadcast(p.data, src=0)

    def evaluate(self) -> float | None:
        """Mean eval loss per target token over every process's share of the eval batches (None: no eval split)."""
        import torch

        if self.objective is not None:
            return self.objective.evaluate(self)
        from jobs.train import packing

        if not self.data.eval_batches:
            return None
        self.peft_model.eval()
        loss_sum, count = 0.0, 0
        mine = self.data.eval_batches[self.rank::self.world]
        batches = fsdp.stand_in(mine, -(-len(self.data.eval_batches) // self.world), self.data.eval_batches[0]) \
            if self.sharded else [(b, True) for b in mine]
        with torch.no_grad(), self.autocast():
            for batch, real in batches:
                s, n = packing.loss_sum(self.peft_model, self.batch(batch, self.data.eval))
                if real:
                    loss_sum, count = loss_sum + float(s), count + n
        self.peft_model.train()
        total, tokens = self.all_sum(loss_sum, count)
        return total / max(tokens, 1)

    def timed_eval(self) -> float | None:
        """evaluate, its time added to timings["eval_s"], its loss to the state's eval losses."""
        started = time.monotonic()
        loss = self.evaluate()
        self.timings["eval_s"] = self.timings.get("eval_s", 0.0) + time.monotonic() - started
        if loss is not None and not (self.state.eval_losses and self.state.eval_losses[-1]["step"] == self.state.step):
            self.state.eval_losses.append({"step": self.state.step, "loss": round(loss, 6)})
        return loss

    def keep_candidate(self, eval_loss: float | None) -> bool:
        """After a step: save its adapter as a candidate when select's interval or a new best held-out loss
        (early_stopping) asks for it; True when early stopping says to stop."""
        config, step = self.config, self.state.step
        interval = selection.every(config.select, config.checkpoint.every_steps, config.eval_every)
        best = eval_loss is not None and selection.is_new_best(config.early_stopping, self.state.eval_losses, step)
        if self.main and ((interval and step % interval == 0) or best):
            selection.save(config.output, step, self.peft_model, eval_loss)
            self.prune_candidates()
        return eval_loss is not None and selection.should_stop(config.early_stopping, self.state.eval_losses)

    def prune_candidates(self) -> None:
        stopping = self.config.early_stopping
        top = selection.best(self.state.eval_losses, stopping.min_delta) if stopping else None
        keep = self.config.select.keep if self.config.select else 1  # early stopping alone: the best only
        selection.prune(self.config.output, keep, {top[0]} if top else set())

    def last_candidate(self) -> int | None:
        """Before adapter/ is saved (rank 0): the last step saved as a candidate, then, with early stopping, the
        best-loss step's weights loaded in its place. Returns the step adapter/ holds (None: no selection)."""
        config = self.config
        if config.select is None and config.early_stopping is None:
            return None
        last = self.state.eval_losses[-1]["loss"] if self.state.eval_losses and \
            self.state.eval_losses[-1]["step"] == self.state.step else None
        selection.save(config.output, self.state.step, self.peft_model, last)
        top = selection.best(self.state.eval_losses, config.early_stopping.min_delta) if config.early_stopping \
            else None
        if top is None or top[0] == self.state.step:
            return self.state.step
        selection.load_into(config.output, top[0], self.peft_model)
        LOG.info("early stopping: adapter/ holds step %d (held-out loss %.4f), not the last step %d", top[0],
                 top[1], self.state.step)
        return top[0]

    def superseded(self) -> bool:
        """Whether another attempt of this run published while this one trained (every rank gets rank 0's answer)."""
        published = float(self.main and storage.exists(mf.manifest_uri(self.config.output)))
        return self.all_sum(published)[0] > 0

    def save_checkpoint(self) -> str | None:
        """Rank 0 saves the state as checkpoint `step` and prunes old ones; every process waits for it.

        Raises Superseded, before writing, when another attempt already published this run: pruning could
        otherwise delete checkpoints its manifest names, and the rest of the training would be for nothing.
        """
        if self.superseded():
            raise Superseded
        started = time.monotonic()
        uri = None
        if self.config.strategy == "fsdp":  # every process writes its shards (jobs/train/fsdp.py)
            uri = fsdp.save_checkpoint(self)
        elif self.main:
            uri = checkpoints.write(self.config.output, self.identity, self.peft_model, self.optimizer,
                                    self.scheduler, self.state, self.attempt)
        if self.main:
            removed = checkpoints.prune(self.config.output, self.config.checkpoint.keep)
            LOG.info("checkpoint saved: %s (%.1fs)%s", uri, time.monotonic() - started,
                     f"; removed steps {removed}" if removed else "",
                     extra={"checkpoint": uri, "step": self.state.step})
        self.accelerator.wait_for_everyone()
        return uri


# --------------------------------------------------------------------------- setup


class Superseded(Exception):  # noqa: N818 - a signal inside train, never seen outside it
    """Another attempt of this run published while this one trained."""
