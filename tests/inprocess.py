"""`ftjobs ARGS` through the CLI in the test's own process (click's CliRunner).

For tests whose subject is what a command does with its files, not the process boundary: a stage as a
process of its own spends ~5 s importing transformers on 2 cores, in the test process they are loaded
once. Tests of signals, races between attempts, torchrun and the pipeline's own steps keep processes.
"""

from __future__ import annotations

import logging

from click.testing import CliRunner, Result

from jobs.cli import main


def ftjobs(args: list[str], *, check: bool = True) -> Result:
    """Run the CLI with JSON logs (as in a container) and its stdout and stderr captured apart; with `check`,
    fail the test unless it exited 0. The root logger is put back as it was after the run."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    try:
        result = CliRunner().invoke(main, args, env={"FTJOBS_LOG_FORMAT": "json"}, catch_exceptions=False)
    finally:  # the CLI pointed the root logger at this run's captured stderr
        root.handlers[:], root.level = handlers, level
    if check:
        assert result.exit_code == 0, result.stderr[-4000:]
    return result
