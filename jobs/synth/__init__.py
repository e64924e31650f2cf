"""synth: new training examples from seed examples and a teacher model, kept only when they pass.

The stage's job, its config and its command live in `jobs/synth/job.py` (read it top to bottom); this package
only hands their names on, as every stage package does.
"""

from jobs.synth.job import STAGE, Config, command, run

__all__ = ["STAGE", "Config", "command", "run"]
