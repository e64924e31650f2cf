"""infer with the transformers engine against the S3 server: shards killed and re-run, template checks,
plain prompt files. (vLLM runs are in test_infer_vllm.py.)"""

from __future__ import annotations

import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from common import chat, data, storage
from common import manifest as mf
from common.config import load_config
from common.errors import ConfigError, FtjobsError, OutputTakenError
from common.stage import Pending
from common.tinymodel import WORDS
from jobs.infer import job as infer

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def publish_prompts(prefix: str, tokenizer: Any, n: int, *, long_rows: int = 0, template_hash: str | None = None,
                    seed: int = 0) -> mf.Loaded:
    """A prepare manifest (canonical rows, eval split) as the prepare job publishes it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n + long_rows):
        words = 300 if i >= n else rng.randint(3, 10)
        question = " ".join(rng.choice(WORDS) for _ in range(words))
        messages = [{"role": "user", "content": question},
                    {"role": "assistant", "content": f"answer {i} " + rng.choice(WORDS)}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": "Be brief."})
        rows.append({"id": f"q{i:03d}", "messages": messages, "split": "eval", "source": "test"})
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows, schema=data.schema(tokenized=False)), buf)
    writer = mf.ArtifactWriter(prefix)
    writer.add_bytes(buf.getvalue(), "data/eval/part-00000.parquet", name="eval/part-00000", rows=len(rows))
    fmt = chat.chat_format(tokenizer)
    model = {"template_hash": template_hash or fmt.hash, "chat_template": fmt.template,
             "tokenizer": chat.tokenizer_identity(tokenizer)}
    m = mf.build(stage="prepare", run_id=mf.new_run_id(), config={"builder": "test_infer"}, inputs=[],
                 artifacts=writer.artifacts, model=model, stats={"rows": len(rows)})
    mf.publish(prefix, m)
    return mf.load(prefix)


def read_predictions(loaded: mf.Loaded) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for art in sorted(loaded.manifest.artifacts_named("predictions/"), key=lambda a: a.name):
        assert storage.sha256_uri(loaded.resolve(art)) == art.sha256
        rows += pq.read_table(io.BytesIO(storage.read_bytes(loaded.resolve(art)))).to_pylist()
    return rows


def config(**kw: Any) -> infer.Config:
    base = {"engine": "transformers", "sampling": {"temperature": 0, "max_tokens": 6}}
    return load_config(infer.Config, flags=base | kw)


def cli(args: list[str], env: dict[str, str], **kw: Any) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "jobs.cli", "infer", *args], cwd=REPO, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def test_three_shards_one_killed_mid_shard_rerun_gives_each_row_once(
        s3_root: str, tiny_model: Path, tiny_tokenizer: Any, subprocess_env: dict[str, str], tmp_path: Path) -> None:
    prompts = publish_prompts(f"{s3_root}/prepare", tiny_tokenizer, 12)
    out = f"{s3_root}/infer"
    common = {"model": str(tiny_model), "prompts": prompts.uri, "output": out, "num_shards": 3, "chunk_rows": 2,
              "cache_dir": str(tmp_path / "cache")}
    args = ["--model", str(tiny_model), "--prompts", prompts.uri, "--output", out, "--engine", "transformers",
            "--set", "sampling.temperature=0", "--set", "sampling.max_tokens=6", "--set", "chunk_rows=2",
            "--set", f"cache_dir={tmp_path / 'cache'}"]

    assert infer.run(config(**common, shard=0)).marker.endswith("shards/00000/DONE.json")

    # Shard 1 dies by SIGKILL after its first chunk (the pause makes "mid-shard" deterministic).
    proc = cli([*args, "--shard", "1/3"], subprocess_env | {infer.PAUSE_ENV: "60"})
    first = f"{out}/shards/00001/chunk-00000.parquet"
    deadline = time.monotonic() + 180
    while not storage.exists(first):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, "shard 1 never wrote its first chunk"
        time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert [o.rel for o in storage.list_objects(f"{out}/shards/00001")] == ["chunk-00000.parquet"]
    kept = storage.sha256_uri(first)

    assert infer.run(config(**common, shard=2)).marker.endswith("shards/00002/DONE.json")
    assert not storage.exists(f"{out}/manifest.json")
    with pytest.raises(FtjobsError, match=r"shards \[1\] of 3 have not finished"):
        infer.run(config(**common, finalize=True))

    rerun = cli([*args, "--shard", "1/3"], subprocess_env)
    stdout, stderr = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, stderr[-3000:]
    assert "2 chunks, 1 already written" in stderr
    assert storage.sha256_uri(first) == kept  # the finished chunk was not redone
    uri = stdout.strip().splitlines()[-1]
    assert uri == f"{out}/manifest.json"

    loaded = mf.load(uri, verify="full", expect_stage="infer")
    rows = read_predictions(loaded)
    assert sorted(r["id"] for r in rows) == [f"q{i:03d}" for i in range(12)]
    assert len(loaded.manifest.artifacts_named("predictions/part-")) == 3
    m = loaded.manifest
    assert m.stats["rows"] == m.stats["predictions"] == 12 and m.stats["errors"] == 0
    assert [s["rows"] for s in m.stats["shards"]] == [4, 4, 4]
    assert m.stats["completion_tokens"] == sum(r["completion_tokens"] for r in rows) > 0
    assert m.stats["tokens_per_s"] > 0 and set(m.timings) >= {"shard_00001_generate_s", "generate_s"}
    assert {r.role for r in m.inputs} == {"data"} and m.config["shard"] is None
    assert m.model["engine"] == "transformers" and m.model["template_hash"] == prompts.manifest.model["template_hash"]
    first_row = next(r for r in rows if r["id"] == "q001")
    assert first_row["reference"].startswith("answer 1 ") and first_row["prompt"][-1]["role"] == "user"
    assert first_row["finish_reason"] in {"stop", "length"} and first_row["model"] == str(tiny_model)
    assert json.loads(first_row["sampling"])["max_tokens"] == 6

    # Every shard, and --finalize, now answer "already done" with the same manifest.
    assert infer.run(config(**common, shard=0)).uri == uri
    assert infer.run(config(**common, finalize=True)).uri == uri
    with pytest.raises(OutputTakenError, match="sampling.max_tokens"):
        infer.run(config(**common, shard=0, sampling={"temperature": 0, "max_tokens": 7}))


def test_template_mismatch_is_refused_unless_forced(tmp_path: Path, tiny_model: Path, tiny_tokenizer: Any) -> None:
    root = str(tmp_path / "store")
    prompts = publish_prompts(f"{root}/prepare", tiny_tokenizer, 2, template_hash="0" * 64)
    kw = {"model": str(tiny_model), "prompts": prompts.uri, "cache_dir": str(tmp_path / "cache")}
    with pytest.raises(ConfigError, match=r"Chat template mismatch: the prompts .* recorded template sha256 "
                                          r"000000000000.*force_template"):
        infer.run(config(**kw, output=f"{root}/refused"))
    assert storage.list_objects(f"{root}/refused") == []  # nothing half-written

    done = infer.run(config(**kw, output=f"{root}/forced", force_template=True))
    assert isinstance(done, mf.Loaded) and done.manifest.stats["predictions"] == 2


def test_jsonl_prompt_column_bad_rows_reported_and_n_samples(tmp_path: Path, tiny_model: Path) -> None:
    src = tmp_path / "prompts.jsonl"
    lines = [{"prompt": "hello world", "reference": "hi"}, {"prompt": ""}, {"prompt": "one two three"},
             {"messages": "not a list"}]
    src.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    done = infer.run(config(model=str(tiny_model), prompts=str(src), output=str(tmp_path / "out"),
                            cache_dir=str(tmp_path / "cache"),
                            sampling={"temperature": 0.9, "seed": 1, "n": 2, "max_tokens": 5}))
    assert isinstance(done, mf.Loaded)
    rows = {(r["id"], r["sample"]): r for r in read_predictions(done)}
    assert sorted(rows) == [(f"row-{i:08d}", s) for i in range(4) for s in (0, 1)]
    assert rows[("row-00000000", 1)]["reference"] == "hi" and rows[("row-00000000", 0)]["completion_tokens"] > 0
    # The prompt messages keep the canonical message fields (tool calls and the rest are null here).
    assert chat.clean(rows[("row-00000000", 0)]["prompt"]) == [{"role": "user", "content": "hello world"}]
    assert "non-empty 'prompt'" in rows[("row-00000001", 0)]["error"]
    assert "not a list of {role, content}" in rows[("row-00000003", 1)]["error"]
    assert rows[("row-00000003", 1)]["finish_reason"] == "error"
    assert done.manifest.stats["errors"] == 4 and done.manifest.stats["predictions"] == 8
    assert done.manifest.inputs[0].stage is None and done.manifest.inputs[0].sha256 == storage.sha256_uri(str(src))


def test_racing_finishers_publish_exactly_one_manifest(s3_root: str, tiny_model: Path, tiny_tokenizer: Any,
                                                      tmp_path: Path) -> None:
    from concurrent.futures import ThreadPoolExecutor

    prompts = publish_prompts(f"{s3_root}/prepare", tiny_tokenizer, 4)
    out = f"{s3_root}/infer"
    common = {"model": str(tiny_model), "prompts": prompts.uri, "output": out, "num_shards": 2,
              "cache_dir": str(tmp_path / "cache")}
    assert isinstance(infer.run(config(**common, shard=0)), Pending)
    first = infer.run(config(**common, shard=1))
    assert isinstance(first, mf.Loaded)
    # The last shard died after its DONE marker and parts, before its manifest: two finishers now race.
    storage.delete(first.uri)
    with ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda kw: infer.run(config(**common, **kw)), [{"shard": 1}, {"finalize": True}]))
    assert all(isinstance(r, mf.Loaded) for r in results)
    assert results[0].sha256 == results[1].sha256  # both report the one manifest that won
    winner = mf.load(out, verify="full")
    assert sorted(r["id"] for r in read_predictions(winner)) == ["q000", "q001", "q002", "q003"]


def test_unreadable_prompt_files_exit_3_naming_file_and_line_before_anything_is_written(
        tmp_path: Path, tiny_model: Path) -> None:
    from click.testing import CliRunner

    from jobs.cli import main

    truncated = tmp_path / "prompts.parquet"
    pq.write_table(pa.table({"prompt": ["hello world"] * 50}), truncated)
    truncated.write_bytes(truncated.read_bytes()[:-20])  # the footer is gone, as after an interrupted copy
    latin1 = tmp_path / "prompts.jsonl"
    latin1.write_bytes(b'{"prompt": "hello"}\n{"prompt": "caf\xe9"}\n')
    cases = [(truncated, f"{truncated}: not a readable Parquet file"),
             (latin1, f"{latin1} line 2: invalid UTF-8 at byte 15")]
    for src, message in cases:
        out = tmp_path / f"out-{src.suffix[1:]}"
        result = CliRunner().invoke(main, ["--log-format", "text", "infer", "--model", str(tiny_model),
                                           "--prompts", str(src), "--output", str(out), "--engine", "transformers",
                                           "--set", f"cache_dir={tmp_path / 'cache'}"])
        assert result.exit_code == 3, result.output
        assert message in result.output and "Traceback" not in result.output
        assert storage.list_objects(str(out)) == []


def test_finalize_given_only_the_output_publishes_the_run_recorded_in_plan_json(
        s3_root: str, tiny_model: Path, tiny_tokenizer: Any, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from jobs.cli import main

    def finalize_alone() -> Any:
        return CliRunner().invoke(main, ["--log-format", "text", "infer", "--finalize", "--output", out])

    prompts = publish_prompts(f"{s3_root}/prepare", tiny_tokenizer, 4)
    out = f"{s3_root}/infer"
    result = finalize_alone()
    assert result.exit_code == 1 and f"{out} has no plan.json: no shard has started there yet" in result.output

    shard0 = CliRunner().invoke(main, ["--log-format", "text", "infer", "--model", str(tiny_model), "--prompts",
                                       prompts.uri, "--output", out, "--shard", "0/2", "--engine", "transformers",
                                       "--set", "sampling.temperature=0", "--set", "sampling.max_tokens=6",
                                       "--set", f"cache_dir={tmp_path / 'cache'}"])
    assert shard0.exit_code == 0, shard0.output
    marker = f"{out}/shards/00000/DONE.json"
    assert shard0.stdout.strip().splitlines()[-1] == marker
    assert f"shard marker: {marker} (not a manifest: waiting for shards [1]" in shard0.output
    assert f"manifest: {marker}" not in shard0.output  # the CLI's last line names it a marker too
    result = finalize_alone()
    assert result.exit_code == 1 and "shards [1] of 2 have not finished" in result.output

    common = {"model": str(tiny_model), "prompts": prompts.uri, "output": out, "num_shards": 2,
              "cache_dir": str(tmp_path / "cache")}
    last = infer.run(config(**common, shard=1))
    assert isinstance(last, mf.Loaded)
    storage.delete(last.uri)  # the last shard died after its marker, before publishing

    result = finalize_alone()
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == f"{out}/manifest.json"
    assert f"finalizing the run in {out}/plan.json: model {tiny_model}, prompts {prompts.uri}, 2 shards" \
        in result.output
    loaded = mf.load(out, verify="full", expect_stage="infer")
    # The manifest the shards would have published: their config and inputs, so it is "already done" for them.
    assert loaded.manifest.config == last.manifest.config and loaded.manifest.inputs == last.manifest.inputs
    assert sorted(r["id"] for r in read_predictions(loaded)) == ["q000", "q001", "q002", "q003"]
    assert infer.run(config(**common, shard=0)).uri == loaded.uri
    again = finalize_alone()
    assert again.exit_code == 0 and "already done" in again.output


def test_several_adapters_on_the_transformers_engine_give_the_rows_of_separate_runs(
        tmp_path: Path, tiny_model: Path, tiny_tokenizer: Any) -> None:
    from tests.jobs.builders import publish_adapter

    prompts = publish_prompts(str(tmp_path / "prepare"), tiny_tokenizer, 5)
    a = publish_adapter(str(tmp_path / "train-a"), tiny_model, r=4, seed=1)
    b = publish_adapter(str(tmp_path / "train-b"), tiny_model, r=8, seed=2)
    common = {"model": str(tiny_model), "prompts": prompts.uri, "engine": "transformers",
              "cache_dir": str(tmp_path / "cache"), "sampling": {"temperature": 0, "max_tokens": 6}}
    first = infer.run(config(**common, adapter=a.uri, output=str(tmp_path / "served-a"),
                             also=[{"adapter": b.uri, "output": str(tmp_path / "served-b")}]))
    assert isinstance(first, mf.Loaded) and first.uri == mf.manifest_uri(str(tmp_path / "served-a"))
    for name, adapter in (("a", a), ("b", b)):
        served = read_predictions(mf.load(str(tmp_path / f"served-{name}"), verify="full"))
        alone = read_predictions(infer.run(config(**common, adapter=adapter.uri, output=str(tmp_path / name))))
        assert [(r["id"], r["completion"], r["adapter"]) for r in served] == \
            [(r["id"], r["completion"], r["adapter"]) for r in alone]
    with pytest.raises(ConfigError, match="also: every adapter needs an output of its own"):
        config(**common, adapter=a.uri, output=str(tmp_path / "x"), also=[{"adapter": b.uri,
                                                                            "output": str(tmp_path / "x")}])
