"""LoRA's input dropout on CPU (jobs/train/dropout.py): nn.Dropout's distribution from the dropped positions only."""

from __future__ import annotations

import pytest
import torch

from jobs.train import dropout

pytestmark = pytest.mark.unit


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_each_element_is_dropped_with_probability_p_and_the_rest_scaled(p):
    torch.manual_seed(0)
    drop = dropout.SparseDropout(p).train()
    x = torch.rand(400, 500) + 1.0
    y = drop(x)
    dropped = y == 0
    n = x.numel()
    assert abs(float(dropped.float().mean()) - p) < 5 * (p * (1 - p) / n) ** 0.5
    torch.testing.assert_close(y[~dropped], x[~dropped] / (1 - p))
    # Positions are independent: drops spread evenly over rows and columns, not in runs or at the start.
    assert abs(float(dropped[:200].float().mean()) - float(dropped[200:].float().mean())) < 0.02
    assert abs(float(dropped[:, 0::2].float().mean()) - float(dropped[:, 1::2].float().mean())) < 0.02


def test_small_tensors_get_every_position_with_the_same_chance():
    torch.manual_seed(1)
    counts = torch.zeros(7)
    for _ in range(4000):
        counts[dropout.dropped_positions(7, 0.3)] += 1
    assert ((counts / 4000 - 0.3).abs() < 0.04).all(), counts / 4000


def test_backward_zeroes_the_dropped_positions_and_scales_the_rest():
    torch.manual_seed(2)
    x = torch.randn(8, 33, requires_grad=True)
    y = dropout.SparseDropout(0.2).train()(x.transpose(0, 1))  # a non-contiguous input
    grad = torch.randn(33, 8)
    y.backward(grad)
    assert x.grad is not None
    kept = (y != 0).transpose(0, 1)
    torch.testing.assert_close(x.grad, torch.where(kept, grad.transpose(0, 1) / 0.8, 0.0))


def test_the_seed_fixes_the_draws_and_eval_mode_is_the_identity():
    x = torch.randn(64, 64)
    drop = dropout.SparseDropout(0.1).train()
    torch.manual_seed(3)
    first = drop(x)
    torch.manual_seed(3)
    assert torch.equal(drop(x), first)  # what gradient checkpointing relies on when it replays a layer
    assert drop.eval()(x) is x


def test_every_lora_dropout_of_a_peft_model_is_swapped():
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_dropout=0.05, target_modules="all-linear"))
    assert dropout.use_sparse(model) == 2 * 7  # q k v o gate up down per layer
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
