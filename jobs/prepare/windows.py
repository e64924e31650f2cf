"""Long documents for continued pretraining: a plain-text row (`{"text": ...}`, format `text`) longer than
max_length is cut into consecutive windows of max_length tokens rather than dropped.

The document is tokenized once, as a text row always is (BOS, its text, EOS); window k holds tokens
[k * stride, k * stride + max_length), stride = max_length - window_overlap. With an overlap, the tokens a
window shares with the one before are context only (labels -100): every token is trained once. The last
window may be shorter than max_length: `last_window: keep` (the default) keeps it, `drop` drops it (the
tokens it would have trained are lost; a document always keeps its first, full window).

Every window is a row of its own (messages: one `text` message holding the window's characters, id: the
document's id for the first window and sha256 of it and the window number for the others), and all
windows of a document go to the same split, so no document is split across train and eval. Chat rows keep
their own rule (whole trailing turns dropped, on_too_long). `long_documents: drop` drops long documents
instead, counted as too_long_tokens.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from typing import Any

from common import chat, chat_encode


@dataclass(frozen=True)
class Window:
    input_ids: list[int]
    labels: list[int]
    text: str


def window_id(doc_id: str, k: int) -> str:
    return doc_id if k == 0 else hashlib.sha256(f"{doc_id}\n#window{k}".encode()).hexdigest()


def split(e: chat_encode.Encoded, max_length: int, overlap: int, last: str) -> list[Window]:
    """The windows of a document encoded whole (e.offsets set by chat_encode.encode_many's long_text)."""
    assert e.offsets is not None and e.text is not None
    ids, labels, n = e.input_ids, e.labels, len(e.input_ids)
    stride = max_length - overlap
    out: list[Window] = []
    start = 0
    while True:
        end = min(start + max_length, n)
        if out and end - start < max_length and last == "drop":
            break
        lab = list(labels[start:end])
        if out:  # the overlap was trained in the window before: context here
            lab[:overlap] = [chat.IGNORE_INDEX] * min(overlap, len(lab))
        out.append(Window(list(ids[start:end]), lab, _chars(e, start, end)))
        if end == n:
            break
        start += stride
    return out


def _chars(e: chat_encode.Encoded, start: int, end: int) -> str:
    """The document characters of tokens [start, end): the window's text (BOS/EOS markup left out)."""
    assert e.offsets is not None and e.text is not None
    size = len(e.text)
    spans = [o for o in e.offsets[start:end] if o is not None and o[1] > 0 and o[0] < size]
    if not spans:
        return ""
    return e.text[max(spans[0][0], 0):min(spans[-1][1], size)]


def stats(counts: Counter[int], overlap: int, max_length: int | None, last: str) -> dict[str, Any]:
    """The stats section: documents cut into windows, by how many windows each gave."""
    return {"documents": sum(counts.values()), "windows": sum(k * n for k, n in counts.items()),
            "max_per_document": max(counts) if counts else 0, "per_document": dict(sorted(counts.items())),
            "stride": (max_length - overlap) if max_length else None, "overlap": overlap, "last_window": last}
