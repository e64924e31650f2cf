"""train's config: what `ftjobs train` reads from its --config, --set and flags (every field documented).

The job that reads it is `jobs/train/job.py`; the strategies, objectives and checkpoint selection it names
keep their own settings beside their code (strategy.py, objectives.py, selection.py).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from common.chat import TrainOn
from common.config import JobConfig
from jobs.train import objectives, selection, strategy
from jobs.train.strategy import Fsdp


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
    method: Literal["qlora", "lora", "full"] | None = Field(
        None, description="qlora: 4-bit base + LoRA; lora: 16-bit base + LoRA; full: every weight trained, "
                          "published as a safetensors model. Default: qlora, or lora when quantization.mode is "
                          "none (see docs/distributed.md).")
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="With several processes: ddp (each holds the whole model) or fsdp (FSDP2 shards "
                           "weights, gradients and optimizer state over them).")
    fsdp: Fsdp = Field(default_factory=Fsdp, description="FSDP settings (strategy fsdp).")
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
    per_example_attention: bool = Field(True, description="On CPU with attention sdpa and packing position_ids, "
                                        "run attention per packed example instead of over the whole row with a "
                                        "block mask: same result, a fraction of the work (docs/train.md). false: "
                                        "the dense masked SDPA.")
    packing: Literal["position_ids", "mask", "none"] = Field(
        "position_ids", description="How packed examples are kept apart: position_ids (transformers builds "
                                    "the block mask; flash-attention runs varlen), mask (an explicit 4D mask), or "
                                    "none (one example per row: for models with recurrent or linear-attention "
                                    "layers, where packing is refused).")
    eval_every: int | None = Field(None, ge=1, description="Eval loss every N steps (and always at the end "
                                                           "when the data has an eval split).")
    checkpoint: Checkpointing = Field(default_factory=Checkpointing, description="Checkpoints and preemption.")
    report_to: Literal["none", "tensorboard", "mlflow", "wandb"] = Field(
        "none", description="Tracking tool, configured by its own environment variables.")
    run_name: str | None = Field(None, description="Name shown in the tracking tool (default: the run id).")
    objective: objectives.Objective = Field("sft", description="sft (supervised rows), or dpo / orpo (preference "
                                            "pairs from a preference prepare run): docs/preference.md.")
    preference: objectives.Preference = Field(default_factory=objectives.Preference,
                                              description="beta, DPO loss and label smoothing (objective dpo/orpo).")
    init_adapter: str | None = Field(None, description="A train manifest whose adapter the policy starts from "
                                     "(and, for dpo, the frozen reference): SFT, then DPO. Its LoRA r, alpha and "
                                     "target_modules must be this run's.")
    select: selection.Select | None = Field(None, description="Keep checkpoints' adapters as candidates that "
                                            "`ftjobs select` scores on the held-out prompts (docs/selection.md).")
    early_stopping: selection.EarlyStopping | None = Field(
        None, description="Stop when the held-out loss stops falling (needs eval_every); the best-loss step's "
                          "adapter is published (docs/selection.md).")

    @model_validator(mode="after")
    def _consistent(self) -> Config:
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("set warmup_ratio or warmup_steps, not both")
        if self.packing == "mask" and self.attention == "flash_attention_2":
            raise ValueError("packing: mask needs attention sdpa or eager; flash_attention_2 packs through "
                             "position_ids (set packing: position_ids)")
        if self.early_stopping is not None and self.eval_every is None:
            raise ValueError("early_stopping needs eval_every: it counts evaluations of the held-out loss; set "
                             "eval_every: N (and give the data an eval split)")
        if self.select is not None and selection.every(self.select, self.checkpoint.every_steps,
                                                       self.eval_every) is None:
            raise ValueError("select: no candidate interval; set select.every, checkpoint.every_steps or eval_every")
        if self.strategy == "fsdp" and (self.select is not None or self.early_stopping is not None):
            raise ValueError("select and early_stopping save candidates from one process's weights, which strategy "
                             "fsdp shards: use strategy: ddp with them (or leave them out)")
        strategy.check(self)
        objectives.check_config(self)
        return self
