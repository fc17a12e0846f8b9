"""Model accounting: exact analytic FLOPs, activation bytes and the training cost formula."""

from __future__ import annotations

import math

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


# --------------------------------------------------------------------------------------------------
# per-tier sums in every round's metrics (the engines' Accountant / TierLedger)
# --------------------------------------------------------------------------------------------------


def _mlp_slice_cost(hidden: int, rate: float, n: int, batch: int, momentum: bool) -> dict[str, int]:
    """Hand-computed cost of the rate-``rate`` slice of a 64-h-h-10 MLP (digits) trained on n samples."""
    h = math.ceil(rate * hidden)
    params = 64 * h + h + h * h + h + h * 10 + 10
    macs = 64 * h + h * h + h * 10
    activations = 4 * (64 + 4 * h + 10)  # flatten, fc1, relu1, fc2, relu2, out (float32, per sample)
    return {"params": params, "flops": 3 * 2 * macs * n,
            "peak": params * 4 * (2 + momentum) + activations * batch, "bytes": params * 4}


def test_round_metrics_sum_costs_per_tier_against_hand_computed_values(digits_cfg):
    from hetfl.engines.simulator import Simulator
    from hetfl.runner import prepare

    cfg = digits_cfg('algorithm={name="heterofl", clients_per_round=6}', 'fleet.source="tiers"', 'fleet.mix="a-c-e"',
                     "data.num_clients=6", 'model={name="mlp", hidden="16,16"}', "train.momentum=0.9",
                     "train.epochs=2", "train.batch_size=8")
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    _, report = sim.run_round(exp.algorithm.init_state(exp.ctx), 1)
    row = report.as_metrics()
    rates = exp.ctx.fleet.max_width  # fixed assignment: 2 clients each at 1, 1/4, 1/16
    sizes = exp.ctx.client_sizes
    for label, rate in (("w1", 1.0), ("w0.25", 0.25), ("w0.0625", 0.0625)):
        members = [c for c in range(6) if rates[c] == rate]
        costs = [_mlp_slice_cost(16, rate, 2 * int(sizes[c]), 8, True) for c in members]
        assert len(members) == 2
        assert row[f"tier.{label}.clients"] == 2
        assert row[f"tier.{label}.params_trained"] == sum(c["params"] for c in costs)
        assert row[f"tier.{label}.flops"] == sum(c["flops"] for c in costs)
        assert row[f"tier.{label}.bytes_up"] == row[f"tier.{label}.bytes_down"] == sum(c["bytes"] for c in costs)
        assert row[f"tier.{label}.peak_mem_bytes"] == max(c["peak"] for c in costs)
    # the slices: 16, 4 and 1 hidden units
    assert row["tier.w0.0625.params_trained"] == 2 * (64 + 1 + 1 + 1 + 10 + 10)
    for field in ("bytes_up", "bytes_down"):
        assert sum(row[f"tier.{t}.{field}"] for t in ("w1", "w0.25", "w0.0625")) == row[field]


def test_every_server_algorithm_writes_tier_costs_and_run_totals(tmp_path, digits_cfg):
    from hetfl.results import read_metrics
    from hetfl.runner import run

    # FedAvg without a fleet: one tier; dropped clients received the model but trained nothing
    cfg = digits_cfg("rounds=2", "faults.dropout=0.5")
    summary = run(cfg, tmp_path / "fedavg", quiet=True)
    rows = read_metrics(tmp_path / "fedavg")
    for row in rows:
        assert row["tier.w1.clients"] == row["clients"] <= row["clients_selected"]
        assert row["tier.w1.bytes_up"] == row["bytes_up"] and row["tier.w1.bytes_down"] == row["bytes_down"]
        assert row["tier.w1.params_trained"] == row["clients"] * (64 * 32 + 32 + 32 * 10 + 10)
    totals = summary["tier_totals"]["w1"]
    assert totals["flops"] == sum(r["tier.w1.flops"] for r in rows) > 0
    assert totals["peak_mem_bytes"] == max(r["tier.w1.peak_mem_bytes"] for r in rows)
