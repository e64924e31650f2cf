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


def load_quantized(folder: Path, device: str) -> Any:
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    q = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                           bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=q, dtype=dtype,
                                                 attn_implementation="sdpa",
                                                 device_map={"": 0 if device == "cuda" else "cpu"})
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


def run_ftjobs(base: Any, examples: list[Any], device: str, max_len: int, steps: int, warmup: int) -> dict:
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
    tokens, t0 = 0, None
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
        tokens += packing.count_tokens(mb, examples)[0]
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - t0
    out = {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "peak_gib": peak(device),
           "tokens_per_step": tokens / steps, "density": sum(len(e) for e in examples) / (len(rows) * max_len)}
    model.unload()
    del opt
    return out


def run_plain(base: Any, examples: list[Any], device: str, steps: int, warmup: int) -> dict:
    """HF Trainer + peft + bitsandbytes, batches of 4 padded to the longest: the usual QLoRA recipe."""
    from transformers import Trainer, TrainerCallback, TrainingArguments

    model = with_lora(base)
    real_tokens: list[int] = []

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
        real_tokens.append(int(mask.sum()))
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}

    marks: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if state.global_step == warmup:
                if device == "cuda":
                    torch.cuda.synchronize()
                marks["t0"] = time.monotonic()
                marks["n0"] = len(real_tokens)

    data = [{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, max_steps=warmup + steps,
                                 learning_rate=2e-4, bf16=device == "cuda", use_cpu=device == "cpu",
                                 gradient_checkpointing=True,
                                 gradient_checkpointing_kwargs={"use_reentrant": False},
                                 optim="paged_adamw_8bit" if device == "cuda" else "adamw_torch",
                                 report_to=[], save_strategy="no", logging_strategy="no",
                                 remove_unused_columns=False, dataloader_num_workers=0, seed=0)
        reset_peak(device)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=collate, callbacks=[Clock()])
        trainer.train()
    if device == "cuda":
        torch.cuda.synchronize()
    seconds = time.monotonic() - marks["t0"]
    # The collator ran for every step; those after the warmup were timed.
    tokens = sum(real_tokens[marks["n0"]:marks["n0"] + steps]) if len(real_tokens) > marks["n0"] else 0
    out = {"tokens_per_s": tokens / seconds, "step_s": seconds / steps, "peak_gib": peak(device),
           "tokens_per_step": tokens / steps}
    model.unload()
    del trainer
    return out


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="CPU smoke test with tiny shapes")
    ap.add_argument("--shapes", default="llama-3.2-1b,llama-3.1-8b")
    ap.add_argument("--steps", type=int, default=8, help="timed steps per recipe (after 2 warmup steps)")
    ap.add_argument("--budget-s", type=float, default=400, help="skip what would not fit in this many seconds")
    args = ap.parse_args()
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
            examples = make_examples(600 if not args.tiny else 200, lo, max_len, SHAPES[shape]["vocab_size"])
            t = time.monotonic()
            base = load_quantized(work / "base", device)
            load_s = time.monotonic() - t
            steps = args.steps if not shape.endswith("8b") else max(3, args.steps // 2)
            plain = run_plain(base, examples, device, steps, warmup=2)
            ours = run_ftjobs(base, examples, device, max_len, steps, warmup=2)
            del base
            if device == "cuda":
                torch.cuda.empty_cache()
            merge = None
            if args.budget_s - (time.monotonic() - started) > (120 if shape.endswith("8b") else 40):
                merge = merge_vs_copy(work / "base", device, work)
            details[shape] = {"build_s": build_s, "load_4bit_s": load_s, "plain": plain, "ftjobs": ours,
                              "merge": merge, "lengths": {"min": lo, "max": max_len,
                                                          "mean": sum(len(e) for e in examples) / len(examples)}}
            print(json.dumps({shape: details[shape]}, default=str), flush=True)
            rows.append(report.row("train", f"{shape} tokens/s (effective)", ours["tokens_per_s"],
                                   plain["tokens_per_s"], goal=">= 2x",
                                   met=ours["tokens_per_s"] >= 2 * plain["tokens_per_s"], unit="tok/s"))
            rows.append(report.row("train", f"{shape} peak memory", ours["peak_gib"], plain["peak_gib"],
                                   goal="<= 1x", met=ours["peak_gib"] <= plain["peak_gib"] * 1.02, unit="GiB"))
            if merge:
                rows.append(report.row("merge", f"{shape} merge+save vs copy", merge["merge_s"], merge["copy_s"],
                                       goal="<= 1.3x", met=merge["merge_s"] <= 1.3 * merge["copy_s"], unit="s"))
    report.emit("gpu_bench" if not args.tiny else "gpu_bench_tiny", rows,
                extra={"device": device, "details": details, "wall_s": time.monotonic() - started})


if __name__ == "__main__":
    main()
