"""Training examples from a prepare manifest.

Pre-tokenized `input_ids`/`labels` are used as they are when the prepare run
tokenized with the base model's tokenizer (same vocabulary hash) and the same
chat template (same template hash). A prepare run without a tokenizer is
tokenized here through `common.chat`, the code prepare and infer share, each
row with its tools (the `tools` column) and its messages' tool calls. A
prepare run tokenized for another tokenizer or template is refused, naming
the command that fixes it, unless `retokenize: true` asks for the messages
to be tokenized again here.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa

from common import chat, chat_encode
from common import data as canonical
from common import manifest as mf
from common.errors import ConfigError, InputError

if TYPE_CHECKING:  # packing imports torch; the CLI (and the prepare image, which has none) imports this module
    from jobs.train.packing import Example

LOG = logging.getLogger(__name__)

Source = Literal["pretokenized", "tokenized_here"]
ENCODE_BATCH = 1024


def choose_source(prep: mf.Loaded, tokenizer: Any, fmt: chat.ChatFormat, *, base_model: str,
                  retokenize: bool) -> Source:
    """Whether the prepare run's token ids can be trained on as they are."""
    model = prep.manifest.model or {}
    theirs = model.get("tokenizer") or {}
    if not theirs:
        return "tokenized_here"
    mine = chat.tokenizer_identity(tokenizer)
    same_vocab = theirs.get("vocab_sha256") == mine["vocab_sha256"]
    same_template = model.get("template_hash") == fmt.hash
    if same_vocab and same_template:
        return "pretokenized"
    what = []
    if not same_vocab:
        what.append(f"tokenizer {theirs.get('name') or '?'} (vocab sha256 {str(theirs.get('vocab_sha256'))[:12]}) "
                    f"but the base model's is {mine['name'] or base_model} (vocab sha256 {mine['vocab_sha256'][:12]})")
    if not same_template:
        what.append(f"chat template {str(model.get('template_hash'))[:12]} but training uses template "
                    f"{fmt.hash[:12]}")
    if retokenize:
        LOG.warning("prepare run %s used %s: re-tokenizing its messages here (retokenize: true)",
                    prep.uri, "; ".join(what))
        return "tokenized_here"
    raise InputError(
        f"The prepare run {prep.uri} was tokenized with {'; and '.join(what)}. Token ids from another "
        f"tokenizer or template would train the wrong thing. Re-run prepare for this model: "
        f"`ftjobs prepare ... --tokenizer {base_model}` (with the same chat_template as this train config), "
        "or set retokenize: true to tokenize its messages here."
    )


def load(prep: mf.Loaded, split: str, *, source: Source, tokenizer: Any, fmt: chat.ChatFormat,
         max_seq_length: int, train_on: chat.TrainOn) -> tuple[list[Example], dict[str, Any]]:
    """One split's examples, and what happened to its rows (counts of everything dropped)."""
    from jobs.train.packing import example

    dropped: Counter[str] = Counter()
    truncated = 0
    examples: list[Example] = []
    if source == "pretokenized":
        table = canonical.read_split(prep, split, columns=["id", "input_ids", "labels"])
        ids_col, labels_col = _flat(table, "input_ids"), _flat(table, "labels")
        row_ids = table.column("id").to_pylist()
        for i, rid in enumerate(row_ids):
            ids, labels = ids_col(i), labels_col(i)
            if ids is None or labels is None:
                raise InputError(f"Row {rid!r} of split {split!r} in {prep.uri} has no input_ids/labels although "
                                 "the manifest records a tokenizer. Re-run prepare into a fresh prefix.")
            if len(ids) != len(labels):
                raise InputError(f"Row {rid!r} of split {split!r} in {prep.uri} has {len(ids)} input_ids but "
                                 f"{len(labels)} labels. Re-run prepare into a fresh prefix.")
            if len(ids) > max_seq_length:
                dropped["longer_than_max_seq_length"] += 1
                continue
            ex = example(ids, labels)
            if ex.trainable == 0:
                dropped["zero_trainable_tokens"] += 1
                continue
            examples.append(ex)
        rows = len(row_ids)
    else:
        table = canonical.read_split(prep, split, columns=["id", "messages", "tools"])
        conversations = table.column("messages").to_pylist()
        tools = [canonical.tools_of(t) for t in table.column("tools").to_pylist()]
        row_ids = table.column("id").to_pylist()
        rows = len(conversations)
        for start in range(0, rows, ENCODE_BATCH):
            batch = slice(start, start + ENCODE_BATCH)
            encoded = chat_encode.encode_many(tokenizer, fmt, conversations[batch], tools=tools[batch],
                                       max_length=max_seq_length, train_on=train_on)
            for rid, enc in zip(row_ids[batch], encoded, strict=True):
                if enc.error:  # the template refused the row, or a turn of it cannot be located
                    raise ConfigError(f"Row {rid!r} of split {split!r} in {prep.uri}: {enc.error}")
                if enc.drop_reason:
                    dropped[enc.drop_reason] += 1
                    continue
                ex = example(np.asarray(enc.input_ids, dtype=np.int32), np.asarray(enc.labels, dtype=np.int32))
                if ex.trainable == 0:
                    dropped["zero_trainable_tokens"] += 1
                    continue
                truncated += int(enc.truncated)
                examples.append(ex)
    if dropped:
        LOG.warning("split %s: dropped %d of %d rows: %s", split, sum(dropped.values()), rows, dict(dropped))
    stats = {
        "rows": rows,
        "examples": len(examples),
        "dropped": dict(dropped),
        "truncated": truncated,
        "tokens": int(sum(len(e) for e in examples)),
        "trainable_tokens": int(sum(e.trainable for e in examples)),
    }
    return examples, stats


def _flat(table: pa.Table, column: str) -> Any:
    """Row i of a list<int32> column as a zero-copy numpy view (None for a null row)."""
    arr = table.column(column).combine_chunks()
    if isinstance(arr, pa.ChunkedArray):  # an empty table
        arr = pa.array([], type=pa.list_(pa.int32()))
    offsets = arr.offsets.to_numpy()
    values = arr.values.to_numpy(zero_copy_only=False).copy()  # writable: torch warns on read-only arrays
    valid = arr.is_valid().to_numpy(zero_copy_only=False)

    def row(i: int) -> np.ndarray | None:
        return values[offsets[i]:offsets[i + 1]] if valid[i] else None

    return row


@dataclass
class TrainData:
    """The training data as the loop sees it: tokenized examples and the packed rows that index them."""

    source: Source                    # pretokenized, or tokenized here
    train: list[Example]
    eval: list[Example]
    train_stats: dict[str, Any]       # rows read and dropped (by reason), as data.load counts them
    eval_stats: dict[str, Any]
    rows: list[list[int]]             # packed rows of train example indices, row_tokens tokens at most
    row_tokens: int
    eval_batches: list[list[list[int]]]
    pad_id: int

    @property
    def density(self) -> float:
        """Fraction of the packed rows' token slots that hold real tokens."""
        return sum(len(e) for e in self.train) / (len(self.rows) * self.row_tokens)
