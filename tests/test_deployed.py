"""``deployed_accuracy`` / ``smallest_accuracy``: one definition for width, depth and capacity levels."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hetfl.fleet import build_fleet
from hetfl.resolve import load_config
from hetfl.runner import run

CASES = {
    "heterofl": ("heterofl", ["w0.5", "w0.25", "w0.125"]),
    "depthfl": ("depthfl", ["w1d0.75", "w1d0.5", "w1d0.25"]),
    "fiarse": ("fiarse", ["r0.25", "r0.0625", "r0.015625"]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_deployed_is_the_client_weighted_mean_of_each_tier_model(case, tmp_path):
    name, labels = CASES[case]
    cfg = load_config("configs/digits_fedavg.toml", [
        "rounds=1", "eval.every=1", "data.num_clients=12", 'fleet.source="tiers"', 'fleet.mix="a-b-c-d"',
        'model={name="heterofl_conv", hidden="8,8,8,8"}', f'algorithm={{name="{name}", clients_per_round=4}}'])
    run(cfg, tmp_path, quiet=True)
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    tiers = build_fleet(cfg.fleet, 12, cfg.seed, sizes=np.ones(12)).tiers()
    accs = [row["test_accuracy"]] + [row[f"test_accuracy.{label}"] for label in labels]
    want = sum(np.mean(tiers == t) * a for t, a in enumerate(accs))
    assert row["deployed_accuracy"] == pytest.approx(want, abs=1e-12)
    assert row["smallest_accuracy"] == accs[-1]


def test_one_model_for_everyone(tmp_path):
    cfg = load_config("configs/digits_fedavg.toml", ["rounds=1", "eval.every=1", "data.num_clients=4"])
    run(cfg, tmp_path, quiet=True)
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert row["deployed_accuracy"] == row["smallest_accuracy"] == row["test_accuracy"]


def test_worst_clients_of_the_deployed_models(tmp_path):
    """``deployed_client_acc_*``: each local client scored with the model of its tier (here: local splits)."""
    cfg = load_config("configs/digits_fedavg.toml", [
        "rounds=1", "eval.every=1", "data.num_clients=12", 'fleet.source="tiers"', 'fleet.mix="a-b"',
        'model={name="heterofl_conv", hidden="8,8,8,8"}', 'algorithm={name="heterofl", clients_per_round=4}'])
    run(cfg, tmp_path, quiet=True)
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    tiers = build_fleet(cfg.fleet, 12, cfg.seed, sizes=np.ones(12)).tiers()
    share = np.mean(tiers == 0)
    mean = share * row["tier_acc.global"] + (1 - share) * row["tier_acc.w0.5"]
    assert row["deployed_client_acc_mean"] == pytest.approx(mean, abs=1e-12)
    assert row["deployed_client_acc_worst10"] <= row["deployed_client_acc_mean"]
