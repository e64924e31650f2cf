"""Pretrain the demo's small base model: it knows the chat format and the demo's
words, and has never seen the demo task (demo/make_data.py).

A random-weight model cannot show a finetune helping: it does not even know
where an answer starts and stops. This script gives the base general chat
skills with generated data (repeat a text, give its first or last word, answer
short greetings), trained on the assistant turns only, so the demo's LoRA only
has to learn the task itself. The committed model had 400 steps (~12 min on a
busy 2-core machine; loss 7.0 -> ~2.5): it writes well-formed, well-terminated
turns, but its copying is still poor, which is why the demo task answers with
words from a closed set rather than copied text.

Llama architecture, head_dim 64 (vLLM's CPU attention needs it), float32
safetensors (3.4 MB), a byte-level BPE tokenizer trained here and the ChatML
template. Pretrained with tied embeddings, saved with an untied copy as the
output head, so the demo finetune can train the head in full
(`lora.modules_to_save: [lm_head]`) without touching the input embeddings: LoRA
alone, under the frozen head, learns the answer format but not the routing.
Seeded; bit-identical weights also need the same --threads:

    .venv/bin/python -m demo.pretrain_base --out demo/base-model --threads 2

The sweep demo (demo/sweep.yaml) adds a smaller and a larger model made the same way:

    .venv/bin/python -m demo.pretrain_base --out demo/base-model-s --hidden 64 --layers 2 --threads 1
    .venv/bin/python -m demo.pretrain_base --out demo/base-model-l --hidden 256 --layers 4 --threads 1 \
        --save-dtype bfloat16
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from common.chat import CHATML, IGNORE_INDEX, chat_format, encode_many
from demo.make_data import CITIES, NAMES

HERE = Path(__file__).resolve().parent
SPECIAL = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
WORDS = (
    "the a of to in is are was it that this with for on as at from and not but what how why when where who "
    "can will do have red green blue black white cat dog bird fish tree house car road river sun moon star "
    "apple bread milk water stone paper music light night day year hand door book table window garden "
    "small big old new fast slow happy quiet warm cold open close left right up down one two three four five"
).split()
KEYS = "color size kind shape count price weight speed label owner mood level".split()
GREETINGS = [("Hello!", "Hello! How can I help?"), ("Hi", "Hi there."), ("Thanks!", "You are welcome."),
             ("Who are you?", "I am a small demo model."), ("Good morning", "Good morning to you.")]


def snippet(rng: random.Random) -> str:
    """A random text to repeat: words, names, cities, numbers or JSON-like objects."""
    kind = rng.random()
    if kind < 0.35:
        keys = rng.sample(KEYS, rng.randint(1, 3))
        obj = {k: (rng.randint(0, 99) if rng.random() < 0.4 else rng.choice(WORDS + NAMES + CITIES)) for k in keys}
        return json.dumps(obj)
    pool = WORDS * 2 + NAMES + CITIES + [str(rng.randint(0, 99)) for _ in range(10)]
    words = [rng.choice(pool) for _ in range(rng.randint(2, 9))]
    text = " ".join(words)
    if rng.random() < 0.5:
        text = text[0].upper() + text[1:] + rng.choice([".", "!", "?", ","])
    return text


def conversation(rng: random.Random) -> list[dict[str, str]]:
    r = rng.random()
    if r < 0.08:
        q, a = rng.choice(GREETINGS)
        return [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
    text = snippet(rng)
    if r < 0.7:
        prompt, reply = rng.choice(["Repeat: ", "Say exactly: ", "Copy this: "]) + text, text
    elif r < 0.85:
        prompt, reply = "First word: " + text, text.split()[0]
    else:
        prompt, reply = "Last word: " + text, text.split()[-1]
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": reply}]


def tokenizer_corpus(rng: random.Random) -> list[str]:
    lines = [" ".join(m["content"] for m in conversation(rng)) for _ in range(6000)]
    lines += [json.dumps({"name": n, "age": rng.randint(18, 90), "city": c})
              for n, c in zip(NAMES, CITIES * 2, strict=False)]
    return lines + [chr(c) for c in range(32, 127)]


def build_tokenizer(path: Path, vocab_size: int, seed: int):  # type: ignore[no-untyped-def]
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(tokenizer_corpus(random.Random(seed)), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>",
                                   pad_token="<pad>", unk_token="<unk>", additional_special_tokens=["<|im_start|>"])
    fast.chat_template = CHATML
    fast.model_max_length = 512
    fast.save_pretrained(str(path))
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description="Pretrain the demo base model.")
    parser.add_argument("--out", default=str(HERE / "base-model"))
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=1536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="float32",
                        help="bfloat16 halves the files of the larger sweep model (trained in float32 either way)")
    args = parser.parse_args()

    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out, args.vocab, args.seed)
    fmt = chat_format(tok)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3 // 64 * 64,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64, num_key_value_heads=args.hidden // 64,
        head_dim=64, max_position_embeddings=512, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=True, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config)
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {params / 1e6:.2f}M parameters, vocab {len(tok)}", flush=True)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, args.steps) / args.steps)))
    rng = random.Random(args.seed)
    start = time.monotonic()
    model.train()
    for step in range(1, args.steps + 1):
        enc = encode_many(tok, fmt, [conversation(rng) for _ in range(args.batch)])
        width = max(len(e.input_ids) for e in enc)
        ids = torch.tensor([e.input_ids + [tok.pad_token_id] * (width - len(e.input_ids)) for e in enc])
        labels = torch.tensor([e.labels + [IGNORE_INDEX] * (width - len(e.labels)) for e in enc])
        mask = (torch.arange(width)[None, :] < torch.tensor([len(e.input_ids) for e in enc])[:, None]).long()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 50 == 0 or step == 1:
            print(f"step {step}/{args.steps} loss {loss.item():.4f} {time.monotonic() - start:.0f}s", flush=True)

    untie_head(model)
    params = sum(p.numel() for p in model.parameters())
    model.eval()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id)
    if args.save_dtype != "float32":
        model = model.to(getattr(torch, args.save_dtype))
    model.save_pretrained(str(out), safe_serialization=True)
    (out / "ftjobs-demo-base.json").write_text(json.dumps(vars(args) | {"parameters": params}, indent=2) + "\n")
    check(model, tok, fmt, rng)


def untie_head(model) -> None:  # type: ignore[no-untyped-def]
    """Give the output head its own copy of the input embeddings (same outputs, separately trainable)."""
    import torch

    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())


def check(model, tok, fmt, rng: random.Random) -> None:  # type: ignore[no-untyped-def]
    """Greedy answers to a few prompts: repeating works, the demo task does not."""
    import torch

    from common.chat import render_prompt
    from demo.make_data import generate

    prompts = ["Repeat: " + snippet(rng) for _ in range(3)] + ["Last word: " + snippet(rng)]
    prompts += [str(generate(1, seed=1)[0]["messages"][0]["content"])]  # type: ignore[index]
    for p in prompts:
        ids = tok(render_prompt(fmt, [{"role": "user", "content": p}]), add_special_tokens=False,
                  return_tensors="pt")["input_ids"]
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=40, do_sample=False)
        print(f"{p!r} -> {tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)!r}")


if __name__ == "__main__":
    main()
