"""merge itself, in memory or streaming: the merged tensors, handed to the writer one at a time.

`merge_in_memory` loads the model and uses peft's merge; `merge_streaming` reads the base checkpoint
tensor by tensor and applies W + scale * B @ A (`lora.lora_merge`), probing each merged tensor. Both take
the generation check's reference from the unmerged base + adapter first, and both return a `Merged`
whose `source` the writer (`job.write_model`) pulls from.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from common.errors import ConfigError
from jobs.merge.checks import Reference, reference_run
from jobs.merge.lora import (
    Adapter,
    Probe,
    Quant,
    lora_merge,
    quantized_weight_names,
    read_adapter,
    roundtrip_4bit,
    tied_head,
)
from jobs.merge.plan import Plan
from jobs.merge.tensors import TensorInfo, fresh_tensor, map_tensor, open_map


class TensorSource(Protocol):
    """Hands the writer each merged tensor by name, in any order."""

    probes: dict[str, float]  # tensor -> relative error of W'x against Wx + s*B(Ax), where probed
    finite: set[str]          # tensors already proven free of NaN/Inf (by their probe): the writer skips them

    def tensor(self, info: TensorInfo) -> Any: ...

    def close(self) -> None: ...


@dataclass
class Merged:
    """The merged model, as tensors the writer pulls one at a time."""

    tensors: list[TensorInfo]  # what the output holds: the base's, plus a trained head untied from the embeddings
    untied: bool               # such a head exists (config.json says tie_word_embeddings: false)
    reference: Reference | None  # the unmerged base + adapter's greedy run, for the generation check
    source: TensorSource


def merge_in_memory(plan: Plan, timings: dict[str, float]) -> Merged:
    """peft's merge on the whole model; the generation reference is taken from the unmerged model first."""
    from peft import PeftModel

    t = time.monotonic()
    peft_model = PeftModel.from_pretrained(load_base(plan.base.path, plan.dtype, plan.device,
                                                     plan.config.trust_remote_code, plan.roundtrip),
                                           str(plan.adapter_dir), is_trainable=False)
    timings["load"] += time.monotonic() - t
    t = time.monotonic()
    reference = _reference(plan, peft_model) if plan.gen_check else None
    timings["check"] = time.monotonic() - t
    t = time.monotonic()
    tensors, names = list(plan.tensors), {x.name for x in plan.tensors}
    tied, untied = bool(plan.base_cfg.get("tie_word_embeddings")), False
    if tied:
        untie_adapted_head(peft_model.get_base_model())
    merged_model = peft_model.merge_and_unload()
    state = merged_model.state_dict()
    head = merged_model.get_output_embeddings().weight
    if tied and head.data_ptr() != merged_model.get_input_embeddings().weight.data_ptr():
        # The output head was trained on a tied base: it is its own tensor now, and the base checkpoint
        # holds none for it. Write it, and say so in config.json, or loading re-ties the head to the
        # input embeddings and the trained head is silently lost.
        head_name = next(n for n, p in merged_model.named_parameters(remove_duplicate=False) if p is head)
        if head_name not in names:
            like = next(x for x in tensors if x.shape == tuple(head.shape))
            tensors.append(TensorInfo(head_name, like.file, tuple(head.shape), like.dtype))
            names.add(head_name)
            untied = True
    del merged_model, peft_model
    absent = sorted(names - set(state))
    if absent:
        raise ConfigError(f"the loaded model names its weights differently from the checkpoint (e.g. "
                          f"{absent[:3]}); use mode: sharded")
    timings["merge"] = time.monotonic() - t
    return Merged(tensors=tensors, untied=untied, reference=reference, source=InMemoryTensors(state))


@dataclass
class InMemoryTensors:
    """The merged model's state dict."""

    state: dict[str, Any]
    probes: dict[str, float] = field(default_factory=dict)  # peft merged: nothing to probe
    finite: set[str] = field(default_factory=set)

    def tensor(self, info: TensorInfo) -> Any:
        return self.state[info.name]

    def close(self) -> None:
        self.state = {}
        gc.collect()  # release the in-memory model before the check loads the saved one


def merge_streaming(plan: Plan, timings: dict[str, float]) -> Merged:
    """W + scale * B @ A per tensor while the base checkpoint is read: peak memory about one tensor."""
    import torch
    from peft import PeftModel
    from transformers import AutoConfig, AutoModelForCausalLM

    t = time.monotonic()
    reference = None
    if plan.gen_check:
        peft_model = PeftModel.from_pretrained(load_base(plan.base.path, plan.dtype, plan.device,
                                                         plan.config.trust_remote_code, plan.roundtrip),
                                               str(plan.adapter_dir), is_trainable=False)
        loaded_s = time.monotonic() - t
        reference = _reference(plan, peft_model)
        reference.seconds["reference_load"] = loaded_s
        del peft_model
        gc.collect()  # the reference model is not needed while streaming
    timings["check"] = time.monotonic() - t
    t = time.monotonic()
    tensors, names = list(plan.tensors), {x.name for x in plan.tensors}
    rt_names: set[str] = set()
    aliases: dict[str, str] = {}  # a tied base's head -> the embedding the checkpoint stores for it
    tied = bool(plan.base_cfg.get("tie_word_embeddings"))
    if plan.roundtrip is not None or tied:
        trust = plan.config.trust_remote_code
        with torch.device("meta"):  # the structure only: no weights are allocated
            skeleton = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(
                str(plan.base.path), trust_remote_code=trust), trust_remote_code=trust)
        if plan.roundtrip is not None:
            rt_names = quantized_weight_names(skeleton, plan.roundtrip) & names
        if tied:
            aliases = tied_head(skeleton, names)
    adapter = read_adapter(plan.adapter_dir, names | set(aliases))
    untied = False
    for head_name, embed_name in aliases.items():
        if head_name in adapter.updates:  # the head was trained: it becomes its own tensor
            like = next(x for x in tensors if x.name == embed_name)
            tensors.append(TensorInfo(head_name, like.file, like.shape, like.dtype))
            untied = True
    timings["merge"] = time.monotonic() - t
    return Merged(tensors=tensors, untied=untied, reference=reference,
                  source=StreamedTensors(base=plan.base.path, device=plan.device, dtype=plan.dtype, quant=plan.quant,
                                         adapter=adapter, aliases=aliases, roundtrip_names=rt_names,
                                         stored={x.name: x for x in plan.tensors}))


@dataclass
class StreamedTensors:
    """Base tensors read from the checkpoint files one at a time, each merged with its LoRA update."""

    base: Path
    device: str
    dtype: str
    quant: Quant
    adapter: Adapter
    aliases: dict[str, str]      # output name -> the base tensor it starts from (a tied head: the embedding)
    roundtrip_names: set[str]    # weights replaced by their 4-bit roundtrip first
    stored: dict[str, TensorInfo]  # the base checkpoint's tensors by name: where each one's bytes are
    probes: dict[str, float] = field(default_factory=dict)
    finite: set[str] = field(default_factory=set)
    maps: dict[str, Any] = field(default_factory=dict)  # base checkpoint file -> its memory map

    def tensor(self, info: TensorInfo) -> Any:
        import torch

        stored = self.stored[self.aliases.get(info.name, info.name)]
        if stored.file not in self.maps:
            self.maps[stored.file] = open_map(self.base / stored.file,
                                              [t for t in self.stored.values() if t.file == stored.file])
        w = map_tensor(self.maps[stored.file], stored)  # a view: nothing below writes into it
        up = self.adapter.updates.get(info.name)
        if up is None and info.name not in self.roundtrip_names:
            return w
        if up is not None and up.source is not None:
            if tuple(up.source.shape) != info.shape:
                raise ConfigError(f"the adapter saves {info.name} as {tuple(up.source.shape)}; the base "
                                  f"has {info.shape} (vocabulary resized?). Set mode: in_memory")
            w = up.source  # lora_merge never writes into its input
        torch_dtype = getattr(torch, self.dtype)
        src = w.to(self.device, torch_dtype)
        if info.name in self.roundtrip_names:
            src = roundtrip_4bit(src, self.quant)
        if up is None:
            return src
        check = Probe.before_merge(src, up, self.device) if up.replace is None else None
        merged = lora_merge(src, up, self.device)
        if merged.dtype != torch_dtype:  # cast once, into huge pages too: the writer gets it as is
            merged = (fresh_tensor(tuple(merged.shape), torch_dtype).copy_(merged) if self.device == "cpu"
                      else merged.to(torch_dtype))
        if check is not None:
            self.probes[info.name], finite = check.error(merged)
            if finite:
                self.finite.add(info.name)
        return merged

    def close(self) -> None:
        # The maps close when the last view of them (a tensor the writer held) is gone: closing one that
        # a view still uses raises BufferError.
        self.maps.clear()


def _reference(plan: Plan, peft_model: Any) -> Reference:
    assert plan.check_inputs is not None  # read by plan_merge whenever the generation check runs
    return reference_run(peft_model, plan.check_inputs, plan.eos, plan.device, plan.dtype)


def load_base(path: Path, dtype: str, device: str, trust: bool, roundtrip: Quant | None) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, dtype),
                                                      trust_remote_code=trust)
    model.to(device).eval()
    if roundtrip is not None:
        names = quantized_weight_names(model, roundtrip)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if name in names:
                    p.copy_(roundtrip_4bit(p.data, roundtrip))
    return model


def untie_adapted_head(model: Any) -> None:
    """Give a LoRA-adapted output head its own copy of a tied weight before peft merges into it.

    Otherwise W += B @ A lands in the one tensor the head shares with the input embeddings and changes
    both (peft warns about tied target modules; the generation check catches the result). A head under
    modules_to_save needs nothing: peft replaces it with the trained copy.
    """
    import torch

    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    base_layer = getattr(head, "base_layer", None)
    if base_layer is not None and base_layer.weight.data_ptr() == embed.weight.data_ptr():
        base_layer.weight = torch.nn.Parameter(base_layer.weight.detach().clone(), requires_grad=False)
