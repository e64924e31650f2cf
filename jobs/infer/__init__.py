"""infer: sharded, resumable offline batch inference (vLLM, or transformers where vLLM is missing).

The stage's job, its config and its command live in `jobs/infer/job.py` (read it top to bottom); this package
only hands their names on, as every stage package does.
"""

from jobs.infer.job import STAGE, Config, command, run

__all__ = ["STAGE", "Config", "command", "run"]
