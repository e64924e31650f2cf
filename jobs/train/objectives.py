"""Preference objectives in the train stage: DPO (sigmoid, IPO, hinge; label smoothing) and ORPO, as 4-bit
LoRA on the same loop, checkpoints and manifest as SFT.

    ftjobs train --input s3://ml/runs/r1/prepare-pairs/manifest.json --base-model Qwen/Qwen2.5-0.5B-Instruct \\
        --output s3://ml/runs/r1/dpo --set objective=dpo --set preference.beta=0.1 \\
        --set init_adapter=s3://ml/runs/r1/train/manifest.json

Data: a preference prepare run (`common.preference`). Each pair is two examples, prompt + chosen and
prompt + rejected, with SFT's loss masks; a packed row holds whole pairs (both sequences, each with its own
position ids, so neither attends to the other: `packing.collate`), so a micro-batch always holds both answers
of each of its pairs. `max_seq_length` bounds each sequence; a packed row holds up to twice that.

Reference policy (DPO): the policy before its first step. Without `init_adapter` that is the 4-bit base with
the adapter disabled (peft's `disable_adapter()`; one model in memory); with `init_adapter` (a train manifest)
the policy starts from that adapter and the same adapter, frozen, is the reference. The reference's
log-probabilities of every train and eval sequence are computed once, before the first step, and kept in
the training state (`TrainState.extra`), so checkpoints carry them and a resume does not recompute them
(nor see them move by a rounding). ORPO needs no reference.

Losses, per pair, with s = the summed log-probability of an answer's trained tokens (a = its mean per token):
- dpo/sigmoid: h = beta * ((s_c - ref_c) - (s_r - ref_r)); -(1 - ls) log sigmoid(h) - ls log sigmoid(-h)
- dpo/hinge:   relu(1 - h)
- dpo/ipo:     ((a_c - ref_a_c) - (a_r - ref_a_r) - 1 / (2 beta))^2   (IPO uses per-token means)
- orpo:        -a_c - beta * log sigmoid(log odds(a_c) - log odds(a_r)), odds(a) = e^a / (1 - e^a)
- dpo with preference.sft_weight w (RPO): the DPO loss above - w * a_c
Rewards (what the reward accuracy and margins report): DPO beta * (s - ref), ORPO beta * a. The step's loss is
the mean over its pairs.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

from pydantic import Field, model_validator

from common import manifest as mf
from common import preference as P
from common.config import JobConfig
from common.errors import ConfigError, InputError

if TYPE_CHECKING:
    import torch

    from jobs.train.data import TrainData

LOG = logging.getLogger(__name__)
Objective = Literal["sft", "dpo", "orpo"]


class Trainer(Protocol):
    """What a preference objective uses of train's Trainer (jobs/train/trainer.py), which calls it: declared here
    so that this module does not import the trainer that imports it."""

    config: Any
    data: TrainData
    state: Any
    peft_model: Any
    optimizer: Any
    scheduler: Any
    params: list[Any]
    timings: dict[str, float]

    @property
    def rank(self) -> int: ...
    @property
    def world(self) -> int: ...
    def autocast(self) -> Any: ...
    def batch(self, rows: list[list[int]], examples: list[Any]) -> dict[str, Any]: ...
    def step_batches(self, step: int, rank: int = 0, world: int = 1) -> list[Any]: ...
    def all_sum(self, *values: float) -> list[float]: ...
    def sum_gradients(self) -> None: ...
PREFERENCE_OBJECTIVES = ("dpo", "orpo")


class Preference(JobConfig):
    """Settings of the preference objectives (train.objective: dpo or orpo)."""

    beta: float = Field(0.1, gt=0, description="DPO: strength of the KL pull to the reference (higher: stay "
                        "closer). ORPO: the weight lambda of the odds-ratio term beside the SFT loss.")
    loss: Literal["sigmoid", "ipo", "hinge"] = Field("sigmoid", description="DPO loss: sigmoid (the DPO paper), "
                                                     "ipo (squared, on per-token means) or hinge (SLiC).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="DPO sigmoid: the assumed share of pairs whose "
                                   "labels are flipped (conservative DPO); 0 for none.")
    sft_weight: float = Field(0.0, ge=0, description="DPO: weight of an SFT term, the chosen answer's mean "
                              "negative log-likelihood per token, added to each pair's loss (RPO; TRL's rpo_alpha; "
                              "1.0 in the RPO paper). DPO alone can lower the chosen answer's likelihood too when "
                              "the two answers share most tokens; this keeps it up. 0: plain DPO. ORPO has its "
                              "own SFT term.")

    @model_validator(mode="after")
    def _smoothing(self) -> Preference:
        if self.label_smoothing and self.loss != "sigmoid":
            raise ValueError(f"label_smoothing applies to loss sigmoid only, got loss {self.loss}; set "
                             "preference.label_smoothing=0 or preference.loss=sigmoid")
        return self


def check_config(config: Any) -> None:
    """Cross-field rules of the train config that concern the objective."""
    if config.objective == "orpo" and config.preference.sft_weight:
        raise ValueError("preference.sft_weight adds an SFT term to DPO; ORPO has its own (weighted against the "
                         "odds-ratio term by beta). Remove preference.sft_weight or set objective: dpo")
    if config.objective == "orpo" and config.preference.loss != "sigmoid":
        raise ValueError(f"preference.loss {config.preference.loss} is a DPO loss; ORPO has its own (odds ratio "
                         "+ SFT). Remove preference.loss or set objective: dpo")
    if config.objective in PREFERENCE_OBJECTIVES and config.packing == "none":
        raise ValueError(f"objective {config.objective} packs a pair's two answers into one row (each with its own "
                         "position ids), so packing: none is not supported. Models with recurrent or "
                         "linear-attention layers (which need packing: none) train with objective: sft only.")


def extra_inputs(config: Any) -> list[mf.InputRef]:
    """The init adapter's train manifest, as an input of the run's identity."""
    if not config.init_adapter:
        return []
    return [mf.load(config.init_adapter, verify="size", expect_stage="train").ref("init_adapter")]


def check_data(config: Any, prep: mf.Loaded) -> None:
    """Preference data needs a preference objective and the other way round."""
    pairs = P.is_preference_run(prep)
    if pairs and config.objective == "sft":
        raise ConfigError(f"{prep.uri} holds preference pairs; set objective: dpo or orpo to train on them "
                          "(objective: sft trains on supervised rows)")
    if not pairs and config.objective != "sft":
        raise InputError(f"objective {config.objective} trains on preference pairs, but {prep.uri} holds supervised "
                         "rows. Prepare a preference file (docs/preference.md) or set objective: sft")


# --------------------------------------------------------------------------- data


def load_data(config: Any, prep: mf.Loaded, tokenizer: Any, fmt: Any) -> TrainData:
    """The pairs as examples 2k (prompt + chosen) and 2k+1 (prompt + rejected), packed whole pairs per row."""
    from jobs.train import data as train_data
    from jobs.train.data import TrainData

    source = train_data.choose_source(prep, tokenizer, fmt, base_model=config.base_model,
                                      retokenize=config.retokenize)
    splits = {s: _examples(prep, s, source, tokenizer, fmt, config.max_seq_length) for s in ("train", "eval")}
    train_ex, train_stats = splits["train"]
    eval_ex, eval_stats = splits["eval"]
    dropped = sum(train_stats["dropped"].values())
    if train_ex and dropped > config.max_drop_fraction * train_stats["rows"]:
        raise InputError(f"train would drop {dropped} of {train_stats['rows']} pairs of {prep.uri} "
                         f"({train_stats['dropped']}); raise max_seq_length (now {config.max_seq_length}, per "
                         "sequence) or max_drop_fraction")
    if not train_ex:
        raise InputError(f"The train split of {prep.uri} has no usable pairs ({train_stats}).")
    row_tokens = 2 * config.max_seq_length
    rows = _pair_rows(train_ex, row_tokens)
    eval_rows = _pair_rows(eval_ex, row_tokens)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return TrainData(source=source, train=train_ex, eval=eval_ex, train_stats=train_stats, eval_stats=eval_stats,
                     rows=rows, row_tokens=row_tokens,
                     eval_batches=[eval_rows[i:i + config.batch_size]
                                   for i in range(0, len(eval_rows), config.batch_size)], pad_id=pad_id)


def _pair_rows(examples: list[Any], row_tokens: int) -> list[list[int]]:
    from jobs.train import packing

    pair_rows = packing.pack([len(examples[2 * k]) + len(examples[2 * k + 1]) for k in range(len(examples) // 2)],
                             row_tokens)
    return [[i for k in row for i in (2 * k, 2 * k + 1)] for row in pair_rows]


def _examples(prep: mf.Loaded, split: str, source: str, tokenizer: Any, fmt: Any, max_seq_length: int
              ) -> tuple[list[Any], dict[str, Any]]:
    from collections import Counter

    from common import data
    from jobs.train.packing import example

    columns = ["prompt", "chosen", "rejected", "tools"]
    if source == "pretokenized":
        columns += ["prompt_ids", "chosen_ids", "chosen_labels", "rejected_ids", "rejected_labels"]
    table = data.read_split(prep, split, columns=columns).to_pylist()
    if source != "pretokenized":
        from common import chat

        enc = P.encode_pairs(tokenizer, fmt, [(chat.clean(r["prompt"]), chat.clean(r["chosen"]),
                                               chat.clean(r["rejected"]), data.tools_of(r["tools"]))
                                              for r in table], max_length=None)
        for r, e in zip(table, enc, strict=True):
            r.update(prompt_ids=e.prompt_ids, chosen_ids=e.chosen_ids, chosen_labels=e.chosen_labels,
                     rejected_ids=e.rejected_ids, rejected_labels=e.rejected_labels, drop=e.drop_reason)
    dropped: Counter[str] = Counter()
    out: list[Any] = []
    for r in table:
        if r.get("drop"):
            dropped[r["drop"]] += 1
            continue
        p = list(r["prompt_ids"])
        pair = [example(p + list(r[f"{s}_ids"]), [P.IGNORE_INDEX] * len(p) + list(r[f"{s}_labels"]))
                for s in ("chosen", "rejected")]
        if any(len(e) > max_seq_length for e in pair):
            dropped["too_long_tokens"] += 1
            continue
        if any(e.trainable == 0 for e in pair):
            dropped["zero_trainable_tokens"] += 1
            continue
        out += pair
    return out, {"rows": len(table), "pairs": len(out) // 2, "dropped": dict(dropped)}


# --------------------------------------------------------------------------- the objective in the loop


@dataclass
class Result:
    """Sums over a set of pairs: loss, pairs, reward accuracy and margins."""

    loss: float = 0.0
    pairs: int = 0
    correct: float = 0.0
    margin: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0

    def add(self, other: Result) -> None:
        for k in ("loss", "pairs", "correct", "margin", "chosen", "rejected"):
            setattr(self, k, getattr(self, k) + getattr(other, k))

    def means(self) -> dict[str, float]:
        n = max(self.pairs, 1)
        return {"loss": self.loss / n, "reward_accuracy": self.correct / n, "reward_margin": self.margin / n,
                "chosen_reward": self.chosen / n, "rejected_reward": self.rejected / n}


@dataclass
class PreferenceObjective:
    """What the Trainer calls instead of its SFT step and eval when the objective is dpo or orpo."""

    name: str
    settings: Preference
    reference: str | None          # what the DPO reference is, for the manifest
    last_eval: dict[str, float] = field(default_factory=dict)

    # ---- reference log-probabilities, once per run (kept in the training state)

    def ensure_reference(self, t: Trainer) -> None:
        if self.name != "dpo" or "reference" in t.state.extra:
            return
        import torch

        started = time.monotonic()
        model = t.peft_model
        model.eval()
        ref: dict[str, list[float]] = {}
        ctx = model.disable_adapter() if not t.config.init_adapter else contextlib.nullcontext()
        with torch.no_grad(), t.autocast(), ctx:
            for split, examples, rows in (("train", t.data.train, t.data.rows),
                                          ("eval", t.data.eval, [r for b in t.data.eval_batches for r in b])):
                logps = [0.0] * len(examples)
                for i in range(0, len(rows), t.config.batch_size):
                    mb = rows[i:i + t.config.batch_size]
                    sums, _ = self.logps(t, mb, examples)
                    for idx, v in zip([j for row in mb for j in row], sums.tolist(), strict=True):
                        logps[idx] = v
                ref[split] = logps
        model.train()
        t.state.extra["reference"] = ref
        t.timings["reference_s"] = time.monotonic() - started
        LOG.info("reference log-probabilities of %d train and %d eval sequences computed in %.1fs (%s)",
                 len(ref["train"]), len(ref["eval"]), t.timings["reference_s"], self.reference)

    def logps(self, t: Trainer, mb: list[list[int]], examples: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed log-probabilities of each sequence's trained tokens, and their counts, in the mb's order."""
        import torch

        batch = t.batch(mb, examples)
        owner = torch.full_like(batch["targets"], -1)
        for b, row in enumerate(mb):
            at = 0
            for seg, i in enumerate(row):
                n = len(examples[i])
                owner[b, at:at + n] = sum(len(r) for r in mb[:b]) + seg
                at += n
        return sequence_logps(t.peft_model, batch, owner, sum(len(r) for r in mb))

    # ---- the loss

    def pair_loss(self, t: Trainer, mb: list[list[int]], examples: list[Any], ref: list[float] | None
                  ) -> tuple[torch.Tensor, Result]:
        import torch

        sums, counts = self.logps(t, mb, examples)
        order = [i for row in mb for i in row]
        c_at = torch.tensor([k for k, i in enumerate(order) if i % 2 == 0], device=sums.device)
        s_c, s_r = sums[c_at], sums[c_at + 1]
        n_c, n_r = counts[c_at].clamp(min=1), counts[c_at + 1].clamp(min=1)
        ref_c = ref_r = None
        if self.name == "dpo":
            assert ref is not None
            ids = torch.tensor([order[k] for k in c_at.tolist()], device=sums.device)
            ref_t = torch.tensor(ref, dtype=sums.dtype, device=sums.device)
            ref_c, ref_r = ref_t[ids], ref_t[ids + 1]
        losses, r_c, r_r = pair_losses(self.name, self.settings, s_c, s_r, n_c, n_r, ref_c, ref_r)
        total = losses.sum()
        res = Result(loss=float(total.detach()), pairs=int(c_at.numel()), correct=float((r_c > r_r).sum()),
                     margin=float((r_c - r_r).sum()), chosen=float(r_c.sum()), rejected=float(r_r.sum()))
        return total, res

    def train_step(self, t: Trainer) -> dict[str, float]:
        """One optimizer step: the mean loss over the step's pairs (all processes together)."""
        import torch

        from jobs.train import packing

        self.ensure_reference(t)
        examples, ref = t.data.train, t.state.extra.get("reference", {}).get("train")
        everyone = t.step_batches(t.state.step)
        counts = [packing.count_tokens(b, examples) for b in everyone]
        step_tokens, step_trained = sum(c[0] for c in counts), sum(c[1] for c in counts)
        step_pairs = sum(len(row) for b in everyone for row in b) // 2
        started = time.monotonic()
        res = Result()
        for mb in t.step_batches(t.state.step, t.rank, t.world):
            with t.autocast():
                total, r = self.pair_loss(t, mb, examples, ref)
                (total / step_pairs).backward()
            res.add(r)
        t.sum_gradients()
        grad_norm = None
        if t.config.max_grad_norm:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(t.params, t.config.max_grad_norm))
        t.optimizer.step()
        t.scheduler.step()
        t.optimizer.zero_grad(set_to_none=True)
        loss, correct, margin = t.all_sum(res.loss, res.correct, res.margin)
        seconds, lr = time.monotonic() - started, t.scheduler.get_last_lr()[0]
        t.state.advance(loss=loss / step_pairs, lr=lr, tokens=step_tokens, trained_tokens=step_trained,
                        seconds=seconds)
        scalars = {"train/loss": loss / step_pairs, "train/lr": lr,
                   "train/tokens_per_s": step_tokens / seconds if seconds > 0 else 0.0,
                   "train/reward_accuracy": correct / step_pairs, "train/reward_margin": margin / step_pairs}
        if grad_norm is not None:
            scalars["train/grad_norm"] = grad_norm
        return scalars

    def evaluate(self, t: Trainer) -> float | None:
        """Mean loss over the eval pairs; their reward accuracy and margins go to `last_eval` and the state."""
        import torch

        if not t.data.eval_batches:
            return None
        self.ensure_reference(t)
        ref = t.state.extra.get("reference", {}).get("eval")
        t.peft_model.eval()
        res = Result()
        with torch.no_grad(), t.autocast():
            for i in range(t.rank, len(t.data.eval_batches), t.world):
                res.add(self.pair_loss(t, t.data.eval_batches[i], t.data.eval, ref)[1])
        t.peft_model.train()
        sums = t.all_sum(res.loss, res.pairs, res.correct, res.margin, res.chosen, res.rejected)
        total = Result(*sums)  # type: ignore[arg-type]
        self.last_eval = {k: round(v, 6) for k, v in total.means().items()}
        history = t.state.extra.setdefault("eval_rewards", [])
        if not (history and history[-1]["step"] == t.state.step):
            history.append({"step": t.state.step, **self.last_eval})
        LOG.info("step %d eval: loss %.4f, reward accuracy %.3f, margin %.4f", t.state.step,
                 self.last_eval["loss"], self.last_eval["reward_accuracy"], self.last_eval["reward_margin"])
        return self.last_eval["loss"]

    def report(self, t: Trainer, metrics: dict[str, Any], stats: dict[str, Any]) -> None:
        """The manifest's objective block and held-out reward metrics."""
        stats["objective"] = {"name": self.name, "beta": self.settings.beta,
                              "loss": self.settings.loss if self.name == "dpo" else "orpo",
                              "label_smoothing": self.settings.label_smoothing if self.name == "dpo" else None,
                              "sft_weight": self.settings.sft_weight if self.name == "dpo" else None,
                              "reference": self.reference, "init_adapter": t.config.init_adapter,
                              "pairs": {"train": len(t.data.train) // 2, "eval": len(t.data.eval) // 2}}
        for k, v in self.last_eval.items():
            if k != "loss":
                metrics[f"eval_{k}"] = v
        metrics["eval_reward_series"] = t.state.extra.get("eval_rewards", [])


def setup(config: Any, peft_model: Any) -> PreferenceObjective | None:
    """The objective for the Trainer (None: SFT), after the policy was initialised from init_adapter if set."""
    if config.init_adapter:
        load_init_adapter(config, peft_model)
    if config.objective == "sft":
        return None
    reference = None
    if config.objective == "dpo":
        reference = (f"init_adapter {config.init_adapter} (frozen)" if config.init_adapter
                     else "base model, adapter disabled")
    return PreferenceObjective(config.objective, config.preference, reference)


def load_init_adapter(config: Any, peft_model: Any) -> None:
    """The adapter of a train manifest as the policy's starting weights (its LoRA shape must be this run's)."""
    import tempfile
    from pathlib import Path

    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    loaded = mf.load(config.init_adapter, verify="size", expect_stage="train")
    model = loaded.manifest.model or {}
    lora = model.get("lora") or {}
    mine = {"r": config.lora.r, "alpha": config.lora.alpha, "target_modules": config.lora.target_modules}
    theirs = {k: lora.get(k) for k in mine}
    if theirs != mine:
        raise ConfigError(f"init_adapter {config.init_adapter} has LoRA {theirs}, this run {mine}; set lora.r, "
                          "lora.alpha and lora.target_modules to the adapter's so the policy can start from it")
    if model.get("base_model") not in (None, config.base_model):
        LOG.warning("init_adapter %s was trained on %s; this run's base model is %s", config.init_adapter,
                    model.get("base_model"), config.base_model)
    art = loaded.manifest.artifact("adapter/adapter_model.safetensors")
    with tempfile.TemporaryDirectory(prefix="ftjobs-init-adapter-") as tmp:
        local = mf.fetch_artifact(loaded, art, Path(tmp) / "adapter_model.safetensors")
        result = set_peft_model_state_dict(peft_model, load_file(str(local)))
    missing = [k for k in getattr(result, "unexpected_keys", []) or []]
    if missing:
        raise ConfigError(f"init_adapter {config.init_adapter} holds weights this model has no place for "
                          f"({missing[:3]}...); was it trained on another base model?")
    LOG.info("policy initialised from init_adapter %s", config.init_adapter)


# --------------------------------------------------------------------------- pieces


def pair_losses(name: str, settings: Preference, s_c: Any, s_r: Any, n_c: Any, n_r: Any, ref_c: Any = None,
                ref_r: Any = None) -> tuple[Any, Any, Any]:
    """Per pair: the loss, and the chosen and rejected rewards (detached), from summed log-probabilities `s`,
    trained-token counts `n` and (DPO) the reference's summed log-probabilities (module docstring)."""
    import torch
    import torch.nn.functional as F

    a_c, a_r = s_c / n_c, s_r / n_r
    beta = settings.beta
    if name == "orpo":
        log_odds = (a_c - a_r) - (_log1mexp(a_c) - _log1mexp(a_r))
        return -a_c - beta * F.logsigmoid(log_odds), beta * a_c.detach(), beta * a_r.detach()
    if settings.loss == "ipo":
        h = (a_c - ref_c / n_c) - (a_r - ref_r / n_r)
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        h = beta * ((s_c - ref_c) - (s_r - ref_r))
        if settings.loss == "hinge":
            losses = torch.relu(1 - h)
        else:
            ls = settings.label_smoothing
            losses = -(1 - ls) * F.logsigmoid(h) - ls * F.logsigmoid(-h)
    if settings.sft_weight:
        losses = losses - settings.sft_weight * a_c
    return losses, beta * (s_c - ref_c).detach(), beta * (s_r - ref_r).detach()


def sequence_logps(model: Any, batch: dict[str, Any], owner: Any, n: int, chunk: int = 4096
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per sequence (owner index 0..n-1): summed log-probabilities of its targets, and how many there were.

    As `packing.loss_sum`: the decoder once, the output head only on positions with a target, `chunk` at a
    time (recomputed in backward), so [B, L, V] logits never exist.
    """
    import torch
    import torch.utils.checkpoint

    from jobs.train.packing import IGNORE_INDEX, head_and_decoder

    targets = batch["targets"]
    keep = targets != IGNORE_INDEX
    kwargs = {"input_ids": batch["input_ids"], "position_ids": batch["position_ids"], "use_cache": False}
    if "attention_mask" in batch:
        kwargs["attention_mask"] = batch["attention_mask"]
    who = owner[keep]
    wanted = targets[keep]
    decoder, head = head_and_decoder(model)
    if decoder is None:
        logits = model(**kwargs).logits[keep].float()
        lp = -torch.nn.functional.cross_entropy(logits, wanted, reduction="none")
    else:
        picked = decoder(**kwargs).last_hidden_state[keep]
        parts = []
        for start in range(0, picked.shape[0], chunk):
            h, y = picked[start:start + chunk], wanted[start:start + chunk]
            if torch.is_grad_enabled():
                parts.append(torch.utils.checkpoint.checkpoint(_token_logps, head, h, y, use_reentrant=False))
            else:
                parts.append(_token_logps(head, h, y))
        lp = torch.cat(parts) if parts else picked.new_zeros((0,), dtype=torch.float32)
    sums = lp.new_zeros((n,)).index_add(0, who, lp)
    counts = torch.bincount(who, minlength=n).to(lp.dtype)
    return sums, counts


def _token_logps(head: Any, h: Any, y: Any) -> Any:
    import torch

    return -torch.nn.functional.cross_entropy(head(h).float(), y, reduction="none")


def _log1mexp(x: Any) -> Any:
    """log(1 - e^x) for x < 0, stable near 0."""
    import torch

    x = x.clamp(max=-1e-6)
    return torch.where(x > -math.log(2), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))
