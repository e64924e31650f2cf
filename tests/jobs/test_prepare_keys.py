"""The compact key table prepare's job process keeps one entry per distinct row in (jobs/prepare/keys.py)."""

from __future__ import annotations

import random

import pytest

from jobs.prepare.keys import KeySet, Repeats

pytestmark = pytest.mark.unit


def test_key_set_and_repeats_agree_with_a_python_set_and_counter_through_growth() -> None:
    rng = random.Random(0)
    keys = [rng.getrandbits(64) for _ in range(20_000)] + [0, 1, 2**64 - 1]  # 0 is the table's free-slot mark
    keys += rng.sample(keys, 5_000) + [0, 0]
    table, ref, repeats, counts = KeySet(capacity=8), set(), Repeats(), {}  # type: ignore[var-annotated]
    for k in keys:
        assert (k in table) == (k in ref)
        assert table.add(k) == (k not in ref)
        ref.add(k)
        assert repeats.seen(k) == counts.get(k, 0)  # the n-th repeat of a row is numbered n
        counts[k] = counts.get(k, 0) + 1
    assert len(table) == len(ref) == len(repeats)
