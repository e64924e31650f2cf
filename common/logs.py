"""Logging, configured once at the CLI entry, and progress reporting.

On a terminal: readable lines. Elsewhere (containers, CI) or with
`--log-format json`: one JSON object per line, which log collectors parse.
Modules only call `logging.getLogger(__name__)`; nothing here runs at import.

Under torchrun / `ftjobs launch` (RANK and WORLD_SIZE set) every record carries
its `rank`, and processes other than rank 0 log errors only: they run the same
code on the same data, so whatever else they would say, rank 0 says once; an
error is that process's own reason to stop. Their progress stays silent too.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from typing import Any

LOG = logging.getLogger(__name__)

_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# Credentials that ride in URLs, masked in every log line whoever wrote it (an S3 client's "could not connect to
# http://user:pass@minio:9000/...", a tracker URI, a presigned URL): a user:password before the host (any
# scheme: postgresql://, mlflow backends), a bare token before an http(s) host, and query parameters that
# name a secret (X-Amz-Signature, X-Amz-Credential, token, api_key, sig, ...). `hf://id@split` is left alone.
_SECRETS = (
    (re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)([^/\s@:\"'<>]*):[^/\s@\"'<>]+@"), r"\1\2:***@"),
    (re.compile(r"(\bhttps?://)[^/\s@:\"'<>]+@"), r"\1***@"),
    (re.compile(r"([?&][^=&\s\"'<>]*(?:token|key|secret|signature|password|passwd|credential|sig)[^=&\s\"'<>]*=)"
                r"[^&\s\"'<>#]+", re.IGNORECASE), r"\1***"),
)


def redact(text: str) -> str:
    """The text with the credentials of any URL in it masked (see _SECRETS)."""
    if "://" not in text and "=" not in text:
        return text
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(self._format(record))

    def _format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _RESERVED and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-5s %(name)s: %(message)s", datefmt="%H:%M:%S")

    def format(self, record: logging.LogRecord) -> str:
        line = redact(super().format(record))
        where = getattr(record, "rank", 0)
        return f"[rank {where}] {line}" if where else line


def rank() -> int:
    """This process's rank among the processes torchrun started (RANK), 0 outside them."""
    try:
        return int(os.environ.get("RANK") or 0)
    except ValueError:
        return 0


def world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE") or 1)
    except ValueError:
        return 1


class _Rank(logging.Filter):
    def __init__(self, value: int) -> None:
        super().__init__()
        self.value = value

    def filter(self, record: logging.LogRecord) -> bool:
        record.__dict__["rank"] = self.value
        return True


def setup(fmt: str = "auto", level: str = "info") -> None:
    """Configure the root logger once. `fmt`: auto | text | json."""
    if fmt == "auto":
        fmt = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if world_size() > 1:
        handler.addFilter(_Rank(rank()))
        if rank() > 0:  # on the handler: libraries' loggers with a level of their own pass it too
            handler.setLevel(logging.ERROR)
            # Hugging Face's progress bars (weights loading, downloads) write to stderr, not through logging;
            # read when huggingface_hub is first imported, which is after this.
            os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # Libraries that are chatty at INFO.
    for name in ("botocore", "boto3", "s3transfer", "urllib3", "filelock", "httpx", "datasets", "fsspec"):
        logging.getLogger(name).setLevel(logging.WARNING)


def is_tty() -> bool:
    return sys.stderr.isatty()


def _fmt_eta(seconds: float) -> str:
    if seconds != seconds or seconds == float("inf") or seconds < 0:  # nan / inf
        return "?"
    m, s = divmod(int(seconds), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class Progress:
    """Progress for long work: a bar on a terminal, periodic log lines elsewhere.

    `update(n, **fields)` advances by n units; fields (loss=..., tok_s=...) are
    shown beside the rate and ETA.
    """

    def __init__(self, desc: str, total: int | None = None, unit: str = "rows", every_s: float = 30.0,
                 logger: logging.Logger | None = None):
        self.desc = desc
        self.total = total
        self.unit = unit
        self.every_s = every_s
        self.log = logger or LOG
        self.done = 0
        self.fields: dict[str, Any] = {}
        self.start = time.monotonic()
        self._last = self.start
        self._tty = is_tty()
        self._silent = rank() > 0  # rank 0 reports the progress all processes make together

    def update(self, n: int = 1, **fields: Any) -> None:
        self.done += n
        self.fields.update(fields)
        now = time.monotonic()
        interval = 0.2 if self._tty else self.every_s
        if now - self._last >= interval:
            self._last = now
            self._emit(final=False)

    def line(self) -> str:
        elapsed = max(time.monotonic() - self.start, 1e-9)
        rate = self.done / elapsed
        parts = [f"{self.desc}: {self.done}" + (f"/{self.total}" if self.total else "") + f" {self.unit}"]
        if self.total:
            parts.append(f"{100.0 * self.done / self.total:5.1f}%")
        parts.append(f"{rate:,.1f} {self.unit}/s")
        for key, value in self.fields.items():
            parts.append(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}")
        if self.total:
            parts.append(f"eta {_fmt_eta((self.total - self.done) / rate if rate else float('inf'))}")
        return "  ".join(parts)

    def _emit(self, final: bool) -> None:
        if self._silent:
            return
        if self._tty:
            sys.stderr.write("\r" + self.line()[:200].ljust(100) + ("\n" if final else ""))
            sys.stderr.flush()
        else:
            self.log.info(self.line(), extra={"progress": self.desc, "done": self.done, "total": self.total,
                                               **{k: v for k, v in self.fields.items()
                                                  if isinstance(v, int | float | str)}})

    def close(self) -> None:
        self._emit(final=True)
