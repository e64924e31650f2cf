"""Seed the rehearsal's object store with the offline demo's base model and data.

Runs as the compose service `seed`, before prepare, in the prepare image (it only copies files):
the bundled 0.7M-parameter base model (demo/base-model, made by demo/pretrain_base.py) and the
ticket-routing dataset (demo/data/tickets.jsonl), mounted read-only at /demo. With them the
rehearsal's report shows what `make demo` shows: the finetuned model beating the base, here
through the images, MinIO and the manifests. Idempotent: an existing seed is left alone.

    python /rehearsal/seed.py s3://ftjobs/seed      # writes model/ and data.jsonl there

A rehearsal with a real model sets BASE_MODEL (an HF id or s3:// prefix) instead.
"""

from __future__ import annotations

import sys
from pathlib import Path

from common import storage

DEMO = Path("/demo")


def main(root: str) -> None:
    data_uri = storage.join(root, "data.jsonl")
    model_uri = storage.join(root, "model")
    if storage.exists(data_uri) and storage.exists(storage.join(model_uri, "config.json")):
        print(f"seed already at {root}")
        return
    storage.upload_dir(DEMO / "base-model", model_uri)
    storage.upload_file(DEMO / "data" / "tickets.jsonl", data_uri)
    print(f"seeded {model_uri} and {data_uri}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "s3://ftjobs/seed")
