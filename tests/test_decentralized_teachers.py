"""dkd's options for weak-tier gain (issue #6): teacher-side relay, ensemble teachers, one-way overlap gossip,
gossip weights on the gossip subgraph.  Tiny problem (4 digits nodes, 2 strong + 2 weak, complete graph)."""

from __future__ import annotations

import pytest
import torch

from hetfl.decentralized.host import relay_mean
from hetfl.decentralized.protocol import node_key
from hetfl.decentralized.topology import sample_topology
from hetfl.engines import engine_for
from hetfl.errors import ConfigError
from hetfl.resolve import load_config
from hetfl.runner import prepare
from tests.test_decentralized import BASE as DEC_BASE

BASE = {**DEC_BASE, "name": "dec-teachers"}  # tests/test_decentralized.py's tiny problem
STRONG, WEAK = (0, 1), (2, 3)


def run_rounds(*overrides: str, rounds: int = 2):
    cfg = load_config(None, [f"rounds={rounds}", *overrides], base=BASE)
    exp = prepare(cfg)
    engine = engine_for(cfg.engine.name, exp.algorithm)(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg)
    state = exp.algorithm.init_state(exp.ctx)
    for rnd in range(1, rounds + 1):
        state, report = engine.run_round(state, rnd)
    engine.close()
    return exp, state, report.as_metrics()


def same(a, b, i: int) -> bool:
    x, y = a.models[node_key(i)], b.models[node_key(i)]
    return all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize("field, value, allowed", [
    ("kd_return", "avg", "own, mean"),
    ("teacher", "ensembles", "own, ensemble"),
    ("gossip", "up", "tier, overlap, wider, narrower, none"),
    ("gossip_weights", "metropolis", "graph, subgraph"),
])
def test_bad_option_values_are_config_errors_naming_the_allowed_values(field, value, allowed):
    with pytest.raises(ConfigError, match=f"algorithm.{field} must be one of {allowed}, got '{value}'"):
        prepare(load_config(None, [f'algorithm.{field}="{value}"'], base=BASE))


def test_options_at_their_defaults_change_nothing():
    _, base, _ = run_rounds()
    _, explicit, _ = run_rounds('algorithm.kd_return="own"', 'algorithm.teacher="own"', 'algorithm.gossip="tier"',
                             'algorithm.gossip_weights="graph"')
    assert all(same(base, explicit, i) for i in range(4))


@pytest.mark.parametrize("option", ['algorithm.kd_return="mean"', 'algorithm.teacher="ensemble"'])
def test_relay_and_ensemble_teacher_change_only_the_weak_models(option):
    _, base, _ = run_rounds()
    _, other, _ = run_rounds(option)
    assert all(same(base, other, i) for i in STRONG)  # teachers train and gossip as before
    assert not any(same(base, other, i) for i in WEAK)


def test_relay_returns_the_mean_of_a_teachers_same_model_students():
    exp = prepare(load_config(None, [], base=BASE))
    lay = exp.algorithm.layout(exp.ctx)
    w = {k: torch.ones_like(v) for k, v in exp.algorithm.init_state(exp.ctx).models["node2"].items()}
    returned = {(0, 2): w, (0, 3): {k: 3 * v for k, v in w.items()}, (1, 2): w}
    out = relay_mean(returned, lay)
    assert all(torch.all(v == 2.0) for v in out[(0, 2)].values())
    assert all(torch.equal(out[(0, 2)][k], out[(0, 3)][k]) for k in w)
    assert out[(1, 2)] is w  # a teacher with one student of a model returns its copy unchanged


def test_one_way_overlap_gossip_leaves_the_other_side_as_tier_gossip_in_round_one():
    _, tier, tier_metrics = run_rounds(rounds=1)
    # narrower: strong nodes take the weak overlap
    _, narrower, narrower_metrics = run_rounds('algorithm.gossip="narrower"', rounds=1)
    # ... from the copy each weak node sent for distillation: no extra message, the same bytes
    assert narrower_metrics["node.bytes_sent"] == tier_metrics["node.bytes_sent"]
    _, wider, _ = run_rounds('algorithm.gossip="wider"', rounds=1)  # weak nodes take the strong slices
    assert all(same(tier, narrower, i) for i in WEAK) and not any(same(tier, narrower, i) for i in STRONG)
    assert all(same(tier, wider, i) for i in STRONG) and not any(same(tier, wider, i) for i in WEAK)


def test_subgraph_weights_are_metropolis_on_the_gossip_subgraph():
    cfg = load_config(None, ['algorithm.gossip_weights="subgraph"'], base=BASE)
    exp = prepare(cfg)
    lay = exp.algorithm.layout(exp.ctx)
    plan = exp.algorithm.plan(1, lay, sample_topology(cfg.graph, 4, lay.tiers, 0, 1))
    assert plan.gossip[0] == (1,) and plan.coeffs[0] == {0: 0.5, 1: 0.5}  # 1 / (1 + 1), not 1 / (1 + 3)
    assert plan.coeffs[2] == {2: 0.5, 3: 0.5}
