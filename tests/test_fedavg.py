"""FedAvg: golden identities on tiny problems."""

from __future__ import annotations

import torch

from hetfl.algorithms.base import ClientResult, round_seed
from hetfl.algorithms.fedavg import average_weights
from hetfl.engines.simulator import Simulator
from hetfl.runner import prepare
from hetfl.train import batch_indices


def test_one_client_full_participation_equals_centralized_sgd(digits_cfg):
    cfg = digits_cfg("data.num_clients=1", 'data.partition={name="iid"}', "data.local_test_fraction=0.0",
                     "algorithm.clients_per_round=1", "train.epochs=2", "train.batch_size=32", "rounds=3")
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    init = {k: v.clone() for k, v in state.models["global"].items()}
    for rnd in range(1, cfg.rounds + 1):
        state, report = sim.run_round(state, rnd)
        assert report.clients == [0]

    # the same SGD steps, written out by hand as centralized training on the same batch order
    model = exp.ctx.model.build(exp.ctx.info)
    model.load_state_dict(init)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    x, y = exp.federation.client_train(0).x, exp.federation.client_train(0).y
    for rnd in range(1, cfg.rounds + 1):
        gen = torch.Generator().manual_seed(round_seed(cfg.seed, rnd, 0))
        for idx in batch_indices(len(y), cfg.train.batch_size, cfg.train.epochs, 0, gen):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, state.models["global"][k]), k


def test_weighted_average_golden():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(4)}
    avg, count, samples = average_weights([ClientResult(0, 1, a), ClientResult(1, 3, b)])
    assert (count, samples) == (2, 4)
    torch.testing.assert_close(avg["w"], torch.tensor([3.25, 6.5]))
    assert avg["n"].dtype == torch.int64 and int(avg["n"]) == 4  # 3.5 rounds to even
    unweighted, _, _ = average_weights([ClientResult(0, 1, a), ClientResult(1, 3, b)], weighted=False)
    torch.testing.assert_close(unweighted["w"], torch.tensor([2.5, 5.0]))
    single, _, _ = average_weights([ClientResult(0, 7, a)])
    assert single["w"] is a["w"]
    assert average_weights([]) == ({}, 0, 0)


def test_server_momentum_changes_trajectory(digits_cfg):
    plain = prepare(digits_cfg())
    mom = prepare(digits_cfg("algorithm.server_momentum=0.9", "algorithm.server_lr=1.0"))
    outs = []
    for exp in (plain, mom):
        sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
        state = exp.algorithm.init_state(exp.ctx)
        for rnd in (1, 2):
            state, _ = sim.run_round(state, rnd)
        outs.append(state)
    k = next(iter(outs[0].models["global"]))
    assert not torch.equal(outs[0].models["global"][k], outs[1].models["global"][k])
    assert "momentum" in outs[1].buffers


def test_client_sampling_is_seeded_and_sized(digits_cfg):
    exp = prepare(digits_cfg("algorithm.clients_per_round=2"))
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    _, r1 = sim.run_round(state, 1)
    _, r1b = sim.run_round(state, 1)
    assert r1.clients == r1b.clients and len(r1.clients) == 2
    exp = prepare(digits_cfg("algorithm.fraction=1.0"))
    assert exp.algorithm.clients_for(exp.ctx.num_clients) == 5
