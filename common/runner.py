"""What every job command shares: --config/--set options, config resolution,
and the one place exceptions become exit codes."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import click

from common import config as cfg
from common.errors import EXIT_RETRYABLE, FtjobsError

LOG = logging.getLogger("ftjobs.cli")


EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it


def exit_code(exc: BaseException) -> int:
    """The code a command exits with when `exc` ends it (the split podFailurePolicy relies on)."""
    if isinstance(exc, FtjobsError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_RETRYABLE
    return EXIT_RETRYABLE


def fail(exc: BaseException) -> None:
    """Print an error the way users should see it and exit with its code."""
    if isinstance(exc, FtjobsError):
        LOG.error(str(exc), extra={"error": type(exc).__name__, "exit_code": exc.exit_code})
        published = getattr(exc, "manifest", None)
        if published:  # a verdict, not a failure to run: the manifest exists and stays the stdout line
            click.echo(published)
    elif isinstance(exc, KeyboardInterrupt):
        LOG.error("interrupted")
    else:
        LOG.exception("unexpected error (exit 1, worth retrying): %s", exc)
    sys.exit(exit_code(exc))


def config_options(fn: Callable[..., Any] | None = None, *, example: str = "key.sub=value") -> Any:
    """--config FILE and --set key=value, shared by every job command.

    `@config_options` or `@config_options(example="lora.r=32")`: the example must be a key of that job.
    """
    def wrap(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                         help=f"Override a config key (dotted path), e.g. --set {example}. Repeatable.")(f)
        return click.option("--config", "config_file", metavar="FILE_OR_URI",
                            help="YAML/JSON config (path or URI). Later sources win: defaults < file < --set < "
                                 "flags.")(f)
    return wrap(fn) if fn is not None else wrap


def _on_sigterm(signum: int, frame: Any) -> None:
    # SystemExit, not an Exception: libraries that catch Exception (retry loops) cannot swallow it,
    # and `finally` blocks still clean up on the way out.
    LOG.error("received SIGTERM: stopping (exit 1, retryable). Re-running the same command resumes: "
              "finished outputs are skipped through their manifests and markers.")
    raise SystemExit(EXIT_RETRYABLE)


def execute(job: Any, config_file: str | None, sets: tuple[str, ...], flags: dict[str, Any]) -> None:
    """Resolve the config, run the job, print the manifest URI on stdout."""
    # In a pod the job is PID 1, which ignores SIGTERM unless it installs a handler: without this a
    # preempted pod would only stop at SIGKILL when the grace period ends. Jobs that can do better
    # (train: finish the step, checkpoint) install their own handler inside run().
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        conf = cfg.load_config(job.Config, file=config_file, sets=sets, flags=flags)
        LOG.info("resolved config", extra={"config": cfg.redacted(cfg.dump(conf)), "stage": job.STAGE})
        result = job.run(conf)
    except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
        if isinstance(exc, SystemExit):
            raise
        fail(exc)
        return
    uri = getattr(result, "uri", None) or str(result)
    if uri.endswith("/DONE.json"):  # an infer shard that is not the last: its marker, not yet a manifest
        LOG.info("shard marker: %s", uri, extra={"shard_marker": uri})
    else:
        LOG.info("manifest: %s", uri, extra={"manifest": uri})
    click.echo(uri)


