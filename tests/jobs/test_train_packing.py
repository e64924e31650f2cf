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


@pytest.mark.parametrize("world", [1, 2, 3, 8])
@pytest.mark.parametrize(("n_rows", "batch_size", "grad_accum"), [(26, 2, 1), (26, 2, 3), (7, 4, 2), (1, 1, 1)])
def test_every_packed_row_of_an_epoch_is_trained_once_by_one_process(world, n_rows, batch_size, grad_accum):
    # What train_step takes: this epoch's micro-batches, a step's share per process (packing.step_share).
    rows = [[2 * i, 2 * i + 1] for i in range(n_rows)]  # packed rows of example indices
    batches = packing.micro_batches(rows, batch_size, seed=3, epoch=0)
    per_step = grad_accum * world
    steps = -(-len(batches) // per_step)  # jobs.train's steps_per_epoch
    taken = []
    for step in range(steps):
        shares = [packing.step_share(batches, per_step, step, rank, world) for rank in range(world)]
        # The step's micro-batches are the same on any number of processes: ranks split them, nothing more.
        alone = packing.step_share(batches, per_step, step)
        assert sorted(map(str, (b for share in shares for b in share))) == sorted(map(str, alone))
        assert all(len(share) <= -(-per_step // world) for share in shares)
        taken += [example for share in shares for batch in share for row in batch for example in row]
    # No duplicates, no gaps: every example of every packed row exactly once per epoch.
    assert sorted(taken) == list(range(2 * n_rows))
    assert packing.step_share(batches, per_step, steps) == []  # past the epoch's end there is nothing
    with pytest.raises(ValueError, match="rank 2 is not in a world of 2"):
        packing.step_share(batches, per_step, 0, rank=2, world=2)


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


def tiny_hybrid(kind: str):  # type: ignore[no-untyped-def]
    """Tiny random models of two hybrid architectures transformers ships (CPU, torch fallbacks): Qwen3-Next
    (gated delta-net linear attention + full attention) and LFM2 (short convolutions + full attention).
    Large initial weights make any mixing between packed examples plain in the logits."""
    from transformers import (
        Lfm2Config,
        Lfm2ForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen3NextConfig,
        Qwen3NextForCausalLM,
    )

    torch.manual_seed(0)
    common = {"vocab_size": 64, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 128, "initializer_range": 0.5}
    if kind == "qwen3_next":
        config = Qwen3NextConfig(**common, num_key_value_heads=1, head_dim=32,
                                 layer_types=["linear_attention", "full_attention"], linear_num_value_heads=2,
                                 linear_num_key_heads=2, linear_key_head_dim=16, linear_value_head_dim=16,
                                 num_experts=2, num_experts_per_tok=1, moe_intermediate_size=32,
                                 shared_expert_intermediate_size=32)
        return Qwen3NextForCausalLM(config).eval()
    if kind == "lfm2":
        return Lfm2ForCausalLM(Lfm2Config(**common, num_key_value_heads=2,
                                          layer_types=["conv", "full_attention"])).eval()
    return LlamaForCausalLM(LlamaConfig(**common, num_key_value_heads=2)).eval()


@pytest.mark.parametrize("kind", ["qwen3_next", "lfm2", "llama"])
def test_packing_is_refused_exactly_where_packed_examples_would_read_each_other(kind: str) -> None:
    model = tiny_hybrid(kind)
    g = torch.Generator().manual_seed(0)
    exs = [packing.example(torch.randint(5, 60, (n,), generator=g).tolist(), [-100] * n) for n in (9, 14)]
    batch = packing.collate([[0, 1]], exs, pad_id=0)
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = model(input_ids=torch.tensor([exs[1].input_ids]), use_cache=False).logits[0]
    leaks = not torch.allclose(packed[9:23], alone, atol=1e-3)
    for mode in ("position_ids", "mask"):
        why = packing.refusal(model.config, mode)
        assert (why is not None) == leaks == (kind != "llama"), (kind, mode, why)
        if why:
            assert f"model type {kind!r}" in why and "Set packing: none" in why and f"packing: {mode}" in why
    assert packing.refusal(model.config, "none") is None


def test_pure_recurrent_models_are_refused_and_sliding_attention_is_not() -> None:
    from transformers import AutoConfig

    assert "'mamba'" in (packing.refusal(AutoConfig.for_model("mamba"), "position_ids") or "")
    assert "'recurrent_gemma'" in (packing.refusal(AutoConfig.for_model("recurrent_gemma"), "mask") or "")
    assert packing.refusal(AutoConfig.for_model("gemma3_text"), "position_ids") is None  # sliding + full attention


def test_packing_none_puts_one_example_per_row() -> None:
    rows = packing.pack([5, 9, 3], max_len=10, separate=True)
    assert sorted(rows) == [[0], [1], [2]] and rows[0] == [1]  # longest first, as packed rows are
    with pytest.raises(ValueError, match="more than max_len"):
        packing.pack([11], max_len=10, separate=True)


def test_state_json_records_the_step_size_and_reads_version_1_as_before():
    from common.errors import InputError
    from jobs.train import checkpoints

    state = checkpoints.TrainState(step=6, tokens=10, trained_tokens=5, attempts=2, per_step=4, world=2)
    data = state.to_json()
    assert (data["version"], data["per_step"], data["world"]) == (2, 4, 2)
    assert checkpoints.TrainState.from_json(data, "here") == state
    v1 = {k: v for k, v in data.items() if k not in ("per_step", "world")} | {"version": 1}
    old = checkpoints.TrainState.from_json(v1, "here")
    assert (old.step, old.per_step, old.world) == (6, None, None)  # the config's grad_accum x processes then
    with pytest.raises(InputError, match="state.json is not a training state"):
        checkpoints.TrainState.from_json({k: v for k, v in data.items() if k != "per_step"}, "here")
    with pytest.raises(InputError, match="version 3; this ftjobs reads versions 1, 2"):
        checkpoints.TrainState.from_json({**data, "version": 3}, "here")
