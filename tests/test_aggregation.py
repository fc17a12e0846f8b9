"""Aggregation as one part (hetfl.aggregation): placements, the one weighted mean, the robust reducers, and
every server algorithm reduced by them (robust aggregation for all, not a field of two algorithms)."""

from __future__ import annotations

import pytest
import torch

from hetfl.aggregation import CoordinateRobust, Piece, Placement, WeightedMean, make_reducer, whole
from hetfl.errors import ConfigError
from hetfl.runner import run

TIERS = 'fleet.source="tiers"'
MLP2 = 'model={name="mlp", hidden="32,32"}'


def test_mean_of_whole_and_sliced_pieces():
    ref = {"w": torch.zeros(2, 3), "b": torch.full((3,), 7.0)}
    mean = WeightedMean({"global": ref})
    mean.add(whole({"w": torch.ones(2, 3), "b": torch.ones(3)}, weight=1.0))
    # a slice: row 0 only (flat positions 0..2), weight 3
    mean.add(Placement({"w": Piece(torch.full((1, 3), 5.0), index=torch.arange(3))}, weight=3.0))
    out = mean.result()["global"]
    assert out["w"].tolist() == [[4.0, 4.0, 4.0], [1.0, 1.0, 1.0]]  # (1 + 15) / 4 and 1 / 1
    assert out["b"].tolist() == [1.0, 1.0, 1.0]
    assert mean.clients == 2


def test_share_and_mask_weight_elements_and_untouched_keep_reference():
    ref = {"w": torch.full((4,), -1.0)}
    mean = WeightedMean({"global": ref})
    mean.add(Placement({"w": Piece(torch.ones(4), mask=torch.tensor([True, True, False, False]))}))
    mean.add(Placement({"w": Piece(torch.full((4,), 3.0), share=torch.tensor([1.0, 0.0, 0.0, 0.0]))}))
    assert mean.result()["global"]["w"].tolist() == [2.0, 1.0, -1.0, -1.0]


def test_models_are_reduced_separately_and_zero_weight_is_skipped():
    mean = WeightedMean({"a": {"x": torch.zeros(2)}, "b": {"x": torch.zeros(2)}})
    mean.add(whole({"x": torch.ones(2)}, model="a"))
    mean.add(whole({"x": torch.full((2,), 9.0)}, model="a", weight=0.0))
    mean.add(whole({"x": torch.full((2,), 4.0)}, model="b", weight=2.0))
    out = mean.result()
    assert out["a"]["x"].tolist() == [1.0, 1.0] and out["b"]["x"].tolist() == [4.0, 4.0]
    assert mean.counts() == {"a": 1, "b": 1}


def test_robust_reduces_only_covering_clients():
    ref = {"w": torch.zeros(3)}
    red = CoordinateRobust({"global": ref}, "median")
    red.add(whole({"w": torch.tensor([1.0, 1.0, 1.0])}))
    red.add(whole({"w": torch.tensor([2.0, 2.0, 2.0])}))
    red.add(Placement({"w": Piece(torch.tensor([100.0]), index=torch.tensor([0]))}))
    assert red.result()["global"]["w"].tolist() == [2.0, 1.5, 1.5]
    assert isinstance(make_reducer({"global": ref}, "trimmed_mean", 0.2), CoordinateRobust)
    with pytest.raises(ConfigError, match="aggregator must be one of"):
        make_reducer({"global": ref}, "mode")


@pytest.mark.parametrize("algo, extra", [
    ('{name="depthfl", levels="1x1,1x0.5"}', (MLP2,)),
    ('{name="fiarse"}', ()),
    ('{name="feddf", families="mlp(hidden=32),mlp(hidden=16)", distill_steps=5, server_data_size=50, '
     'server_val_size=20}', ()),
    ('{name="fedgen"}', ()),
    ('{name="fjord"}', ()),
])
@pytest.mark.parametrize("method", ["median", "trimmed_mean"])
def test_robust_aggregation_for_every_server_algorithm(tmp_path, digits_cfg, algo, extra, method):
    s = run(digits_cfg("rounds=1", f"algorithm={algo}", "algorithm.clients_per_round=4", TIERS, 'fleet.mix="a-b"',
                       f'algorithm.aggregator="{method}"', "algorithm.trim=0.25", *extra), tmp_path / "r", quiet=True)
    assert s["rounds"] == 1
    models = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["state"]["models"]
    assert all(bool(torch.isfinite(v).all()) for m in models.values() for v in m.values() if v.is_floating_point())


def test_median_of_identical_clients_is_their_mean(tmp_path, digits_cfg):
    """Depth levels under median: with one client per level-slice the median is that client's value, so
    a single-client round equals the mean bit for bit."""
    base = ("rounds=1", 'algorithm={name="depthfl", levels="1x1,1x0.5", clients_per_round=1}', MLP2, TIERS,
            'fleet.mix="a-b"')
    run(digits_cfg(*base), tmp_path / "mean", quiet=True)
    run(digits_cfg(*base, 'algorithm.aggregator="median"'), tmp_path / "median", quiet=True)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
            for d in ("mean", "median"))
    assert all(torch.equal(a[k], b[k]) for k in a)
