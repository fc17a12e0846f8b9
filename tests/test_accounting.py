"""Model accounting: exact analytic FLOPs, activation bytes and the training cost formula."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetfl.accounting import ModelCost, TrainCost, model_cost, train_cost
from hetfl.data.base import DataInfo
from hetfl.models import build_model

MNIST = DataInfo((1, 28, 28), 10)
TOKENS = DataInfo((80,), 80, vocab_size=80)


def test_mlp_exact_flops_params_activations():
    model = build_model("mlp", MNIST)
    cost = model_cost(model, torch.zeros(1, 1, 28, 28))
    assert cost.forward_flops == 2 * (784 * 200 + 200 * 200 + 200 * 10)
    assert cost.params == 784 * 200 + 200 + 200 * 200 + 200 + 200 * 10 + 10
    # leaf outputs: flatten 784, fc1 200, relu 200, fc2 200, relu 200, out 10 (float32)
    assert cost.activation_bytes == 4 * (784 + 4 * 200 + 10)


def test_cnn_exact_flops_and_batch_independence():
    model = build_model("cnn", MNIST)
    cost = model_cost(model, torch.zeros(1, 1, 28, 28))
    macs = 32 * 28 * 28 * 25 + 64 * 14 * 14 * 32 * 25 + 512 * 64 * 7 * 7 + 10 * 512
    assert cost.forward_flops == 2 * macs
    assert cost.params == sum(p.numel() for p in model.parameters())
    assert model_cost(model, torch.zeros(4, 1, 28, 28)) == cost  # per sample, whatever the batch
    half = model_cost(build_model("cnn", MNIST, width=0.5), torch.zeros(1, 1, 28, 28))
    assert half.forward_flops < cost.forward_flops / 2


def test_recurrent_and_attention_flops():
    lstm = model_cost(build_model("lstm", TOKENS), torch.zeros(1, 80, dtype=torch.long))
    per_step = 4 * 256 * (8 + 256) + 4 * 256 * (256 + 256)  # two layers, 4 gates; the embedding is free
    assert lstm.forward_flops == 2 * (80 * per_step + 256 * 80)

    tr = model_cost(build_model("transformer", TOKENS), torch.zeros(1, 80, dtype=torch.long))
    d, ffn, seq, layers = 128, 512, 80, 2
    per_layer = seq * (4 * d * d + 2 * d * ffn) + seq * seq * 2 * d  # projections + ffn + QK^T and AV
    assert tr.forward_flops == 2 * (layers * per_layer + d * 80)

    class Hand(nn.Module):  # attention written with @ and an nn.MultiheadAttention
        def __init__(self) -> None:
            super().__init__()
            self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            scores = F.softmax(x @ x.transpose(1, 2), -1)  # (1, 5, 5): 5*5*16 MACs
            return self.mha(scores @ x, x, x)[0]  # 5*5*16 MACs + the MHA's own

    hand = model_cost(Hand(), torch.zeros(1, 5, 16))
    assert hand.forward_flops == 2 * (2 * 5 * 5 * 16 + 4 * 5 * 16 * 16 + 2 * 5 * 5 * 16)


def test_model_cost_leaves_model_untouched():
    model = build_model("heterofl_conv", MNIST)
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model_cost(model, torch.randn(1, 1, 28, 28))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats too
    with pytest.raises(ValueError):
        model_cost(model, torch.zeros(0, 1, 28, 28))


def test_train_cost_formula():
    cost = ModelCost(params=1000, forward_flops=500, activation_bytes=64)
    assert train_cost(cost, 120, 10, momentum=False) == TrainCost(flops=3 * 500 * 120,
                                                                  peak_memory_bytes=1000 * 4 * 2 + 64 * 10)
    assert train_cost(cost, 120, 10, momentum=True).peak_memory_bytes == 1000 * 4 * 3 + 64 * 10
    assert train_cost(cost, 0, 1, momentum=False).flops == 0
