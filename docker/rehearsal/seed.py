"""Seed the rehearsal's object store: a tiny real base model and a small chat dataset.

Runs in the train image (it needs torch to write the model) as the compose service
`seed`, before prepare. Idempotent: an existing seed is left alone.

    python /rehearsal/seed.py s3://ftjobs/seed      # writes model/ and data.jsonl there

The model is common.tinymodel's (2-layer Llama, head_dim 64, ChatML); the data are
simple word tasks with exactly checkable answers, so the report has real numbers.
A rehearsal with a real model sets BASE_MODEL (an HF id or s3:// prefix) instead.
"""

from __future__ import annotations

import json
import random
import sys
import tempfile
from pathlib import Path

from common import storage, tinymodel

WORDS = "red green blue cat dog bird tree house car road sun moon star river city".split()


def rows(n: int = 240, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out: list[dict] = []
    seen: set[tuple[str, ...]] = set()
    while len(out) < n:  # distinct rows: prepare would drop duplicates (and count them)
        words = rng.sample(WORDS, rng.randint(2, 5))
        task = rng.choice(["reverse", "upper", "first", "last"])
        if (task, *words) in seen:
            continue
        seen.add((task, *words))
        i = len(out)
        answer = {"reverse": " ".join(reversed(words)), "upper": " ".join(words).upper(),
                  "first": words[0], "last": words[-1]}[task]
        prompt = {"reverse": "Reverse the words", "upper": "Write in upper case",
                  "first": "Give the first word", "last": "Give the last word"}[task]
        out.append({"id": f"seed-{i:04d}", "messages": [{"role": "user", "content": f"{prompt}: {' '.join(words)}"},
                                                        {"role": "assistant", "content": answer}]})
    return out


def main(root: str) -> None:
    data_uri = storage.join(root, "data.jsonl")
    model_uri = storage.join(root, "model")
    if storage.exists(data_uri) and storage.exists(storage.join(model_uri, "config.json")):
        print(f"seed already at {root}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        model = tinymodel.build(Path(tmp) / "model")
        storage.upload_dir(model, model_uri)
    storage.write_bytes(data_uri, "".join(json.dumps(r) + "\n" for r in rows()).encode())
    print(f"seeded {model_uri} and {data_uri}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "s3://ftjobs/seed")
