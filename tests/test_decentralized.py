"""Decentralized learning on a graph: topologies, the distillation protocol, D-PSGD exactness, runner."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hetfl.algorithms.base import nbytes, round_seed, weights_of
from hetfl.decentralized.engine import InProcessEngine
from hetfl.decentralized.protocol import cut, node_key
from hetfl.decentralized.topology import TOPOLOGIES, GraphConfig, mixing_matrix, sample_topology, spectral_gap
from hetfl.engines import SERVER_ENGINES, engine_for
from hetfl.errors import ConfigError
from hetfl.models import ModelRef
from hetfl.resolve import load_config
from hetfl.results import read_metrics, read_summary, strip_timing
from hetfl.runner import prepare, run
from hetfl.train import local_sgd

BASE = {
    "name": "dec",
    "rounds": 2,
    "seed": 0,
    "data": {"name": "digits", "num_clients": 4, "local_test_fraction": 0.2,
             "partition": {"name": "dirichlet", "alpha": 0.5}},
    "model": {"name": "mlp", "hidden": "32"},
    "algorithm": {"name": "dkd"},
    "train": {"steps": 4, "batch_size": 16, "lr": 0.1},
    "fleet": {"source": "tiers", "mix": "a-e"},
    "graph": {"name": "complete"},
}


def cfg_of(*overrides: str):
    return load_config(None, overrides, base=BASE)


def run_rounds(cfg, rounds: int):
    exp = prepare(cfg)
    engine = engine_for(cfg.engine.name, exp.algorithm)(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg)
    state = exp.algorithm.init_state(exp.ctx)
    reports = []
    for rnd in range(1, rounds + 1):
        state, rep = engine.run_round(state, rnd)
        reports.append(rep)
    engine.close()
    return exp, state, reports


# ---------------------------------------------------------------------------------------------- topologies


@pytest.mark.parametrize("name", TOPOLOGIES.names())
def test_every_topology_is_connected_with_doubly_stochastic_positive_weights(name):
    cfg = GraphConfig(name=name, degree=3, p=0.5, k=1)
    tiers = np.repeat([0, 1, 2], [4, 4, 4])
    topo = sample_topology(cfg, 12, tiers, seed=3, rnd=1)
    w = topo.weights
    assert np.allclose(w, w.T) and np.allclose(w.sum(0), 1) and np.allclose(w.sum(1), 1)
    assert (np.diag(w) > 0).all()
    assert 0 < topo.spectral_gap <= 1
    assert all(i in topo.neighbours[j] for i, j in topo.edges)
    if name == "regular":
        assert {len(n) for n in topo.neighbours} == {3}
    if name == "capability":  # every less capable node has k more capable neighbours
        assert all(any(tiers[j] < tiers[i] for j in topo.neighbours[i]) for i in range(12) if tiers[i] > 0)


def test_metropolis_weights_keep_self_weight_so_even_rings_mix():
    topo = sample_topology(GraphConfig(name="ring"), 16, np.zeros(16, int), seed=0, rnd=1)
    assert np.allclose(np.diag(topo.weights), 1 / 3)  # w_ij = 1/(1 + max(2, 2)), w_ii = 1 - 2/3
    assert topo.spectral_gap == pytest.approx(0.0507, abs=1e-3)  # algorithms.md 3.1.3
    edges = ((0, 1), (1, 2), (2, 3), (0, 3))
    assert np.allclose(mixing_matrix(4, edges, "uniform"), mixing_matrix(4, edges, "metropolis"))  # regular graph
    bad = np.array([[0, 1], [1, 0]], dtype=float)  # the variant without +1 on an even cycle: never mixes
    assert spectral_gap(bad) == pytest.approx(0.0)


def test_static_graph_is_fixed_and_resampled_graph_changes():
    tiers = np.zeros(20, int)
    static = GraphConfig(name="regular", degree=4)
    assert sample_topology(static, 20, tiers, 0, 1).edges == sample_topology(static, 20, tiers, 0, 7).edges
    moving = GraphConfig(name="regular", degree=4, resample=True)
    assert sample_topology(moving, 20, tiers, 0, 1).edges != sample_topology(moving, 20, tiers, 0, 2).edges


def test_bad_and_disconnected_graphs_are_clear_config_errors():
    tiers = np.zeros(5, int)
    with pytest.raises(ConfigError, match="degree=3 with 5 nodes"):
        sample_topology(GraphConfig(name="regular", degree=3), 5, tiers, 0, 1)
    with pytest.raises(ConfigError, match=r"p=0.01.*disconnected in all 7 draws"):
        sample_topology(GraphConfig(name="erdos_renyi", p=0.01, max_tries=7), 5, tiers, 0, 1)
    with pytest.raises(ConfigError, match="graph.rows=2 does not divide"):
        sample_topology(GraphConfig(name="torus", rows=2), 5, tiers, 0, 1)
    with pytest.raises(ConfigError, match="graph.name: unknown topology 'star'"):
        cfg_of('graph.name="star"')  # the registry check is part of resolving a config (hetfl.resolve)
    with pytest.raises(ConfigError, match="graph.mixing"):
        cfg_of('graph.mixing="max"')
    with pytest.raises(ConfigError, match="exceeds the 4 nodes"):
        prepare(cfg_of("graph.processes=5"))
    with pytest.raises(ConfigError, match="fleet.assignment must be 'fixed'"):
        prepare(cfg_of('fleet.assignment="dynamic"'))


# ---------------------------------------------------------------------------------------------- protocol


def test_four_node_protocol_distils_into_weak_nodes_and_accounts_bytes():
    exp, state, reports = run_rounds(cfg_of(), rounds=2)
    lay = exp.algorithm.layout(exp.ctx)
    assert [r.width for r in lay.refs] == [1.0, 1.0, 0.0625, 0.0625]
    m = reports[-1].as_metrics()
    assert m["kd_pairs"] == 4 and m["no_stronger"] == 0  # complete graph: 2 strong x 2 weak
    strong = nbytes(state.models["node0"])
    weak = nbytes(state.models["node2"])
    # weak: its model to 2 strong nodes, plus gossip with the other weak node; strong: 2 distilled back + gossip
    assert m["node.bytes_sent"] == [2 * weak + strong] * 2 + [3 * weak] * 2
    assert m["node.bytes_recv"] == m["node.bytes_sent"]
    assert m["bytes_up"] == m["bytes_down"] == sum(m["node.bytes_sent"])
    assert m["flops.w1"] > m["flops.w0.0625"] > 0 and m["kd_loss"] > 0
    assert {"consensus.w1", "consensus.w0.0625", "graph_spectral_gap"} <= set(m)
    # distillation only changes the weak nodes: strong nodes end exactly as without it
    _, plain, _ = run_rounds(cfg_of("algorithm.kd_weight=0.0"), rounds=2)
    for i in range(4):
        same = all(torch.equal(state.models[node_key(i)][k], plain.models[node_key(i)][k])
                   for k in state.models[node_key(i)])
        assert same == (i < 2), i


def test_with_one_architecture_dkd_is_dpsgd_exactly():
    """One architecture: no stronger neighbour, so the round is local SGD then Metropolis-Hastings gossip."""
    cfg = cfg_of('fleet.source="uniform"', 'graph.name="ring"', "rounds=3", "algorithm.kd_weight=1.0")
    exp, state, _ = run_rounds(cfg, rounds=3)
    # reference D-PSGD, written out: same init, same per-(round, node) seeds, x_i <- sum_j w_ij x_j
    ref = ModelRef("mlp", 1.0, (("hidden", "32"),))
    torch.manual_seed(round_seed(0, 0))
    model = ref.build(exp.ctx.info)
    x = [weights_of(model) for _ in range(4)]
    w = {(i, j): 1 / 3 for i in range(4) for j in ((i - 1) % 4, (i + 1) % 4)}  # 1 / (1 + max(2, 2))
    for rnd in range(1, 4):
        half = []
        for i in range(4):
            model.load_state_dict(x[i])
            local_sgd(model, exp.federation.client_train(i), cfg.train, seed=round_seed(0, rnd, i))
            half.append(weights_of(model))
        x = []
        for i in range(4):
            nbrs = sorted({(i - 1) % 4, (i + 1) % 4})
            coeff = {j: w[(i, j)] for j in nbrs}
            coeff[i] = 1.0 - sum(coeff[j] for j in nbrs)
            out = {}
            for key in half[i]:
                acc, total = None, 0.0
                for j in sorted(coeff):
                    v = half[j][key].to(torch.float64)
                    acc = v * coeff[j] if acc is None else acc.add_(v, alpha=coeff[j])
                    total += coeff[j]
                out[key] = (acc / total).to(half[i][key].dtype)
            x.append(out)
    for i in range(4):
        for key, v in x[i].items():
            assert torch.equal(state.models[node_key(i)][key], v), (i, key)
    # ... and it is what the dpsgd baseline computes
    _, base, _ = run_rounds(cfg_of('fleet.source="uniform"', 'graph.name="ring"', "rounds=3",
                                   'algorithm.name="dpsgd"'), rounds=3)
    for i in range(4):
        assert all(torch.equal(state.models[node_key(i)][k], base.models[node_key(i)][k]) for k in x[i])


def test_kd_weight_zero_reduces_to_its_gossip_baseline_exactly():
    _, a, _ = run_rounds(cfg_of("algorithm.kd_weight=0.0", 'algorithm.gossip="overlap"'), rounds=2)
    _, b, _ = run_rounds(cfg_of('algorithm.name="dpsgd"'), rounds=2)
    for key in a.models:
        assert all(torch.equal(a.models[key][k], b.models[key][k]) for k in a.models[key])


def test_overlap_gossip_averages_each_element_over_the_neighbours_holding_it():
    exp = prepare(cfg_of('algorithm.name="dpsgd"', "data.num_clients=2", 'fleet.mix="a-c"'))
    algo, info = exp.algorithm, exp.ctx.info
    lay = algo.layout(exp.ctx)
    big = {k: torch.full_like(v, 2.0) for k, v in exp.algorithm.init_state(exp.ctx).models["node0"].items()}
    small = {k: torch.full_like(v, 6.0) for k, v in exp.algorithm.init_state(exp.ctx).models["node1"].items()}
    coeffs = {0: 0.5, 1: 0.5}
    out = algo.mix(lay, 0, big, {1: small}, coeffs, info)
    w = out["fc1.weight"]  # 32 x 64; the quarter-width node holds the first 8 rows
    assert torch.all(w[:8] == 4.0) and torch.all(w[8:] == 2.0)
    assert torch.all(out["out.weight"][:, :8] == 4.0) and torch.all(out["out.weight"][:, 8:] == 2.0)
    # the narrow node receives the wide node's slice and averages it whole
    back = algo.mix(lay, 1, small, {0: cut(big, lay.refs[0], lay.refs[1], info)}, coeffs, info)
    assert all(torch.all(v == 4.0) for v in back.values())


def test_node_without_a_stronger_neighbour_only_gossips_and_is_reported():
    # ring 0-1-2-3-0 with tiers [a, a, e, e]... node 3 touches node 0; use mix a-c-e on 6 nodes: node 3 (c)
    # sits between node 2 (c) and node 4 (e): it has no more capable neighbour
    cfg = cfg_of("data.num_clients=6", 'fleet.mix="a-c-e"', 'graph.name="ring"', "rounds=1")
    exp, _, reports = run_rounds(cfg, rounds=1)
    m = reports[0].as_metrics()
    assert m["no_stronger"] == 1
    assert "no more capable neighbour (3)" in reports[0].messages[0]
    assert m["node.bytes_recv"][3] > 0  # it still gossips with node 2
    with pytest.raises(ConfigError, match=r"node\(s\) 3 have no more capable neighbour"):
        prepare(cfg_of("data.num_clients=6", 'fleet.mix="a-c-e"', 'graph.name="ring"',
                       'algorithm.no_stronger="error"'))


def test_different_architectures_distil_across_families():
    cfg = cfg_of('algorithm.families="mlp(hidden=32), mlp(hidden=8)"', 'graph.name="ring"')
    exp, state, reports = run_rounds(cfg, rounds=2)
    shapes = {k: tuple(v.shape) for k, v in state.models["node2"].items()}
    assert shapes["fc1.weight"] == (8, 64)
    m = reports[-1].as_metrics()
    assert m["kd_pairs"] == 2 and m["flops.w1"] > m["flops.w0.0625"]


def test_isolated_nodes_exchange_nothing():
    _, _, reports = run_rounds(cfg_of('algorithm.name="isolated"'), rounds=1)
    m = reports[0].as_metrics()
    assert m["bytes_up"] == 0 and m["kd_pairs"] == 0


# ---------------------------------------------------------------------------------------------- runner


def test_runner_writes_node_and_tier_metrics_and_resumes_exactly(tmp_path):
    cfg = cfg_of("rounds=2", "data.num_clients=6", 'fleet.mix="a-c-e"', 'graph.name="capability"', "graph.k=1")
    full = run(cfg, tmp_path / "full", quiet=True)
    assert full["status"] == "complete"
    row = read_metrics(tmp_path / "full")[-1]
    for key in ("test_accuracy", "test_accuracy.w0.0625", "tier_acc.w0.0625", "client_acc_mean", "node.test_acc",
                "node.local_acc", "bytes_sent.w0.0625", "flops.w1", "consensus.w0.25"):
        assert key in row, key
    assert len(row["node.test_acc"]) == 6
    assert full["test_accuracy.w0.0625"] == row["test_accuracy.w0.0625"]
    assert full["bytes_sent_per_node_mean"] > 0
    run(cfg.replace(rounds=1), tmp_path / "part", quiet=True)
    resumed = run(cfg, resume=tmp_path / "part", quiet=True)
    assert resumed["status"] == "complete"
    assert strip_timing(read_metrics(tmp_path / "part")) == strip_timing(read_metrics(tmp_path / "full"))
    assert read_summary(tmp_path / "part")["rounds_completed"] == 2


def test_engines_refuse_the_wrong_kind_of_algorithm():
    exp = prepare(cfg_of())
    with pytest.raises(ConfigError, match="engine 'flower' does not run graph algorithms.*simulator, torchrun"):
        engine_for("flower", exp.algorithm)
    fedavg = prepare(cfg_of('algorithm.name="fedavg"'))
    with pytest.raises(ConfigError, match="engine 'torchrun' does not run server algorithms.*flower, simulator"):
        engine_for("torchrun", fedavg.algorithm)
    with pytest.raises(ConfigError, match="engine 'torchrun' does not run server algorithms"):
        prepare(cfg_of('algorithm.name="fedavg"', 'engine.name="torchrun"'))  # before any file is written
    assert isinstance(engine_for("simulator", exp.algorithm)(exp.algorithm, exp.federation, exp.ctx, exp.device,
                                                             exp.cfg), InProcessEngine)
    assert SERVER_ENGINES.get("simulator") is engine_for("simulator", fedavg.algorithm)
