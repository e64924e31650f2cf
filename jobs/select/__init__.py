"""select: score a train run's checkpoints as candidates and carry the best forward.

The stage's job, its config and its command live in `jobs/select/job.py` (read it top to bottom); this package
only hands their names on, as every stage package does.
"""

from jobs.select.job import STAGE, Config, command, run

__all__ = ["STAGE", "Config", "command", "run"]
