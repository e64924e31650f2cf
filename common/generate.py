"""Generation shared by every stage that runs a model over prompts (infer, synth, evaluate's judge).

- `Sampling` and `EngineArgs`: the typed settings of vLLM's `SamplingParams` and `LLM`, one declaration for
  every stage's config;
- the engines: vLLM's offline `LLM` (`start_vllm`) and batched transformers `generate`
  (`start_transformers`), behind one signature: `generate(list of prompt token ids) -> per prompt, n samples
  of (text, completion tokens, finish reason)`, plus the context length, the engine's version and `close`;
- `download_named`: a manifest's model (or adapter) files, fetched once and sha256-checked;
- `load_model`: a model that answers prompts for another stage (synth's teacher, evaluate's judge): a merge
  manifest or any model source, with its tokenizer and chat template.

Heavy libraries (torch, vLLM, transformers) are imported inside the functions that need them.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol

from pydantic import Field, model_validator

from common import chat, models, resources, storage
from common import manifest as mf
from common.config import JobConfig
from common.errors import ConfigError, InputError

LOG = logging.getLogger(__name__)

# An engine is `generate(list of prompt ids, adapter=0) -> per prompt, n samples of (text, completion tokens,
# finish reason)`, plus its context length, its version and a function that releases it. `adapter` picks one of
# the LoRA adapters the engine serves (`model["adapter_dirs"]`, all on the one base: a sweep's cells).
Completion = tuple[str, int, str]
Generate = Callable[..., list[list[Completion]]]


def adapter_dirs(model: dict[str, Any]) -> list[Path]:
    """The adapters an engine serves: `adapter_dirs`, or the one `adapter_dir`."""
    if model.get("adapter_dirs"):
        return list(model["adapter_dirs"])
    return [model["adapter_dir"]] if model.get("adapter_dir") is not None else []
Engine = tuple[Generate, int, str, Callable[[], None]]


# --------------------------------------------------------------------------- settings


class Sampling(JobConfig):
    """vLLM `SamplingParams`; the defaults are vLLM's own (never the model repo's generation_config)."""

    temperature: float = Field(1.0, ge=0.0, description="0 is greedy. vLLM's default is 1.0.")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling mass; 1.0 is off.")
    top_k: int = Field(0, ge=-1, description="Sample among the k most likely tokens; 0 or -1 is off.")
    max_tokens: int = Field(256, ge=1, description="Most new tokens per completion (vLLM's own default, 16, "
                                                   "is too short for evaluation).")
    stop: list[str] = Field(default_factory=list, description="Strings that end a completion (not included in it).")
    seed: int | None = Field(None, description="Per-prompt sampling seed: a prompt gets the same samples in any "
                                               "batch, chunk or shard (a resumed run matches); None: random.")
    n: int = Field(1, ge=1, description="Completions per prompt; each is its own output row (column `sample`).")

    @model_validator(mode="after")
    def _n_needs_sampling(self) -> Sampling:
        if self.n > 1 and self.temperature == 0:
            raise ValueError(f"n={self.n} with temperature 0 gives {self.n} identical completions: "
                             "set temperature > 0 or n: 1")
        return self


class EngineArgs(JobConfig):
    """Engine settings, passed through to `vllm.LLM` (the transformers engine uses dtype and batch_size)."""

    tensor_parallel_size: int = Field(1, ge=1, description="GPUs per model replica (vLLM).")
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0, description="Share of GPU memory vLLM may "
                                                                           "take (weights + KV cache).")
    max_model_len: int | None = Field(None, ge=2, description="Context length (prompt + completion); None: the "
                                                             "model's. Longer prompts become per-row errors.")
    max_num_seqs: int | None = Field(None, ge=1, description="Most sequences vLLM batches at once; None: vLLM's.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="auto: the model's dtype on GPU, float32 on CPU (vLLM's CPU build wants it).")
    enforce_eager: bool | None = Field(None, description="Skip CUDA graphs (vLLM); None: true on CPU, false on GPU.")
    quantization: str | None = Field(None, description="vLLM quantization method (awq, gptq, fp8, ...); None: "
                                                       "what the checkpoint says.")
    batch_size: int = Field(16, ge=1, description="Prompts per `generate` call in the transformers engine.")


class Settings(Protocol):
    """What an engine reads from a stage's config (infer's, synth's, the judge's)."""

    @property
    def engine_args(self) -> EngineArgs: ...

    @property
    def sampling(self) -> Sampling: ...

    @property
    def trust_remote_code(self) -> bool: ...


# --------------------------------------------------------------------------- engines


def on_gpu() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def start(engine: str, config: Settings, model: dict[str, Any], *, guided: dict[str, Any] | None = None,
          seed_by_prompt: bool = False) -> Engine:
    """The named engine ("vllm" or "transformers"); `guided`: a JSON schema every completion must follow;
    `seed_by_prompt`: see `prompt_seed`."""
    if engine == "vllm":
        return start_vllm(config, model, guided=guided, seed_by_prompt=seed_by_prompt)
    if guided is not None:
        raise ConfigError("guided decoding (a JSON schema the completions must follow) needs engine: vllm; the "
                          "transformers engine cannot constrain its output. Set engine: vllm or guided: false.")
    return start_transformers(config, model, seed_by_prompt=seed_by_prompt)


def prompt_seed(seed: int, ids: list[int]) -> int:
    """A prompt's own sampling seed, from the configured seed and the prompt's tokens.

    With one seed for every prompt (infer's rule) each prompt draws the same random numbers; when the model
    leans little on the prompt (a small teacher, similar few-shot prompts) that makes their samples alike.
    Synth seeds each prompt apart this way: still the same samples in any batch, chunk or attempt.
    """
    digest = hashlib.sha256(f"{seed}/".encode() + b",".join(str(i).encode() for i in ids)).digest()
    return int.from_bytes(digest[:4], "little")


def start_vllm(config: Settings, model: dict[str, Any], *, guided: dict[str, Any] | None = None,
               seed_by_prompt: bool = False) -> Engine:
    """vLLM's offline LLM with its own generation defaults; LoRA adapters as a LoRARequest.

    `guided`: a JSON schema every completion must follow (vLLM's structured outputs, xgrammar, compact: no
    whitespace between tokens, which an unconstrained sampler would otherwise fill the output with).
    """
    gpu = on_gpu()
    if not gpu:
        # vLLM's CPU build sizes its KV cache from this (GiB); its default takes a large share of RAM.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        # Run the engine core in this process: on CPU there is no GPU work to overlap with scheduling, and
        # each spawned engine/worker process re-imports torch and vLLM (measured: 61 s -> 36 s per run).
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        # vLLM binds one OpenMP thread per core it sees: the node's, in a pod with a CPU limit. Name the pod's.
        ids = resources.capped_cpu_ids()
        if ids and config.engine_args.tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", ",".join(map(str, ids)))
    # vLLM logs to stdout by default; ftjobs' stdout carries only the manifest URI.
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    import vllm
    from vllm import LLM, SamplingParams

    e, s = config.engine_args, config.sampling
    kwargs: dict[str, Any] = {
        "tensor_parallel_size": e.tensor_parallel_size, "gpu_memory_utilization": e.gpu_memory_utilization,
        "dtype": e.dtype if (e.dtype != "auto" or gpu) else "float32",
        "enforce_eager": e.enforce_eager if e.enforce_eager is not None else not gpu,
        "quantization": e.quantization, "trust_remote_code": config.trust_remote_code,
        "generation_config": "vllm", "seed": s.seed or 0,
    }
    if e.max_model_len is not None:
        kwargs["max_model_len"] = e.max_model_len
    if e.max_num_seqs is not None:
        kwargs["max_num_seqs"] = e.max_num_seqs
    if guided is not None:
        kwargs["structured_outputs_config"] = {"backend": "xgrammar", "disable_any_whitespace": True}
    if not gpu and s.seed is not None and s.temperature > 0:
        # vLLM rewinds a seeded request's generator when a prompt's prefill is split over steps, by a CUDA
        # generator's offset; a CPU generator has none ("CPU Generator does not use offset"). Whole prefills only.
        kwargs["enable_chunked_prefill"] = False
    loras: list[Any] = []
    dirs = adapter_dirs(model)
    if dirs:
        from vllm.lora.request import LoRARequest

        rank = max(int(json.loads((d / "adapter_config.json").read_text())["r"]) for d in dirs)
        # vLLM accepts only these ranks as the maximum; round the largest adapter's rank up to one. Every
        # adapter fits in the engine at once (max_loras): a sweep's cells are served without reloading.
        kwargs |= {"enable_lora": True, "max_loras": len(dirs),
                   "max_lora_rank": next(x for x in (1, 8, 16, 32, 64, 128, 256, 320, 512) if x >= rank)}
        loras = [LoRARequest(f"adapter{i}", i + 1, str(d)) for i, d in enumerate(dirs)]
    LOG.info("starting vLLM %s: %s", vllm.__version__, {k: v for k, v in kwargs.items() if v is not None})
    llm: Any = LLM(str(model["path"]), **kwargs)  # vLLM's prompt types are stricter than the dicts it takes
    max_len = int(llm.llm_engine.model_config.max_model_len)
    def params_for(seed: int | None) -> Any:
        params = SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, max_tokens=s.max_tokens,
                                stop=s.stop or None, seed=seed, n=s.n)
        if guided is not None:
            from vllm.sampling_params import StructuredOutputsParams

            params.structured_outputs = StructuredOutputsParams(json=guided)
        return params

    params = params_for(s.seed)
    by_prompt = seed_by_prompt and s.seed is not None

    def generate(batch: list[list[int]], adapter: int = 0) -> list[list[tuple[str, int, str]]]:
        per = [params_for(prompt_seed(s.seed, ids)) for ids in batch] if by_prompt else params  # type: ignore[arg-type]
        outs = llm.generate([{"prompt_token_ids": ids} for ids in batch], per,
                            lora_request=loras[adapter] if loras else None, use_tqdm=False)
        return [[(o.text, len(o.token_ids), o.finish_reason or "length") for o in req.outputs] for req in outs]

    def close() -> None:  # stop the engine process now, not at interpreter exit
        llm.llm_engine.engine_core.shutdown()

    return generate, max_len, str(vllm.__version__), close


def start_transformers(config: Settings, model: dict[str, Any], *, seed_by_prompt: bool = False) -> Engine:
    """Batched `generate` with left padding: the same rows as vLLM, for machines without it."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, GenerationConfig, LogitsProcessorList

    gpu = on_gpu()
    e, s = config.engine_args, config.sampling
    dtype = getattr(torch, e.dtype) if e.dtype != "auto" else (torch.bfloat16 if gpu else torch.float32)
    net: Any = AutoModelForCausalLM.from_pretrained(str(model["path"]), dtype=dtype,
                                               trust_remote_code=config.trust_remote_code)
    dirs = adapter_dirs(model)
    if dirs:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, str(dirs[0]), adapter_name="adapter0")
        for i, d in enumerate(dirs[1:], start=1):  # a sweep's cells: one base in memory, adapters switched
            net.load_adapter(str(d), adapter_name=f"adapter{i}")
    net = net.to("cuda" if gpu else "cpu").eval()
    if not gpu:
        resources.limit_torch_threads()  # torch's default is the node's cores
    tok = model["tokenizer"]
    max_len = e.max_model_len or int(getattr(net.config, "max_position_embeddings", 0) or 2048)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    eos = tok.eos_token_id
    # Seeded sampling draws each row from its own generator (as vLLM's per-request seed does), so a prompt
    # gets the same samples whichever batch, chunk or shard it lands in: a resumed run matches an
    # uninterrupted one. generate()'s own sampling shares one generator across the batch.
    seeded = s.temperature > 0 and s.seed is not None
    sample = s.temperature > 0 and not seeded
    # A fresh GenerationConfig: the model repo's own defaults must not leak in (vLLM ignores them too).
    gen = GenerationConfig(max_new_tokens=s.max_tokens, do_sample=sample,
                           temperature=s.temperature if sample else None,
                           top_p=s.top_p if sample else None,
                           top_k=max(s.top_k, 0) if sample else None,  # 0: off, as in vLLM
                           num_return_sequences=1 if seeded else s.n, eos_token_id=eos, pad_token_id=pad,
                           stop_strings=s.stop or None)

    def one_batch(batch: list[list[int]]) -> list[list[tuple[str, int, str]]]:
        width = max(len(x) for x in batch)
        ids = torch.tensor([[pad] * (width - len(x)) + x for x in batch], device=net.device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in batch], device=net.device)
        extra: dict[str, Any] = {}
        if seeded:  # n rows per prompt, sample j from its own generator; generate() then takes that token
            ids, mask = ids.repeat_interleave(s.n, dim=0), mask.repeat_interleave(s.n, dim=0)
            keys = [str(prompt_seed(s.seed, x)) if seed_by_prompt else "" for x in batch]  # type: ignore[arg-type]
            extra["logits_processor"] = LogitsProcessorList([_SeededSampler(s, keys, net.device)])
        with torch.no_grad():
            seqs = net.generate(input_ids=ids, attention_mask=mask, generation_config=gen, tokenizer=tok, **extra)
        out = []
        for b, prompt in enumerate(batch):
            samples = []
            for j in range(s.n):
                new = seqs[b * s.n + j, width:].tolist()[: max_len - len(prompt)]
                finish = "length"
                if eos in new:
                    new, finish = new[: new.index(eos) + 1], "stop"
                # A completion cut mid-character ends in incomplete UTF-8 bytes; vLLM's detokenizer drops
                # them, decode() renders U+FFFD. Drop them too, so both engines write the same text.
                text = tok.decode(new, skip_special_tokens=True).rstrip("\ufffd")
                for stop in s.stop:
                    if stop in text:
                        text, finish = text[: text.index(stop)], "stop"
                samples.append((text, len(new), finish))
            out.append(samples)
        return out

    def generate(batch: list[list[int]], adapter: int = 0) -> list[list[tuple[str, int, str]]]:
        if len(dirs) > 1:
            net.set_adapter(f"adapter{adapter}")
        order = sorted(range(len(batch)), key=lambda i: len(batch[i]))  # similar lengths: less padding
        results: list[list[tuple[str, int, str]]] = [[] for _ in batch]
        for lo in range(0, len(order), e.batch_size):
            idx = order[lo:lo + e.batch_size]
            for i, r in zip(idx, one_batch([batch[i] for i in idx]), strict=True):
                results[i] = r
        return results

    return generate, max_len, str(transformers.__version__), lambda: None


class _SeededSampler:
    """A logits processor that samples each row with its own generator and leaves only that token.

    Rows are prompt-major (prompt i's sample j is row i * n + j); row (i, j) is seeded from `seed` and j
    (and the prompt's own seed when prompts are seeded apart), never from its position in the batch.
    Temperature, top-k and top-p are applied as vLLM does.
    """

    def __init__(self, s: Any, prompt_keys: list[str], device: Any):
        import torch

        self.s = s
        self.generators = []
        for key in prompt_keys:  # "" for every prompt unless each is seeded apart (prompt_seed)
            for j in range(s.n):
                g = torch.Generator(device=device)
                text = f"{s.seed}/{j}" if not key else f"{s.seed}/{key}/{j}"
                g.manual_seed(int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little"))
                self.generators.append(g)

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        s = self.s
        logits = scores.float() / s.temperature
        if s.top_k > 0:
            kth = torch.topk(logits, min(s.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = torch.softmax(logits, dim=-1)
        if s.top_p < 1.0:
            ordered, order = torch.sort(probs, dim=-1, descending=True)
            # Keep the smallest set of most likely tokens whose mass reaches top_p (at least one token).
            drop = (ordered.cumsum(dim=-1) - ordered) >= s.top_p
            probs = probs.scatter(-1, order, ordered.masked_fill(drop, 0.0))
        picked = torch.stack([torch.multinomial(probs[r], 1, generator=g)
                              for r, g in enumerate(self.generators)])
        return torch.full_like(scores, float("-inf")).scatter(-1, picked, 0.0)


# --------------------------------------------------------------------------- model files from a manifest


def download_named(loaded: mf.Loaded, prefix: str, dest: Path) -> Path:
    """Fetch a manifest's artifacts named `<prefix>...` into `dest` (once; sha256-checked)."""
    done = dest / ".ftjobs-complete"
    if done.exists():
        return dest
    arts = loaded.manifest.artifacts_named(prefix)
    if not arts:
        raise InputError(f"{loaded.uri} has no {prefix}* artifacts: is it the output of "
                         f"`{mf.PRODUCER[loaded.manifest.stage]}`?")
    for art in arts:
        mf.fetch_artifact(loaded, art, storage.safe_destination(dest, art.name[len(prefix):]))
    done.write_text(loaded.uri)
    return dest


@dataclass
class Model:
    """A model ready for an engine: where its files are, its tokenizer and chat format, and where it came from."""

    source: str  # what the config named: a merge manifest or a model source
    path: Path
    tokenizer: Any
    fmt: chat.ChatFormat
    revision: str | None
    loaded: mf.Loaded | None  # the merge manifest, when `source` is one

    def engine_model(self) -> dict[str, Any]:
        """What `start` takes."""
        return {"path": self.path, "adapter_dir": None, "tokenizer": self.tokenizer}

    def identity(self) -> dict[str, Any]:
        """What a manifest records about it (beside the input ref of a merge manifest)."""
        base = getattr(mf.model_block(self.loaded), "base_model", None) if self.loaded else self.source
        return {"model": self.loaded.uri if self.loaded else self.source, "base_model": base,
                "revision": self.revision, "template_hash": self.fmt.hash}


def model_input(src: str) -> mf.Loaded | None:
    """The merge manifest `src` names, or None for a plain model source (a Hugging Face id, s3:// prefix or
    folder). Cheap: it reads the manifest, not the weights, so a stage can put it in its identity first.
    `models:/NAME[/VERSION]` names a registered merged model (root: $FTJOBS_ROOT, else '.')."""
    from common import registry

    if registry.is_ref(src):
        version = registry.resolve(src)
        if version.stage != "merge":
            raise ConfigError(f"{src} is an adapter (a train manifest); here a merged model is needed: promote the "
                              "merge of that adapter")
        return mf.load(version.manifest, expect_stage="merge")
    if models.looks_like_hf_id(src) or not storage.exists(mf.as_manifest_uri(src)):
        return None
    return mf.load(src, expect_stage="merge")


def load_model(src: str, loaded: mf.Loaded | None, *, cache: Path, trust_remote_code: bool = False,
               chat_template: str | None = None) -> Model:
    """The model's files (a merge manifest's `model/`, sha256-checked, or the source resolved into the
    cache), its tokenizer, and the chat template: the override, else the one recorded upstream, else the
    tokenizer's own."""
    from transformers import AutoTokenizer

    if loaded is not None:
        path = download_named(loaded, "model/", cache / "models" / f"merge-{loaded.sha256[:16]}")
        recorded = mf.model_block(loaded)
        revision = getattr(recorded, "base_revision", None)
        template = chat_template or recorded.chat_template
    else:
        ref = models.resolve(src, cache_dir=cache / "models")
        path, revision, template = ref.path, ref.revision, chat_template
    models.check_trust_remote_code(path, trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    return Model(source=src, path=path, tokenizer=tokenizer, fmt=chat.chat_format(tokenizer, template),
                 revision=revision, loaded=loaded)
