"""Real upstream outputs for stage tests, built without running the upstream job.

`publish_adapter` writes what the train job publishes (same layout, same
manifest fields) from a real peft LoRA on the tiny model, so merge and infer
tests do not depend on a training run. The adapter's B matrices are random
(not zero), so the adapted model really differs from the base.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from common import chat, models
from common import manifest as mf


def publish_adapter(prefix: str, base_model: Path, *, r: int = 8, alpha: int = 16, seed: int = 0,
                    modules_to_save: list[str] | None = None, scale: float = 1.0, saved_noise: float = 0.0,
                    quantization: dict[str, Any] | None = None,
                    target_modules: str | list[str] = "all-linear", use_dora: bool = False,
                    data: mf.Loaded | None = None) -> mf.Loaded:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(str(base_model), dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(base_model))
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=target_modules,
                      modules_to_save=modules_to_save, init_lora_weights=False, task_type="CAUSAL_LM",
                      use_dora=use_dora)
    model = get_peft_model(base, lora)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.mul_(scale)
            elif saved_noise and "modules_to_save" in name:  # as if the module had been trained in full
                p.add_(torch.randn_like(p) * saved_noise)
    fmt = chat.chat_format(tok)
    ref = models.resolve(str(base_model))
    writer = mf.ArtifactWriter(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(Path(tmp) / "adapter")
        tok.save_pretrained(Path(tmp) / "tokenizer")
        writer.add_dir(Path(tmp) / "adapter", "adapter")
        writer.add_dir(Path(tmp) / "tokenizer", "tokenizer")
    model_info: dict[str, Any] = {
        "base_model": str(base_model),
        "base_revision": ref.revision,
        "template_hash": fmt.hash,
        "chat_template": fmt.template,
        "tokenizer": chat.tokenizer_identity(tok),
        "quantization": quantization or {"mode": "none"},
        "lora": {"r": r, "alpha": alpha, "dropout": 0.0, "target_modules": "all-linear",
                 "modules_to_save": modules_to_save},
    }
    m = mf.build(stage="train", run_id=mf.new_run_id(), config={"builder": "tests.jobs.builders", "seed": seed},
                 inputs=[data.ref("data")] if data else [], artifacts=writer.artifacts, model=model_info,
                 metrics={"steps": 0})
    mf.publish(prefix, m)
    return mf.load(prefix)


def publish_merged(prefix: str, model_dir: Path, *, seed: int = 0, noise: float = 0.0) -> mf.Loaded:
    """What `ftjobs merge` publishes (a `model/` folder and a merge manifest) from a model folder as it is, or with
    `noise` added to every weight (a different model of the same shape, as a merge of another adapter is)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    fmt = chat.chat_format(tok)
    writer = mf.ArtifactWriter(prefix)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "model"
        shutil.copytree(model_dir, out)
        if noise:
            torch.manual_seed(seed)
            for f in out.glob("*.safetensors"):
                tensors = load_file(str(f))
                save_file({k: v + noise * torch.randn_like(v) for k, v in tensors.items()}, str(f),
                          metadata={"format": "pt"})
        writer.add_dir(out, "model")
    model_info: dict[str, Any] = {"base_model": str(model_dir), "template_hash": fmt.hash,
                                  "chat_template": fmt.template, "tokenizer": chat.tokenizer_identity(tok),
                                  "dtype": "float32", "mode": "test-builder"}
    m = mf.build(stage="merge", run_id=mf.new_run_id(), config={"builder": "tests.jobs.builders", "seed": seed,
                                                                "noise": noise},
                 inputs=[], artifacts=writer.artifacts, model=model_info)
    mf.publish(prefix, m)
    return mf.load(prefix)
