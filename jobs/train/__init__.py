"""ftjobs train: QLoRA finetuning (bitsandbytes 4-bit + peft LoRA) that survives preemption.

The stage's job, its config and its command live in `jobs/train/job.py` (read it top to bottom); this package
only hands their names on, as every stage package does.
"""

from jobs.train.job import STAGE, Config, command, run

__all__ = ["STAGE", "Config", "command", "run"]
