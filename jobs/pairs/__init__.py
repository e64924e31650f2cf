"""ftjobs pairs: preference pairs from a model's wrong answers on training prompts (or an LLM judge's verdicts).

The stage's job, its config and its command live in `jobs/pairs/job.py` (read it top to bottom); this package
only hands their names on, as every stage package does.
"""

from jobs.pairs.job import STAGE, Config, command, run

__all__ = ["STAGE", "Config", "command", "run"]
