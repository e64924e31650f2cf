"""Prepare's per-row work on batches, in this process or in worker processes.

Rendering a chat template is Python (Jinja) and runs on one core, and so do
decoding, validating and hashing a record; with `workers > 1` each batch
(`batch.process`: raw lines in, verdicts and Arrow columns out) goes to a
pool of processes, each with its own tokenizer, and comes back in submission
order, so the output is identical to a single-process run. At most
`2 * workers` batches are in flight: memory stays bounded however long the
input.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from common import chat, chat_encode, heap
from jobs.prepare import batch as B

# What a batch gives back: its verdicts and the Arrow columns of its kept rows (batch.process).
Result = tuple[list[tuple[Any, ...]], Any]
Done = Callable[[Any, Result], None]

_worker: dict[str, Any] = {}
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def default_workers() -> int:
    """Tokenizing processes when the config sets none: the CPUs this process may use (the pod's CPU limit,
    not the node's cores)."""
    from common.resources import available_cpus

    return available_cpus()


# Tokenizer classes that name the generic Rust-backed tokenizer (transformers 5 calls it TokenizersBackend).
GENERIC_FAST = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str) -> Any:
    """AutoTokenizer's tokenizer for a folder, without importing torch where that is safe.

    `AutoTokenizer` imports the model registry and with it torch: ~6 s of CPU before the first row. A
    tokenizer-only folder (no config.json, so no model type can pick another class) whose tokenizer_config
    names the generic fast class, with no remote code, is exactly what AutoTokenizer returns for it; that
    class loads it directly. Anything else goes through AutoTokenizer.
    """
    with heap.paused():  # transformers' import builds ~40k long-lived objects: no collections meanwhile
        return _load_tokenizer(path)


def _load_tokenizer(path: str) -> Any:
    folder = Path(path)
    try:
        conf = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        conf = None
    if (isinstance(conf, dict) and conf.get("tokenizer_class") in GENERIC_FAST and "auto_map" not in conf
            and (folder / "tokenizer.json").is_file() and not (folder / "config.json").exists()):
        try:
            from transformers import TokenizersBackend
        except ImportError:  # transformers < 5
            pass
        else:
            return TokenizersBackend.from_pretrained(path)
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path, trust_remote_code=False)


def encoder(tokenizer: Any, fmt: chat.ChatFormat, rules: B.Rules) -> Callable[..., list[chat_encode.Encoded]]:
    """The tokenizing step of batch.process for this tokenizer and template."""
    def encode(conversations: Sequence[chat.Messages], tools: Sequence[chat.ToolList]) -> list[chat_encode.Encoded]:
        return chat_encode.encode_many(tokenizer, fmt, conversations, tools=tools, max_length=rules.max_length,
                                train_on=rules.train_on, long_text=rules.long_documents == "windows",
                                special_tokens=rules.special_tokens_in_text)  # type: ignore[arg-type]
    return encode


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


def _init(path: str, template: str, rules: B.Rules, parent: int) -> None:
    _die_with_parent(parent)
    heap.fewer_collections()
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool is the parallelism
    if _worker.get("path") == path and _worker["fmt"].template == template and _worker["rules"] == rules:
        return  # forked: the job's tokenizer and template came with the process
    tok = load_tokenizer(path)
    fmt = chat.chat_format(tok, template)
    _worker.update(path=path, fmt=fmt, rules=rules, encode=encoder(tok, fmt, rules))


def _work(file_format: str | None, items: list[Any]) -> tuple[str, Result]:
    w = _worker
    return w["fmt"].hash, B.process(file_format, items, w["rules"], w["encode"])


class Encoder:
    """Submit batches in order; `drain` hands results back in the same order.

    Without a tokenizer every batch runs here (there is nothing worth a pool). With one, the first batch waits
    for a second: an input of one batch runs here when drained (small inputs never pay for starting a pool);
    with a second, the pool starts and takes both. Running the first batch here before the pool started kept
    one core idle for a batch's time (~0.4 s of 1,024 rows) in every larger run."""

    def __init__(self, tokenizer: Any, tokenizer_path: str | None, fmt: chat.ChatFormat | None, rules: B.Rules, *,
                 workers: int):
        self.path, self.fmt, self.rules = tokenizer_path, fmt, rules
        self.encode = encoder(tokenizer, fmt, rules) if tokenizer is not None and fmt is not None else None
        self.workers = workers if self.encode is not None else 1
        self.pool: ProcessPoolExecutor | None = None
        self.pending: deque[tuple[Any, Future[tuple[str, Result]]]] = deque()
        self.held: tuple[str | None, list[Any], Any] | None = None  # the first batch, until a second comes
        self.frozen = False

    def _start(self) -> None:
        """Once, at the first batch of a tokenizing run: the first Arrow columns' imports (pyarrow imports
        pandas, 0.2 s, the first time it converts a Python list: every run pays it, here or in its first
        batch), then the start-up heap is frozen until `close` (common/heap.py): the collections of a long
        run, the forked workers' included, no longer walk it."""
        with heap.paused():
            B.columns_of([], tokenized=True)
        heap.freeze()
        heap.freeze_at_exit()
        self.frozen = True

    def submit(self, file_format: str | None, items: list[Any], tag: Any, done: Done) -> None:
        """Process a batch of one file's items (batch.process); `done(tag, result)` runs once it and every
        earlier batch finished."""
        if self.encode is not None and not self.frozen:
            self._start()
        if self.workers <= 1:
            self._here(file_format, items, tag, done)
            return
        if self.pool is None and self.held is None:
            self.held = (file_format, items, tag)
            return
        if self.pool is None:
            self.pool = self._start_pool()
        if self.held is not None:
            held_format, held_items, held_tag = self.held
            self.held = None
            self.pending.append((held_tag, self.pool.submit(_work, held_format, held_items)))
        self.pending.append((tag, self.pool.submit(_work, file_format, items)))
        while len(self.pending) > 2 * self.workers:
            self._finish_one(done)

    def _start_pool(self) -> ProcessPoolExecutor:
        import multiprocessing

        assert self.fmt is not None and self.path is not None
        # fork: workers start in milliseconds with transformers already imported (spawn re-imports it,
        # seconds per worker). Nothing here holds a lock across the fork; tokenizers turns its own
        # thread pool off in forked children, which is what the workers want anyway.
        method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
        if method == "fork":
            # What each worker would otherwise do first, done once here and inherited: load the tokenizer and
            # resolve the template (~0.1 s), and the first Arrow columns' imports (`_start`).
            _worker.update(path=self.path, fmt=self.fmt, rules=self.rules, encode=self.encode)
        return ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context(method), initializer=_init,
            initargs=(self.path, self.fmt.template, self.rules, os.getpid()))

    def _here(self, file_format: str | None, items: list[Any], tag: Any, done: Done) -> None:
        done(tag, B.process(file_format, items, self.rules, self.encode))

    def _finish_one(self, done: Done) -> None:
        tag, fut = self.pending.popleft()
        template_hash, result = fut.result()
        if self.fmt is not None and template_hash != self.fmt.hash:  # workers render what the manifest records
            raise RuntimeError("a tokenizer worker resolved a different chat template than the main process")
        done(tag, result)

    def _drain_all(self, done: Done) -> None:
        if self.held is not None:  # the only batch: it runs here
            (file_format, items, tag), self.held = self.held, None
            self._here(file_format, items, tag, done)
        while self.pending:
            self._finish_one(done)

    def drain(self, done: Done) -> None:
        self._drain_all(done)

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None
        if self.frozen:
            heap.thaw()
            self.frozen = False
