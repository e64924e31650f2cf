"""infer on vLLM's CPU build, through the CLI as subprocesses (the engine spawns a process): a merged model
from the real merge job, and the same adapter served on the base as a LoRARequest. Each run starts an engine
(seconds on 2 cores): the merged run and the adapter's run are made once for the module and shared."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest

from common import manifest as mf
from common.config import load_config
from common.errors import ConfigError
from jobs.infer import job as infer
from jobs.merge import job as merge
from tests.conftest import TEST_BUCKET
from tests.jobs.builders import publish_adapter
from tests.jobs.test_infer import publish_prompts, read_predictions

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]
SETTINGS = ["--set", "sampling.temperature=0", "--set", "sampling.max_tokens=12",
            "--set", "engine_args.max_model_len=128", "--set", "chunk_rows=4"]


@pytest.fixture(scope="module")
def stack(s3_endpoint: str, tiny_model: Path, tiny_tokenizer: Any,
          tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """On S3: a train-contract adapter, its real merge, and 8 prompts plus one longer than max_model_len."""
    root = f"s3://{TEST_BUCKET}/t/{uuid.uuid4().hex[:12]}"
    adapter = publish_adapter(f"{root}/train", tiny_model, r=8, scale=1.0)
    merged = merge.run(load_config(merge.Config, flags={"input": adapter.uri, "output": f"{root}/merge"}))
    prompts = publish_prompts(f"{root}/prepare", tiny_tokenizer, 8, long_rows=1)
    return {"root": root, "adapter": adapter, "merged": merged, "prompts": prompts,
            "cache": tmp_path_factory.mktemp("infer-cache")}


def run_cli(args: list[str], env: dict[str, str]) -> mf.Loaded:
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "infer", *args, *SETTINGS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return mf.load(proc.stdout.strip().splitlines()[-1], verify="full", expect_stage="infer")


@pytest.fixture(scope="module")
def merged_run(stack: dict[str, Any], s3_endpoint: str) -> mf.Loaded:
    return run_cli(["--model", stack["merged"].uri, "--prompts", stack["prompts"].uri,
                    "--output", f"{stack['root']}/infer-merged"], env_of(stack))


@pytest.fixture(scope="module")
def lora_run(stack: dict[str, Any], tiny_model: Path, s3_endpoint: str) -> mf.Loaded:
    """The adapter on the base as a LoRARequest, alone in its engine."""
    return run_cli(["--model", str(tiny_model), "--adapter", stack["adapter"].uri, "--prompts", stack["prompts"].uri,
                    "--output", f"{stack['root']}/infer-lora"], env_of(stack))


def env_of(stack: dict[str, Any]) -> dict[str, str]:
    return dict(os.environ) | {"FTJOBS_LOG_FORMAT": "json", "HF_HUB_OFFLINE": "1", "FTJOBS_CACHE": str(stack["cache"])}


def by_id(loaded: mf.Loaded) -> dict[str, dict[str, Any]]:
    return {r["id"]: r for r in read_predictions(loaded)}


def test_merged_model_on_vllm_reports_too_long_prompt_per_row(merged_run: mf.Loaded, stack: dict[str, Any]) -> None:
    rows = by_id(merged_run)
    assert sorted(rows) == [f"q{i:03d}" for i in range(9)]
    long = rows["q008"]
    assert long["error"].startswith("prompt has ") and "max_model_len is 128" in long["error"]
    assert long["finish_reason"] == "error" and long["completion"] == "" and long["prompt_tokens"] > 128
    ok = [r for i, r in rows.items() if i != "q008"]
    assert all(r["error"] is None and r["completion_tokens"] > 0 for r in ok)
    assert {r["finish_reason"] for r in ok} <= {"stop", "length"}
    assert all(r["model"] == stack["merged"].uri and r["adapter"] is None for r in ok)
    m = merged_run.manifest
    assert {(r.role, r.stage) for r in m.inputs} == {("model", "merge"), ("data", "prepare")}
    assert m.model["engine"] == "vllm" and m.model["model"] == stack["merged"].uri
    assert m.stats["errors"] == 1 and m.stats["tokens_per_s"] > 0
    assert m.stats["shards"][0]["engine"][0].startswith("vllm ")


def test_base_plus_adapter_as_lora_request_matches_merged_greedy(
        merged_run: mf.Loaded, lora_run: mf.Loaded, stack: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    merged, lora = by_id(merged_run), by_id(lora_run)
    assert {(r.role, r.stage) for r in lora_run.manifest.inputs} == {("adapter", "train"), ("data", "prepare")}
    assert all(r["adapter"] == stack["adapter"].uri for r in lora.values())
    assert [lora[i]["completion"] for i in sorted(lora)] == [merged[i]["completion"] for i in sorted(merged)]
    assert lora["q008"]["error"] == merged["q008"]["error"]

    # The other engine (peft on transformers) gives the same text for the same adapter and prompts...
    peft = transformers_run(stack, tiny_model, tmp_path / "peft", adapter=stack["adapter"].uri)
    assert {i: r["completion"] for i, r in peft.items()} == {i: r["completion"] for i, r in lora.items()}
    # ...and the adapter really changes the outputs: the bare base differs.
    plain = transformers_run(stack, tiny_model, tmp_path / "base")
    assert sum(plain[i]["completion"] != lora[i]["completion"] for i in plain if i != "q008") >= 6


def transformers_run(stack: dict[str, Any], tiny_model: Path, output: Path, **kw: Any) -> dict[str, dict[str, Any]]:
    """The prompts on the base model (plus `adapter`) through the transformers engine (peft), in-process."""
    done = infer.run(load_config(infer.Config, flags={
        "model": str(tiny_model), "prompts": stack["prompts"].uri, "output": str(output),
        "engine": "transformers", "cache_dir": str(output.parent / "cache"),
        "sampling": {"temperature": 0, "max_tokens": 12}, "engine_args": {"max_model_len": 128}} | kw))
    assert isinstance(done, mf.Loaded)
    return by_id(done)


def test_adapter_with_modules_to_save_is_sent_to_merge(s3_root: str, tiny_model: Path, stack: dict[str, Any],
                                                       tmp_path: Path) -> None:
    adapter = publish_adapter(f"{s3_root}/train", tiny_model, modules_to_save=["lm_head"])
    conf = load_config(infer.Config, flags={"model": str(tiny_model), "adapter": adapter.uri,
                                            "prompts": stack["prompts"].uri, "output": f"{s3_root}/infer",
                                            "cache_dir": str(tmp_path / "cache")})
    with pytest.raises(ConfigError, match=r"modules_to_save: \['lm_head'\].*Run `ftjobs merge"):
        infer.run(conf)


def test_several_adapters_from_one_engine_match_one_engine_each(stack: dict[str, Any], lora_run: mf.Loaded,
                                                              tiny_model: Path, tmp_path: Path) -> None:
    """A sweep's cells on one base: one vLLM engine serves both adapters (a LoRARequest each, max_loras 2),
    each output is the run its own infer would publish (the same identity: a single run there is already
    done), and the completions equal one engine per adapter (greedy): the first adapter's is `lora_run`, the
    second's is its peft run on transformers (in-process: vLLM's LoRA and peft give the same greedy text, as
    test_base_plus_adapter_as_lora_request_matches_merged_greedy shows; a vLLM engine of its own costs ~15 s).
    An adapter answered with the other's weights, or with none, would differ: the two adapters' texts do."""
    env = env_of(stack)
    root = stack["root"]
    other = publish_adapter(f"{root}/train-other", tiny_model, r=4, seed=3, scale=1.0)
    common = ["--model", str(tiny_model), "--prompts", stack["prompts"].uri]
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "infer", *common,
                           "--adapter", stack["adapter"].uri, "--output", f"{root}/served-a",
                           "--adapter", other.uri, "--output", f"{root}/served-b", *SETTINGS], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stderr.count("starting vLLM") == 1 and "'max_loras': 2" in proc.stderr
    served = {name: mf.load(f"{root}/served-{name}", verify="full") for name in "ab"}
    assert proc.stdout.strip().splitlines()[-1] == served["a"].uri
    alone = {"a": by_id(lora_run), "b": transformers_run(stack, tiny_model, tmp_path / "alone-b", adapter=other.uri)}
    for name, adapter in (("a", stack["adapter"]), ("b", other)):
        rows = by_id(served[name])
        assert all(r["adapter"] == adapter.uri for r in rows.values())
        assert {i: r["completion"] for i, r in rows.items()} == {i: r["completion"] for i, r in alone[name].items()}
    assert served["a"].manifest.config == lora_run.manifest.config | {"output": served["a"].manifest.config["output"]}
    assert by_id(served["a"])["q000"]["completion"] != by_id(served["b"])["q000"]["completion"]  # two adapters
    again = run_cli([*common, "--adapter", other.uri, "--output", f"{root}/served-b"], env)
    assert again.uri == served["b"].uri  # the single run's identity: already done
