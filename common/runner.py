"""What every command shares: --config/--set options, config resolution, and the one place exceptions
become exit codes (`Commands`, the click group every `ftjobs` command runs under).

Exit codes (the split Kubernetes `podFailurePolicy` relies on, declared in `common.errors`): 0 done or
already done; 1 anything else, worth retrying (SIGTERM included: a re-run resumes); 2 bad config or usage;
3 bad or missing input data; 4 the evaluate gate (the report is published); 130 Ctrl-C.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any, NoReturn

import click

from common import config as cfg
from common import logs
from common import manifest as mf
from common.errors import EXIT_INTERRUPTED, EXIT_RETRYABLE, FtjobsError
from common.stage import Pending

LOG = logging.getLogger(__name__)


def exit_code(exc: BaseException) -> int:
    """The code a command exits with when `exc` ends it (the split podFailurePolicy relies on)."""
    if isinstance(exc, FtjobsError):
        return exc.exit_code
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPTED
    if isinstance(exc, SystemExit):
        return exc.code if isinstance(exc.code, int) else EXIT_RETRYABLE
    return EXIT_RETRYABLE


def fail(exc: BaseException) -> NoReturn:
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
    """Resolve the config, run the job, print the manifest URI (or a shard's marker) on stdout.

    With `validate_only` in the click context's meta (`ftjobs k8s render` checking a stage's arguments
    before a Job exists), the resolved config is stored there instead and nothing runs.
    """
    conf = cfg.load_config(job.Config, file=config_file, sets=sets, flags=flags)
    ctx = click.get_current_context(silent=True)
    if ctx is not None and ctx.find_root().meta.get(VALIDATE_ONLY):
        ctx.find_root().meta[VALIDATED] = conf
        return
    # In a pod the job is PID 1, which ignores SIGTERM unless it installs a handler: without this a
    # preempted pod would only stop at SIGKILL when the grace period ends. Jobs that can do better
    # (train: finish the step, checkpoint) install their own handler inside run().
    signal.signal(signal.SIGTERM, _on_sigterm)
    LOG.info("resolved config", extra={"config": cfg.redacted(cfg.dump(conf)), "stage": job.STAGE})
    result = job.run(conf)
    if isinstance(result, Pending):
        LOG.info("%s", result.why, extra={"pending": result.marker})
        if logs.rank() == 0:  # a training rank other than 0: rank 0 prints the manifest it publishes
            click.echo(result.marker)
        return
    uri = result.uri if isinstance(result, mf.Loaded) else str(result)
    LOG.info("manifest: %s", uri, extra={"manifest": uri})
    click.echo(uri)


VALIDATE_ONLY = "ftjobs.validate_only"
VALIDATED = "ftjobs.validated_config"


class Commands(click.Group):
    """The `ftjobs` group: every command below it ends in `fail` on an error, the one place they become exit codes.

    Click's own usage errors keep their handling (exit 2 with the usage line); everything else, from any
    command or subcommand, is logged the way users should see it and exits with its code.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, SystemExit):
            raise
        except BaseException as exc:  # noqa: BLE001 - the one place errors become exit codes
            fail(exc)
