"""Benchmark: rows built to exhaust prepare, before and after its limits (issue 27, findings 4 and 5).

1. A conversation of N one-character messages, its loss mask built by `common.chat.encode_many` with the
   tiny tokenizer and ChatML. "before": rendering every prefix over the whole conversation (max_length
   None: what happened before rendering stopped at max_length); "after": max_length 2048, rendering stops
   once a prefix is past it. (prepare's max_messages, default 1000, drops such rows before either.)
2. Peak RSS of `ftjobs prepare` on a Parquet file holding one string of M MiB and a CSV file with one field
   of M MiB (each prepare in a child process; the peak from RUSAGE_CHILDREN of a one-child wrapper).

    .venv/bin/python -m bench.bench_prepare_limits               # about a minute on 2 cores
    .venv/bin/python -m bench.bench_prepare_limits --messages 1200,2400,4800,9600 --bomb-mib 300
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def conversation_times(sizes: list[int], work: Path) -> None:
    from transformers import AutoTokenizer

    from common import chat, chat_encode, tinymodel

    tinymodel.build_tokenizer(work / "tok")
    tok = AutoTokenizer.from_pretrained(str(work / "tok"))
    fmt = chat.chat_format(tok, "chatml")
    print(f"{'messages':>9} {'before s':>9} {'after s':>8} {'ratio':>7}  kept messages (after)")
    for n in sizes:
        msgs = [{"role": "user" if i % 2 == 0 else "assistant", "content": "x"} for i in range(n)]
        t = time.perf_counter()
        chat_encode.encode_many(tok, fmt, [msgs], max_length=None)
        before = time.perf_counter() - t
        t = time.perf_counter()
        enc = chat_encode.encode_many(tok, fmt, [msgs], max_length=2048)[0]
        after = time.perf_counter() - t
        print(f"{n:>9,} {before:>9.2f} {after:>8.2f} {before / after:>6.1f}x  {enc.kept_messages}")


def bomb_rss(mib: int, work: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    size = mib << 20
    values = pa.py_buffer(np.full(size, ord("x"), dtype=np.uint8))
    array = pa.StringArray.from_buffers(1, pa.py_buffer(np.array([0, size], dtype=np.int32)), values)
    pq.write_table(pa.table({"text": array}), work / "bomb.parquet", compression="zstd")
    del values, array
    with open(work / "bomb.csv", "wb") as fh:
        fh.write(b"prompt,completion\nq,\"")
        for _ in range(mib):
            fh.write(b"y" * (1 << 20))
        fh.write(b"\"\n")
    wrapper = ("import resource, subprocess, sys\n"
               "p = subprocess.run(sys.argv[1:], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)\n"
               "print(p.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n")
    for name in ("bomb.parquet", "bomb.csv"):
        t = time.perf_counter()
        out = subprocess.run([sys.executable, "-c", wrapper, sys.executable, "-m", "jobs.cli", "prepare", "--source",
                              str(work / name), "--output", str(work / f"out-{name}")], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split()
        print(f"{name}: {(work / name).stat().st_size / 1e3:,.0f} KB on disk, one {mib} MiB value: exit {out[0]}, "
              f"peak RSS {int(out[1]) / 1024:,.0f} MiB, {time.perf_counter() - t:.1f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", default="1200,2400,4800", help="conversation sizes, comma-separated")
    ap.add_argument("--bomb-mib", type=int, default=256, help="MiB of the one huge value")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        conversation_times([int(x) for x in args.messages.split(",")], Path(tmp))
        bomb_rss(args.bomb_mib, Path(tmp))


if __name__ == "__main__":
    main()
