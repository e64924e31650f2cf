"""evaluate: score predictions against references and compare models side by side.

The stage's job, its config and its command live in `jobs/evaluate/job.py` (read it top to bottom); this package
only hands their names on, as every stage package does.
"""

from jobs.evaluate.job import STAGE, Config, command, run

__all__ = ["STAGE", "Config", "command", "run"]
