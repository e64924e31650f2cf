"""Packing, collation and checkpoint bookkeeping of the train job: pure functions, no model."""

from __future__ import annotations

import random

import pytest
import torch

from jobs.train import packing
from jobs.train.packing import IGNORE_INDEX

pytestmark = pytest.mark.unit


def test_pack_places_every_example_once_within_the_row_length():
    rng = random.Random(0)
    lengths = [min(512, int(rng.paretovariate(1.2) * 20)) for _ in range(2000)]
    rows = packing.pack(lengths, 512)
    placed = sorted(i for row in rows for i in row)
    assert placed == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in row) <= 512 for row in rows)
    # Best fit keeps rows nearly full: far fewer rows than one example per row would need.
    assert sum(lengths) / (len(rows) * 512) > 0.95


def test_pack_refuses_an_example_longer_than_a_row():
    with pytest.raises(ValueError, match="more than max_len"):
        packing.pack([10, 600], 512)


def test_epoch_order_is_reproducible_and_differs_between_epochs():
    rows = [[i] for i in range(50)]
    assert packing.micro_batches(rows, 4, seed=1, epoch=0) == packing.micro_batches(rows, 4, seed=1, epoch=0)
    assert packing.micro_batches(rows, 4, seed=1, epoch=0) != packing.micro_batches(rows, 4, seed=1, epoch=1)


def test_collate_restarts_positions_and_never_targets_across_examples():
    a = packing.example([1, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 11, 12])
    b = packing.example([1, 20, 21], [IGNORE_INDEX, 20, 21])
    c = packing.example([1, 30], [IGNORE_INDEX, 30])
    batch = packing.collate([[0, 1], [2]], [a, b, c], pad_id=0, with_mask=True)
    assert batch["input_ids"].tolist() == [[1, 10, 11, 12, 1, 20, 21], [1, 30, 0, 0, 0, 0, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2], [0, 1, 0, 1, 2, 3, 4]]
    # Position t predicts token t+1 of the same example; the last token of an example predicts nothing.
    assert batch["targets"].tolist() == [[-100, 11, 12, -100, 20, 21, -100], [30, -100, -100, -100, -100, -100, -100]]
    allowed = batch["attention_mask"][0, 0] == 0
    assert allowed[5].tolist() == [False, False, False, False, True, True, False]  # token 20 sees only its example
    assert not allowed[1, 2]  # causal
    assert packing.count_tokens([[0, 1]], [a, b, c]) == (7, 4)


def test_example_counts_trainable_positions_for_lists_and_arrays():
    import numpy as np

    labels = [IGNORE_INDEX, IGNORE_INDEX, 5, 6, IGNORE_INDEX]
    assert packing.example([1, 2, 3, 4, 5], labels).trainable == 2
    assert packing.example(np.arange(5), np.asarray(labels, dtype=np.int32)).trainable == 2


def test_loss_sum_counts_only_targets():
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = torch.nn.Embedding(50, 8)
            self.head = torch.nn.Linear(8, 50)

        def forward(self, input_ids, position_ids, use_cache):  # noqa: ANN001
            return type("Out", (), {"logits": self.head(self.emb(input_ids))})()

    model = Tiny()
    a = packing.example([1, 10, 11, 12], [IGNORE_INDEX, IGNORE_INDEX, 11, 12])
    batch = packing.collate([[0]], [a], pad_id=0)
    total, n = packing.loss_sum(model, batch)
    logits = model.head(model.emb(torch.tensor([[1, 10, 11, 12]])))[0]
    expected = torch.nn.functional.cross_entropy(logits[1:3], torch.tensor([11, 12]), reduction="sum")
    assert n == 2
    assert torch.allclose(total, expected)
