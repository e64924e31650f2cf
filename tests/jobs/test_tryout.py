"""`ftjobs try` and `models:/` in infer, with the tiny model on the transformers engine.

The models are a base folder, a registered merged model (models:/tickets) and two LoRA adapters on the base
(served by one engine); each answer `ftjobs try` gives must be the completion infer writes for the same
prompt, greedy.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner

from common import manifest as mf
from common import registry
from common.config import load_config
from common.errors import EXIT_CONFIG
from jobs import tryout
from jobs.cli import main
from jobs.infer import job as infer
from tests.jobs.builders import publish_adapter, publish_merged
from tests.jobs.test_infer import read_predictions

pytestmark = pytest.mark.integration
PROMPTS = ["What is the sum of two and three?", "Reverse the word cat", "hello world"]


@pytest.fixture
def store(tmp_path: Path, tiny_model: Path) -> dict[str, Any]:
    root = str(tmp_path / "store")
    merge = publish_merged(f"{root}/runs/r1/merge", tiny_model, seed=1, noise=0.02)
    registry.promote(merge.uri, "tickets", root, verify="size")
    file = tmp_path / "prompts.jsonl"
    file.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return {"root": root, "merge": merge.uri, "prompts": str(file),
            "adapters": [publish_adapter(f"{root}/runs/a{i}/train", tiny_model, seed=i).uri for i in (3, 4)]}


def infer_answers(store: dict[str, Any], out: str, **kw: Any) -> tuple[list[str], mf.Loaded]:
    config = load_config(infer.Config, flags={"engine": "transformers", "prompts": store["prompts"], "output": out,
                                              "sampling": {"temperature": 0, "max_tokens": 6}, **kw})
    loaded = infer.run(config)
    assert isinstance(loaded, mf.Loaded)
    by_id = {r["id"]: r["completion"] for r in read_predictions(loaded)}
    return [by_id[f"p{i}"] for i in range(len(PROMPTS))], loaded


def test_try_gives_each_model_the_completion_infer_writes(store: dict[str, Any], tiny_model: Path,
                                                          tmp_path: Path) -> None:
    sources = (str(tiny_model), "models:/tickets", *store["adapters"])
    contenders, rows = tryout.run(sources, (), store["prompts"], engine="transformers", max_tokens=6,
                                  temperature=0.0, root=store["root"])
    assert [c.label for c in contenders] == list(sources) and len(rows) == 3
    assert tryout.engines(contenders) == [[0], [1], [2, 3]]  # the two adapters on the base: one engine
    out = str(tmp_path / "store" / "infer")
    expected = [infer_answers(store, f"{out}/base", model=str(tiny_model))[0]]
    # models:/NAME in infer: the champion's merge manifest is what infer runs and records.
    answers, loaded = infer_answers(store, f"{out}/champion", model="models:/tickets", root=store["root"])
    assert loaded.manifest.model["model"] == store["merge"]
    assert [i.uri for i in loaded.manifest.inputs if i.role == "model"] == [store["merge"]]
    expected.append(answers)
    for n, adapter in enumerate(store["adapters"]):
        expected.append(infer_answers(store, f"{out}/adapter{n}", model=str(tiny_model), adapter=adapter)[0])
    assert [c.answers for c in contenders] == expected
    assert len({tuple(a) for a in expected}) > 1  # the models really differ, so a mix-up would show


def test_try_prints_a_table_and_writes_html(store: dict[str, Any], tiny_model: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["try", "--model", "models:/tickets", "--model", store["adapters"][0], "--prompt", PROMPTS[0],
            "--prompt", "<b>ticket</b>", "--engine", "transformers", "--max-tokens", "4", "--root", store["root"]]
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert f"[1] {PROMPTS[0]}" in result.output and "models:/tickets" in result.output
    page = tmp_path / "try.html"
    result = runner.invoke(main, [*args, "--html", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    assert "&lt;b&gt;ticket&lt;/b&gt;" in text and "<b>ticket</b>" not in text and "models:/tickets" in text


def test_try_usage_mistakes_exit_2(store: dict[str, Any]) -> None:
    runner = CliRunner()
    no_prompt = runner.invoke(main, ["try", "--model", "models:/tickets", "--root", store["root"]])
    assert no_prompt.exit_code == EXIT_CONFIG and "--prompt TEXT" in no_prompt.output
    unknown = runner.invoke(main, ["try", "--model", "models:/tikets", "--prompt", "hi", "--root", store["root"]])
    assert unknown.exit_code == EXIT_CONFIG and "names: tickets" in unknown.output
