"""``algorithm.eval_window``: a rolling / random tier is scored with the window its clients last trained."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from hetfl.errors import ConfigError
from hetfl.experiment import prepare
from hetfl.fleet import build_fleet
from hetfl.hetero import spec_for
from hetfl.hetero.extract import extract
from hetfl.runner import run

TIERS = ('data.num_clients=8', 'fleet.source="tiers"', 'fleet.mix="a-b-c"',
         'model={name="heterofl_conv", hidden="8,8,8,8"}')


def _setup(digits_cfg, algo: str):
    exp = prepare(digits_cfg(*TIERS, f"algorithm={algo}"))
    return exp.algorithm, exp.ctx


def test_tier_is_scored_with_its_last_window_and_the_prefix_beside_it(digits_cfg):
    algo, ctx = _setup(digits_cfg, '{name="fedrolex", eval_window="trained"}')
    state = algo.init_state(ctx)
    glob = state.models["global"]
    state.buffers["windows"] = {"0.25": [7, 3]}  # width 1/4 last trained in round 7 (by client 3)
    targets = algo.eval_targets(state, ctx)
    want = extract(glob, spec_for(ctx.model, ctx.info), algo.selection(ctx, 0.25, 7, 3))
    got = targets["w0.25"].weights
    assert all(torch.equal(got[k], want[k]) for k in want)
    # the round-7 window of the 8-channel convs is channels 2..3 (rolled 6): not the prefix 0..1
    assert all(v.tolist() == [2, 3] for v in algo.selection(ctx, 0.25, 7, 3).values())
    assert not all(torch.equal(got[k], targets["prefix_w0.25"].weights[k]) for k in want)
    assert targets["prefix_w0.25"].clients is None  # scored on the test set, never someone's deployed model
    assert "prefix_w0.5" not in targets  # width 1/2 never trained yet: its prefix, once


def test_run_records_the_windows_and_reports_both(digits_cfg, tmp_path):
    cfg = digits_cfg(*TIERS, "rounds=2", 'algorithm={name="fedrolex", clients_per_round=8, eval_window="trained"}')
    run(cfg, tmp_path, quiet=True)
    row = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert {"test_accuracy.w0.5", "test_accuracy.prefix_w0.5", "test_accuracy.prefix_w0.25"} <= set(row)
    buffers = torch.load(tmp_path / "checkpoint.pt", weights_only=False)["state"]["buffers"]
    tiers = build_fleet(cfg.fleet, 8, cfg.seed, sizes=np.ones(8)).tiers()
    first = [int(np.flatnonzero(tiers == t)[0]) for t in (1, 2)]  # every client trained in round 2
    assert buffers["windows"] == {"0.5": [2, first[0]], "0.25": [2, first[1]]}


@pytest.mark.parametrize("algo", ['{name="heterofl", eval_window="trained"}', '{name="fedrolex"}'])
def test_prefix_evaluation_keeps_no_windows(digits_cfg, algo):
    algo, ctx = _setup(digits_cfg, algo)
    state = algo.init_state(ctx)
    assert not algo.tracks_windows
    assert not any(label.startswith("prefix_") for label in algo.eval_targets(state, ctx))


def test_bad_window_and_privacy(digits_cfg):
    with pytest.raises(ConfigError, match="algorithm.eval_window must be one of prefix, trained, got 'last'"):
        _setup(digits_cfg, '{name="fedrolex", eval_window="last"}')
    algo, ctx = _setup(digits_cfg, '{name="feddropout", eval_window="trained"}')
    with pytest.raises(ConfigError, match="not with \\[privacy\\]"):
        algo.init_state(dataclasses.replace(ctx, privacy=object()))


def test_depth_levels_follow_the_same_rule(digits_cfg):
    algo, ctx = _setup(digits_cfg, '{name="scalefl", index_policy="rolling", eval_window="trained"}')
    state = algo.init_state(ctx)
    state.buffers["windows"] = {"0.7": [4, 0]}
    targets = algo.eval_targets(state, ctx)
    ref = targets["w0.7d0.5"].model
    want = algo.submodel(state.models["global"], ctx, ref, 0.7, 4, 0)
    assert all(torch.equal(targets["w0.7d0.5"].weights[k], want[k]) for k in want)
    assert "prefix_w0.7d0.5" in targets and "prefix_w0.75d0.75" not in targets
