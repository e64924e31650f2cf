"""prepare: raw data -> validated, split, optionally tokenized Parquet shards + manifest.

Reads JSONL, JSON arrays, CSV/TSV, Parquet (text formats also gzipped), from
local paths, globs, folders, `s3://` objects or prefixes and Hugging Face
datasets (`hf://id[@split]`, or a `save_to_disk` folder). Normalizes alpaca,
sharegpt, OpenAI `messages`, prompt/completion and plain text into the
canonical rows of `common/data.py` (with their tools, tool calls, tool
results and reasoning), drops bad rows with a named reason,
deduplicates, splits by a seeded hash of each row's id, and, with a
tokenizer, renders the chat template through `common.chat` and writes
`input_ids`/`labels`.

Writes under `--output`: `data/<split>/part-NNNNN.parquet` (zstd),
`drops.jsonl` (the first examples of each drop reason), `stats.json`, then
`manifest.json` (counts, drops, token statistics, source sha256s, tokenizer
identity and template hash).

    ftjobs prepare --source data/train.jsonl --source s3://bucket/raw/ \\
        --tokenizer ./tiny-model --output s3://ml/ftjobs/runs/r1/prepare
    ftjobs inspect s3://ml/ftjobs/runs/r1/prepare --rows 3 --html rows.html

Exit codes: 0 done or already done; 2 bad config (or a template that refuses
a row or cannot render its tools: file and line); 3 bad input data (too many
drops: the reason table; a broken file or row, whatever broke: its name and
line).
"""

from jobs.prepare.inspect_cmd import command as inspect_command
from jobs.prepare.job import STAGE, Config, Source, run
from jobs.prepare.job import command as command

extra_commands = [inspect_command]

__all__ = ["STAGE", "Config", "Source", "run", "command", "extra_commands"]
