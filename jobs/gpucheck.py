"""ftjobs gpu-check: the whole chain on a tiny model on CUDA, in a few minutes, with a verdict per part.

Does this machine (or this lock, or this image) run ftjobs on its GPUs? Each part runs the real command as a
subprocess (`python -m jobs.cli ...`), on a tiny Llama built here (common/tinymodel.py) and generated chats,
in a temporary local store:

    prepare   tokenize the chats with the tiny model's tokenizer
    train     QLoRA with bitsandbytes' CUDA kernels (nf4, paged 8-bit AdamW): the loss must fall
    fsdp      a 2-GPU FSDP2 QLoRA run through `ftjobs launch` (bnb_4bit_quant_storage), when 2 GPUs are visible
    merge     the adapter folded into the 16-bit base
    infer     the merged model served by vLLM's CUDA build
    evaluate  the predictions scored

Prints the versions (torch, CUDA, bitsandbytes, transformers, peft, accelerate, vLLM, the GPUs), then one
line per part: PASS, FAIL (with the last lines of its log), SKIP (with why) or NOT RUN (a part it needs
failed). Exit 0 when nothing failed; 1 otherwise, and 1 at once, saying so, on a machine without CUDA.

    make gpu-check                      # or, in a GPU image: ftjobs gpu-check
    ftjobs gpu-check --parts train,fsdp,merge   # the train image has no vLLM: check what it holds
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

STAGE = "gpu-check"
PARTS = ("prepare", "train", "fsdp", "merge", "infer", "evaluate")
NEEDS = {"train": "prepare", "fsdp": "prepare", "merge": "train", "infer": "merge", "evaluate": "infer"}
PACKAGES = ("torch", "bitsandbytes", "transformers", "peft", "accelerate", "vllm")
TRAIN_SETS = ["max_seq_length=256", "batch_size=2", "max_steps=6", "learning_rate=0.002", "lora.r=8",
              "checkpoint.every_steps=null", "checkpoint.every_minutes=null"]
PART_TIMEOUT_S = 600


@dataclass
class Verdict:
    part: str
    status: str          # PASS, FAIL, SKIP, NOT RUN
    seconds: float = 0.0
    detail: str = ""


def versions() -> dict[str, str]:
    """Installed versions of what the chain runs on, and the GPUs torch sees."""
    out: dict[str, str] = {"python": sys.version.split()[0]}
    for name in PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    try:
        import torch

        out["cuda (torch built with)"] = str(torch.version.cuda)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        out["gpus"] = ", ".join(torch.cuda.get_device_name(i) for i in range(count)) or "none"
    except ImportError:
        out["gpus"] = "torch missing"
    return out


def cuda_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


# --------------------------------------------------------------------------- the parts


@dataclass
class Work:
    root: Path
    model: Path
    data: Path
    env: dict[str, str]

    def out(self, part: str) -> str:
        return str(self.root / "runs" / "gpu-check" / part)

    def manifest(self, part: str) -> dict[str, Any]:
        return dict(json.loads((Path(self.out(part)) / "manifest.json").read_text()))


def make_inputs(root: Path) -> Work:
    """A tiny Llama (head_dim 64, as vLLM needs) and chats it can learn."""
    from common import tinymodel

    model = tinymodel.build(root / "base", dtype="bfloat16")
    rows = []
    for i in range(96):
        a, b = i % 10, i // 10  # 96 distinct sums (prepare drops duplicates)
        rows.append({"messages": [{"role": "user", "content": f"add {a} plus {b}"},
                                  {"role": "assistant", "content": f"{a} plus {b} equals {a + b}"}]})
    data = root / "chats.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
           "FTJOBS_LOG_FORMAT": "text", "HF_HUB_OFFLINE": "1", "VLLM_CONFIGURE_LOGGING": "0"}
    return Work(root=root, model=model, data=data, env=env)


def command_line(w: Work, part: str) -> list[str]:
    """The ftjobs command line of a part."""
    cli = [sys.executable, "-m", "jobs.cli"]
    train_sets = [a for s in TRAIN_SETS for a in ("--set", s)]
    if part == "prepare":
        return [*cli, "prepare", "--source", str(w.data), "--tokenizer", str(w.model), "--output", w.out(part),
                "--set", "eval_size=8"]
    if part == "train":
        return [*cli, "train", "--input", w.out("prepare"), "--base-model", str(w.model), "--output", w.out(part),
                *train_sets]
    if part == "fsdp":
        return [*cli, "launch", "--standalone", "--nproc-per-node", "2", "--", "train", "--input", w.out("prepare"),
                "--base-model", str(w.model), "--output", w.out(part), *train_sets, "--set", "strategy=fsdp",
                "--set", "max_steps=2"]
    if part == "merge":
        return [*cli, "merge", "--input", w.out("train"), "--output", w.out(part)]
    if part == "infer":
        return [*cli, "infer", "--model", w.out("merge"), "--prompts", w.out("prepare"), "--output", w.out(part),
                "--engine", "vllm", "--set", "sampling.max_tokens=8", "--set", "sampling.temperature=0",
                "--set", "engine_args.max_model_len=256", "--set", "engine_args.gpu_memory_utilization=0.3"]
    return [*cli, "evaluate", "--predictions", w.out("infer"), "--output", w.out(part)]


def judge(w: Work, part: str) -> str:
    """What a passing part must show in its manifest beyond exit 0; '' when it does."""
    m = w.manifest(part)
    if part in ("train", "fsdp"):
        device, quant = m["stats"]["device"], m["model"]["quantization"]
        if device == "cpu" or quant.get("mode") != "nf4":
            return f"trained on {device} with quantization {quant}: not 4-bit on CUDA"
        if m["metrics"]["final_train_loss"] >= m["metrics"]["first_train_loss"]:
            return f"loss did not fall: {m['metrics']['first_train_loss']} -> {m['metrics']['final_train_loss']}"
        if part == "fsdp" and (m["stats"]["world_size"], m["model"]["strategy"]) != (2, "fsdp"):
            return f"ran as {m['model']['strategy']} on {m['stats']['world_size']} process(es)"
    return ""


def run_part(w: Work, part: str) -> Verdict:
    started = time.monotonic()
    log = w.root / f"{part}.log"
    with open(log, "w") as f:
        try:
            done = subprocess.run(command_line(w, part), env=w.env, stdout=f, stderr=subprocess.STDOUT,
                                  timeout=PART_TIMEOUT_S, cwd=w.root)
            code = done.returncode
        except subprocess.TimeoutExpired:
            code = -1
    seconds = time.monotonic() - started
    if code != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-8:]
        why = "timed out" if code == -1 else f"exit {code}"
        return Verdict(part, "FAIL", seconds, f"{why}; last lines of {log}:\n      " + "\n      ".join(tail))
    problem = judge(w, part)
    return Verdict(part, "FAIL" if problem else "PASS", seconds, problem or summary(w, part))


def summary(w: Work, part: str) -> str:
    m = w.manifest(part)
    if part in ("train", "fsdp"):
        return (f"loss {m['metrics']['first_train_loss']:.3f} -> {m['metrics']['final_train_loss']:.3f} on "
                f"{m['stats']['device']} x {m['stats']['world_size']}, peak "
                f"{m['metrics']['peak_memory_bytes'] / 2**30:.2f} GiB")
    if part == "infer":
        return f"engine {m['model'].get('engine')}, {m['stats'].get('rows', '?')} rows"
    return ""


def check(parts: list[str], keep: Path | None = None) -> list[Verdict]:
    """Run the parts in order; a part whose input part did not pass is NOT RUN."""
    gpus = cuda_gpus()
    verdicts: dict[str, Verdict] = {}
    with tempfile.TemporaryDirectory(prefix="ftjobs-gpu-check-") as tmp:
        root = keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        w = make_inputs(root)
        for part in PARTS:
            if part not in parts:
                continue
            need = NEEDS.get(part)
            if need and need in parts and verdicts.get(need, Verdict(need, "PASS")).status != "PASS":
                verdicts[part] = Verdict(part, "NOT RUN", detail=f"needs {need}, which did not pass")
            elif part == "fsdp" and gpus < 2:
                verdicts[part] = Verdict(part, "SKIP", detail=f"{gpus} GPU visible; FSDP needs 2")
            elif part == "infer" and versions()["vllm"] == "not installed":
                verdicts[part] = Verdict(part, "FAIL", detail="vLLM is not installed here (the infer image has it)")
            else:
                verdicts[part] = run_part(w, part)
            v = verdicts[part]
            click.echo(f"  {v.part:<9} {v.status:<8} {v.seconds:6.1f}s  {v.detail}", err=True)
    return list(verdicts.values())


@click.command("gpu-check")
@click.option("--parts", default=",".join(PARTS), show_default=True,
              help="Which parts to run (a part whose input part is left out reads nothing and fails).")
@click.option("--keep", type=click.Path(path_type=Path), help="Keep the store and logs in this folder.")
def command(parts: str, keep: Path | None) -> None:
    """The chain on a tiny model on CUDA (4-bit train, 2-GPU FSDP, merge, vLLM, evaluate): a verdict per part."""
    wanted = [p.strip() for p in parts.split(",") if p.strip()]
    unknown = sorted(set(wanted) - set(PARTS))
    if unknown:
        raise click.UsageError(f"--parts: unknown {', '.join(unknown)}; expected some of {', '.join(PARTS)}")
    click.echo("versions:", err=True)
    for name, version in versions().items():
        click.echo(f"  {name:<24} {version}", err=True)
    if not cuda_gpus():
        click.echo("gpu-check: no CUDA device here (torch.cuda.is_available() is False): this check needs a GPU "
                   "machine and a CUDA build of torch; nothing was run.", err=True)
        sys.exit(1)
    click.echo("parts:", err=True)
    verdicts = check(wanted, keep)
    failed = [v.part for v in verdicts if v.status in ("FAIL", "NOT RUN")]
    click.echo(f"gpu-check: {'FAILED: ' + ', '.join(failed) if failed else 'all parts passed'}", err=True)
    sys.exit(1 if failed else 0)




if __name__ == "__main__":
    command()
