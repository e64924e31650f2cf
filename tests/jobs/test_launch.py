"""`ftjobs launch`: torchrun's own parser and agent around `python -m jobs.cli`, keeping ftjobs' exit codes.

(Training on 2 processes through it: tests/jobs/test_train_distributed.py.)"""

from __future__ import annotations

import re
import subprocess

import pytest

from jobs import launch
from tests.jobs.test_train_distributed import REPO, launch_command, records_of


@pytest.mark.integration
def test_the_launcher_keeps_the_workers_exit_code(subprocess_env):
    # A config mistake: every worker exits 2, and so does the launcher (torchrun alone would exit 1).
    cmd = launch_command(2, ["train", "--input", "s3://ftjobs-test/none/manifest.json", "--base-model", "m", "--output",
                      "s3://ftjobs-test/none/out", "--set", "lora.r=0"])
    proc = subprocess.run(cmd, cwd=REPO, env=subprocess_env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 2, proc.stderr[-3000:]
    records = records_of(proc.stderr)
    msgs = [(r.get("rank"), r["msg"]) for r in records]
    # The first worker to fail decides; the agent then stops the other (a negative code: a signal).
    (summary,) = [m for rank, m in msgs if rank is None and "exit codes by rank" in m]
    assert summary.endswith("exit 2") and re.search(r"\{(0: 2, 1: -?\d+|1: 2, 0: -?\d+|0: 2|1: 2)", summary)
    mistakes = [rank for rank, m in msgs if "lora.r: Input should be greater than or equal to 1" in m]
    assert mistakes and set(mistakes) <= {0, 1}  # each worker's own error line, tagged with its rank


@pytest.mark.unit
@pytest.mark.parametrize(("codes", "expected"), [
    ({0: 3, 1: 3}, 3), ({0: 2, 1: -15}, 2), ({1: 4}, 4), ({0: 3, 1: 1}, 1), ({0: 1, 1: 1}, 1), ({0: -9}, 1),
    ({0: 2, 1: 3}, 1),
])
def test_exit_code_is_final_only_when_the_failed_workers_agree(codes, expected):
    assert launch.exit_code(codes) == expected


@pytest.mark.unit
def test_launcher_arguments_are_torchruns_around_jobs_cli(monkeypatch):
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    args = launch.torchrun_args(["--nnodes", "2", "--nproc-per-node", "4", "--", "train", "--input", "x"], ["train"])
    assert (args.module, args.training_script, args.training_script_args) == (True, "jobs.cli", ["train", "--input",
                                                                                                 "x"])
    assert (args.nnodes, args.nproc_per_node, args.shutdown_timeout) == ("2", "4", launch.SHUTDOWN_S)
    assert launch.torchrun_args(["--shutdown-timeout", "9", "train"], ["train"]).shutdown_timeout == 9
    for argv, message in ((["-m", "train"], "drop -m/--module"), (["--nnodes", "1", "trian"], "'trian' is not an"),
                          ([], "Pass torchrun's options")):
        with pytest.raises(launch.ConfigError, match=message):
            launch.torchrun_args(argv, ["train", "merge"])
