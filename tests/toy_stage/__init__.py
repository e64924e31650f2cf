"""A toy stage, to show that a stage is declared once: this package and its registry entry below, nothing else.

`FTJOBS_EXTRA_STAGES=tests.toy_stage` makes every ftjobs process know it (the CLI gets `ftjobs toy`, chain
validation finds its command line, the manifest model and the Kubernetes renderer its image and GPU need).
Its job writes one word, as a stage does: through common.stage (already done?, an attempt, the manifest
published last, create-only), recording the run it was started for.
"""

from __future__ import annotations

import sys

import click
from pydantic import Field

from common import manifest as mf
from common import stage
from common.config import JobConfig, dump
from common.runner import config_options, execute
from common.stages import Stage

STAGE = "toy"
STAGES = (Stage(STAGE, "tests.toy_stage", image="prepare", gpu=False),)


class Config(JobConfig):
    """The toy's config: where to write, what it read, which word."""

    output: str = Field(description="Output prefix (local path or s3://).")
    input: str | None = Field(None, description="An earlier step's manifest it takes (recorded as an input).")
    word: str = Field("hello", description="The word it writes.")


def run(config: Config) -> mf.Loaded:
    inputs = [mf.load(config.input, verify="size").ref("input")] if config.input else []
    identity = stage.Identity(STAGE, config.output, dump(config), inputs)

    def work(attempt: stage.Attempt) -> stage.Outcome:
        attempt.writer.add_bytes(config.word.encode(), "word.txt")
        return stage.Outcome(stats={"word": config.word})

    result = stage.run(identity, work)
    assert isinstance(result, mf.Loaded)
    return result


@click.command(name=STAGE)
@click.option("--input", "input_", metavar="URI", help="An earlier step's manifest.")
@click.option("--output", metavar="URI", help="Output prefix.")
@config_options(example="word=hi")
def command(input_: str | None, output: str | None, config_file: str | None, sets: tuple[str, ...]) -> None:
    """Write one word (a toy stage for tests)."""
    execute(sys.modules[__name__], config_file, sets, {"input": input_, "output": output})
