"""ftjobs launch: an ftjobs command on several processes through torchrun, with ftjobs' exit codes kept.

torchrun (`torch.distributed.run`, PyTorch's launcher and elastic agent) starts the processes, gives them
RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT, forwards SIGTERM to them and waits for them. Its options
are torchrun's own, parsed by torchrun's parser; this command adds only what a Kubernetes Job needs and
torchrun does not do:

- exit codes: torchrun exits 1 when any worker failed, whatever its code, so a podFailurePolicy could not
  tell bad input (3) from a crash (1). Here the launcher exits with the code the workers that stopped on
  their own agreed on when it is 2, 3 or 4 (not worth retrying), else 1.
- the grace period: after forwarding SIGTERM, torchrun waits 30 s before it SIGKILLs the workers, and
  train needs `checkpoint.grace_seconds` (default 120) to save its checkpoint. Without `--shutdown-timeout`
  (or TORCH_ELASTIC_SHUTDOWN_TIMEOUT) the wait here is SHUTDOWN_S; keep it below the pod's
  terminationGracePeriodSeconds and above the stage's grace_seconds.

    # the GPUs of one machine
    ftjobs launch --nproc-per-node 8 -- train --input ... --base-model ... --output ...
    # node R of N: one pod per node (`ftjobs k8s render train --nodes N` writes this for each pod)
    ftjobs launch --nnodes 4 --nproc-per-node 8 --node-rank $JOB_COMPLETION_INDEX \\
        --master-addr ftjobs-train-r1-0.ftjobs-train-r1 --master-port 29500 -- train ...

The workers run `python -m jobs.cli COMMAND ...` with the launcher's log format and level.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import click

from common.errors import EXIT_CONFIG, EXIT_GATE, EXIT_INPUT, EXIT_RETRYABLE, ConfigError, FtjobsError

LOG = logging.getLogger(__name__)
STAGE = "launch"
SHUTDOWN_S = 150
FINAL = (EXIT_CONFIG, EXIT_INPUT, EXIT_GATE)  # codes a retry cannot change


class WorkersFailed(FtjobsError):
    """Workers failed: carries the exit code they agreed on (2, 3, 4), else 1."""

    def __init__(self, message: str, exit_code: int = EXIT_RETRYABLE) -> None:
        super().__init__(message)
        self.exit_code = exit_code


def exit_code(codes: Mapping[int, int]) -> int:
    """The launcher's exit code for the workers' failures {rank: exit code}.

    Negative codes are workers the agent killed (a signal): they say nothing about the failure. 2, 3 or 4
    when every other failed worker exited with that one code; 1 otherwise (mixed codes mean a rank failed
    and took the others down: worth retrying).
    """
    own = {code for code in codes.values() if code > 0}
    if len(own) == 1 and own <= set(FINAL):
        return own.pop()
    return EXIT_RETRYABLE


def torchrun_args(argv: list[str], commands: list[str]) -> Any:
    """torchrun's parsed arguments for `argv` (its options, then the ftjobs command), running `-m jobs.cli`."""
    from torch.distributed import run as torchrun

    if not argv:
        raise ConfigError("Pass torchrun's options and the ftjobs command, e.g. `ftjobs launch --nproc-per-node 2 "
                          "-- train --input ... --base-model ... --output ...`.")
    argv = nproc_alias(argv)
    try:
        args = torchrun.parse_args(argv)
    except SystemExit:  # argparse printed what it did not understand
        raise ConfigError(f"torchrun could not parse {' '.join(argv)!r}: see its message above "
                          "(`torchrun --help` lists its options).") from None
    if args.module or args.no_python or args.run_path:
        raise ConfigError("ftjobs launch runs `python -m jobs.cli COMMAND`: drop -m/--module, --no-python and "
                          "--run-path, and name the ftjobs command after the torchrun options.")
    if args.training_script not in commands:
        raise ConfigError(f"ftjobs launch: {args.training_script!r} is not an ftjobs command; expected one of "
                          f"{', '.join(sorted(commands))} after torchrun's options (e.g. `-- train ...`).")
    if args.shutdown_timeout is None and not os.environ.get("TORCH_ELASTIC_SHUTDOWN_TIMEOUT"):
        args.shutdown_timeout = SHUTDOWN_S
    args.module = True
    args.training_script_args = [args.training_script, *args.training_script_args]
    args.training_script = "jobs.cli"
    return args


def nproc_alias(argv: list[str]) -> list[str]:
    """`--nproc N` as `--nproc-per-node N` (argparse finds the prefix ambiguous between torchrun's two spellings);
    only among the launcher's options, before `--`."""
    end = argv.index("--") if "--" in argv else len(argv)
    head = ["--nproc-per-node" if a == "--nproc" else
            "--nproc-per-node=" + a.split("=", 1)[1] if a.startswith("--nproc=") else a for a in argv[:end]]
    return head + argv[end:]


def launch(args: Any) -> None:
    """Run torchrun; its failures become WorkersFailed with the exit code `exit_code` picks."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        torchrun.run(args)
    except ChildFailedError as exc:
        codes = {int(rank): int(f.exitcode) for rank, f in exc.failures.items()}
        code = exit_code(codes)
        raise WorkersFailed(f"{args.training_script_args[0]} failed on {len(codes)} process(es), exit codes by "
                            f"rank {codes} (their own log lines above say why): exit {code}", code) from None
    except SignalException as exc:
        raise WorkersFailed(f"{exc.sigval.name}: the processes were told to stop and have ended (exit 1, "
                            "retryable: a re-run resumes)") from None


@click.command("launch", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.argument("argv", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def command(ctx: click.Context, argv: tuple[str, ...]) -> None:
    """Run an ftjobs command (train) on several processes with torchrun, keeping ftjobs' exit codes.

    ARGV: torchrun's options, then the command, e.g.
    `ftjobs launch --nproc-per-node 8 -- train --input ... --base-model ... --output ...`.
    """
    root = ctx.find_root()
    group = root.command
    names = group.list_commands(root) if isinstance(group, click.Group) else []  # imported as asked: list them all
    args = torchrun_args(list(argv), [name for name in names if name != STAGE])
    for key, env in (("log_format", "FTJOBS_LOG_FORMAT"), ("log_level", "FTJOBS_LOG_LEVEL")):
        if root.params.get(key):
            os.environ[env] = str(root.params[key])  # the workers log as the launcher was told to
    launch(args)
