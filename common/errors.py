"""Errors that carry their exit code, and the exit codes themselves (declared here only).

The split is the contract Kubernetes `podFailurePolicy` relies on:
0 done (or already done); 1 anything else, worth retrying (SIGTERM included);
2 bad config or usage; 3 bad or missing input data (not worth retrying);
4 evaluate's `--fail-if-worse` gate (a verdict, published); 5 a sweep where some but not all cells
failed (its leaderboard is published); 130 Ctrl-C.
`common.runner` is the one place exceptions become these codes.
"""

from __future__ import annotations

EXIT_RETRYABLE = 1
EXIT_CONFIG = 2
EXIT_INPUT = 3
# evaluate --fail-if-worse: the job finished and published its report, and the candidate
# did not beat the baseline. Not an error to retry: a verdict (podFailurePolicy: FailJob).
EXIT_GATE = 4
EXIT_PARTIAL = 5
"""`ftjobs sweep` (and `k8s submit --sweep`): some cells failed, the others finished and the leaderboard that
lists every cell (the failed ones with the step, exit code and reason) is published, its manifest URI the last
stdout line. Not the gate's 4: no verdict was reached on the failed cells. `allow_failed_cells: true` makes it 0;
when every cell failed the sweep exits with the failing steps' code instead."""
EXIT_INTERRUPTED = 130  # Ctrl-C, as shells report it


class FtjobsError(Exception):
    """Base class. Anything not classified is worth retrying (exit 1)."""

    exit_code = EXIT_RETRYABLE


class ConfigError(FtjobsError):
    """The configuration or the command line is wrong: fix it, do not retry."""

    exit_code = EXIT_CONFIG


class InputError(FtjobsError):
    """Input data is bad or missing: re-running will not help."""

    exit_code = EXIT_INPUT


class ChecksumError(InputError):
    """An artifact's bytes do not match what its manifest recorded."""


class AlreadyExistsError(FtjobsError):
    """A create-only write found the object already there."""

    exit_code = EXIT_RETRYABLE


class OutputTakenError(FtjobsError):
    """The output prefix holds a finished run with a different config or inputs."""

    exit_code = EXIT_CONFIG


class Preempted(FtjobsError):
    """The job was asked to stop (SIGTERM) and saved its state: retry to resume."""

    exit_code = EXIT_RETRYABLE


class GateFailed(FtjobsError):
    """evaluate --fail-if-worse: the report is published and the candidate did not beat the baseline."""

    exit_code = EXIT_GATE

    def __init__(self, message: str, manifest: str | None = None):
        super().__init__(message)
        self.manifest = manifest  # published: still the job's stdout, so CI can read the report


class CellsFailed(FtjobsError):
    """Some cells of a sweep failed; the leaderboard of every cell is published (exit 5)."""

    exit_code = EXIT_PARTIAL

    def __init__(self, message: str, manifest: str | None = None):
        super().__init__(message)
        self.manifest = manifest  # published: still the command's last stdout line
