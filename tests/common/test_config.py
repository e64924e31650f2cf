"""Config: sources in order, unknown keys named, readable errors, exit code 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import Field, ValidationError, model_validator

from common import config as cfg
from common.errors import ConfigError

pytestmark = pytest.mark.unit


class Lora(cfg.JobConfig):
    r: int = Field(16, description="rank")
    alpha: float = Field(32, description="scale")


class Demo(cfg.JobConfig):
    name: str = Field("x", description="a name")
    run_id: str | None = Field(None, description="a run id")
    lora: Lora = Field(default_factory=Lora, description="LoRA settings")
    tags: list[str] = Field(default_factory=list, description="tags")


def test_sources_in_order(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("name: fromfile\nlora:\n  r: 8\n  alpha: 4\n")
    c = cfg.load_config(Demo, file=str(f), sets=["lora.r=32", "tags=[a, b]"], flags={"name": "flag", "x": None})
    assert (c.name, c.lora.r, c.lora.alpha, c.tags) == ("flag", 32, 4.0, ["a", "b"])


def test_unknown_key_is_named_with_suggestion() -> None:
    with pytest.raises(ConfigError) as err:
        cfg.load_config(Demo, sets=["lora.alpah=4"])
    assert "unknown key 'lora.alpah'" in str(err.value) and "did you mean 'alpha'" in str(err.value)


def test_set_gives_text_fields_the_text_as_typed() -> None:
    c = cfg.load_config(Demo, sets=["run_id=007", "name=2026-11-29", "lora.r=0x10"])
    assert (c.run_id, c.name, c.lora.r) == ("007", "2026-11-29", 16)  # ints stay YAML: 0x10 is 16
    with pytest.raises(ConfigError, match="tags.0"):  # a list of numbers is not made text
        cfg.load_config(Demo, sets=["tags=[1, 2]"])
    assert cfg.load_config(Demo, sets=["run_id=null"]).run_id is None


def test_a_bad_key_names_where_it_came_from(tmp_path: Path) -> None:
    f = tmp_path / "c.yaml"
    f.write_text("lora:\n  r: 8\n  alpah: 1\n")
    with pytest.raises(ConfigError) as err:
        cfg.load_config(Demo, file=str(f), sets=["bogus=1", "lora.r=big"])
    text = str(err.value)
    assert "unknown key 'bogus' (from --set bogus=1)" in text
    assert f"unknown key 'lora.alpah' (in {f})" in text
    assert "lora.r: Input should be a valid integer, unable to parse string as an integer (got 'big') " \
           "(from --set lora.r=big)" in text


def test_wrong_type_says_what_came() -> None:
    with pytest.raises(ConfigError, match=r"lora.r: .*integer.*got 'big'"):
        cfg.load_config(Demo, sets=["lora.r=big"])


class Window(cfg.JobConfig):
    lo: int = Field(0, description="low end")
    hi: int = Field(1, description="high end")

    @model_validator(mode="after")
    def _order(self) -> Window:
        if self.hi <= self.lo:
            raise ValueError(f"hi ({self.hi}) must be above lo ({self.lo}): raise hi or lower lo")
        return self


def test_a_validators_message_is_shown_as_written() -> None:
    with pytest.raises(ConfigError) as err:
        cfg.load_config(Window, sets=["lo=5"])
    assert str(err.value).splitlines()[1] == "  - hi (1) must be above lo (5): raise hi or lower lo"


def test_bad_set_syntax_and_missing_file() -> None:
    with pytest.raises(ConfigError, match="key=value"):
        cfg.load_config(Demo, sets=["lora.r"])
    with pytest.raises(ConfigError, match="does not exist"):
        cfg.load_config(Demo, file="/nonexistent/c.yaml")


def test_frozen() -> None:
    c = Demo()
    with pytest.raises(ValidationError, match="frozen"):
        c.name = "y"  # type: ignore[misc]


def test_redaction() -> None:
    assert cfg.redacted({"aws_secret_access_key": "s", "n": {"api_key": "k", "r": 1}, "hf_token": "t",
                         "max_new_tokens": 32, "sampling": {"max_tokens": 8}}) == {
        "aws_secret_access_key": "***", "n": {"api_key": "***", "r": 1}, "hf_token": "***",
        "max_new_tokens": 32, "sampling": {"max_tokens": 8}}


def test_help_and_version_work() -> None:
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--help"], capture_output=True, text=True, check=True)
    assert "show" in out.stdout
    out = subprocess.run([sys.executable, "-m", "jobs.cli", "--version"], capture_output=True, text=True, check=True)
    assert "ftjobs, version" in out.stdout


@pytest.mark.parametrize("stage", ["prepare", "train", "merge", "infer", "evaluate", "pipeline"])
def test_each_commands_set_example_is_a_key_it_accepts(stage: str) -> None:
    import importlib
    import re

    module = importlib.import_module(f"jobs.{stage}")
    option = next(p for p in module.command.params if p.name == "sets")
    example = re.search(r"e\.g\. --set (\S+)\.", option.help).group(1)
    if example == "key.sub=value":  # the generic placeholder names no key
        return
    key = example.split("=")[0]
    try:
        cfg.load_config(module.Config, sets=[example], flags={})
    except ConfigError as err:  # required keys are missing here; the example's own key must not be the problem
        assert "unknown key" not in str(err) and key not in str(err), str(err)
