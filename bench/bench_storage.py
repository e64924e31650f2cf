"""Object-store transfer of a model folder: ftjobs vs sequential single-part boto3.

    .venv/bin/python -m bench.bench_storage [--files 4] [--mb 48] [--mbps 25]

Both sides move the same folder (a few large "weight shards" plus small
config files) through the same S3 endpoint, in one run:
- baseline: for each file, one `put_object` / `get_object` call, one after another
  (what a hand-written script does);
- ftjobs: `common.storage.upload_dir` / `download_dir` (files in parallel,
  multipart parts in parallel, sha256 while streaming).

The endpoint is the moto S3 server on loopback, behind `bench/netem.py`, a
relay that caps each TCP connection at --mbps MB/s, as real stores cap a
single stream. With --mbps 0 the relay is skipped (pure loopback: then the
two cores, not the network, are the limit, and the ratio says little).
Goal: >= 3x.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from bench.netem import ThrottledRelay
from bench.report import emit, row


def make_folder(root: Path, files: int, mb: int) -> int:
    root.mkdir(parents=True, exist_ok=True)
    total = 0
    for i in range(files):
        data = os.urandom(mb * 1024 * 1024)
        (root / f"model-{i + 1:05d}-of-{files:05d}.safetensors").write_bytes(data)
        total += len(data)
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        (root / name).write_text('{"x": 1}' * 200)
        total += (root / name).stat().st_size
    return total


def baseline_upload(client, bucket: str, prefix: str, src: Path) -> None:  # type: ignore[no-untyped-def]
    for p in sorted(src.iterdir()):
        with open(p, "rb") as f:
            client.put_object(Bucket=bucket, Key=f"{prefix}/{p.name}", Body=f.read())


def baseline_download(client, bucket: str, prefix: str, dest: Path) -> None:  # type: ignore[no-untyped-def]
    dest.mkdir(parents=True, exist_ok=True)
    listing = client.list_objects_v2(Bucket=bucket, Prefix=prefix + "/")
    for obj in listing.get("Contents", []):
        body = client.get_object(Bucket=bucket, Key=obj["Key"])["Body"].read()
        (dest / obj["Key"].rsplit("/", 1)[1]).write_bytes(body)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--files", type=int, default=4, help="number of large shards")
    ap.add_argument("--mb", type=int, default=48, help="size of each shard in MiB")
    ap.add_argument("--mbps", type=float, default=25.0, help="per-connection cap in MB/s (0: no relay)")
    args = ap.parse_args()

    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    relay = ThrottledRelay(host, port, mbytes_per_s=args.mbps) if args.mbps > 0 else None
    if relay:
        relay.__enter__()
    os.environ["S3_ENDPOINT_URL"] = relay.url if relay else f"http://{host}:{port}"

    from common import storage

    client = storage.s3_client()
    bucket = "bench-" + uuid.uuid4().hex[:8]
    client.create_bucket(Bucket=bucket)
    tmp = Path(tempfile.mkdtemp(prefix="ftjobs-bench-storage-"))
    try:
        total = make_folder(tmp / "src", args.files, args.mb)
        mb = total / 1e6
        t = time.perf_counter()
        baseline_upload(client, bucket, "plain", tmp / "src")
        base_up = time.perf_counter() - t
        t = time.perf_counter()
        storage.upload_dir(tmp / "src", f"s3://{bucket}/ftjobs")
        ours_up = time.perf_counter() - t
        t = time.perf_counter()
        baseline_download(client, bucket, "plain", tmp / "plain-down")
        base_down = time.perf_counter() - t
        t = time.perf_counter()
        storage.download_dir(f"s3://{bucket}/ftjobs", tmp / "ftjobs-down")
        ours_down = time.perf_counter() - t
        for p in (tmp / "src").iterdir():  # same bytes on both sides
            assert (tmp / "ftjobs-down" / p.name).read_bytes() == p.read_bytes(), p.name
            assert (tmp / "plain-down" / p.name).stat().st_size == p.stat().st_size, p.name
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if relay:
            relay.__exit__()
        server.stop()
    link = f"{args.mbps:g} MB/s per connection" if relay else "loopback"
    cond = f"{args.files}x{args.mb} MiB, {link}"
    rows = [
        row("storage", "upload MB/s (model folder)", mb / ours_up, mb / base_up, goal=">= 3x",
            met=(base_up / ours_up) >= 3, unit="MB/s", notes=cond),
        row("storage", "download MB/s (model folder)", mb / ours_down, mb / base_down, goal=">= 3x",
            met=(base_down / ours_down) >= 3, unit="MB/s", notes=cond),
    ]
    emit("storage", rows, {"conditions": cond})


if __name__ == "__main__":
    main()
