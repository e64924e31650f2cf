"""Attention per packed example (jobs/train/segments.py): the same loss and gradients as the dense masked SDPA
path, on a tiny in-memory Llama with grouped-query attention and a packed batch of several examples."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from jobs.train import packing, segments

LENGTHS = [5, 17, 3, 30, 9, 1, 12]  # two rows: 5+17+3 = 25 (padded to 52) and 30+9+1+12 = 52
ROWS = [[0, 1, 2], [3, 4, 5, 6]]


def tiny_llama(attention: str) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = LlamaForCausalLM(config)
    segments.register()
    model.set_attn_implementation(attention)
    return model.train()


def packed_batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    examples = [packing.example(torch.randint(3, 64, (n,), generator=gen).tolist(),
                                [-100, *torch.randint(3, 64, (n - 1,), generator=gen).tolist()]) for n in LENGTHS]
    return packing.collate(ROWS, examples, pad_id=0)


def loss_and_grads(model: Any, batch: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    total, n = packing.loss_sum(model, batch)
    (total / n).backward()
    return float(total.detach()), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.integration
def test_per_example_attention_gives_the_dense_masked_loss_and_gradients(monkeypatch):
    rows_run: list[list[int]] = []
    real_row = segments._row

    def spy(q: Any, k: Any, v: Any, lengths: list[int], *args: Any) -> Any:
        rows_run.append(lengths)
        return real_row(q, k, v, lengths, *args)

    monkeypatch.setattr(segments, "_row", spy)
    batch = packed_batch()
    dense_loss, dense_grads = loss_and_grads(tiny_llama("sdpa"), batch)
    loss, grads = loss_and_grads(tiny_llama(segments.NAME), batch)

    # Each layer ran each row example by example (the first row's padding is an example of its own).
    assert rows_run == [[5, 17, 3, 27], [30, 9, 1, 12]] * 2
    assert loss == pytest.approx(dense_loss, rel=1e-5)
    for name, grad in dense_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")


@pytest.mark.integration
def test_a_padded_batch_keeps_plain_sdpa_with_its_mask():
    ids = torch.randint(3, 64, (2, 12), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :5] = 0  # left padding: without the mask the real tokens would read it
    with torch.no_grad():
        want = tiny_llama("sdpa").eval()(input_ids=ids, attention_mask=mask).logits
        got = tiny_llama(segments.NAME).eval()(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got[mask.bool()], want[mask.bool()], rtol=1e-5, atol=1e-5)


@pytest.mark.unit
def test_examples_are_found_where_positions_restart_as_transformers_finds_them():
    positions = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 0, 1, 2]])
    assert segments.segment_lengths(positions) == [[3, 2, 4], [6, 3]]


@pytest.mark.unit
@pytest.mark.parametrize(("kind", "fields", "attention", "packing_mode", "cuda", "chosen"), [
    ("llama", {}, "sdpa", "position_ids", False, segments.NAME),
    ("llama", {}, "sdpa", "position_ids", True, "sdpa"),  # CUDA: flash_attention_2 runs varlen
    ("llama", {}, "sdpa", "mask", False, "sdpa"),  # an explicit mask is kept as asked
    ("llama", {}, "eager", "position_ids", False, "eager"),
    ("mistral", {"sliding_window": 16}, "sdpa", "position_ids", False, "sdpa"),
    ("gemma2", {}, "sdpa", "position_ids", False, "sdpa"),  # soft-capped scores, sliding layers
])
def test_per_example_attention_is_chosen_only_where_it_is_what_the_model_computes(kind, fields, attention,
                                                                                  packing_mode, cuda, chosen):
    from transformers import AutoConfig

    config = AutoConfig.for_model(kind, **fields)
    assert segments.choose(config, attention, packing_mode, cuda) == chosen
