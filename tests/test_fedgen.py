"""FedGen: generator, head finding, label-count leakage and its noised option, bad configs, runs."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hetfl.algorithms.fedgen import (
    FedGen,
    FedGenUpdate,
    Generator,
    diversity_loss,
    find_head,
    head_shape,
    label_distribution,
    noise_scale,
    privatize_counts,
    total_variation,
)
from hetfl.data.base import DataInfo
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.models import ModelRef
from hetfl.resolve import load_config
from hetfl.runner import prepare, run

FEDGEN = {
    "name": "t-fedgen",
    "rounds": 2,
    "seed": 0,
    "data": {"name": "digits", "num_clients": 6, "local_test_fraction": 0.0,
             "partition": {"name": "dirichlet", "alpha": 0.3}},
    "model": {"name": "cnn", "conv1": 4, "conv2": 8, "fc": 16},
    "algorithm": {"name": "fedgen", "clients_per_round": 4, "gen_steps": 5, "gen_hidden": 32, "gen_samples": 8},
    "train": {"steps": 3, "batch_size": 16, "lr": 0.05},
    "eval": {"every": 1, "local": False},
}


def cfg(*overrides: str):
    return load_config(None, overrides, base=FEDGEN)


def test_generator_head_and_diversity_shapes():
    info = DataInfo((1, 8, 8), 10)
    gen = Generator(10, 5, 16, 7)
    z = gen(torch.tensor([0, 3, 9]), torch.rand(3, 5))
    assert z.shape == (3, 7)
    for ref, want in [(ModelRef("mlp", 1.0, (("hidden", "20,12"),)), ("out", 12)),
                      (ModelRef("cnn", 1.0, (("fc", 32),)), ("fc2", 32)),
                      (ModelRef("resnet", 0.25, (("depth", 10),)), ("fc", 128))]:
        name, dim, classes = head_shape(ref, info)
        assert (name, dim, classes) == (*want, 10)
        assert find_head(ref.build(info))[0] == name
    g = torch.Generator().manual_seed(0)
    eps = torch.rand(6, 4, generator=g)
    same = diversity_loss(eps, torch.zeros(6, 3))
    assert float(same) == pytest.approx(1.0)  # identical features: no diversity, the loss is maximal
    assert float(diversity_loss(eps, torch.randn(6, 3, generator=g) * 100)) < 0.1


def test_raw_counts_leak_exactly_and_noise_hides_them():
    hist = torch.tensor([30.0, 0, 0, 5, 0, 0, 0, 0, 1, 0])
    raw = privatize_counts(hist, "none", 1.0, 1e-5, seed=0)
    assert torch.equal(raw, hist.float())
    assert total_variation(label_distribution(hist), label_distribution(raw)) == 0.0
    lap = privatize_counts(hist, "laplace", 0.5, 1e-5, seed=0)
    assert (lap >= 0).all() and total_variation(label_distribution(hist), label_distribution(lap)) > 0
    assert torch.equal(lap, privatize_counts(hist, "laplace", 0.5, 1e-5, seed=0))  # a seed is one release
    gauss = privatize_counts(hist, "gaussian", 0.5, 1e-5, seed=1)
    assert total_variation(label_distribution(hist), label_distribution(gauss)) > 0
    # calibration: Laplace b = 2/eps (replace-one), Gaussian sigma = sqrt(2) sqrt(2 ln(1.25/delta)) / eps
    assert noise_scale("laplace", 0.5, 1e-5) == 4.0
    assert noise_scale("gaussian", 1.0, 1e-5) == pytest.approx(math.sqrt(2) * math.sqrt(2 * math.log(1.25e5)))
    draws = torch.stack([privatize_counts(torch.full((10,), 1000.0), "laplace", 1.0, 1e-5, seed=s)
                         for s in range(400)])
    assert float(draws.std()) == pytest.approx(math.sqrt(2) * 2.0, rel=0.1)
    assert total_variation(np.array([1.0, 0]), np.array([0, 1.0])) == 1.0
    assert label_distribution(torch.tensor([-3.0, -1.0])).tolist() == [0.5, 0.5]


@pytest.mark.parametrize("override, msg", [
    ("algorithm.label_noise='exponential'", "algorithm.label_noise must be one of none, laplace, gaussian"),
    ("algorithm.label_epsilon=0", "algorithm.label_epsilon must be > 0"),
    ("algorithm.gen_batch=1", "algorithm.gen_batch must be >= 2"),
    ("algorithm.label_counts='full'", "algorithm.label_counts must be one of histogram, batches"),
    ("algorithm.reg_decay=1.5", "algorithm.reg_decay must be in"),
    ("algorithm.gen_noise='normal'", "algorithm.gen_noise must be one of uniform, gaussian"),
])
def test_bad_config_errors(override, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(override)


def test_bad_config_combinations():
    with pytest.raises(ConfigError, match="label_epsilon must be <= 1 with label_noise='gaussian'"):
        cfg("algorithm.label_noise='gaussian'", "algorithm.label_epsilon=2.0")
    with pytest.raises(ConfigError, match="label_release='once' cannot be used with label_counts='batches'"):
        cfg("algorithm.label_noise='laplace'", "algorithm.label_counts='batches'")
    # heterogeneous families must share the feature dimension (cnn fc=16 vs mlp's 32): caught before any file
    with pytest.raises(ConfigError, match="algorithm.families: fedgen's generator needs one feature dimension"):
        prepare(cfg("algorithm.families='cnn, mlp(hidden=32)'"))


def test_without_regularisers_fedgen_is_fedavg_bit_for_bit():
    gen = prepare(cfg("algorithm.alpha=0.0", "algorithm.beta=0.0"))
    avg = prepare(cfg("algorithm={name='fedavg', clients_per_round=4}"))
    states = []
    for exp in (gen, avg):
        sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
        state = exp.algorithm.init_state(exp.ctx)
        for rnd in (1, 2):
            state, _ = sim.run_round(state, rnd)
        states.append(state.models["global"])
    for k, v in states[1].items():
        assert torch.equal(states[0][k], v), k


def test_regulariser_schedule_and_generator_is_sent_from_round_two():
    exp = prepare(cfg())
    algo: FedGen = exp.algorithm
    assert algo.regularizer_weights(1) == (0.0, 0.0)
    assert algo.regularizer_weights(2) == pytest.approx((10 * 0.98, 10 * 0.98))
    assert algo.regularizer_weights(10_000) == (1e-4, 1e-4)
    state = algo.init_state(exp.ctx)
    assert "generator" not in algo.configure_round(state, 1, [0], exp.ctx)[0].extra
    task = algo.configure_round(state, 2, [0], exp.ctx)[0]
    assert set(task.extra) == {"generator", "alpha", "beta"}
    assert all(isinstance(v, torch.Tensor) for v in task.extra["generator"].values())


def test_generator_training_lowers_the_heads_loss():
    exp = prepare(cfg("algorithm.gen_steps=150", "algorithm.gen_lr=0.01", "algorithm.diversity_weight=0.0"))
    algo, ctx = exp.algorithm, exp.ctx
    torch.manual_seed(0)
    dim = algo.feature_dim(ctx)
    heads = [torch.randn(10, dim) for _ in range(3)]
    counts = [torch.tensor([50.0, 20, 0, 0, 3, 0, 0, 9, 0, 0]), torch.tensor([0.0, 0, 40, 40, 0, 0, 0, 0, 1, 1]),
              torch.tensor([5.0] * 8 + [1.0, 0.0])]
    upd = FedGenUpdate(means={}, clients={}, heads_w=heads, heads_b=[torch.zeros(10)] * 3, counts=counts,
                       client_ids=[0, 1, 2])
    state = algo.init_state(ctx)

    def loss(weights) -> float:
        gen = algo._generator(ctx)
        gen.load_state_dict(weights)
        gen.eval()
        y = torch.arange(8).repeat(20)  # the qualified labels
        share = torch.stack(counts) / torch.stack(counts).sum(0)
        with torch.no_grad():  # the generator's objective: every head's CE weighted by its share of the label
            z = gen(y, torch.rand(len(y), algo.gen_noise_dim, generator=torch.Generator().manual_seed(1)))
            ce = [torch.nn.functional.cross_entropy(z @ w.T, y, reduction="none") for w in heads]
            return float(sum((c * share[k, y]).mean() for k, c in enumerate(ce)))

    new, opt_state, stats = algo.train_generator(state.models["generator"], None, upd, 1, ctx)
    assert stats["gen_qualified_labels"] == 8  # labels 8, 9: no client counts them more than once
    assert loss(new) < loss(state.models["generator"])
    assert opt_state["state"]  # Adam moments carried to the next round


def test_two_rounds_end_to_end_with_noised_counts_and_resume(tmp_path):
    over = ("algorithm.label_noise='laplace'", "algorithm.label_epsilon=0.5", "algorithm.label_release='every_round'",
            "algorithm.clients_per_round=6", "rounds=3")
    summary = run(cfg(*over), tmp_path / "a", quiet=True)
    assert summary["status"] == "complete" and summary["label_noise"] == "laplace"
    rows = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    # every client reports every round: 3 releases of eps 0.5 each (basic composition)
    assert [r["label_dp_eps_total_max"] for r in rows] == [0.5, 1.0, 1.5]
    assert all(r["label_leak_tv_mean"] > 0 and r["label_bytes_up"] == 6 * 40 for r in rows)
    assert rows[0]["gen_bytes_down"] == 0 and rows[1]["gen_bytes_down"] > 0
    assert summary["label_dp_eps_total_max"] == 1.5
    # release once: identical noised counts every round, the total stays eps
    once = run(cfg(*over[:2], "algorithm.clients_per_round=6", "rounds=2"), tmp_path / "b", quiet=True)
    assert once["label_dp_eps_total_max"] == 0.5
    # raw counts: the server recovers every client's label distribution exactly
    raw = run(cfg("rounds=1"), tmp_path / "c", quiet=True)
    assert raw["label_leak_tv_mean"] == 0.0 and "label_dp_eps_total_max" not in raw
    # resume equals an uninterrupted run (generator optimiser state is checkpointed)
    run(cfg(*over[:4], "rounds=2"), tmp_path / "d", quiet=True)
    resumed = run(cfg(*over), resume=tmp_path / "d", quiet=True)
    assert resumed["test_accuracy"] == summary["test_accuracy"]


def test_heterogeneous_families_sharing_the_feature_dimension(tmp_path):
    summary = run(cfg("algorithm.families='cnn, mlp(hidden=16)'", "fleet.source='tiers'", "fleet.mix='a-b'",
                      "algorithm.clients_per_round=6"), tmp_path / "h", quiet=True)
    assert summary["status"] == "complete" and "test_accuracy.mlp(hidden=16)" in summary
    rows = [json.loads(line) for line in (tmp_path / "h" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["clients.cnn"] == 3 and rows[-1]["clients.mlp(hidden=16)"] == 3
