"""Exclusive learning: one model per size, FedAvg over the clients that can run it."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetfl.fleet import build_fleet
from hetfl.runner import run


def _rows(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in r.items() if not (k.endswith("_s") and k != "round_sim_time_s")} for r in rows]


def _weights(path):
    return torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)["state"]["models"]["global"]


def test_one_size_is_fedavg_bit_for_bit(digits_cfg, tmp_path):
    """A uniform fleet: the same clients, initial model, local steps and average as FedAvg."""
    fedavg = digits_cfg("engine.batched=false")
    excl = digits_cfg("engine.batched=false", 'algorithm={name="exclusive", clients_per_round=3}')
    run(fedavg, tmp_path / "fedavg", quiet=True)
    run(excl, tmp_path / "excl", quiet=True)
    assert _rows(tmp_path / "excl") == _rows(tmp_path / "fedavg")
    want, got = _weights(tmp_path / "fedavg"), _weights(tmp_path / "excl")
    assert sorted(got) == sorted(f"sizes.s0.{k}" for k in want)
    for k, v in want.items():
        assert torch.equal(got[f"sizes.s0.{k}"], v), k


def test_each_size_is_the_mean_of_the_clients_that_can_run_it(digits_cfg, tmp_path):
    """Three tiers, one round: size s moved iff a sampled client can run it, and every client is scored with
    the largest size it can run (deployed = client-weighted mean of the per-size accuracies)."""
    cfg = digits_cfg("rounds=1", "data.num_clients=12", 'fleet.source="tiers"', 'fleet.mix="a-b-c"',
                     'algorithm={name="exclusive", clients_per_round=4}')
    run(cfg, tmp_path, quiet=True)
    row = _rows(tmp_path)[-1]
    tiers = build_fleet(cfg.fleet, 12, cfg.seed, sizes=np.ones(12)).tiers()
    accs = [row["test_accuracy"], row["test_accuracy.w0.5"], row["test_accuracy.w0.25"]]
    want = sum(np.mean(tiers == t) * a for t, a in enumerate(accs))
    assert row["deployed_accuracy"] == pytest.approx(want, abs=1e-12)
    assert row["smallest_accuracy"] == accs[-1]
    # the widest tier's clients trained all three sizes: its FLOPs per client exceed the narrowest tier's
    assert row["tier.w1.flops"] / max(row["tier.w1.clients"], 1) > row["tier.w0.25.flops"] / max(
        row["tier.w0.25.clients"], 1)


def test_size_models_have_the_plain_shapes(digits_cfg):
    from hetfl.experiment import prepare

    cfg = digits_cfg("data.num_clients=6", 'fleet.source="tiers"', 'fleet.mix="a-c"',
                     'algorithm={name="exclusive"}')
    exp = prepare(cfg)
    algo = exp.algorithm
    state = algo.init_state(exp.ctx)
    small = algo.size_ref(exp.ctx, 1).build(exp.ctx.info).state_dict()
    got = algo.size_weights(state.models["global"], 1)
    assert {k: tuple(v.shape) for k, v in got.items()} == {k: tuple(v.shape) for k, v in small.items()}


def test_bundle_of_bundles_is_refused():
    from hetfl.data.base import DataInfo
    from hetfl.errors import ConfigError
    from hetfl.models.registry import build_model

    with pytest.raises(ConfigError, match="cannot be exclusive_sizes"):
        build_model("exclusive_sizes", DataInfo((4,), 3), base="exclusive_sizes")
    with pytest.raises(ConfigError, match=r"model.widths of 'exclusive_sizes'.*got '1,x'"):
        build_model("exclusive_sizes", DataInfo((4,), 3), widths="1,x")


def test_private_rounds_clip_one_update_over_every_size(digits_cfg, tmp_path):
    """[privacy]: a client's update spans every size it trained; each size's expected contributors are the
    clients that can run it (footprints), and per-size noise figures name the deployed sizes."""
    cfg = digits_cfg("rounds=2", "data.num_clients=8", 'fleet.source="tiers"', 'fleet.mix="a-b"',
                     'algorithm={name="exclusive", clients_per_round=4}', "privacy.clip=1.0",
                     "privacy.noise_multiplier=1.0")
    run(cfg, tmp_path, quiet=True)
    row = _rows(tmp_path)[-1]
    assert np.isfinite(row["test_accuracy"]) and np.isfinite(row["test_accuracy.w0.5"])
    assert any(k.startswith("privacy.") for k in row)
