"""strategy fsdp for real: `ftjobs launch` (torchrun, gloo on CPU) runs `ftjobs train` sharded with FSDP2 on
2 processes, for every method.

Each run's loss curve must be the curve of one uninterrupted process with the same global batch (grad_accum
2 x 1 process = grad_accum 1 x 2 processes), step for step: that holds only when the sharded gradients are
summed over the processes (not averaged), every micro-batch is trained on once, and the processes run the
same collectives. Full finetuning is SIGKILLed after its first sharded checkpoint (every rank wrote its
shards) and resumed on ONE process (torch.distributed.checkpoint reshards 2 -> 1); its published model/
passes through merge unchanged and infer serves it. Dropout is off; what remains is float summation order.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from common import manifest as mf
from common import storage
from common.config import load_config
from jobs.infer import job as infer
from jobs.merge import job as merge
from jobs.train import checkpoints
from jobs.train import job as train
from tests.jobs.helpers import publish_prepare
from tests.jobs.test_infer import publish_prompts, read_predictions
from tests.jobs.test_train_distributed import REPO, launch_command, records_of

pytestmark = pytest.mark.e2e

STEPS = 6
SETS = ["max_seq_length=96", "batch_size=2", f"max_steps={STEPS}", "learning_rate=0.01", "lora.r=8",
        "lora.alpha=16", "lora.dropout=0", "checkpoint.every_steps=2", "checkpoint.keep=2",
        "checkpoint.grace_seconds=60", "eval_every=3"]
METHOD_SETS = {"lora": ["method=lora"], "qlora": ["method=qlora"], "full": ["method=full", "learning_rate=0.001"]}
# Float32 sums in another order (FSDP's reduce-scatter, gloo): identical to 6 decimals on lora and qlora here.
TOLERANCE = {"rel": 0, "abs": 2e-4}


@pytest.fixture(scope="module")
def prepared(s3_endpoint, tiny_tokenizer) -> mf.Loaded:
    return publish_prepare(f"s3://ftjobs-test/t/{uuid.uuid4().hex[:12]}/prepare", tokenizer=tiny_tokenizer,
                           n_train=64, n_eval=8)


def sets(method: str) -> list[str]:
    return [*SETS, *METHOD_SETS[method]]


def one_process(prepared: mf.Loaded, tiny_model: Path, method: str) -> mf.Loaded:
    """The reference: one process, strategy ddp, grad_accum 2, never interrupted (in-process)."""
    config = load_config(train.Config, sets=[*sets(method), "grad_accum=2"], flags={
        "input": prepared.uri, "base_model": str(tiny_model), "output": f"{prepared.prefix}-one-{method}"})
    result = train.run(config)
    assert isinstance(result, mf.Loaded)
    return result


def fsdp_args(prepared: mf.Loaded, tiny_model: Path, output: str, method: str) -> list[str]:
    args = ["train", "--input", prepared.uri, "--base-model", str(tiny_model), "--output", output]
    for item in [*sets(method), "strategy=fsdp"]:
        args += ["--set", item]
    return args


def curve(loaded: mf.Loaded) -> dict[str, Any]:
    return json.loads(storage.read_bytes(loaded.resolve(loaded.manifest.artifact("loss_curve.json"))))


def assert_same_curve(got: mf.Loaded, ref: mf.Loaded) -> float:
    a, b = curve(got), curve(ref)
    assert [p["step"] for p in a["train"]] == [p["step"] for p in b["train"]] == list(range(1, STEPS + 1))
    assert [p["loss"] for p in a["train"]] == pytest.approx([p["loss"] for p in b["train"]], **TOLERANCE)
    assert [p["loss"] for p in a["eval"]] == pytest.approx([p["loss"] for p in b["eval"]], **TOLERANCE)
    assert got.manifest.metrics["tokens_trained"] == ref.manifest.metrics["tokens_trained"]
    return max(abs(x["loss"] - y["loss"]) for x, y in zip(a["train"], b["train"], strict=True))


@pytest.mark.timeout(400)
@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_fsdp_on_two_processes_trains_the_one_process_curve(method, prepared, tiny_model, subprocess_env):
    output = f"{prepared.prefix}-fsdp-{method}"
    done = subprocess.run(launch_command(2, fsdp_args(prepared, tiny_model, output, method)), cwd=REPO,
                          env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    got = mf.load(mf.manifest_uri(output))
    m = got.manifest
    assert (m.stats["world_size"], m.model["strategy"], m.model["method"]) == (2, "fsdp", method)
    assert m.model["quantization"]["mode"] == ("nf4" if method == "qlora" else "none")
    worst = assert_same_curve(got, one_process(prepared, tiny_model, method))
    # The adapter is whole (gathered from the shards), in the layout merge reads: every LoRA matrix full-size.
    from safetensors.torch import load as load_st

    adapter = load_st(storage.read_bytes(got.resolve(m.artifact("adapter/adapter_model.safetensors"))))
    assert {tuple(t.shape) for k, t in adapter.items() if "q_proj.lora_A" in k} == {(8, 128)}
    print(f"{method}: fsdp 2 processes vs 1 process, largest train-loss difference {worst:.2e}")


def _descendants(pid: int) -> list[int]:
    out: list[int] = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        for child in (task / "children").read_text().split():
            out += [int(child), *_descendants(int(child))]
    return out


def _sigkill_at_first_checkpoint(cmd: list[str], env: dict[str, str], output: str) -> None:
    """Start the command in a process group of its own; SIGKILL the group once a checkpoint is complete."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stderr is not None
    lines = []
    for line in proc.stderr:
        lines.append(line)
        if "checkpoint saved" in line:
            # torchrun starts each worker in a session of its own: kill them with the launcher, as a lost node
            for pid in [*_descendants(proc.pid), proc.pid]:
                os.kill(pid, signal.SIGKILL)
            break
    else:
        proc.wait(timeout=60)
        pytest.fail("train exited before its first checkpoint:\n" + "".join(lines[-30:]))
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    time.sleep(1)  # the workers' pids are gone once the kernel reaped them


@pytest.mark.timeout(500)
def test_full_finetune_sigkilled_on_two_processes_resumes_on_one_then_merges_and_serves(
        prepared, tiny_model, tiny_tokenizer, subprocess_env, tmp_path):
    output = f"{prepared.prefix}-fsdp-full"
    args = fsdp_args(prepared, tiny_model, output, "full")
    _sigkill_at_first_checkpoint(launch_command(2, args), subprocess_env, output)
    (name,) = [n for n, (_, files) in checkpoints.present(output).items() if checkpoints.MARKER in files]
    marker = json.loads(storage.read_bytes(storage.join(checkpoints.root(output), name, checkpoints.MARKER)))
    # Sharded: each rank wrote its own shard file, listed with its sha256 in the one marker.
    assert (marker["format"], marker["world"]) == ("dcp", 2)
    assert {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "state.json"} <= set(marker["files"])
    assert not storage.exists(mf.manifest_uri(output))

    started = time.monotonic()
    resumed = subprocess.run(launch_command(1, args), cwd=REPO, env=subprocess_env, capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = "\n".join(r["msg"] for r in records_of(resumed.stderr))
    assert f"resuming from {output}/checkpoints/{name}" in log, log
    got = mf.load(mf.manifest_uri(output))
    m = got.manifest
    assert (m.stats["resumed_from_step"], m.stats["world_size"], m.model["method"], m.model["lora"]) == (
        2, 1, "full", None)
    assert not m.artifacts_named("adapter/") and m.artifact("model/model.safetensors")
    worst = assert_same_curve(got, one_process(prepared, tiny_model, "full"))
    print(f"full: 2 processes SIGKILLed at step 2, resumed on 1: largest train-loss difference {worst:.2e} "
          f"(resume {time.monotonic() - started:.0f}s)")

    # merge passes the model through byte for byte; infer serves it.
    merged = merge.run(load_config(merge.Config, flags={"input": got.uri, "output": str(tmp_path / "merge")}))
    assert merged.manifest.model["mode"] == "passthrough"
    assert merged.manifest.artifact("model/model.safetensors").sha256 == m.artifact("model/model.safetensors").sha256
    prompts = publish_prompts(str(tmp_path / "prompts"), tiny_tokenizer, 3)
    served = infer.run(load_config(infer.Config, flags={
        "engine": "transformers", "sampling": {"temperature": 0, "max_tokens": 4}, "model": merged.uri,
        "prompts": prompts.uri, "output": str(tmp_path / "infer")}))
    assert isinstance(served, mf.Loaded)
    assert len(read_predictions(served)) == 3


def test_fsdp_refuses_cpu_offload_without_cuda(prepared, tiny_model):
    config = load_config(train.Config, sets=[*sets("lora"), "strategy=fsdp", "fsdp.cpu_offload=true"], flags={
        "input": prepared.uri, "base_model": str(tiny_model), "output": f"{prepared.prefix}-offload"})
    from common.errors import ConfigError

    with pytest.raises(ConfigError, match="fsdp.cpu_offload"):
        train.run(config)
