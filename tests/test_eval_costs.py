"""Per-tier FLOPs beside per-tier accuracy (summary.json ``evaluated_models``), and the budget-matched depth levels."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from hetfl.accounting import CostCache, example_input
from hetfl.algorithms import ALGORITHMS
from hetfl.algorithms.base import Context
from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo
from hetfl.fleet import FleetConfig, build_fleet
from hetfl.hetero import submodel_ref
from hetfl.models import ModelRef
from hetfl.runner import run

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIGS = Path(__file__).parents[1] / "configs"


def test_summary_puts_each_models_flops_beside_its_accuracy(digits_cfg, tmp_path):
    cfg = digits_cfg("rounds=1", "data.num_clients=8", 'fleet.source="tiers"', 'fleet.mix="a-b-c"',
                     'model={name="heterofl_conv", hidden="8,8,8,8"}',
                     'algorithm={name="heterofl", clients_per_round=4}')
    run(cfg, tmp_path, quiet=True)
    models = json.loads((tmp_path / "summary.json").read_text())["evaluated_models"]
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert list(models) == ["global", "w0.5", "w0.25"]
    assert models["w0.5"]["test_accuracy"] == row["test_accuracy.w0.5"]
    assert models["w0.5"]["tier_acc"] == row["tier_acc.w0.5"]
    flops = [models[k]["forward_flops"] for k in models]
    assert flops[0] > flops[1] > flops[2] > 0


@pytest.mark.parametrize(("study", "method"), [("study_footing_fmnist", "depthfl-budget"),
                                               ("study_footing_fmnist", "scalefl-budget"),
                                               ("study_crossover_pilot", "nefl"),
                                               ("study_crossover_pilot", "depthfl-dyn"),
                                               ("study_footing_q_lr", "depthfl"),
                                               ("study_footing_q_lr", "scalefl"),
                                               ("study_footing_q_lr", "inclusivefl"),
                                               ("study_crossover_shakespeare_lr", "depthfl-dyn")])
def test_budget_matched_depth_levels_cost_what_heterofl_tiers_cost(study, method):
    """The study's budget-matched levels: every tier's client model within 10 % of HeteroFL's forward FLOPs per
    sample on the study's model and 28x28 inputs (tier b of DepthFL's own levels costs 0.74 of the full model,
    HeteroFL's 0.26)."""
    study = tomllib.loads((CONFIGS / f"{study}.toml").read_text())
    override = study["axes"]["method"][method][0]
    name = re.search(r'name="(\w+)"', override).group(1)
    levels = re.search(r'levels="([^"]+)"', override).group(1)
    base_model = study["base"]["model"]
    if base_model["name"] == "lstm":  # 80-character windows over hetfl's 96-symbol Shakespeare vocabulary
        from hetfl.data.shakespeare import SHAKESPEARE_VOCAB

        n = len(SHAKESPEARE_VOCAB)
        info = DataInfo((study["base"]["data"]["seq_len"],), n, vocab_size=n)
        model = ModelRef("lstm", 1.0, (("hidden", base_model["hidden"]), ("per_layer", base_model["per_layer"])))
    else:
        info = DataInfo((1, 28, 28), 10)
        model = ModelRef("heterofl_conv", 1.0, (("hidden", base_model["hidden"]),))
    fleet = build_fleet(FleetConfig(source="tiers", mix=study["base"]["fleet"]["mix"]), 4, 0, sizes=np.ones(4))
    ctx = Context(info, model, TrainConfig(), np.ones(4), 0, 100, fleet)
    cost = CostCache(info, example_input(info))
    algo = ALGORITHMS.get(name)(levels=levels)
    width_tiers = [cost(submodel_ref(model, w)).forward_flops for w in fleet.levels]
    depth_tiers = [cost(algo.client_ref(ctx, level)).forward_flops for level in algo.level_table(ctx)]
    ratios = [d / w for d, w in zip(depth_tiers, width_tiers)]
    assert all(abs(r - 1) < 0.1 for r in ratios), ratios


@pytest.mark.parametrize("algorithm", ['{name="heterofl", clients_per_round=4}', '{name="fedavg", clients_per_round=4}',
                                       '{name="depthfl", clients_per_round=4, levels="1x1,1x0.5,1x0.25"}'])
def test_every_method_reports_the_same_per_tier_keys(digits_cfg, tmp_path, algorithm):
    """deployed_tier_acc.<tier> / deployed_tier_test.<tier>: keyed by the fleet tier, whatever model serves it, so
    a crossover table reads one column per tier for one model for all, widths and depths alike."""
    cfg = digits_cfg("rounds=1", "data.num_clients=12", "data.local_test_fraction=0.2", 'fleet.source="tiers"',
                     'fleet.mix="a-b-c"', 'model={name="heterofl_conv", hidden="8,8,8,8"}', f"algorithm={algorithm}")
    run(cfg, tmp_path, quiet=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    tiers = ("w1", "w0.5", "w0.25")
    assert all(f"deployed_tier_acc.{t}" in row and f"deployed_tier_test.{t}" in row for t in tiers), sorted(row)
    if "heterofl" in algorithm:  # the tier's own model, as tier_acc / test_accuracy name it
        assert row["deployed_tier_acc.w0.5"] == row["tier_acc.w0.5"]
        assert row["deployed_tier_test.w0.25"] == row["test_accuracy.w0.25"]
        assert row["deployed_tier_test.w1"] == row["test_accuracy"]
    if "fedavg" in algorithm:  # one model for everyone: every tier reads its test accuracy
        assert {row[f"deployed_tier_test.{t}"] for t in tiers} == {row["test_accuracy"]}
