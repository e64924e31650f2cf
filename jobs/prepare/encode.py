"""Tokenizing batches of conversations, in this process or in worker processes.

Rendering a chat template is Python (Jinja) and runs on one core; with
`workers > 1` batches go to a pool of processes, each with its own tokenizer,
and come back in submission order, so the output is identical to a
single-process run. At most `2 * workers` batches are in flight: memory
stays bounded however long the input.
"""

from __future__ import annotations

import os
import signal
import sys
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

from common import chat

# One encoded row, compact for pickling: input_ids, labels, kept_messages, truncated, drop_reason, error.
Result = tuple[Sequence[int], Sequence[int], int, bool, str | None, str | None]
Tools = Sequence[chat.ToolList]

_worker: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def default_workers() -> int:
    """Tokenizing processes when the config sets none: the CPUs this process may run on."""
    n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return int(n or 1)


def load_tokenizer(path: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def encode_batch(tokenizer: Any, fmt: chat.ChatFormat, conversations: Sequence[Sequence[dict[str, Any]]],
                 tools: Tools, max_length: int | None, train_on: chat.TrainOn) -> list[Result]:
    # array('i'): pickled as one bytes block, not one object per token, between workers and the main process.
    out: list[tuple[Sequence[int], Sequence[int], int, bool, str | None, str | None]] = []
    for e in chat.encode_many(tokenizer, fmt, conversations, tools=tools, max_length=max_length, train_on=train_on):
        out.append((array("i", e.input_ids), array("i", e.labels), e.kept_messages, e.truncated, e.drop_reason,
                    e.error))
    return out


def _die_with_parent(parent: int) -> None:
    """Make a worker end when the process that forked it ends, however it ends.

    A parent killed with SIGKILL never shuts its pool down, and the workers block forever on a queue whose
    write end their siblings still hold: orphans that outlive the job. The kernel can signal them instead
    (Linux prctl PR_SET_PDEATHSIG); elsewhere this is a no-op.
    """
    # Forked from the job's process, a worker inherits the CLI's SIGTERM handler (log, raise SystemExit),
    # meant for the main process: the pool's loop catches SystemExit inside a task, and orphaned workers were
    # seen surviving SIGTERM. A worker writes nothing, so the default action (end at once) is what it needs.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # the parent died before prctl took effect: nobody would signal us
        os._exit(1)


def _init(path: str, template: str, max_length: int | None, train_on: str, parent: int) -> None:
    _die_with_parent(parent)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    tok = load_tokenizer(path)
    _worker.update(tok=tok, fmt=chat.chat_format(tok, template), max_length=max_length, train_on=train_on)


def _work(conversations: list[list[dict[str, Any]]], tools: Tools) -> tuple[str, list[Result]]:
    w = _worker
    return w["fmt"].hash, encode_batch(w["tok"], w["fmt"], conversations, tools, w["max_length"], w["train_on"])


class Encoder:
    """Submit batches in order; `drain` hands results back in the same order."""

    def __init__(self, tokenizer: Any, tokenizer_path: str, fmt: chat.ChatFormat, *, max_length: int | None,
                 train_on: chat.TrainOn, workers: int):
        self.tokenizer, self.path, self.fmt = tokenizer, tokenizer_path, fmt
        self.max_length, self.train_on, self.workers = max_length, train_on, workers
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[Any, Future[tuple[str, list[Result]]]]] = deque()
        self.batches = 0

    def submit(self, conversations: list[list[dict[str, Any]]], tools: Tools, tag: Any,
               done: Callable[[Any, list[Result]], None]) -> None:
        """Encode a batch (each conversation with its tools); `done(tag, results)` runs once it and every
        earlier batch finished."""
        self.batches += 1
        if self.workers <= 1 or (self.pool is None and self.batches == 1):
            # The first batch runs here: small inputs never pay for starting a pool.
            self._drain_all(done)
            done(tag, encode_batch(self.tokenizer, self.fmt, conversations, tools, self.max_length, self.train_on))
            return
        if self.pool is None:
            import multiprocessing

            # fork: workers start in milliseconds with transformers already imported (spawn re-imports it,
            # seconds per worker). Nothing here holds a lock across the fork; tokenizers turns its own
            # thread pool off in forked children, which is what the workers want anyway.
            method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
            self.pool = ProcessPoolExecutor(
                self.workers, mp_context=multiprocessing.get_context(method), initializer=_init,
                initargs=(self.path, self.fmt.template, self.max_length, self.train_on, os.getpid()))
        self.pending.append((tag, self.pool.submit(_work, conversations, tools)))
        while len(self.pending) > 2 * self.workers:
            self._finish_one(done)

    def _finish_one(self, done: Callable[[Any, list[Result]], None]) -> None:
        tag, fut = self.pending.popleft()
        template_hash, results = fut.result()
        if template_hash != self.fmt.hash:  # a worker must render exactly what the manifest records
            raise RuntimeError("a tokenizer worker resolved a different chat template than the main process")
        done(tag, results)

    def _drain_all(self, done: Callable[[Any, list[Result]], None]) -> None:
        while self.pending:
            self._finish_one(done)

    def drain(self, done: Callable[[Any, list[Result]], None]) -> None:
        self._drain_all(done)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
