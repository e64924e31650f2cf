"""The chain declaration: what every driver reads. Its wiring must match each stage's real command line and
config model, so a drift between the two (a key spelled one way here and another in the stage) fails here."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from common import config as cfg
from common.errors import ConfigError
from jobs import chain
from jobs.cli import main

pytestmark = pytest.mark.unit


def run_config(**fields: object) -> chain.Config:
    return cfg.validate(chain.Config, {"base_model": "tiny-base", "data": ["a.jsonl", "b.jsonl"], **fields})


def test_steps_are_named_once_and_only_take_from_earlier_steps() -> None:
    assert len(set(chain.STEP_NAMES)) == len(chain.CHAIN)
    for i, step in enumerate(chain.CHAIN):
        assert set(step.needs()) <= set(chain.STEP_NAMES[:i]), step.name
        assert step.name.split("-")[0] == step.stage  # the Job name and folder say which stage runs


@pytest.mark.parametrize("step", chain.CHAIN, ids=lambda s: s.name)
def test_every_wired_flag_sets_its_key_in_the_stage_config(step: chain.Step, tmp_path: Path) -> None:
    # Every optional step in the run (train-dpo takes its pairs from the pairs step or from prepare-preference).
    pairs = ({"preference_data": ["p.jsonl"]} if step.name == "prepare-preference"
             else {"pairs": {"metric": "exact_match"}})
    config = run_config(synth={"teacher": "tiny-teacher"}, train={"select": {"metric": "exact_match"}},
                        promote={"name": "tickets"}, champion="models:/tickets/1", dpo={"objective": "dpo"},
                        **pairs)
    done = {s.name: f"s3://ml/runs/r1/{s.name}/manifest.json" for s in chain.CHAIN}
    args = chain.arguments(step, config, done)
    section = tmp_path / "section.yaml"
    section.write_text(json.dumps(config.section(step)))
    resolved = chain.validate_arguments(step.stage, [*args, "--output", f"s3://ml/runs/r1/{step.name}/", "--config",
                                                     str(section)])
    for take in step.takes:
        if (take.when and not getattr(config, take.when)) or take.unless:  # unless: replaced by a step in the run
            continue
        if take.source in chain.BY_NAME and not chain.BY_NAME[take.source].wanted(config):
            continue  # a step this run leaves out: its take is left out too
        value = done.get(take.source) or getattr(config, take.source)
        got = getattr(resolved, take.key)
        if isinstance(value, list):  # one of the takes that fill this key (prepare: the data and synth's)
            assert [v for v in got if v in value] == value, (take, got)
        elif isinstance(got, list):
            assert value in got, (take, got)
        else:
            assert got == value, (take, got)
    for key in step.wired:
        assert key in type(resolved).model_fields, (step.name, key)


def test_train_select_adds_the_select_step_and_merge_takes_its_adapter() -> None:
    done = {s.name: f"s3://x/{s.name}/manifest.json" for s in chain.CHAIN}
    plain = run_config()
    assert "select" not in [s.name for s in chain.steps(plain)]
    assert chain.arguments(chain.BY_NAME["merge"], plain, done) == ["--input", done["train"]]
    chosen = run_config(train={"select": {"metric": "token_f1"}}, select={"infer": {"engine": "transformers"}})
    assert [s.name for s in chain.steps(chosen)][2:5] == ["train", "select", "merge"]
    assert chain.arguments(chain.BY_NAME["merge"], chosen, done) == ["--input", done["select"]]
    assert chain.arguments(chain.BY_NAME["select"], chosen, done) == [
        "--train", done["train"], "--prompts", done["prepare"], "--baseline", done["infer-base"]]
    assert chain.check(chosen)["select"].infer == {"engine": "transformers"}


def test_leaving_out_the_baseline_leaves_out_its_step_and_its_predictions() -> None:
    config = run_config(baseline=False)
    assert [s.name for s in chain.steps(config)] == ["prepare", "train", "merge", "infer-finetuned", "evaluate"]
    args = chain.arguments(chain.BY_NAME["evaluate"], config, {"infer-finetuned": "s3://x/manifest.json"})
    assert args == ["--predictions", "s3://x/manifest.json", "--label", "finetuned"]


def test_stop_after_ends_the_steps_there() -> None:
    assert [s.name for s in chain.steps(run_config(stop_after="train"))] == ["prepare", "infer-base", "train"]


@pytest.mark.parametrize("section, key", [("prepare", "sources"), ("prepare", "tokenizer"), ("infer", "model"),
                                          ("infer_base", "prompts"), ("evaluate", "labels"),
                                          ("evaluate", "predictions"), ("train", "base_model"),
                                          ("merge", "output")])
def test_a_section_that_sets_what_the_chain_wires_is_refused_naming_the_key(section: str, key: str) -> None:
    with pytest.raises(ConfigError, match=rf"section `{section}` sets {key}: the chain wires that"):
        run_config(**{section: {key: ["x"]}})


def test_a_pipeline_config_with_prepare_sources_exits_2_naming_sources(tmp_path: Path) -> None:
    # The drift this declaration fixed: the pipeline's own list said `source`, prepare's field is `sources`,
    # so `prepare: {sources: [...]}` validated and was then silently replaced by the pipeline's --source flags.
    conf = tmp_path / "pipeline.yaml"
    conf.write_text("base_model: demo/base-model\ndata: [demo/data/tickets.jsonl]\n"
                    "prepare:\n  sources: [other.jsonl]\n")
    result = CliRunner().invoke(main, ["--log-format", "text", "pipeline", "--config", str(conf), "--root",
                                       str(tmp_path / "store")])
    assert result.exit_code == 2, result.output
    assert "section `prepare` sets sources: the chain wires that into step prepare itself (sources from the " \
           "run config data; sources from step synth when the run config has a `synth` section)" in result.output
    assert not (tmp_path / "store").exists()


def test_check_validates_each_step_through_its_own_command_line() -> None:
    resolved = chain.check(run_config(train={"lora": {"r": 4}}, infer={"sampling": {"temperature": 0}},
                                      infer_base={"sampling": {"max_tokens": 3}}))
    assert resolved["train"].lora.r == 4
    assert resolved["infer-base"].sampling.temperature == 0 and resolved["infer-base"].sampling.max_tokens == 3
    assert resolved["infer-finetuned"].sampling.max_tokens == 256
    assert resolved["evaluate"].labels == ["base", "finetuned"]


def test_an_unknown_stage_option_is_a_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"No such option '--nodes'.*ftjobs train --help"):
        chain.validate_arguments("train", ["--nodes", "2", "--input", "x", "--base-model", "y", "--output", "z"])


def test_a_synth_section_adds_synth_before_prepare_and_its_examples_to_prepare_sources() -> None:
    without = run_config()
    assert "synth" not in [s.name for s in chain.steps(without)]
    assert chain.arguments(chain.BY_NAME["prepare"], without, {})[:4] == ["--source", "a.jsonl", "--source", "b.jsonl"]
    assert "synth" not in chain.arguments(chain.BY_NAME["prepare"], without, {"synth": "s3://x/synth/manifest.json"})

    config = run_config(synth={"teacher": "big-teacher", "num_prompts": 10})
    assert [s.name for s in chain.steps(config)][:2] == ["synth", "prepare"]
    assert chain.arguments(chain.BY_NAME["synth"], config, {}) == ["--seeds", "a.jsonl", "--seeds", "b.jsonl"]
    args = chain.arguments(chain.BY_NAME["prepare"], config, {"synth": "s3://x/synth/manifest.json"})
    assert args[:6] == ["--source", "a.jsonl", "--source", "b.jsonl", "--source", "s3://x/synth/manifest.json"]
    assert chain.check(config)["synth"].num_prompts == 10  # the section goes through synth's own command line
    with pytest.raises(ConfigError, match=r"section `synth` sets seeds: the chain wires that into step synth"):
        run_config(synth={"teacher": "t", "seeds": ["x.jsonl"]})
    with pytest.raises(ConfigError, match=r"(?s)run config, section `synth` \(step synth\).*num_prompts"):
        chain.check(run_config(synth={"teacher": "t", "num_prompts": 0}))
