"""`python -m tests.e2e.zombie_cli STAGE ARGS...`: `python -m jobs.cli ARGS` as test_attempts.py's zombie.

The zombie is held (FTJOBS_ATTEMPT_HOLD_S, common/stage.py) right after it passed the "already done" check,
until another attempt has published. Here it says so on stderr first (ZOMBIE_READY, the test's cue to start
the racers) and imports what the stage imports inside its functions before it holds, as a pod paused in the
middle of its run has its libraries loaded: its imports (transformers alone is ~4 s on 2 cores) overlap the
racers' instead of coming after the winner published. What the zombie does after the hold, and the race,
are unchanged: it still passed the check before anyone published and still writes after the winner did.
"""

from __future__ import annotations

import importlib
import runpy
import sys

from common import stage

ZOMBIE_READY = "zombie: past the already-done check"
TORCH_STACK = ["torch", "peft", "transformers:AutoModelForCausalLM", "transformers:AutoTokenizer"]
PRELOAD = {"prepare": ["transformers:AutoTokenizer"], "train": TORCH_STACK, "merge": TORCH_STACK,
           "infer": TORCH_STACK, "evaluate": ["matplotlib.pyplot", "rouge_score.rouge_scorer"]}


def preload(names: list[str]) -> None:
    """Import each `module` or `module:attribute` (transformers loads its classes on first access)."""
    for name in names:
        module, _, attribute = name.partition(":")
        loaded = importlib.import_module(module)
        if attribute:
            getattr(loaded, attribute)


def main() -> None:
    names = PRELOAD[sys.argv.pop(1)]
    hold = stage._hold

    def ready_preload_hold(output: str) -> None:
        print(ZOMBIE_READY, file=sys.stderr, flush=True)
        preload(names)
        hold(output)

    stage._hold = ready_preload_hold
    runpy.run_module("jobs.cli", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
