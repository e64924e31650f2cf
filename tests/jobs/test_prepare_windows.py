"""Long documents for continued pretraining: text rows longer than max_length become windows of max_length
tokens whose tokens, joined, are the document's tokens; chat rows keep their rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common import config as cfg
from common import data
from common.errors import InputError
from jobs import prepare

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common import tinymodel

    path = tmp_path_factory.mktemp("tok") / "tok"
    tinymodel.build_tokenizer(path)
    return path


@pytest.fixture(scope="module")
def tok(tok_dir: Path):  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def document(i: int, words: int) -> str:
    return " ".join(f"word{(i * 7 + k) % 97} of document {i}." for k in range(words))


def prepared(tmp_path: Path, tok_dir: Path, docs: list[str], name: str, **kw):  # type: ignore[no-untyped-def]
    src = tmp_path / "docs.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    conf = {"sources": [str(src)], "output": str(tmp_path / name), "tokenizer": str(tok_dir), "max_length": 64,
            "eval_fraction": 0.0, "workers": 1, **kw}
    loaded = prepare.run(cfg.validate(prepare.Config, conf))
    return loaded, data.read_split(loaded, "train").to_pylist()


def doc_tokens(tok, text: str) -> list[int]:  # type: ignore[no-untyped-def]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    return ([tok.bos_token_id] if tok.bos_token_id is not None else []) + ids + [tok.eos_token_id]


@pytest.mark.parametrize("overlap", [0, 16])
def test_long_documents_become_windows_whose_tokens_join_to_the_document(tmp_path: Path, tok_dir: Path, tok,
                                                                         overlap: int):
    docs = [document(0, 120), document(1, 3), document(2, 60)]
    loaded, rows = prepared(tmp_path, tok_dir, docs, f"o{overlap}", window_overlap=overlap)
    stats = loaded.manifest.stats
    assert stats["dropped"] == {} and stats["rows_in"] == 3
    by_doc: dict[str, list[dict]] = {}
    for r in rows:
        text = r["messages"][0]["content"]
        doc = next(d for d in docs if text and text in d)
        by_doc.setdefault(doc, []).append(r)
    for d in docs:
        want = doc_tokens(tok, d)
        windows = by_doc[d]
        assert all(len(w["input_ids"]) <= 64 for w in windows)
        joined = list(windows[0]["input_ids"])
        for w in windows[1:]:
            assert w["input_ids"][:overlap] == joined[len(joined) - overlap:]  # the overlap repeats the tokens before
            assert all(lab == -100 for lab in w["labels"][:overlap])  # ...as context, trained once
            joined += w["input_ids"][overlap:]
        assert joined == want, d[:40]
        trained = [t for w in windows for t, lab in zip(w["input_ids"], w["labels"], strict=True) if lab != -100]
        assert trained == want[1:]  # every token but BOS trained exactly once
    win = stats["windows"]
    assert win["documents"] == 2 and win["windows"] == len(rows) - 1 and win["overlap"] == overlap
    assert len({r["id"] for r in rows}) == len(rows)
    assert stats["tokens"]["rows"] == len(rows) and stats["tokens"]["max"] <= 64


def test_the_last_short_window_can_be_dropped_and_long_documents_dropped_by_name(tmp_path: Path, tok_dir: Path,
                                                                                 tok):
    doc = document(0, 120)
    n = len(doc_tokens(tok, doc))
    _, rows = prepared(tmp_path, tok_dir, [doc], "last", last_window="drop")
    assert [len(r["input_ids"]) for r in rows] == [64] * (n // 64)
    with pytest.raises(InputError, match=r"too_long_tokens .*the document has \d+ tokens > max_length 64"):
        prepared(tmp_path, tok_dir, [doc, document(1, 3)], "drop", long_documents="drop")
