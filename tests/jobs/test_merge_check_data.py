"""merge's generation check on the run's own prepared rows: what it compares, that it fails a damaged merge,
and where it falls back to the prompts.

The adapters here are published with a prepare run as their train input (`publish_adapter(data=...)`), as
`ftjobs train` records it; the tiny model merges in float32 (the strict rule).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from common import manifest as mf
from common.config import validate
from common.errors import InputError
from jobs.merge import check_data, sources
from jobs.merge import job as merge
from tests.jobs.builders import publish_adapter
from tests.jobs.helpers import publish_prepare

pytestmark = pytest.mark.integration


def do_merge(**values: Any) -> mf.Loaded:
    return merge.run(validate(merge.Config, values))


@pytest.fixture(scope="module")
def with_rows(tiny_model: Path, tiny_tokenizer: Any, tmp_path_factory: pytest.TempPathFactory) -> mf.Loaded:
    root = tmp_path_factory.mktemp("check-rows")
    prep = publish_prepare(str(root / "prepare"), tokenizer=tiny_tokenizer, n_train=8, n_eval=8, shards=1)
    return publish_adapter(str(root / "train"), tiny_model, data=prep)


def test_check_compares_held_out_rows_teacher_forced_in_one_forward(with_rows: mf.Loaded, tmp_path: Path) -> None:
    m = do_merge(input=with_rows.uri, output=str(tmp_path / "out"), mode="sharded").manifest
    gen = m.metrics["generation"]
    assert gen["ok"] and gen["rule"] == "strict"
    compared = gen["compared"]
    assert compared["source"] == "data" and compared["split"] == "eval"  # held out from training
    assert compared["rows"] == ["eval-0", "eval-1", "eval-2", "eval-3"]  # checks.rows, in file order
    # every position of every row is compared; the answers' own positions are counted apart
    assert 0 < gen["answer_positions"] == compared["answer_positions"] < gen["positions"]
    assert gen["positions"] == compared["tokens"] - len(compared["rows"])
    assert set(gen["seconds"]) == {"reference_load", "reference_forward", "merged_load", "merged_forward"}
    assert "4 prepared rows" in m.metrics["generation_check"]


def test_damaged_merge_fails_on_the_rows_naming_the_row_and_answer_token(
        with_rows: mf.Loaded, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    right = sources.lora_merge

    def doubled_scale(src: Any, up: merge.LoraUpdate, device: str) -> Any:
        return right(src, merge.LoraUpdate(a=up.a, b=up.b, scale=up.scale * 2, replace=up.replace), device)

    monkeypatch.setattr(sources, "lora_merge", doubled_scale)
    with pytest.raises(merge.MergeCheckError):
        do_merge(input=with_rows.uri, output=str(tmp_path / "out"), mode="sharded")
    assert re.search(r"teacher-forced answers differ: row 'eval-\d', (answer token|prompt position) \d+: "
                     r"base\+adapter chose \d+", caplog.text)
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_rows_it_cannot_use_fall_back_to_the_prompts_or_fail_when_data_is_asked_for(
        tiny_model: Path, tmp_path: Path) -> None:
    untokenized = publish_prepare(str(tmp_path / "prepare"), n_train=4, n_eval=0, shards=1)
    adapter = publish_adapter(str(tmp_path / "train"), tiny_model, data=untokenized)
    m = do_merge(input=adapter.uri, output=str(tmp_path / "out"), checks={"max_new_tokens": 2}).manifest
    compared = m.metrics["generation"]["compared"]
    assert compared["source"] == "prompts" and compared["max_new_tokens"] == 2
    assert "why_not_data" not in compared  # max_new_tokens set: the prompts were asked for, not fallen back to
    with pytest.raises(InputError, match="checks.source is data.*is not tokenized.*checks.source: prompts") as err:
        do_merge(input=adapter.uri, output=str(tmp_path / "out2"), checks={"source": "data"})
    assert err.value.exit_code == 3


@pytest.mark.unit
def test_auto_source_honours_a_config_that_sets_the_prompts() -> None:
    assert merge.Checks().data_first
    assert not merge.Checks(prompts=["Hi"]).data_first and not merge.Checks(max_new_tokens=4).data_first
    assert merge.Checks(source="data", prompts=["Hi"]).data_first and not merge.Checks(source="prompts").data_first


def test_a_select_manifest_leads_through_its_train_run_to_the_prepared_rows(with_rows: mf.Loaded,
                                                                              tmp_path: Path) -> None:
    select = mf.build(stage="select", run_id=mf.new_run_id(), config={}, inputs=[with_rows.ref("train")],
                      artifacts=[])
    mf.publish(str(tmp_path / "select"), select)
    prep = check_data.prepare_run(mf.load(str(tmp_path / "select")))
    assert prep.uri == with_rows.manifest.inputs[0].uri and prep.manifest.stage == "prepare"
