"""Train throughput on a GPU: ftjobs' packed loop vs the plain padded HF recipe; merge vs file copy.

Needs only torch, transformers, peft, accelerate, bitsandbytes (no boto3,
pydantic, datasets or vLLM): it loads `jobs/train/packing.py` by path, the
same code the train job runs. Random weights in Llama-3.2-1B and
Llama-3.1-8B shapes, variable-length chat-like data (long-tailed lengths
between 32 and 2048 tokens, the first ~40% of each example a prompt without
loss). Both recipes train a fresh LoRA (r=16, all-linear) on the same NF4
base with bf16 compute, gradient checkpointing and paged 8-bit AdamW:

- plain: HF Trainer, batches of 4 examples padded to the longest in the batch.
- ftjobs: rows of 2048 tokens packed with restarted position ids, 4 rows per
  step, loss on target positions only.
- fsdp: with 2 or more GPUs visible, the same loop sharded by the train job's FSDP2 code (QLoRA with
  bnb_4bit_quant_storage bf16) on every GPU through torchrun: tokens/s and peak memory per GPU beside the
  one-GPU loop's.
- trl: TRL's SFTTrainer as its docs recommend for variable-length SFT data:
  `packing=True, packing_strategy="bfd"` (best-fit decreasing into rows of
  2048, which turns on `padding_free`: each step's 4 rows are flattened into one
  sequence with restarted position ids and no attention mask), the same
  pre-tokenized input_ids/labels. Its docs pair padding-free with
  FlashAttention; it is used when `flash_attn` imports, else SDPA, where
  transformers builds the block-diagonal mask from the position ids (correct,
  but dense over the flattened row). Skipped, with a note, where trl or datasets
  is not installed.

Each recipe then scores its trained adapter on the same held-out examples
(`heldout_loss`: mean cross-entropy per target token, one example per row), so
a recipe cannot look fast by learning less.

    python bench/gpu_bench.py            # on a CUDA box; writes $OUT/gpu_bench.json when OUT is set
    python bench/gpu_bench.py --tiny     # CPU smoke test, tiny shapes, a minute

Skips the 8B shape when the card or the time budget (--budget-s) is short.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("ftjobs_packing", REPO / "jobs" / "train" / "packing.py")
packing = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["ftjobs_packing"] = packing
_spec.loader.exec_module(packing)  # type: ignore[union-attr]

SHAPES = {
    "llama-3.2-1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": True},
    "llama-3.1-8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "vocab_size": 128256,
                     "tie_word_embeddings": False},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 1024, "tie_word_embeddings": False},
}


def lengths(n: int, lo: int, hi: int, seed: int = 0) -> list[int]:
    """Long-tailed (log-normal) lengths, median ~hi/8, clipped to [lo, hi]."""
    rng = random.Random(seed)
    return [max(lo, min(hi, int(rng.lognormvariate(math.log(hi / 8), 0.9)))) for _ in range(n)]


def make_examples(n: int, lo: int, hi: int, vocab: int) -> list[Any]:
    g = torch.Generator().manual_seed(0)
    out = []
    for n_tok in lengths(n, lo, hi):
        ids = torch.randint(10, vocab, (n_tok,), generator=g).tolist()
        cut = max(1, int(0.4 * n_tok))
        out.append(packing.example(ids, [-100] * cut + ids[cut:]))
    return out


def split_heldout(examples: list[Any], n: int) -> tuple[list[Any], list[Any]]:
    """(train, held out): every k-th example is held out, so both keep the same length distribution."""
    k = max(2, len(examples) // max(n, 1))
    held = examples[::k][:n]
    keep = set(range(0, len(examples), k)[:n])
    return [e for i, e in enumerate(examples) if i not in keep], held


def build_base(shape: str, folder: Path, device: str) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    t = time.monotonic()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=4096, rms_norm_eps=1e-5, bos_token_id=1,
                      eos_token_id=2, pad_token_id=0, head_dim=SHAPES[shape]["hidden_size"]
                      // SHAPES[shape]["num_attention_heads"])
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(torch.float32)
    model.save_pretrained(str(folder), safe_serialization=True)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return time.monotonic() - t


def load_quantized(folder: Path, device: str, storage: Any = None, gpu: int = 0) -> Any:
    """The NF4 base; `storage`: bnb_4bit_quant_storage (FSDP shards 4-bit weights kept in a float dtype)."""
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype, **({"bnb_4bit_quant_storage": storage} if storage else {}))
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=q, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": gpu if device == "cuda" else "cpu"})
    if device == "cpu":  # see jobs/train/__init__.py: bitsandbytes' CPU eval repack breaks training
        for m in model.modules():
            if hasattr(m, "support_avx512bf16_for_cpu"):
                m.support_avx512bf16_for_cpu = False
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    return model


def with_lora(base: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    return get_peft_model(base, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                           task_type="CAUSAL_LM"))


def optimizer_for(params: list[Any], device: str) -> Any:
    if device == "cuda":
        import bitsandbytes as bnb

        return bnb.optim.PagedAdamW8bit(params, lr=2e-4)
    return torch.optim.AdamW(params, lr=2e-4)


def reset_peak(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak(device: str) -> float:
    if device == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def run_ftjobs(base: Any, examples: list[Any], device: str, max_len: int, steps: int, warmup: int,
               heldout: list[Any] | None = None) -> dict:
    """The train job's loop body: packed rows, loss on targets only, bf16 autocast."""
    model = with_lora(base)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = optimizer_for(params, device)
    rows = packing.pack([len(e) for e in examples], max_len)
    batches = packing.micro_batches(rows, 4, seed=0, epoch=0)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                     enabled=False)
    reset_peak(device)
    tokens, t0, totals = 0, None, [0, 0]
    for step in range(warmup + steps):
        if step == warmup:
            if device == "cuda":
                torch.cuda.synchronize()
            t0, tokens = time.monotonic(), 0
        mb = batches[step % len(batches)]
        batch = {k: v.to(device) for k, v in packing.collate(mb, examples, pad_id=0).items()}
        with autocast:
            s, n = packing.loss_sum(model, batch)
            (s / n).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        real, trained = packing.count_tokens(mb, examples)
        tokens += real
        totals[0] += real
        totals[1] += trained
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    out = {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "peak_gib": peak(device),
           "tokens_per_step": tokens / steps, "density": sum(len(e) for e in examples) / (len(rows) * max_len),
           "tokens_total": totals[0], "targets_total": totals[1]}
    if heldout:
        out["heldout_loss"] = heldout_loss(model, heldout, device)
    model.unload()
    del opt
    return out


def heldout_loss(model: Any, examples: list[Any], device: str) -> float:
    """Mean cross-entropy per target token on `examples`, one example per row (no packing, no padding), with
    gradients off and dropout off: the one measure every recipe's trained adapter is scored with."""
    was_training = model.training
    model.eval()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda" else torch.autocast("cpu",
                                                                                                     enabled=False)
    total, count = 0.0, 0
    with torch.no_grad(), autocast:
        for i in range(len(examples)):
            batch = {k: v.to(device) for k, v in packing.collate([[i]], examples, pad_id=0).items()}
            s, n = packing.loss_sum(model, batch)
            total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


class _Timed:
    """Trainer mixin: counts each optimizer step's real tokens and target tokens from the batch it trains on.

    Counting here, not in the collator, is exact: accelerate's dataloader collates one batch ahead.
    """

    counted: list[tuple[int, int]]

    def training_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        mask = inputs.get("attention_mask")
        real = int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())  # padding-free: no pads
        self.counted.append((real, int((inputs["labels"][:, 1:] != -100).sum())))
        return super().training_step(model, inputs, *args, **kwargs)  # type: ignore[misc]


def _train_timed(trainer_cls: Any, device: str, steps: int, warmup: int, **kwargs: Any) -> tuple[Any, dict]:
    """Run a (TRL or HF) trainer with `_Timed` mixed in; the clock starts after `warmup` steps."""
    from transformers import TrainerCallback

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["t0"] = time.monotonic()
                marks["n0"] = len(trainer.counted)

    cls = type(f"Timed{trainer_cls.__name__}", (_Timed, trainer_cls), {})
    reset_peak(device)
    trainer = cls(callbacks=[Clock()], **kwargs)
    trainer.counted = []
    trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - marks["t0"]
    timed = trainer.counted[int(marks["n0"]):]
    tokens = sum(c[0] for c in timed)
    return trainer, {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "peak_gib": peak(device),
                     "tokens_per_step": tokens / steps, "steps": len(trainer.counted),
                     "tokens_total": sum(c[0] for c in trainer.counted),
                     "targets_total": sum(c[1] for c in trainer.counted)}


def _trainer_args(device: str, steps: int, warmup: int, schedule: str) -> dict[str, Any]:
    """TrainingArguments both Trainer recipes share (plain HF and TRL)."""
    return {"max_steps": warmup + steps, "learning_rate": 2e-4, "lr_scheduler_type": schedule, "warmup_steps": 0,
            "bf16": device == "cuda", "use_cpu": device == "cpu", "gradient_checkpointing": True,
            "gradient_checkpointing_kwargs": {"use_reentrant": False},
            "optim": "paged_adamw_8bit" if device == "cuda" else "adamw_torch", "report_to": [],
            "save_strategy": "no", "logging_strategy": "no", "disable_tqdm": True, "dataloader_num_workers": 0,
            "seed": 0}


def run_plain(base: Any, examples: list[Any], device: str, steps: int, warmup: int,
              heldout: list[Any] | None = None, schedule: str = "constant") -> dict:
    """HF Trainer + peft + bitsandbytes, batches of 4 padded to the longest: the usual QLoRA recipe."""
    from transformers import Trainer, TrainingArguments

    model = with_lora(base)

    def collate(items: list[dict]) -> dict:
        width = max(len(x["input_ids"]) for x in items)
        ids = torch.zeros((len(items), width), dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for i, x in enumerate(items):
            n = len(x["input_ids"])
            ids[i, :n] = torch.tensor(x["input_ids"])
            labels[i, :n] = torch.tensor(x["labels"])
            mask[i, :n] = 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    data = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, remove_unused_columns=False,
                                 **_trainer_args(device, steps, warmup, schedule))
        trainer, result = _train_timed(Trainer, device, steps, warmup, model=model, args=args, train_dataset=data,
                                       data_collator=collate)
    if heldout:
        result["heldout_loss"] = heldout_loss(model, heldout, device)
    model.unload()
    del trainer
    return result


def trl_missing() -> str | None:
    """Why the TRL recipe cannot run here (None: it can)."""
    for name in ("trl", "datasets"):
        if importlib.util.find_spec(name) is None:
            return f"{name} is not installed"
    return None


def stub_tokenizer() -> Any:
    """SFTTrainer wants a tokenizer for its pad and eos tokens even with pre-tokenized data: three tokens do."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<pad>")),
                                   pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<pad>")


def run_trl(base: Any, examples: list[Any], device: str, max_len: int, rows: int, steps: int, warmup: int,
            heldout: list[Any] | None = None, schedule: str = "constant", tokenizer: Any = None) -> dict:
    """TRL's SFTTrainer with BFD packing (padding-free) on the same pre-tokenized input_ids + labels.

    TRL keeps a `labels` column as it is (loss where labels != -100, shifted by the model as ours), packs
    examples best-fit-decreasing into rows of `max_len`, and flattens each step's `rows` rows into one sequence
    with restarted position ids. It builds the LoRA itself from `peft_config` (and casts the adapter to bf16
    on a 4-bit base, as its QLoRA recipe does). Call it last on a base: it patches the base's forward.
    """
    import datasets
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    datasets.disable_progress_bars()

    attention = "sdpa"
    if device == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        attention = "flash_attention_2"
        base.set_attn_implementation(attention)
    torch.manual_seed(0)
    data = datasets.Dataset.from_dict({"input_ids": [list(e.input_ids) for e in examples],
                              "labels": [list(e.labels) for e in examples]})
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(output_dir=out, per_device_train_batch_size=rows, packing=True, packing_strategy="bfd",
                         padding_free=True, max_length=max_len, **_trainer_args(device, steps, warmup, schedule))
        trainer, result = _train_timed(SFTTrainer, device, steps, warmup, model=base, args=args,
                                       train_dataset=data, processing_class=tokenizer or stub_tokenizer(),
                                       peft_config=lora)
    result.update(attention=attention, packed_rows=len(trainer.train_dataset),
                  density=sum(len(e) for e in examples) / (len(trainer.train_dataset) * max_len))
    model = trainer.model
    if heldout:
        result["heldout_loss"] = heldout_loss(model, heldout, device)
    model.unload()
    del trainer
    return result


def merge_vs_copy(folder: Path, device: str, work: Path) -> dict:
    """Merge a LoRA into the 16-bit base and save it, vs copying the base's files."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    t = time.monotonic()
    shutil.copytree(folder, work / "copy")
    copy_s = time.monotonic() - t
    shutil.rmtree(work / "copy")
    t = time.monotonic()
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    base = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype,
                                                device_map={"": 0 if device == "cuda" else "cpu"})
    model = get_peft_model(base, LoraConfig(r=16, lora_alpha=32, target_modules="all-linear",
                                            init_lora_weights=False))
    merged = model.merge_and_unload()
    merged.save_pretrained(str(work / "merged"), safe_serialization=True)
    merge_s = time.monotonic() - t
    shutil.rmtree(work / "merged")
    del base, model, merged
    if device == "cuda":
        torch.cuda.empty_cache()
    return {"merge_s": merge_s, "copy_s": copy_s}


def fsdp_worker(folder: Path, out: Path, max_len: int, steps: int, warmup: int, vocab: int) -> None:
    """One rank of the FSDP-QLoRA row (torchrun starts one per GPU): the train job's sharding
    (jobs/train/fsdp.py `shard_units`, loaded by path) around the same packed loop as run_ftjobs, each rank
    taking every world-th micro-batch; rank 0 writes tokens/s per GPU and the largest peak to `out`."""
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.cuda.set_device(rank)
    spec = importlib.util.spec_from_file_location("ftjobs_fsdp", REPO / "jobs" / "train" / "fsdp.py")
    fsdp = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(fsdp)  # type: ignore[union-attr]
    examples, _ = split_heldout(make_examples(616, 32, max_len, vocab), 16)
    model = with_lora(load_quantized(folder, "cuda", storage=torch.bfloat16, gpu=rank))
    decoder, head = packing.head_and_decoder(model)
    fsdp.shard_units([*fsdp._decoder_layers(model), decoder, head], torch.bfloat16, cpu_offload=False,
                     reshard_after_forward=True, cuda=True)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-4)  # bitsandbytes' paged 8-bit AdamW does not take DTensor shards
    batches = packing.micro_batches(packing.pack([len(e) for e in examples], max_len), 4, seed=0, epoch=0)
    reset_peak("cuda")
    tokens, t0 = 0, time.monotonic()
    for step in range(warmup + steps):
        if step == warmup:
            torch.cuda.synchronize()
            t0, tokens = time.monotonic(), 0
        mb = batches[(step * world + rank) % len(batches)]
        batch = {k: v.to("cuda") for k, v in packing.collate(mb, examples, pad_id=0).items()}
        with torch.autocast("cuda", dtype=torch.bfloat16):
            s, n = packing.loss_sum(model, batch)
            (s / max(n, 1)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += packing.count_tokens(mb, examples)[0]
    torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    got = torch.tensor([tokens / seconds, peak("cuda")], device="cuda")
    total = got.clone()
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    dist.all_reduce(got[1:], op=dist.ReduceOp.MAX)
    if rank == 0:
        out.write_text(json.dumps({"gpus": world, "tokens_per_s_per_gpu": float(total[0]) / world,
                                   "peak_gib": float(got[1]), "optimizer": "adamw_torch"}))
    dist.destroy_process_group()


def run_fsdp(folder: Path, shape: str, max_len: int, steps: int, work: Path) -> dict:
    """The FSDP-QLoRA row on every visible GPU, through torchrun (it needs 2 or more)."""
    import subprocess

    gpus = torch.cuda.device_count()
    if gpus < 2:
        return {"skipped": f"{gpus} GPU visible; FSDP needs 2"}
    out = work / "fsdp.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={gpus}", __file__,
           "--fsdp-worker", str(folder), "--fsdp-out", str(out), "--steps", str(steps), "--max-len", str(max_len),
           "--vocab", str(SHAPES[shape]["vocab_size"])]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        return {"skipped": f"torchrun exit {done.returncode}: {done.stderr[-1500:]}"}
    return dict(json.loads(out.read_text()))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny shapes")
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per recipe (after 2 warmup steps)")
    ap.add_argument("--budget-s", type=float, default=400, help="skip what would not fit in this many seconds")
    ap.add_argument("--fsdp-worker", type=Path, help=argparse.SUPPRESS)  # a torchrun rank of the FSDP row
    ap.add_argument("--fsdp-out", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--max-len", type=int, default=2048, help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=128256, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.fsdp_worker:
        fsdp_worker(args.fsdp_worker, args.fsdp_out, args.max_len, args.steps, 2, args.vocab)
        return
    started = time.monotonic()
    device = "cuda" if torch.cuda.is_available() and not args.tiny else "cpu"
    shapes = ["tiny"] if args.tiny else args.shapes.split(",")
    max_len, lo = (256, 16) if args.tiny else (2048, 32)
    out_dir = os.environ.get("OUT")
    if out_dir:
        os.environ.setdefault("FTJOBS_BENCH_OUT", out_dir)
    sys.path.insert(0, str(REPO))
    from bench import report

    rows, details = [], {}
    for shape in shapes:
        left = args.budget_s - (time.monotonic() - started)
        if device == "cuda" and shape.endswith("8b"):
            free = torch.cuda.mem_get_info()[0] / 2**30
            if free < 60 or left < 200:
                print(f"skipping {shape}: {free:.0f} GiB free, {left:.0f}s of budget left", flush=True)
                details[shape] = {"skipped": f"{free:.0f} GiB free, {left:.0f}s left"}
                continue
        with tempfile.TemporaryDirectory(dir=os.environ.get("BENCH_TMP")) as tmp:
            work = Path(tmp)
            build_s = build_base(shape, work / "base", device)
            examples, heldout = split_heldout(
                make_examples(616 if not args.tiny else 208, lo, max_len, SHAPES[shape]["vocab_size"]), 16 if not
                args.tiny else 8)
            t = time.monotonic()
            base = load_quantized(work / "base", device)
            load_s = time.monotonic() - t
            steps = args.steps if not shape.endswith("8b") else max(3, args.steps // 2)
            plain = run_plain(base, examples, device, steps, warmup=2, heldout=heldout)
            ours = run_ftjobs(base, examples, device, max_len, steps, warmup=2, heldout=heldout)
            trl = {"skipped": trl_missing()} if trl_missing() else run_trl(
                base, examples, device, max_len, 4, steps, warmup=2, heldout=heldout)  # last: it patches the base
            del base
            if device == "cuda":
                torch.cuda.empty_cache()
            fsdp = {"skipped": "CPU"} if device != "cuda" else run_fsdp(work / "base", shape, max_len, steps, work)
            merge = None
            if args.budget_s - (time.monotonic() - started) > (120 if shape.endswith("8b") else 40):
                merge = merge_vs_copy(work / "base", device, work)
            details[shape] = {"build_s": build_s, "load_4bit_s": load_s, "plain": plain, "ftjobs": ours, "trl": trl,
                              "merge": merge, "fsdp": fsdp, "lengths": {"min": lo, "max": max_len,
                                                          "mean": sum(len(e) for e in examples) / len(examples)}}
            print(json.dumps({shape: details[shape]}, default=str), flush=True)
            rows.append(report.row("train", f"{shape} tokens/s (effective)", ours["tokens_per_s"],
                                   plain["tokens_per_s"], goal=">= 2x",
                                   met=ours["tokens_per_s"] >= 2 * plain["tokens_per_s"], unit="tok/s"))
            rows.append(report.row("train", f"{shape} peak memory", ours["peak_gib"], plain["peak_gib"],
                                   goal="<= 1x", met=ours["peak_gib"] <= plain["peak_gib"] * 1.02, unit="GiB"))
            if "skipped" not in trl:
                rows.append(report.row("train", f"{shape} tokens/s vs TRL packed", ours["tokens_per_s"],
                                       trl["tokens_per_s"], goal=">= 1.2x",
                                       met=ours["tokens_per_s"] >= 1.2 * trl["tokens_per_s"], unit="tok/s",
                                       notes=f"TRL bfd padding-free, {trl['attention']}"))
                rows.append(report.row("train", f"{shape} peak memory vs TRL", ours["peak_gib"], trl["peak_gib"],
                                       goal="<= 1x", met=ours["peak_gib"] <= trl["peak_gib"] * 1.02, unit="GiB"))
                rows.append(report.row("train", f"{shape} held-out loss vs TRL", ours["heldout_loss"],
                                       trl["heldout_loss"], goal="<= 1.05x",
                                       met=ours["heldout_loss"] <= 1.05 * trl["heldout_loss"],
                                       notes=f"tokens trained {ours['tokens_total']} vs {trl['tokens_total']}"))
            else:
                print(f"TRL recipe skipped: {trl['skipped']}", flush=True)
            if "skipped" not in fsdp:  # FSDP-QLoRA over every GPU vs the one-GPU loop, per GPU
                rows.append(report.row("train", f"{shape} FSDP-QLoRA tokens/s per GPU ({fsdp['gpus']} GPUs)",
                                       fsdp["tokens_per_s_per_gpu"], ours["tokens_per_s"], goal=">= 0.8x",
                                       met=fsdp["tokens_per_s_per_gpu"] >= 0.8 * ours["tokens_per_s"],
                                       unit="tok/s", notes="adamw_torch under FSDP; one GPU: paged 8-bit"))
                rows.append(report.row("train", f"{shape} FSDP-QLoRA peak memory per GPU", fsdp["peak_gib"],
                                       ours["peak_gib"], goal="<= 1x", met=fsdp["peak_gib"] <= ours["peak_gib"],
                                       unit="GiB"))
            else:
                print(f"FSDP-QLoRA row skipped: {fsdp['skipped']}", flush=True)
            if merge:
                rows.append(report.row("merge", f"{shape} merge+save vs copy", merge["merge_s"], merge["copy_s"],
                                       goal="<= 1.3x", met=merge["merge_s"] <= 1.3 * merge["copy_s"], unit="s"))
    report.emit("gpu_bench" if not args.tiny else "gpu_bench_tiny", rows,
                extra={"device": device, "details": details, "wall_s": time.monotonic() - started})


if __name__ == "__main__":
    main()
