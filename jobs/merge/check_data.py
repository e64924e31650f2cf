"""What merge's generation check compares: held-out rows of the run's own prepared data, or the prompts.

The train manifest names the prepare run it trained on (input role `data`; a select manifest names its
train run, role `train`). That run's Parquet rows already hold `input_ids` and `labels`: a prompt and its
reference answer, tokenized with the training tokenizer and chat template. Fed teacher-forced to both
models, a few of them cover the answer positions (where a finetune moves the model most) in one forward
per model, where generating answers costs one pass over the weights per token (docs/merge.md).

Rows come from the eval split (held out from training) when it has any, else the train split, in file
order: the first `checks.rows` rows with a trained token within `checks.row_tokens`, each cut there. Only
the split's first shard is fetched (checksum-verified). When no such rows can be read (no prepare run
named, another tokenizer or template, a preference or text-only run, nothing trainable), `source: auto`
falls back to the prompts and records why; `source: data` exits 3 naming what is missing.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from common import chat, data, storage
from common import manifest as mf
from common.errors import InputError
from jobs.merge.checks import CheckInputs, prompt_inputs
from jobs.merge.config import Checks

LOG = logging.getLogger("jobs.merge.job")
SPLITS = ("eval", "train")  # held-out rows first
TOKEN_COLUMNS = ("input_ids", "labels")
PAIR_COLUMNS = ("prompt_ids", "chosen_ids", "chosen_labels")  # a preference run: prompt + chosen answer


class NoRows(Exception):
    """Why the prepared rows cannot be the check's inputs (the prompts are used instead, or exit 3)."""


def check_inputs(checks: Checks, train: mf.Loaded, tokenizer: Any, fmt: chat.ChatFormat, work: Path) -> CheckInputs:
    """The sequences the generation check compares on, per `checks.source`."""
    if not checks.data_first:
        return prompt_inputs(tokenizer, checks.prompts, checks.max_new_tokens)
    try:
        return prepared_rows(train, tokenizer, fmt, checks.rows, checks.row_tokens, work)
    except (NoRows, InputError, OSError, ValueError) as exc:  # ValueError: pyarrow's ArrowInvalid among them
        if checks.source == "data":
            raise InputError(f"checks.source is data, but the train run's prepared rows cannot be compared on: "
                             f"{exc}. Set checks.source: prompts (or auto) to check on checks.prompts.") from None
        LOG.info("generation check: no prepared rows (%s); comparing on checks.prompts", exc)
        return prompt_inputs(tokenizer, checks.prompts, checks.max_new_tokens, why=str(exc))


def prepared_rows(train: mf.Loaded, tokenizer: Any, fmt: chat.ChatFormat, n_rows: int, max_tokens: int,
                  work: Path) -> CheckInputs:
    prep = prepare_run(train)
    model = prep.manifest.model or {}
    vocab = (model.get("tokenizer") or {}).get("vocab_sha256")
    if not vocab:
        raise NoRows(f"prepare run {prep.uri} is not tokenized")
    if vocab != chat.tokenizer_identity(tokenizer)["vocab_sha256"] or model.get("template_hash") != fmt.hash:
        raise NoRows(f"prepare run {prep.uri} was tokenized with another tokenizer or chat template than the "
                     "adapter's (train re-tokenized it)")
    for split in SPLITS:
        arts = data.split_artifacts(prep, split)
        if not arts:
            continue
        local = mf.fetch_artifact(prep, arts[0], storage.safe_destination(work / "check-rows", f"{split}.parquet"))
        picked = _pick(_token_rows(local), n_rows, max_tokens)
        if picked:
            return _as_inputs(picked, prep, split, arts[0].name)
    raise NoRows(f"prepare run {prep.uri} has no row with a trained token within its first {max_tokens} tokens "
                 "(checks.row_tokens)")


def prepare_run(train: mf.Loaded) -> mf.Loaded:
    """The prepare (or pairs) manifest the adapter trained on, as the train manifest recorded it."""
    if train.manifest.stage == "select":
        ref = next((i for i in train.manifest.inputs if i.role == "train"), None)
        if ref is None:
            raise NoRows(f"select manifest {train.uri} names no train run")
        train = mf.load(ref.uri, verify="size", expect_stage="train", expect_sha256=ref.sha256)
    ref = next((i for i in train.manifest.inputs if i.role == "data"), None)
    if ref is None:
        raise NoRows(f"train manifest {train.uri} names no prepare run (no input with role data)")
    return mf.load(ref.uri, verify="size", expect_stage=("prepare", "pairs"), expect_sha256=ref.sha256)


def _token_rows(local: Path, batch: int = 256) -> list[tuple[str, list[int], list[int]]]:
    """(id, input_ids, labels) of the first rows of a shard: one record batch, whatever the shard's size."""
    import pyarrow.parquet as pq

    f = pq.ParquetFile(local)
    names = set(f.schema_arrow.names)
    pairs = not set(TOKEN_COLUMNS) <= names
    columns = ["id", *(PAIR_COLUMNS if pairs else TOKEN_COLUMNS)]
    if not set(columns) <= names:
        raise NoRows(f"{local.name} has no {'/'.join(TOKEN_COLUMNS)} columns")
    first = next(f.iter_batches(batch_size=batch, columns=columns), None)
    out = []
    for r in first.to_pylist() if first is not None else []:
        if pairs and r["prompt_ids"] is not None and r["chosen_ids"] is not None:
            ids = r["prompt_ids"] + r["chosen_ids"]
            out.append((r["id"], ids, [chat.IGNORE_INDEX] * len(r["prompt_ids"]) + r["chosen_labels"]))
        elif not pairs and r["input_ids"] is not None and r["labels"] is not None:
            out.append((r["id"], r["input_ids"], r["labels"]))
    return out


def _pick(rows: list[tuple[str, list[int], list[int]]], n_rows: int,
          max_tokens: int) -> list[tuple[str, list[int], list[int]]]:
    """The first n_rows rows with a trained token at a predicted position (1 .. max_tokens-1), cut there."""
    picked = []
    for rid, ids, labels in rows:
        ids, labels = ids[:max_tokens], labels[:max_tokens]
        if any(label != chat.IGNORE_INDEX for label in labels[1:]):
            picked.append((rid, ids, labels))
            if len(picked) == n_rows:
                break
    return picked


def _as_inputs(picked: list[tuple[str, list[int], list[int]]], prep: mf.Loaded, split: str,
               shard: str) -> CheckInputs:
    # Logit position p predicts token p + 1: an answer position is one whose next token is trained.
    answers = [sum(1 for label in labels[1:] if label != chat.IGNORE_INDEX) for _, _, labels in picked]
    starts = [next(j for j, label in enumerate(labels) if j and label != chat.IGNORE_INDEX)
              for _, _, labels in picked]
    record = {"source": "data", "prepare": prep.uri, "prepare_sha256": prep.sha256, "split": split,
              "shard": shard, "rows": [rid for rid, _, _ in picked],
              "tokens": sum(len(ids) for _, ids, _ in picked), "answer_positions": sum(answers)}
    return CheckInputs(seqs=[list(ids) for _, ids, _ in picked], n_prompt=starts,
                       names=[f"row {rid!r}" for rid, _, _ in picked], max_new_tokens=0,
                       answer_positions=sum(answers), record=record)
