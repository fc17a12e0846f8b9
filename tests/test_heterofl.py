"""Submodel algorithms end to end: identities with FedAvg, evaluation at every width, baselines."""

from __future__ import annotations

import pytest
import torch

from hetfl.engines.simulator import Simulator
from hetfl.results import read_metrics
from hetfl.runner import prepare, run

IID = 'data.partition={name="iid"}'


def _final(cfg, rounds=3):
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    for rnd in range(1, rounds + 1):
        state, _ = sim.run_round(state, rnd)
    return state.models["global"]


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "feddropout", "fjord"])
@pytest.mark.parametrize("model", ['model={name="mlp", hidden="32"}', 'model={name="heterofl_conv", hidden="8,16"}'])
def test_all_clients_at_width_one_equal_fedavg_bit_for_bit(digits_cfg, algo, model):
    common = (IID, model, "train.momentum=0.9", "train.grad_clip=1.0")
    ref = _final(digits_cfg(*common, 'algorithm={name="fedavg", clients_per_round=3, weighted=false}'))
    # static BN would keep the running statistics out of the average; FedAvg averages them
    got = _final(digits_cfg(*common, f'algorithm={{name="{algo}", clients_per_round=3, weighted=false, '
                                     f'static_bn=false}}'))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "feddropout", "fjord"])
def test_heterogeneous_fleet_runs_and_evaluates_every_width(tmp_path, digits_cfg, algo):
    cfg = digits_cfg(f'algorithm={{name="{algo}", clients_per_round=5}}', 'fleet.source="tiers"',
                     'fleet.mix="a-b-e"', "data.num_clients=6", 'model={name="heterofl_conv", hidden="8,16"}',
                     "rounds=2")
    summary = run(cfg, tmp_path / algo, quiet=True)
    assert summary["status"] == "complete"
    row = read_metrics(tmp_path / algo)[-1]
    for key in ("test_accuracy", "test_accuracy.w0.5", "test_accuracy.w0.0625", "tier_acc.global", "tier_acc.w0.5",
                "tier_acc.w0.0625"):
        assert key in row, key
    if algo != "feddropout":  # static BN: statistics recomputed for evaluation (off for random subsets)
        assert row["bn_calibration_samples"] > 0
    assert row["bytes_down"] < 5 * sum(v.numel() * 4 for v in _final(cfg, 0).values())  # submodels are smaller


def test_fleet_levels_below_full_get_smaller_models(digits_cfg):
    cfg = digits_cfg('algorithm={name="heterofl", clients_per_round=6}', 'fleet.source="tiers"',
                     'fleet.mix="a-e"', "data.num_clients=6", 'model={name="mlp", hidden="32"}')
    exp = prepare(cfg)
    state = exp.algorithm.init_state(exp.ctx)
    tasks = exp.algorithm.configure_round(state, 1, list(range(6)), exp.ctx)
    widths = sorted({t.model.width for t in tasks})
    assert widths == [0.0625, 1.0]
    small = next(t for t in tasks if t.model.width < 1)
    assert small.weights["fc1.weight"].shape == (2, 64)  # ceil(32/16) hidden units
