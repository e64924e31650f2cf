"""prepare's config: what `ftjobs prepare` reads from its --config, --set and flags (every field documented),
its sources and column maps. The job that reads it is `jobs/prepare/job.py`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from common import data
from common.config import JobConfig
from jobs.prepare import mixing
from jobs.prepare import rows as R

Format = Literal["auto", R.Format]


class Source(JobConfig):
    """One raw input, with what applies to it alone."""

    path: str = Field(description="File, folder, glob, s3:// object or prefix, save_to_disk folder, or "
                      "hf://<id>[@split].")
    split: Literal["auto", "train", "eval"] = Field(
        default="auto", description="auto: split by the seeded row hash; train/eval: every row of this source "
        "goes there.")
    format: Format | None = Field(default=None, description="Overrides the top-level format for this source.")
    weight: float | None = Field(default=None, gt=0, description="Share of the training rows (relative to the "
                                 "other sources' weights; every training source then needs one). See "
                                 "docs/prepare.md, Mixing.")
    max_rows: int | None = Field(default=None, ge=1, description="At most this many of its training rows (a "
                                 "seeded choice, nested: a smaller max_rows keeps a subset).")
    repeat: bool = Field(default=False, description="Let its weight take more rows than it has, by repeating its "
                         "rows (each copy gets its own id); without it such a weight is an error.")


class Columns(JobConfig):
    """Source column (or JSON key) names for each canonical field, for data that names them differently."""

    instruction: str = Field(default="instruction", description="alpaca: the instruction.")
    input: str = Field(default="input", description="alpaca: optional extra input appended to the instruction.")
    output: str = Field(default="output", description="alpaca: the answer.")
    system: str = Field(default="system", description="alpaca/sharegpt: optional system prompt.")
    history: str = Field(default="history", description="alpaca: optional earlier [user, assistant] pairs.")
    conversations: str = Field(default="conversations", description="sharegpt: the list of turns.")
    messages: str = Field(default="messages", description="messages: the list of {role, content}.")
    prompt: str = Field(default="prompt", description="prompt_completion: the prompt.")
    completion: str = Field(default="completion", description="prompt_completion: the completion.")
    text: str = Field(default="text", description="text: the plain text.")
    role: str | None = Field(default=None, description="Key of a turn's role (default: 'role'; sharegpt 'from').")
    content: str | None = Field(default=None,
                                description="Key of a turn's text (default: 'content'; sharegpt 'value').")
    tools: str = Field(default="tools", description="The row's tool schemas: a list of JSON schemas, or JSON text "
                       "of one (LLaMA-Factory's sharegpt `tools` column). Rendered for the template as `tools=`.")
    reasoning: str = Field(default="reasoning_content", description="Key of an assistant turn's reasoning (kept "
                           "and rendered the way the template wants; <think> blocks in the text are kept as they are).")


# Settings that cut only the training split: the held-out split is the same whatever they are (the plan shares
# the steps that read only the held-out split across them, e.g. a learning curve's base predictions).
TRAIN_ONLY = ("max_train_rows", "train_fraction")


class Config(JobConfig):
    """ftjobs prepare: raw data -> validated, split, optionally tokenized Parquet + manifest."""

    sources: list[str | Source] = Field(description="Raw inputs (paths/URIs, or {path, split, format} mappings).")
    output: str = Field(description="Output prefix (local path or s3://...); the manifest is written last.")
    format: Format = Field(default="auto", description="Input format; auto detects it per file and logs what it saw.")
    columns: Columns = Field(default_factory=Columns, description="Column/key names when the data uses other names.")
    roles: dict[str, R.ROLE_TARGETS] = Field(
        default_factory=dict, description="Extra role names -> canonical roles, e.g. {bot: assistant}; tool_call "
        "makes a turn's text a tool call ({name, arguments} JSON), as sharegpt function_call turns are.")
    tokenizer: str | None = Field(default=None, description="Model source for the tokenizer (folder, s3:// prefix, "
                                  "HF id); only tokenizer files are fetched. Without it rows are not tokenized.")
    chat_template: str | None = Field(default=None, description="Template override: a builtin name (chatml) or "
                                      "Jinja text. Default: the tokenizer's own template.")
    train_on: Literal["assistant", "last_assistant", "all"] = Field(
        default="assistant", description="Which tokens get labels: every assistant turn, only the last, or all.")
    max_length: int | None = Field(default=2048, description="Max tokens per row; longer rows lose whole trailing "
                                   "turns (or are dropped when even the first answer does not fit).")
    on_too_long: Literal["truncate", "drop"] = Field(
        default="truncate", description="truncate: drop trailing turns to fit max_length; drop: drop the row.")
    max_chars: int = Field(default=200_000, gt=0, description="Rows with more characters than this are dropped.")
    special_tokens_in_text: Literal["drop", "keep"] = Field(
        default="drop", description="A row whose own text (content, reasoning, tool call arguments) holds one of "
        "the chat template's special tokens (<|im_end|>, <|eot_id|>, </s> ...), which the tokenizer reads as that "
        "token and so ends the turn inside the text: drop it (special_token_in_text, naming the message), or keep "
        "it tokenized as the tokenizer reads it.")
    long_documents: Literal["windows", "drop"] = Field(
        default="windows", description="Plain-text rows (format text) longer than max_length: cut into windows "
        "of max_length tokens (each a row), or drop them (too_long_tokens). Chat rows follow on_too_long.")
    window_overlap: int = Field(default=0, ge=0, description="Tokens a window shares with the one before "
                                "(context only there: each token is trained once). Must be below max_length.")
    last_window: Literal["keep", "drop"] = Field(default="keep", description="A document's last window when it is "
                                                 "shorter than max_length: keep it or drop it.")
    max_messages: int = Field(default=1000, gt=0, description="Rows with more messages than this are dropped "
                              "(too_many_messages): finding each turn's loss mask renders the conversation once "
                              "per turn.")
    eval_fraction: float | None = Field(
        default=None, description="Share of rows (by seeded hash) for eval. Default 0.05 unless eval_size is set "
        "or a source is marked split: eval.")
    eval_size: int | None = Field(default=None, ge=1, description="Exact number of eval rows (the lowest hashes).")
    seed: int = Field(default=0, description="Seed of the split hash: same inputs and seed, same split.")
    dedup: Literal["none", "exact", "normalized"] = Field(
        default="normalized", description="Drop exact duplicates, or also ones differing only in case/whitespace.")
    max_drop_fraction: float = Field(default=0.1, ge=0, le=1,
                                     description="Fail (exit 3) when more than this share of rows is dropped "
                                                 "(eval_overlap removals are reported but not counted here).")
    skip_bad_lines: bool = Field(default=False, description="Drop unreadable lines and rows (bad JSON/UTF-8/CSV, "
                                 "too long or too deep, unusable tools) and count them instead of failing on the "
                                 "first one.")
    max_line_bytes: int = Field(default=data.MAX_LINE_BYTES, ge=1024, description="Longest JSON line/element, "
                                "CSV record or Parquet/Arrow row (its values' bytes) read; longer ones are bad lines.")
    rows_per_shard: int = Field(default=100_000, ge=1, description="Rows per Parquet file.")
    row_group_rows: int = Field(default=8192, ge=1, description="Rows per Parquet row group.")
    batch_size: int = Field(default=1024, ge=1, description="Rows per tokenizer call.")
    workers: int | None = Field(default=None, ge=1, description="Processes that decode, validate and tokenize "
                                "rows when a tokenizer is set (default: CPU count; 1: none).")
    drop_examples: int = Field(default=5, ge=0, description="Examples kept per drop reason in drops.jsonl.")
    run_id: str | None = Field(default=None, description="Run id recorded in the manifest (default: generated).")
    mix_rows: int | None = Field(default=None, ge=1, description="Training rows of a weighted mixture (default: the "
                                 "rows the weighted sources have, after max_rows).")
    max_train_rows: int | None = Field(default=None, ge=1, description="Train on at most this many rows: a seeded, "
                                       "nested subset of the same split (the learning-curve axis; eval unchanged).")
    train_fraction: float | None = Field(default=None, gt=0, le=1, description="Train on this share of the training "
                                         "rows: nested like max_train_rows (both set: the smaller wins).")
    decontaminate: Literal["near", "exact", "off"] = Field(
        default="near", description="Remove training rows that near-duplicate (or, exact: equal after "
        "normalization) an eval row or a guard suite prompt; counted as eval_overlap.")
    decontam_threshold: float = Field(default=0.8, gt=0, le=1, description="Jaccard similarity of character "
                                      "5-grams at or above which a training row is a near-duplicate.")
    guard_suites: list[str] = Field(default_factory=list, description="JSON Lines files of prompts (prompt, "
                                    "messages or text per line) that training rows must not near-duplicate.")

    @field_validator("decontaminate", mode="before")
    @classmethod
    def _decontaminate_off(cls, value: Any) -> Any:
        # YAML reads a bare `off` (and `no`, `false`) as False: that is the setting's "off", not a mistake.
        return "off" if value is False else value

    @field_validator("sources")
    @classmethod
    def _nonempty(cls, v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError("give at least one source (--source PATH_OR_URI)")
        return v

    @model_validator(mode="after")
    def _check(self) -> Config:
        if self.eval_fraction is not None and self.eval_size is not None:
            raise ValueError("set eval_fraction or eval_size, not both")
        if self.eval_fraction is not None and not 0 <= self.eval_fraction < 1:
            raise ValueError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.chat_template and not self.tokenizer:
            raise ValueError("chat_template needs a tokenizer (set tokenizer: MODEL_SRC)")
        if self.max_length is not None and self.max_length < 8:
            raise ValueError(f"max_length must be at least 8 tokens, got {self.max_length}")
        mixing.check_sources(self.source_specs(), self.mix_rows)
        if self.max_length is not None and self.window_overlap >= self.max_length:
            raise ValueError(f"window_overlap ({self.window_overlap}) must be below max_length ({self.max_length}): "
                             "windows would not advance. Lower window_overlap.")
        return self

    def source_specs(self) -> list[Source]:
        return [Source(path=s) if isinstance(s, str) else s for s in self.sources]

    def effective_eval_fraction(self) -> float:
        if self.eval_fraction is not None:
            return self.eval_fraction
        if self.eval_size is not None or any(s.split == "eval" for s in self.source_specs()):
            return 0.0
        return 0.05
