"""Tiny real models built from a config, for tests, the compose rehearsal and benchmarks.

`build(path)` writes a Llama-architecture causal LM (random weights,
safetensors) with a byte-level BPE tokenizer trained on a small generated
corpus and a ChatML chat template. head_dim is 64 because vLLM's CPU
attention rejects smaller heads. Everything is deterministic for a seed.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from common.chat import CHATML

SPECIAL = ["<pad>", "<s>", "<|im_end|>", "<|im_start|>", "<unk>"]
WORDS = (
    "the a an of to in is are was be it that this with for on as by at from or and not but "
    "what how why when where who which can will would should could do does did have has had "
    "model data train test answer question user assistant system hello world please thanks yes no "
    "one two three four five six seven eight nine ten zero number add sum plus minus times equals "
    "red green blue cat dog bird fish tree house car road city country river mountain sun moon star "
    "reverse sort upper lower copy repeat first last word letter list json key value true false null"
).split()


def corpus(n: int = 4000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        k = rng.randint(3, 14)
        words = [rng.choice(WORDS) for _ in range(k)]
        if rng.random() < 0.3:
            words.append(str(rng.randint(0, 9999)))
        line = " ".join(words)
        lines.append(line.capitalize() + rng.choice([".", "?", "!", ":"]))
    lines += [chr(c) for c in range(32, 127)]
    return lines


def build_tokenizer(path: str | Path, vocab_size: int = 1024, seed: int = 0) -> Any:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(seed=seed), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="<|im_end|>", pad_token="<pad>", unk_token="<unk>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML
    fast.model_max_length = 2048
    fast.save_pretrained(str(path))
    return fast


def build(path: str | Path, *, hidden: int = 128, layers: int = 2, heads: int = 2, kv_heads: int = 2,
          intermediate: int = 256, vocab_size: int = 1024, max_positions: int = 1024, seed: int = 0,
          dtype: str = "float32") -> Path:
    """Write a tiny Llama + tokenizer to `path` and return it."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(path, vocab_size=vocab_size, seed=seed)
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=hidden // heads,
        max_position_embeddings=max_positions, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False, rms_norm_eps=1e-5,
    )
    model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id
    )
    model.save_pretrained(str(path), safe_serialization=True)
    (path / "ftjobs-tiny.json").write_text(json.dumps({"seed": seed, "hidden": hidden, "layers": layers}))
    return path


if __name__ == "__main__":  # python -m common.tinymodel OUT_DIR
    import sys

    print(build(sys.argv[1] if len(sys.argv) > 1 else "tiny-model"))
