"""ftjobs estimate: per-GPU memory and wall time of a train run, from the model's config.json alone.

Reads: the base model's `config.json` (a local folder or file, an s3:// prefix, or one file from the
Hugging Face Hub: no weights), train's own config (`--config` a train config or a run config with a
`train:` section, `--set` train keys), optionally the prepare manifest the config names (`input`) for the
token count, and earlier train manifests under `--history` for a measured throughput.
Writes nothing; prints the estimate (or JSON with --json). Exit 2 when the run cannot fit the GPU.

    ftjobs estimate --base-model meta-llama/Llama-3.1-8B --gpu H100-80GB --gpus 8 --config train.yaml \\
        --set strategy=fsdp --set method=full

`check_fits(train_config, base_model, gpu, gpus)` is what `k8s submit` calls for each train step; it raises
ConfigError with the numbers when the step cannot fit. The memory formula and the error measured against
real peaks are in docs/estimate.md.
"""

from __future__ import annotations

import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click

from common.errors import ConfigError, InputError

LOG = logging.getLogger(__name__)
STAGE = "estimate"
GIB = 1 << 30
MIB = 1 << 20
MLP = ("gate_proj", "up_proj", "down_proj")


# --------------------------------------------------------------------------- GPUs (declared once)


@dataclass(frozen=True)
class Gpu:
    memory_mib: int      # total memory as nvidia-smi reports it
    tflops: float        # dense bf16 matmul TFLOP/s a plain GEMM reaches (measured where said, else assumed)
    match: str           # what torch.cuda.get_device_name() holds for this card (manifests' stats.device)


GPUS: dict[str, Gpu] = {
    "H200-141GB": Gpu(143771, 790.0, "H200"),      # 790 measured (shared/facts.md)
    "H100-80GB": Gpu(81559, 790.0, "H100"),        # same compute die as H200: assumed equal
    "A100-80GB": Gpu(81920, 250.0, "A100-SXM4-80GB"),
    "A100-40GB": Gpu(40960, 250.0, "A100-SXM4-40GB"),
    "L40S-48GB": Gpu(46068, 250.0, "L40S"),
    "A10G-24GB": Gpu(23028, 90.0, "A10G"),
    "L4-24GB": Gpu(23034, 90.0, "L4"),
    "RTX4090-24GB": Gpu(24564, 150.0, "4090"),
}
CUDA_CONTEXT = 1 * GIB     # CUDA context + cuBLAS workspaces: outside torch's allocator, inside nvidia-smi's
USABLE = 0.92              # of the card's memory: allocator fragmentation and NCCL buffers need the rest
# Throughput assumption when no earlier manifest matches: 8B QLoRA on an H200 ran at ~275 TFLOP/s counted as
# 6N per token (shared/facts.md), 35% of the 790 TFLOP/s a plain GEMM reached; scaled by the card's TFLOP/s.
ASSUMED_MFU = 275.0 / 790.0


def gpu(name: str) -> Gpu:
    if name not in GPUS:
        raise ConfigError(f"--gpu {name!r}: expected one of {', '.join(GPUS)} (jobs/estimate.py GPUS)")
    return GPUS[name]


# --------------------------------------------------------------------------- the model's shape


@dataclass(frozen=True)
class Shape:
    """What the memory formula needs from config.json."""

    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    experts: int = 1            # MoE: experts per layer (weights) ...
    experts_active: int = 1     # ... and per token (activations)

    @property
    def linears(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder layer, by the module name LoRA targets."""
        h, q, kv, i = self.hidden, self.heads * self.head_dim, self.kv_heads * self.head_dim, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def layer_linear_params(self) -> int:
        return sum(a * b * self.copies(n) for n, (a, b) in self.linears.items())

    def copies(self, name: str) -> int:
        """How many of the linear layer `name` one decoder layer holds (MoE: one MLP per expert)."""
        return self.experts if name in MLP else 1

    @property
    def embed(self) -> int:
        return self.vocab * self.hidden

    @property
    def head(self) -> int:
        return 0 if self.tied else self.vocab * self.hidden

    @property
    def linear_params(self) -> int:
        return self.layers * self.layer_linear_params()

    @property
    def other_params(self) -> int:
        """Embedding, output head and norms: kept in 16 (or 32) bits by bitsandbytes."""
        return self.embed + self.head + (2 * self.layers + 1) * self.hidden

    @property
    def params(self) -> int:
        return self.linear_params + self.other_params


def shape_of(cfg: dict[str, Any], where: str) -> Shape:
    """The Shape of a Llama-like config.json (Llama, Mistral, Qwen, Gemma, Mixtral names); a clear error else."""
    cfg = cfg.get("text_config") or cfg
    need = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads", "vocab_size")
    missing = [k for k in need if not isinstance(cfg.get(k), int)]
    if missing:
        raise InputError(f"{where}: config.json has no {', '.join(missing)}; the estimate reads Llama-style "
                         f"decoder configs (model_type {cfg.get('model_type')!r} is not one)")
    heads = cfg["num_attention_heads"]
    experts = int(cfg.get("num_local_experts") or cfg.get("num_experts") or 1)
    intermediate = (cfg.get("moe_intermediate_size") or cfg["intermediate_size"]) if experts > 1 \
        else cfg["intermediate_size"]
    return Shape(hidden=cfg["hidden_size"], layers=cfg["num_hidden_layers"], intermediate=intermediate,
                 heads=heads, kv_heads=cfg.get("num_key_value_heads") or heads,
                 head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, vocab=cfg["vocab_size"],
                 tied=bool(cfg.get("tie_word_embeddings", False)), experts=int(experts),
                 experts_active=int(cfg.get("num_experts_per_tok") or 1) if experts > 1 else 1)


def read_model_config(base_model: str) -> dict[str, Any]:
    """config.json of a model source, without its weights: a file, a folder, an s3:// prefix or a Hub id."""
    from common import models, storage

    if storage.is_s3(base_model):
        uri = base_model if base_model.endswith(".json") else storage.join(base_model, "config.json")
        try:
            return dict(json.loads(storage.read_bytes(uri)))
        except FileNotFoundError:
            raise InputError(f"{uri} does not exist: is {base_model} a model prefix?") from None
    local = storage.local_path(base_model).expanduser() if not models.looks_like_hf_id(base_model) else None
    if local is not None:
        path = local if local.is_file() else local / "config.json"
        if not path.is_file():
            raise InputError(f"{path} does not exist: give a model folder, its config.json, an s3:// prefix or a "
                             "Hugging Face id")
        return dict(json.loads(path.read_text()))
    try:
        from huggingface_hub import hf_hub_download

        return dict(json.loads(Path(hf_hub_download(base_model, "config.json",
                                                    cache_dir=str(models.cache_root() / "models" / "hf")))
                               .read_text()))
    except Exception as exc:
        raise models.hub_error(exc, "model config", base_model) from None


# --------------------------------------------------------------------------- memory


@dataclass
class Memory:
    """Bytes per GPU by part; `sharded` names the parts FSDP divides by the number of GPUs."""

    parts: dict[str, int]
    activations_gc: int       # activations with gradient checkpointing
    activations_full: int     # ... and without
    gradient_checkpointing: bool
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.parts.values()) + (self.activations_gc if self.gradient_checkpointing
                                           else self.activations_full)

    def total_with(self, gc: bool) -> int:
        return sum(self.parts.values()) + (self.activations_gc if gc else self.activations_full)


def dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def compute_dtype(train: Any, cuda: bool) -> str:
    mode = train.quantization.compute_dtype
    if mode != "auto":
        return str(mode)
    return "bfloat16" if cuda else "float32"


def lora_params(shape: Shape, train: Any) -> int:
    """Adapter parameters: r x (in + out) for every targeted linear layer, plus modules_to_save in full."""
    targets = shape.linears if train.lora.target_modules == "all-linear" else {
        n: io for n, io in shape.linears.items() if n in train.lora.target_modules}
    per_layer = sum(train.lora.r * (a + b) * shape.copies(n) for n, (a, b) in targets.items())
    saved = {"lm_head": shape.head or shape.embed, "embed_tokens": shape.embed}
    return shape.layers * per_layer + sum(saved.get(m, 0) for m in train.lora.modules_to_save)


def memory(shape: Shape, train: Any, gpus: int, cuda: bool = True) -> Memory:
    """Per-GPU bytes of a train run: weights, trainable state, activations (docs/estimate.md)."""
    from jobs.train import strategy

    method = strategy.method_of(train)
    fsdp = train.strategy == "fsdp" and gpus > 1
    shard = gpus if fsdp else 1
    cbytes = dtype_bytes(compute_dtype(train, cuda))
    notes: list[str] = []
    parts: dict[str, int] = {}

    if method == "qlora":
        # 4 bits + an fp32 absmax per 64 (double quant: 8 bits per 64 + fp32 per 256 blocks); peft's
        # prepare_model_for_kbit_training casts the rest (embeddings, head, norms) to float32.
        per = 0.5 + ((1 / 64 + 4 / (64 * 256)) if train.quantization.double_quant else 4 / 64)
        parts["weights"] = int(shape.linear_params * per + 4 * shape.other_params)
    elif method == "lora":
        parts["weights"] = shape.params * cbytes
    else:  # full: float32 master weights, compute in the compute dtype under autocast / FSDP mixed precision
        parts["weights"] = shape.params * 4
    trainable = shape.params if method == "full" else lora_params(shape, train)
    opt_bytes = 8 if _optimizer(train, cuda) == "adamw_torch" else 2
    parts["trainable (grads)"] = trainable * 4
    parts["optimizer state"] = trainable * opt_bytes
    if method != "full":
        parts["adapter weights"] = trainable * 4  # peft keeps adapters in float32
    if fsdp:
        offload = train.fsdp.cpu_offload
        for k in list(parts):
            parts[k] = 0 if offload else math.ceil(parts[k] / shard)
        # Gathered layers: the one computing and the one prefetched, in the mixed-precision dtype.
        layer = shape.layer_linear_params() + 2 * shape.hidden
        gathered_bytes = (0.5 if method == "qlora" else _mp_bytes(train, cbytes))
        parts["gathered layers (fsdp)"] = int(2 * layer * gathered_bytes)
        if method == "full" or train.lora.modules_to_save:
            parts["gathered layers (fsdp)"] += int(max(shape.embed, shape.head) * _mp_bytes(train, cbytes))
        if offload:
            notes.append("fsdp.cpu_offload: weights, gradients and optimizer state live in host memory")
    if cuda:
        parts["cuda context"] = CUDA_CONTEXT
    gc_act, full_act = activations(shape, train, cbytes, method)
    return Memory(parts=parts, activations_gc=gc_act, activations_full=full_act,
                  gradient_checkpointing=train.gradient_checkpointing, notes=notes)


def _mp_bytes(train: Any, cbytes: int) -> int:
    mp = train.fsdp.mixed_precision
    return cbytes if mp in ("auto", "none") else dtype_bytes(mp)


def _optimizer(train: Any, cuda: bool) -> str:
    return "paged_adamw_8bit" if train.optimizer == "auto" and cuda else str(
        "adamw_torch" if train.optimizer == "auto" else train.optimizer)


def activations(shape: Shape, train: Any, cbytes: int, method: str) -> tuple[int, int]:
    """(with, without gradient checkpointing) bytes of activations for one micro-batch.

    Saved for backward per token and layer, in elements: the two norms' inputs and outputs (4h), q, k, v
    and the attention output with their rotary copies (2q + 2kv + q), the MLP's gate, up, activation and
    product (4i per active expert); LoRA adds each adapted layer's dropout output (its input width) and its
    1-byte mask. With
    checkpointing only each layer's input stays (h), plus one layer recomputed in full. The output head
    runs in chunks of 4096 positions (packing.loss_sum): [4096, V] float32 logits and their gradient.
    """
    tokens = train.batch_size * train.max_seq_length
    h, q, kv = shape.hidden, shape.heads * shape.head_dim, shape.kv_heads * shape.head_dim
    per_layer = 4 * h + 3 * q + 2 * kv + 4 * shape.intermediate * shape.experts_active
    masks = 0  # dropout keeps a 1-byte mask beside its output
    if method != "full" and train.lora.dropout > 0:
        per_layer += sum(a for a, _ in shape.linears.values())
        masks = sum(a for a, _ in shape.linears.values())
    layer_bytes = (per_layer * cbytes + masks) * tokens
    logits = 2 * min(tokens, 4096) * shape.vocab * 4 + tokens * h * cbytes  # chunk logits + the picked hidden
    full = shape.layers * layer_bytes + logits
    with_gc = shape.layers * h * cbytes * tokens + layer_bytes + logits
    return with_gc, full


# --------------------------------------------------------------------------- time


@dataclass
class Throughput:
    tokens_per_s_per_gpu: float
    source: str


def tokens_of(train: Any) -> tuple[int | None, str]:
    """Tokens one epoch trains on: from the prepare manifest the config names, when it can be read."""
    from common import manifest as mf

    if not train.input or train.input.startswith("<"):
        return None, "no prepare manifest given (input): pass --tokens"
    try:
        loaded = mf.load(train.input, verify="none", expect_stage="prepare")
    except Exception as exc:  # noqa: BLE001 - the estimate goes on without a time
        return None, f"could not read {train.input} ({exc})"
    tokens = (loaded.manifest.stats or {}).get("tokens") or {}
    total = tokens.get("total")
    if not total:
        return None, f"{loaded.uri} has no token count (prepare ran without a tokenizer): pass --tokens"
    share = loaded.manifest.stats.get("train", 0) / max(loaded.manifest.stats.get("rows_out", 1), 1)
    return int(total * share), f"prepare manifest {loaded.uri} (train share of {total:,} tokens)"


def measured_throughput(history: str, base_model: str, card: Gpu, method: str) -> Throughput | None:
    """Median tokens/s per GPU of earlier train manifests under `history` for this model, card and method."""
    from common import manifest as mf
    from common import storage

    seen = []
    for obj in storage.iter_objects(history):
        if not obj.rel.endswith("train/manifest.json"):
            continue
        try:
            m = mf.load(obj.uri, verify="none", expect_stage="train").manifest
        except Exception:  # noqa: BLE001,S112 - a broken manifest is not this command's business
            continue
        stats, metrics, model = m.stats or {}, m.metrics or {}, m.model or {}
        quant = (model.get("quantization") or {}).get("mode", "nf4")
        their_method = model.get("method") or ("lora" if quant == "none" else "qlora")
        if (model.get("base_model") == base_model and card.match in str(stats.get("device", ""))
                and their_method == method and metrics.get("effective_tokens_per_s")):
            seen.append(float(metrics["effective_tokens_per_s"]) / int(stats.get("world_size") or 1))
    if not seen:
        return None
    return Throughput(statistics.median(seen), f"median of {len(seen)} earlier train manifest(s) under {history}")


def assumed_throughput(shape: Shape, card: Gpu) -> Throughput:
    per = ASSUMED_MFU * card.tflops * 1e12 / (6 * shape.params)
    return Throughput(per, f"assumed: {ASSUMED_MFU:.0%} of the card's {card.tflops:g} TFLOP/s at 6N FLOPs per "
                           "token (8B QLoRA on an H200, shared/facts.md); no earlier manifest of this model and GPU")


# --------------------------------------------------------------------------- the estimate


@dataclass
class Estimate:
    base_model: str
    gpu: str
    gpus: int
    method: str
    strategy: str
    params: int
    memory: Memory
    capacity: int                # usable bytes per GPU
    tokens: int | None
    tokens_source: str
    throughput: Throughput | None
    epochs: float

    @property
    def fits(self) -> bool:
        return self.memory.total <= self.capacity

    @property
    def seconds(self) -> float | None:
        if self.tokens is None or self.throughput is None:
            return None
        return self.tokens * self.epochs / (self.throughput.tokens_per_s_per_gpu * self.gpus)

    def to_json(self) -> dict[str, Any]:
        m = self.memory
        return {"base_model": self.base_model, "gpu": self.gpu, "gpus": self.gpus, "method": self.method,
                "strategy": self.strategy, "params": self.params, "parts_bytes": m.parts,
                "activations_bytes": {"gradient_checkpointing": m.activations_gc, "none": m.activations_full},
                "total_bytes": m.total, "total_bytes_other_checkpointing": m.total_with(not m.gradient_checkpointing),
                "capacity_bytes": self.capacity, "fits": self.fits, "tokens": self.tokens,
                "tokens_source": self.tokens_source, "seconds": self.seconds,
                "tokens_per_s_per_gpu": self.throughput.tokens_per_s_per_gpu if self.throughput else None,
                "throughput_source": self.throughput.source if self.throughput else None, "notes": m.notes}

    def render(self) -> str:
        m = self.memory
        size = f"{self.params / 1e9:.2f}B" if self.params >= 1e8 else f"{self.params / 1e6:.2f}M"  # not "0.00B"
        lines = [f"estimate: {self.base_model} ({size} params), method {self.method}, strategy "
                 f"{self.strategy}, {self.gpus} x {self.gpu}"]
        for name, b in m.parts.items():
            lines.append(f"  {name:<26} {b / GIB:8.2f} GiB")
        gc = m.gradient_checkpointing
        lines.append(f"  {'activations':<26} {(m.activations_gc if gc else m.activations_full) / GIB:8.2f} GiB"
                     f"  (gradient checkpointing {'on' if gc else 'off'}; "
                     f"{'off' if gc else 'on'}: {(m.activations_full if gc else m.activations_gc) / GIB:.2f} GiB)")
        lines.append(f"  {'total per GPU':<26} {m.total / GIB:8.2f} GiB of {self.capacity / GIB:.1f} GiB usable "
                     f"({USABLE:.0%} of {self.gpu}): {'fits' if self.fits else 'DOES NOT FIT'}"
                     f" (with checkpointing {'off' if gc else 'on'}: {m.total_with(not gc) / GIB:.2f} GiB)")
        lines += [f"  note: {n}" for n in m.notes]
        if self.seconds is not None and self.throughput is not None:
            lines.append(f"  time: {self.tokens:,} tokens x {self.epochs:g} epoch(s) at "
                         f"{self.throughput.tokens_per_s_per_gpu:,.0f} tokens/s per GPU: ~{_hours(self.seconds)} "
                         f"({self.throughput.source}; tokens: {self.tokens_source})")
        else:
            lines.append(f"  time: unknown ({self.tokens_source})")
        return "\n".join(lines)


def _hours(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 3600 else f"{seconds / 60:.0f} min"


def estimate(train: Any, base_model: str, gpu_name: str, gpus: int, *, model_config: dict[str, Any] | None = None,
             tokens: int | None = None, history: str | None = None) -> Estimate:
    """The estimate for a resolved train config on `gpus` x `gpu_name`."""
    from jobs.train import strategy

    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: expected 1 or more")
    card = gpu(gpu_name)
    shape = shape_of(model_config if model_config is not None else read_model_config(base_model), base_model)
    method = strategy.method_of(train)
    mem = memory(shape, train, gpus, cuda=True)
    source = "given (--tokens)"
    if tokens is None:
        tokens, source = tokens_of(train)
    through = (measured_throughput(history, base_model, card, method) if history else None) \
        or assumed_throughput(shape, card)
    epochs = float(train.epochs)
    if train.max_steps:  # a fixed number of steps: tokens are the steps' packed rows
        tokens, source, epochs = (train.max_steps * train.batch_size * train.grad_accum * gpus * train.max_seq_length,
                                  f"max_steps {train.max_steps} x full packed rows", 1.0)
    return Estimate(base_model=base_model, gpu=gpu_name, gpus=gpus, method=method, strategy=train.strategy,
                    params=shape.params, memory=mem, capacity=int(card.memory_mib * MIB * USABLE), tokens=tokens,
                    tokens_source=source, throughput=through, epochs=epochs)


def check_fits(train_config: Any, base_model: str, gpu_name: str, gpus: int, *, history: str | None = None) -> Estimate:
    """The estimate, or ConfigError (exit 2) with the numbers when the run cannot fit `gpus` x `gpu_name`."""
    est = estimate(train_config, base_model, gpu_name, gpus, history=history)
    if not est.fits:
        raise ConfigError(f"train cannot fit {gpus} x {gpu_name}: {est.memory.total / GIB:.1f} GiB per GPU "
                          f"needed, {est.capacity / GIB:.1f} GiB usable.\n{est.render()}\n"
                          f"Fix: {_advice(est, train_config)}; or pass --go-anyway to submit it regardless.")
    return est


def _advice(est: Estimate, train: Any) -> str:
    tips = []
    if not train.gradient_checkpointing:
        tips.append("gradient_checkpointing true")
    if est.strategy != "fsdp":
        tips.append("strategy fsdp over more GPUs")
    elif not train.fsdp.cpu_offload:
        tips.append("more GPUs or fsdp.cpu_offload true")
    if est.method != "qlora":
        tips.append("method qlora")
    tips.append("a smaller batch_size or max_seq_length")
    return ", ".join(tips)


# --------------------------------------------------------------------------- config + CLI


def train_config(base_model: str, config_file: str | None, sets: tuple[str, ...]) -> Any:
    """train's config from a train config or a run config (its `train:` section), with --set train keys."""
    from common import config as cfg
    from jobs import train

    data: dict[str, Any] = cfg.read_config_file(config_file) if config_file else {}
    if isinstance(data.get("train"), dict) and "train" not in train.Config.model_fields:
        data = dict(data["train"])  # a run config: its train section
    for item in sets:
        path, value = cfg.parse_set(item.removeprefix("train."))
        cfg.set_path(data, path, value)
    data.setdefault("input", "<no prepare manifest>")
    data.setdefault("output", "<estimate>")
    data["base_model"] = base_model
    return cfg.validate(train.Config, data, source=config_file)


@click.command("estimate")
@click.option("--base-model", metavar="SRC", help="Model folder, its config.json, s3:// prefix or Hugging Face id "
                                                 "(only config.json is read). Default: a run config's base_model.")
@click.option("--gpu", "gpu_name", required=True, type=click.Choice(list(GPUS)), help="The GPU the run is for.")
@click.option("--gpus", type=int, default=1, show_default=True, help="GPUs training together (all nodes).")
@click.option("--config", "config_file", metavar="FILE_OR_URI", help="A train config, or a run config (its train "
                                                                     "section is read).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="A train key, e.g. --set strategy=fsdp.")
@click.option("--tokens", type=int, help="Tokens per epoch (default: from the prepare manifest the config names).")
@click.option("--history", metavar="URI", help="Store prefix whose train manifests give a measured throughput.")
@click.option("--json", "as_json", is_flag=True, help="Print the estimate as JSON.")
def command(base_model: str | None, gpu_name: str, gpus: int, config_file: str | None, sets: tuple[str, ...],
            tokens: int | None, history: str | None, as_json: bool) -> None:
    """Per-GPU memory and time of a train run before it is submitted; exit 2 when it cannot fit the GPU."""
    from common import config as cfg

    if base_model is None and config_file:
        base_model = cfg.read_config_file(config_file).get("base_model")
    if not base_model:
        raise ConfigError("Pass --base-model (or a run config with base_model) to estimate a train run.")
    train = train_config(base_model, config_file, sets)
    est = estimate(train, base_model, gpu_name, gpus, tokens=tokens, history=history)
    click.echo(json.dumps(est.to_json(), indent=2) if as_json else est.render())
    if not est.fits:
        raise ConfigError(f"does not fit: {est.memory.total / GIB:.1f} GiB per GPU needed, "
                          f"{est.capacity / GIB:.1f} GiB usable on {gpu_name}; fix: {_advice(est, train)}")


def check_step(name: str, args: list[str], gpu_name: str, gpus: int, go_anyway: bool) -> Estimate | None:
    """`k8s submit`'s check of one train step (its command-line arguments): prints the estimate; exit 2 when
    it cannot fit, unless `go_anyway`."""
    from jobs import chain

    outputs = [] if any(a == "--output" or a.startswith("--output=") for a in args) else ["--output", "<estimate>"]
    resolved = chain.validate_arguments("train", [*args, *outputs])
    try:
        est = check_fits(resolved, resolved.base_model, gpu_name, gpus)
    except ConfigError as exc:
        if not go_anyway:
            raise ConfigError(f"step {name}: {exc}") from None
        LOG.warning("step %s: %s\n--go-anyway: submitting it regardless", name, exc)
        return None
    click.echo(f"step {name}: {est.render()}", err=True)
    return est
