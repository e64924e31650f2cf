"""The shape every stage shares: already done? -> the work -> the manifest, published last and create-only.

A stage supplies only what differs: its name, its identity (the resolved config and the input manifests it
read) and its work. The work writes its files through the attempt's `writer` and returns an `Outcome`
(stats, metrics, model, timings); this module owns the rest:

1. the "already done" rule: a finished run of the same stage, config and inputs at the output is returned
   as it is (exit 0); a different finished run there is refused (exit 2), before any work;
2. the attempt (`common.attempts`): a folder `attempts/<id>/` of its own for the writer, a heartbeat while
   it works, and removing what earlier attempts left that nothing needs;
3. the manifest: built from the outcome and the artifacts the writer recorded, published create-only
   (`If-None-Match: *`). When another attempt of the same run published first, its manifest stands and is
   returned (this attempt's files stay unreferenced, for gc); another run's manifest there is refused;
4. the result: the published manifest, or `Pending` when this attempt did its part and another publishes
   (an infer shard that is not the last to finish, a training rank other than 0).

Exit codes are not decided here: exceptions travel to the one mapping in `common.runner`.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from common import attempts, storage
from common import manifest as mf
from common.errors import AlreadyExistsError, OutputTakenError

LOG = logging.getLogger(__name__)
HOLD_ENV = "FTJOBS_ATTEMPT_HOLD_S"


@dataclass(frozen=True)
class Identity:
    """What makes two attempts the same run: the stage, its resolved config and the inputs it read."""

    stage: str
    output: str
    config: dict[str, Any]
    inputs: list[mf.InputRef]

    @property
    def key(self) -> str:
        return mf.identity(mf.config_hash(self.config), self.inputs)


@dataclass
class Attempt:
    """One attempt at a stage's work: its id, where its files go, and when it started."""

    identity: Identity
    id: str
    writer: mf.ArtifactWriter
    heartbeat: attempts.Heartbeat
    started: float = field(default_factory=time.monotonic)

    @property
    def output(self) -> str:
        return self.identity.output


@dataclass
class Outcome:
    """What the work returns for its manifest; the artifacts come from the attempt's writer."""

    stats: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    model: dict[str, Any] = field(default_factory=dict)
    run_id: str | None = None  # the run this step belongs to; default: the executor's (FTJOBS_RUN_ID) or a new one


@dataclass(frozen=True)
class Pending:
    """This attempt did its part; another one publishes the stage's manifest.

    `marker` is what this attempt wrote to say so (an infer shard's DONE.json), or the manifest URI the
    publishing attempt will write (a training rank other than 0). It is the command's stdout line.
    """

    marker: str
    why: str  # the log line that says what this attempt did and who publishes

    def __str__(self) -> str:
        return self.marker


Result = mf.Loaded | Pending
Work = Callable[[Attempt], "Outcome | Result"]


def already_done(identity: Identity) -> mf.Loaded | None:
    """The finished run at the output when it is this one; raises OutputTakenError when it is another."""
    done = mf.check_output(identity.output, stage=identity.stage, config=identity.config, inputs=identity.inputs)
    if done is not None:
        LOG.info("already done: %s (run %s)", done.uri, done.manifest.run_id)
    return done


def run(identity: Identity, work: Work, *, record: dict[str, Any] | None = None) -> Result:
    """Already done? Else do the work in an attempt of its own and publish its manifest last, create-only.

    `record` adds to what the attempt's heartbeat says about it (infer: which shard it works on).
    """
    done = already_done(identity)
    if done is not None:
        attempts.tidy(identity.output)
        return done
    attempt_id = attempts.new_id()
    attempts.tidy(identity.output, keep_attempt=attempt_id)
    _hold(identity.output)
    with attempts.Heartbeat(identity.output, attempt_id, identity.stage, extra=record or {}) as beat:
        attempt = Attempt(identity=identity, id=attempt_id, heartbeat=beat,
                          writer=mf.ArtifactWriter(identity.output, base=attempts.path_of(attempt_id)))
        LOG.info("attempt %s at %s", attempt_id, identity.output, extra={"attempt": attempt_id})
        outcome = work(attempt)
        if not isinstance(outcome, Outcome):  # the work found the run finished, or another attempt publishes
            return outcome
        return publish(attempt, outcome)


def _hold(output: str) -> None:
    """Test hook: before its work, wait (at most FTJOBS_ATTEMPT_HOLD_S seconds) until another attempt has
    published at the output, so a test can make this attempt a zombie that writes after the winner."""
    hold = float(os.environ.get(HOLD_ENV, "0") or 0)
    if hold <= 0:
        return
    LOG.warning("%s=%g: holding this attempt until another one publishes at %s", HOLD_ENV, hold, output)
    deadline = time.monotonic() + hold
    while time.monotonic() < deadline and not storage.exists(mf.manifest_uri(output)):
        time.sleep(0.2)


def publish(attempt: Attempt, outcome: Outcome) -> mf.Loaded:
    """Build the manifest from the outcome and the recorded artifacts; publish it create-only."""
    ident = attempt.identity
    timings = dict(outcome.timings)
    timings.setdefault("wall_s", time.monotonic() - attempt.started)
    manifest = mf.build(stage=ident.stage, run_id=outcome.run_id or mf.current_run_id(), cells=mf.current_cells(),
                        config=ident.config,
                        inputs=ident.inputs, artifacts=attempt.writer.artifacts, stats=outcome.stats,
                        metrics=outcome.metrics, timings=timings, model=outcome.model, attempt=attempt.id)
    try:
        uri = mf.publish(ident.output, manifest)
    except AlreadyExistsError:
        return winner(ident)
    return mf.load(uri, verify="none")


def winner(identity: Identity) -> mf.Loaded:
    """Another attempt published while this one worked: its manifest stands when it is the same run.

    Work that notices this early (train, at a checkpoint) returns it instead of finishing for nothing.
    """
    try:
        winner = already_done(identity)
    except OutputTakenError:
        raise OutputTakenError(
            f"While this attempt ran, another run with a different config or inputs published "
            f"{mf.manifest_uri(identity.output)}; this attempt's results were not recorded. Choose another "
            "--output.") from None
    if winner is None:  # published, then gone: not what create-only storage does
        raise AlreadyExistsError(f"{mf.manifest_uri(identity.output)} was published by another attempt and then "
                                 "disappeared; re-run to check the output")
    LOG.warning("another attempt of this run published %s first: its results stand and this attempt's were not "
                "recorded", winner.uri)
    return winner
