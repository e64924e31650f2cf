"""What the training set is made of: source weights, caps and repeats; eval rows and guard prompts kept out
of training; nested subsets for learning curves. Real files through prepare, rows read back from Parquet."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from common import config as cfg
from common import data
from common import manifest as mf
from jobs import prepare

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parents[2]


def jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def rows(tag: str, n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question number {i}: what comes after {i}?"},
                          {"role": "assistant", "content": f"{tag} answer: {i + 1}"}]} for i in range(n)]


def run(**kw) -> mf.Loaded:
    if "eval_size" not in kw:
        kw.setdefault("eval_fraction", 0.0)
    return prepare.run(cfg.validate(prepare.Config, kw))


def split(loaded: mf.Loaded, name: str = "train") -> list[dict]:
    return data.read_split(loaded, name, columns=["id", "source", "messages"]).to_pylist()


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    d = tmp_path_factory.mktemp("mix")
    return jsonl(d / "real.jsonl", rows("real", 300)), jsonl(d / "synthetic.jsonl", rows("synthetic", 60))


def test_weights_are_met_deterministically_and_recorded(tmp_path: Path, sources: tuple[Path, Path]):
    real, synth = sources
    conf = {"sources": [{"path": str(real), "weight": 0.75}, {"path": str(synth), "weight": 0.25, "repeat": True}],
            "mix_rows": 400}
    a = run(**conf, output=str(tmp_path / "a"))
    train = split(a)
    counts = Counter(Path(r["source"]).name for r in train)
    # Tolerance: one row per source (each share is rounded to whole rows).
    assert abs(counts["real.jsonl"] - 300) <= 1 and abs(counts["synthetic.jsonl"] - 100) <= 1
    assert len({r["id"] for r in train}) == len(train)  # repeated copies get their own ids
    mix = a.manifest.stats["mixing"]
    assert mix["train_rows_before"] == 360 and mix["train_rows_after"] == len(train) == 400
    by = {Path(s["source"]).name: s for s in mix["sources"]}
    assert by["real.jsonl"]["rows_before"] == 300 and by["real.jsonl"]["rows_after"] == counts["real.jsonl"]
    assert by["synthetic.jsonl"]["share_before"] == pytest.approx(60 / 360, abs=1e-5)
    assert by["synthetic.jsonl"]["share_after"] == pytest.approx(0.25, abs=1 / 400)
    # The same seed, the same rows in the same order; another seed, another choice of real rows.
    assert [r["id"] for r in split(run(**conf, output=str(tmp_path / "b")))] == [r["id"] for r in train]
    other = split(run(**conf, seed=1, output=str(tmp_path / "c")))
    assert {r["id"] for r in other} != {r["id"] for r in train}
    # Any stretch of the output holds the mixture: the first 128 rows are about a quarter synthetic.
    assert 24 <= sum("synthetic" in r["source"] for r in train[:128]) <= 40


def test_ftjobs_inspect_shows_the_mixture(tmp_path: Path, sources: tuple[Path, Path]):
    from click.testing import CliRunner

    real, synth = sources
    run(sources=[{"path": str(real), "max_rows": 50}, str(synth)], output=str(tmp_path / "o"))
    result = CliRunner().invoke(_inspect(), [str(tmp_path / "o"), "--rows", "1"])
    assert result.exit_code == 0, result.output
    assert "training rows: 360 -> 110" in result.output
    assert f"source {real}: 300 -> 50 rows, share 83.3% -> 45.5%, max_rows 50" in result.output


def _inspect():  # type: ignore[no-untyped-def]
    from jobs.cli import main

    return main.get_command(None, "inspect")


def test_an_unmeetable_weight_exits_2_naming_the_source(tmp_path: Path, sources: tuple[Path, Path],
                                                         subprocess_env: dict[str, str]):
    real, synth = sources
    conf = tmp_path / "mix.yaml"
    conf.write_text(f"sources:\n  - {{path: {real}, weight: 0.5}}\n  - {{path: {synth}, weight: 0.5}}\n"
                    f"output: {tmp_path / 'o'}\neval_fraction: 0\n")
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--config", str(conf)], cwd=REPO,
                          env=subprocess_env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"source '{synth}' cannot meet its weight 0.5: 180 of 360 training rows wanted, it has 60" in proc.stderr
    assert "repeat: true" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o" / "manifest.json").exists() and not list((tmp_path / "o").rglob("*.parquet"))


def test_learning_curve_subsets_are_nested_and_share_the_eval_set(tmp_path: Path, sources: tuple[Path, Path]):
    real, synth = sources
    runs = {n: run(sources=[str(real), str(synth)], eval_size=30, max_train_rows=n, output=str(tmp_path / str(n)))
            for n in (40, 120)}
    full = run(sources=[str(real), str(synth)], eval_size=30, output=str(tmp_path / "all"))
    ids = {n: {r["id"] for r in split(lo)} for n, lo in runs.items()}
    every = {r["id"] for r in split(full)}
    assert len(ids[40]) == 40 and len(ids[120]) == 120
    assert ids[40] < ids[120] < every
    evals = [sorted(r["id"] for r in split(lo, "eval")) for lo in (*runs.values(), full)]
    assert evals[0] == evals[1] == evals[2] and len(evals[0]) == 30
    assert runs[40].manifest.stats["mixing"]["max_train_rows"] == 40
    half = run(sources=[str(real), str(synth)], eval_size=30, train_fraction=0.5, output=str(tmp_path / "half"))
    assert len(split(half)) == half.manifest.stats["mixing"]["train_rows_before"] // 2


def test_a_planted_near_duplicate_of_an_eval_row_is_removed_from_training(tmp_path: Path):
    held = rows("held", 20)
    planted = json.loads(json.dumps(held[7]))
    planted["messages"][1]["content"] = planted["messages"][1]["content"].replace("answer", "answer is")
    train = jsonl(tmp_path / "train.jsonl", rows("train", 100) + [planted])
    evals = jsonl(tmp_path / "eval.jsonl", held)
    guard = jsonl(tmp_path / "guard.jsonl", [{"prompt": "train question number 42: what comes after 42?"}])
    lo = run(sources=[str(train), {"path": str(evals), "split": "eval"}], output=str(tmp_path / "o"),
             guard_suites=[str(guard)])
    stats = lo.manifest.stats
    assert stats["dropped"] == {"eval_overlap": 2}
    assert stats["decontamination"]["removed_by"] == {"eval": 1, str(guard): 1}
    texts = [r["messages"][0]["content"] for r in split(lo)]
    assert len(texts) == 99 and planted["messages"][0]["content"] not in texts
    assert not any("number 42:" in t for t in texts) and "train question number 41: what comes after 41?" in texts
    assert any(g.role == "guard" for g in lo.manifest.inputs)
    # Off, or above the pair's similarity, the planted row stays (the eval row is the same either way).
    kept = run(sources=[str(train), {"path": str(evals), "split": "eval"}], output=str(tmp_path / "off"),
               decontaminate="off")
    assert len(split(kept)) == 101 and "decontamination" not in kept.manifest.stats


def test_weights_must_be_given_for_every_training_source(tmp_path: Path, sources: tuple[Path, Path]):
    real, synth = sources
    with pytest.raises(Exception, match="has no weight while others have one"):
        cfg.validate(prepare.Config, {"sources": [{"path": str(real), "weight": 1}, str(synth)], "output": "x"})
    with pytest.raises(Exception, match="repeat without a weight"):
        cfg.validate(prepare.Config, {"sources": [{"path": str(real), "repeat": True}], "output": "x"})
    with pytest.raises(Exception, match="no source has a weight"):
        cfg.validate(prepare.Config, {"sources": [str(real)], "mix_rows": 10, "output": "x"})


def test_a_pipelines_data_mappings_reach_prepare_as_per_source_settings(tmp_path: Path, sources: tuple[Path, Path],
                                                                        subprocess_env: dict[str, str]):
    """`data:` items of a run config may carry prepare's per-source settings; the chain hands them to
    `ftjobs prepare --source` as JSON, which the real prepare reads as a weighted mixture."""
    from jobs import chain

    real, synth = sources
    config = cfg.validate(chain.Config, {"base_model": "m", "tokenize": False, "prepare": {"mix_rows": 400},
                                         "data": [{"path": str(real), "weight": 0.75},
                                                  {"path": str(synth), "weight": 0.25, "repeat": True}]})
    chain.check(config)  # every step's arguments parse with its own command line, the sources included
    args = chain.arguments(chain.BY_NAME["prepare"], config, {})
    assert args[0] == "--source" and json.loads(args[1]) == {"path": str(real), "weight": 0.75}
    proc = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", *args, "--set", "mix_rows=400", "--set",
                           "eval_fraction=0", "--output", str(tmp_path / "o")], cwd=REPO, env=subprocess_env,
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    by = {Path(s["source"]).name: s for s in mf.load(str(tmp_path / "o")).manifest.stats["mixing"]["sources"]}
    assert abs(by["real.jsonl"]["rows_after"] - 300) <= 1 and abs(by["synthetic.jsonl"]["rows_after"] - 100) <= 1
    bad = subprocess.run([sys.executable, "-m", "jobs.cli", "prepare", "--source", '{"path": "a.jsonl",',
                          "--output", str(tmp_path / "b")], cwd=REPO, env=subprocess_env, capture_output=True,
                         text=True)
    assert bad.returncode == 2 and "starts like a JSON object but is not one" in bad.stderr
    assert "Traceback" not in bad.stderr
    with pytest.raises(Exception, match=r"data\[0\] is a mapping without a path"):
        cfg.validate(chain.Config, {"base_model": "m", "data": [{"weight": 0.5}]})
