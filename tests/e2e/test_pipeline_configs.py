"""Pipeline configs: the shipped ones validate, and a mistake in any stage's section fails before any stage runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from common import config as cfg
from common.errors import ConfigError
from jobs import pipeline

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("path", ["demo/pipeline.yaml", "configs/pipeline.yaml"])
def test_shipped_pipeline_configs_validate_with_every_stage_section(path: str) -> None:
    conf = cfg.load_config(pipeline.Config, file=str(REPO / path))
    pipeline.check_sections(conf)
    assert conf.evaluate["fail_if_worse"] == "exact_match"


def test_demo_config_points_at_bundled_files() -> None:
    conf = cfg.load_config(pipeline.Config, file=str(REPO / "demo/pipeline.yaml"))
    assert (REPO / conf.base_model / "model.safetensors").exists()
    assert all((REPO / d).exists() for d in conf.data)
    assert (REPO / conf.evaluate["checks"]["json_schema"]).exists()


def base(**sections: object) -> dict[str, object]:
    return {"base_model": "m", "data": ["d.jsonl"], **sections}


def test_a_typo_in_a_stage_section_names_the_section_and_the_key() -> None:
    conf = cfg.validate(pipeline.Config, base(train={"lora": {"rr": 8}}))
    with pytest.raises(ConfigError, match=r"(?s)section `train`.*unknown key 'lora.rr'; did you mean 'r'"):
        pipeline.check_sections(conf)
    conf = cfg.validate(pipeline.Config, base(infer_finetuned={"sampling": {"temperature": -1}}))
    with pytest.raises(ConfigError, match=r"(?s)section `infer` \+ `infer_finetuned` \(step infer-finetuned\).*"
                                          r"sampling.temperature"):
        pipeline.check_sections(conf)


def test_sections_cannot_set_what_the_pipeline_wires() -> None:
    with pytest.raises(ConfigError, match=r"section `train` sets output: the chain wires that into step train "
                                          r"itself \(output <run>/train\)"):
        cfg.validate(pipeline.Config, base(train={"output": "elsewhere"}))
    with pytest.raises(ConfigError, match="stop_after='deploy'"):
        cfg.validate(pipeline.Config, base(stop_after="deploy"))


@pytest.mark.parametrize("run_id", ["../../escape", "a/b", "..", "-x", "x" * 64, ""])
def test_a_run_id_that_is_not_one_folder_name_is_refused(run_id: str) -> None:
    with pytest.raises(ConfigError, match=r"run_id: .* is not a run id: use 1-63 letters, digits"):
        cfg.validate(pipeline.Config, base(run_id=run_id))


def test_run_id_outside_root_exits_2_and_writes_nothing(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from jobs.cli import main

    conf = tmp_path / "pipeline.yaml"
    conf.write_text("base_model: demo/base-model\ndata: [demo/data/tickets.jsonl]\nstop_after: prepare\n")
    root = tmp_path / "store" / "root"
    result = CliRunner().invoke(main, ["--log-format", "text", "pipeline", "--config", str(conf), "--root",
                                       str(root), "--run-id", "../../escape"])
    assert result.exit_code == 2, result.output
    assert "run_id: '../../escape' is not a run id: use 1-63 letters" in result.output
    assert not (tmp_path / "store").exists()


def test_a_numeric_or_date_run_id_from_yaml_is_taken_as_typed() -> None:
    conf = cfg.load_config(pipeline.Config, sets=["run_id=42"], flags=base())
    assert conf.run_id == "42"
    conf = cfg.load_config(pipeline.Config, sets=["run_id=2024-05-01"], flags=base())
    assert conf.run_id == "2024-05-01"
