"""Width-sampling policies: each policy's distribution (chi-square at a fixed seed), purity, coverage
allocation, the adaptive policy's state, HeteroFL wiring, and the fleet's size-capability correlation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from hetfl.errors import ConfigError
from hetfl.fleet import FleetConfig, build_fleet
from hetfl.hetero.sampling import (
    WIDTH_SCHEDULES,
    AdaptiveWidth,
    allocate,
    make_width_schedule,
    plan_round,
)
from hetfl.results import read_metrics, strip_timing
from hetfl.runner import prepare, run

LEVELS = (1.0, 0.5, 0.25, 0.125)


def _plan(policy, max_width, samples=None, buffers=None, rnd=1, seed=0, fixed=None):
    max_width = np.asarray(max_width, dtype=np.float64)
    samples = np.ones(len(max_width)) if samples is None else np.asarray(samples, dtype=np.float64)
    return plan_round(policy, levels=LEVELS, max_width=max_width, fixed_max_width=max_width if fixed is None else fixed,
                      samples=samples, buffers=buffers or {}, seed=seed, rnd=rnd)


def _draws(plan, clients):
    return np.array([LEVELS.index(plan.rate(int(c))) for c in clients])


# a fleet of 4 000 clients, 1 000 per level: draws of every tier are tested against the tier's row
FLEET = np.repeat(np.asarray(LEVELS), 1000)


@pytest.mark.parametrize("name,params", [("uniform", {}), ("mixture", {"q": 0.3}), ("mixture", {"q": 1.0}),
                                         ("coverage", {"target": "0.1,0.2,0.3,0.4"}), ("adaptive", {})])
def test_draws_follow_each_policys_distribution(name, params):
    policy = make_width_schedule(name, **params)
    buffers = {"width_loss": torch.tensor([0.2, 0.4, 0.8, 1.6], dtype=torch.float64)} if name == "adaptive" else {}
    plan = _plan(policy, FLEET, buffers=buffers, rnd=3, seed=7)
    draws = _draws(plan, range(len(FLEET)))
    for t in range(len(LEVELS)):
        got = np.bincount(draws[t * 1000:(t + 1) * 1000], minlength=4)
        p = plan.probs[t]
        assert got[p == 0].sum() == 0, (name, t, got)  # never wider than affordable, never a zero-probability level
        if (p > 0).sum() > 1:
            _, pval = stats.chisquare(got[p > 0], 1000 * p[p > 0])
            assert pval > 1e-3, (name, t, got, p)


def test_rules_of_each_policy():
    tiers = _plan(make_width_schedule("uniform"), FLEET).probs
    assert np.allclose(tiers[0], 0.25) and np.allclose(tiers[1], [0, 1 / 3, 1 / 3, 1 / 3]) and tiers[3, 3] == 1
    mix = _plan(make_width_schedule("mixture", q=0.3), FLEET).probs
    assert np.allclose(mix[0], [0.7, 0.1, 0.1, 0.1]) and np.allclose(mix[2], [0, 0, 0.7, 0.3]) and mix[3, 3] == 1
    assert np.array_equal(_plan(make_width_schedule("mixture", q=0.0), FLEET).probs, np.eye(4))
    plan = _plan(make_width_schedule("max"), FLEET)
    assert [plan.rate(c) for c in (0, 1500, 3999)] == [1.0, 0.5, 0.125] and plan.expected_q() == 0.0
    # expected width_q of mixture(q): every tier but the narrowest steps down with probability q
    assert _plan(make_width_schedule("mixture", q=0.4), FLEET).expected_q() == pytest.approx(0.4 * 3 / 4)


def test_draws_are_pure_in_seed_round_client():
    plan = _plan(make_width_schedule("uniform"), FLEET, rnd=5, seed=1)
    again = _plan(make_width_schedule("uniform"), FLEET, rnd=5, seed=1)
    clients = [3, 17, 2500, 999]
    assert [plan.rate(c) for c in clients] == [again.rate(c) for c in reversed(clients)][::-1]
    other_round = _plan(make_width_schedule("uniform"), FLEET, rnd=6, seed=1)
    assert _draws(plan, range(1000)).tolist() != _draws(other_round, range(1000)).tolist()


def test_coverage_matches_feasible_targets_and_caps_infeasible_ones():
    # balanced tiers with equal data: every tier trains its own maximum
    assert np.allclose(allocate(np.array([25.0, 25, 25, 25]), np.full(4, 0.25)), np.eye(4))
    # the measured-phone shares (5 / 61 / 28 / 6 % of samples): the full width gets all of tier 0 (5 %) and the
    # shortfall is spread over the narrower widths, equally as their targets are equal
    probs = allocate(np.array([5.0, 61, 28, 6]), np.full(4, 0.25))
    shares = (np.array([5.0, 61, 28, 6])[:, None] * probs).sum(axis=0) / 100
    assert np.allclose(shares, [0.05, 0.95 / 3, 0.95 / 3, 0.95 / 3])
    assert probs[0, 0] == 1.0 and np.allclose(probs.sum(axis=1), 1)
    # feasible: a strong-heavy fleet steps strong clients down exactly as far as needed
    plan = _plan(make_width_schedule("coverage"), FLEET, samples=np.repeat([50.0, 30, 10, 10], 1000))
    assert np.allclose(plan.expected_shares(), 0.25)
    assert plan.probs[3, 3] == 1.0 and plan.probs[2, 2] == 1.0  # weak tiers keep their maximum
    deploy = _plan(make_width_schedule("coverage", target="deploy"), FLEET, samples=np.repeat([4.0, 3, 2, 1], 1000))
    assert np.allclose(deploy.expected_shares(), 0.25)
    # a target that wants only the full width: nobody can step *up*, so every tier keeps its maximum
    assert np.array_equal(allocate(np.array([5.0, 61, 28, 6]), np.array([1.0, 0, 0, 0])), np.eye(4))


def test_adaptive_target_and_state():
    policy = make_width_schedule("adaptive", ema=0.5)
    assert isinstance(policy, AdaptiveWidth)
    fixed = np.repeat(np.asarray(LEVELS), [100, 100, 100, 700])  # 70 % of devices run the narrowest width
    plan = _plan(policy, fixed, buffers={"width_loss": torch.tensor([1.0, 1.0, 1.0, 1.0])})
    assert np.allclose(plan.expected_shares()[0], 0.1)  # target = deploy share when losses are equal
    lossy = _plan(policy, fixed, buffers={"width_loss": torch.tensor([3.0, 1.0, 1.0, 1.0])})
    assert lossy.expected_shares()[0] > plan.expected_shares()[0] or lossy.probs[0, 0] == 1.0
    assert np.allclose(policy.update(np.array([1.0, 2.0]), np.array([3.0, 0.0])), [2.0, 1.0])


def test_bad_policy_configs(digits_cfg):
    with pytest.raises(ConfigError, match="unknown width schedule 'often'"):
        digits_cfg('algorithm={name="heterofl", width_schedule="often"}')
    with pytest.raises(ConfigError, match=r"q must be in \[0, 1\]"):
        digits_cfg('algorithm={name="heterofl", width_schedule="mixture(q=1.5)"}')
    with pytest.raises(ConfigError, match="target"):
        digits_cfg('algorithm={name="heterofl", width_schedule="coverage(target=a,b)"}')
    with pytest.raises(ConfigError, match="fleet.size_correlation must be one of"):
        digits_cfg('fleet.size_correlation="sideways"')
    cfg = digits_cfg('algorithm={name="heterofl", width_schedule="coverage(target=0.5,0.5)"}',
                     'fleet.source="tiers"', 'fleet.mix="a-b-c"')
    exp = prepare(cfg)
    with pytest.raises(ConfigError, match="2 shares but the fleet has 3 levels"):
        exp.algorithm.configure_round(exp.algorithm.init_state(exp.ctx), 1, [0, 1], exp.ctx)
    assert set(WIDTH_SCHEDULES.names()) == {"adaptive", "coverage", "max", "mixture", "uniform"}


def test_configured_and_aggregated_widths_agree_and_metrics_are_logged(tmp_path, digits_cfg):
    common = ('fleet.source="tiers"', 'fleet.mix="a-b-c"', "data.num_clients=9", "rounds=3",
              'data.partition={name="quantity", sigma=1.0, min_size=5}')
    cfg = digits_cfg(*common,
                     'algorithm={name="heterofl", clients_per_round=9, width_schedule="uniform", scaler=false}')
    exp = prepare(cfg)
    state = exp.algorithm.init_state(exp.ctx)
    widths = {}
    for rnd in (1, 2, 3):
        tasks = exp.algorithm.configure_round(state, rnd, list(range(9)), exp.ctx)
        widths[rnd] = [t.extra["rate"] for t in tasks]
        assert all(t.model.width == t.extra["rate"] <= exp.ctx.fleet.max_width[t.client_id] for t in tasks)
        assert widths[rnd] == exp.algorithm.client_rates(state, exp.ctx, rnd, list(range(9)))
    assert widths[1] != widths[2] or widths[2] != widths[3]  # the strong clients' widths vary
    summary = run(cfg, tmp_path / "u", quiet=True)
    assert summary["status"] == "complete"
    row = read_metrics(tmp_path / "u")[-1]
    assert 0 < row["width_q"] < 1 and sum(row[f"width_share.w{w:g}"] for w in (1, 0.5, 0.25)) == pytest.approx(1)


def test_adaptive_holds_out_validation_and_resumes_exactly(tmp_path, digits_cfg):
    cfg = digits_cfg('fleet.source="tiers"', 'fleet.mix="a-c"', "data.num_clients=6", "rounds=3",
                     'algorithm={name="heterofl", clients_per_round=4, width_schedule="adaptive(val_size=120)"}')
    exp = prepare(cfg)
    assert len(exp.ctx.server_data.val) == 120
    assert exp.federation.summary.num_samples + 120 < len(exp.dataset.train) + 120 + 1
    full = run(cfg, tmp_path / "full", quiet=True)
    part = run(cfg.replace(rounds=2), tmp_path / "part", quiet=True)
    assert full["status"] == part["status"] == "complete"
    run(cfg, resume=tmp_path / "part", quiet=True)
    assert strip_timing(read_metrics(tmp_path / "full")) == strip_timing(read_metrics(tmp_path / "part"))
    rows = read_metrics(tmp_path / "full")
    assert all(f"width_val_loss.w{w:g}" in rows[-1] for w in (1, 0.25))
    assert rows[0]["width_val_loss.w1"] != rows[-1]["width_val_loss.w1"]  # learned state moves


@pytest.mark.parametrize("source,mix", [("tiers", "a-b-c-d"), ("phones", "a-b-c-d")])
def test_size_correlation_reassigns_devices_by_data_size(source, mix):
    sizes = np.random.default_rng(0).lognormal(0, 1, 200).round().astype(int) + 5
    cfg = FleetConfig(source=source, mix=mix)
    base = build_fleet(cfg, 200, seed=3)
    assert np.array_equal(build_fleet(cfg, 200, seed=3, sizes=sizes).max_width, base.max_width)  # "none": unchanged
    pos = build_fleet(FleetConfig(source=source, mix=mix, size_correlation="positive"), 200, seed=3, sizes=sizes)
    neg = build_fleet(FleetConfig(source=source, mix=mix, size_correlation="negative"), 200, seed=3, sizes=sizes)
    for fleet in (pos, neg):  # the same devices, only reassigned
        assert sorted(fleet.max_width) == sorted(base.max_width) and sorted(fleet.speed) == sorted(base.speed)
    assert stats.spearmanr(sizes, pos.speed)[0] > 0.85 and stats.spearmanr(sizes, neg.speed)[0] < -0.85
    assert abs(stats.spearmanr(sizes, base.speed)[0]) < 0.3
    biggest = np.argmax(sizes)
    assert pos.max_width[biggest] == max(pos.levels) and neg.max_width[biggest] == min(neg.max_width)
    with pytest.raises(ConfigError, match="needs the clients' data sizes"):
        build_fleet(FleetConfig(source=source, mix=mix, size_correlation="positive"), 200, seed=3)


def test_overlap_average_accepts_a_full_width_update_after_a_narrow_one():
    """Width policies and size correlation put narrow clients before full-width ones in a round's stream."""
    from hetfl.algorithms.base import weights_of
    from hetfl.data.base import DataInfo
    from hetfl.hetero import group_sizes, spec_for
    from hetfl.hetero.extract import OverlapAverage, extract
    from hetfl.hetero.policy import Prefix
    from hetfl.models import ModelRef

    info, ref = DataInfo((64,), 10), ModelRef("mlp", 1.0, (("hidden", "8"),))
    spec = spec_for(ref, info)
    glob = weights_of(ref.build(info))
    sel = {r: Prefix().select(spec.groups, group_sizes(ref, info, r), rnd=0, client=0, seed=0) for r in (1.0, 0.5)}
    updates = {r: {k: v + (1.0 if r == 1.0 else 2.0) for k, v in extract(glob, spec, sel[r]).items()} for r in sel}
    results = []
    for order in ((1.0, 0.5), (0.5, 1.0)):
        acc = OverlapAverage(glob, spec)
        for r in order:
            acc.add(updates[r], sel[r])
        results.append(acc.result())
    for k in glob:
        assert torch.allclose(results[0][k], results[1][k]), k
    assert torch.allclose(results[1]["fc1.weight"][:4], glob["fc1.weight"][:4] + 1.5)  # both trained these rows
