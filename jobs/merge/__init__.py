"""merge: fold a trained LoRA adapter into its 16-bit base model, prove it, publish a folder vLLM loads.

The stage's job, its config and its command live in `jobs/merge/job.py` (read it top to bottom); this package
only hands their names on, as every stage package does.
"""

from jobs.merge.job import STAGE, Config, command, run

__all__ = ["STAGE", "Config", "command", "run"]
