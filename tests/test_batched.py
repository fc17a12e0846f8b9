"""Batched same-shape clients (hetfl.engines.batched) equal sequential training within float tolerance."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hetfl.algorithms.fedavg import FedAvg
from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo, Split
from hetfl.engines.batched import batch_schedule, check_setting, make_batcher, module_qualifies, train_group
from hetfl.errors import ConfigError
from hetfl.models import ModelRef
from hetfl.resolve import load_config
from hetfl.runner import prepare
from hetfl.train import batch_indices, local_sgd

INFO = DataInfo((12,), 5)


def _data(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 12, generator=g), torch.randint(5, (n,), generator=g)


@pytest.mark.parametrize("train", [
    TrainConfig(epochs=2, batch_size=8, lr=0.1),
    TrainConfig(steps=7, batch_size=5, lr=0.05, momentum=0.9, weight_decay=5e-4, grad_clip=0.5),
])
def test_train_group_equals_local_sgd(train):
    x, y = _data(4 * 20)
    idx = [np.arange(c * 20, (c + 1) * 20) for c in range(4)]
    torch.manual_seed(0)
    module = ModelRef("mlp", 1.0, (("hidden", "16,8"),)).build(INFO)
    start = [{k: v + 0.01 * c for k, v in module.state_dict().items()} for c in range(4)]
    seeds = [11, 12, 13, 14]
    got, losses, steps = train_group(module, start, x, y, idx, train, seeds)
    for c in range(4):
        module.load_state_dict(start[c])
        stats = local_sgd(module, Split(x[idx[c]], y[idx[c]]), train, seed=seeds[c])
        assert steps == stats.steps
        assert losses[c] == pytest.approx(stats.loss, rel=1e-5, abs=1e-6)
        for k, v in module.state_dict().items():
            torch.testing.assert_close(got[c][k], v, rtol=1e-5, atol=1e-5)


def test_batch_schedule_matches_local_sgd():
    gen = torch.Generator()
    for n, cfg in [(23, TrainConfig(epochs=2, batch_size=10)), (7, TrainConfig(steps=5, batch_size=3)),
                   (30, TrainConfig(steps=4, batch_size=10))]:
        sizes = tuple(len(b) for b in batch_indices(n, cfg.batch_size, cfg.epochs, cfg.steps, gen))
        assert batch_schedule(n, cfg) == sizes


def _cfg(batched, partition, num_clients=12):
    return load_config(None, (), base={
        "rounds": 2, "seed": 0, "batched": batched,
        "data": {"name": "synthetic", "num_samples": 1200, "num_features": 12, "num_clients": num_clients,
                 "local_test_fraction": 0.0, "partition": partition},
        "model": {"name": "mlp", "hidden": "16"},
        "algorithm": {"name": "fedavg", "clients_per_round": 6},
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.05, "momentum": 0.5},
        "eval": {"local": False},
    })


@pytest.mark.parametrize("partition", [{"name": "iid"}, {"name": "quantity", "sigma": 0.5, "min_size": 20}])
def test_simulator_rounds_batched_equal_sequential(partition):
    from hetfl.engines import SERVER_ENGINES

    states, batched_counts = [], []
    for batched in (False, True):
        cfg = _cfg(batched, partition)
        exp = prepare(cfg)
        engine = SERVER_ENGINES.get("simulator")(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg)
        state = exp.algorithm.init_state(exp.ctx)
        losses = []
        for rnd in (1, 2):
            state, report = engine.run_round(state, rnd)
            losses.append(report.as_metrics()["train_loss"])
        states.append((state, losses))
        batched_counts.append(engine.batcher.clients_batched if engine.batcher is not None else 0)
    (seq, seq_loss), (bat, bat_loss) = states
    assert batched_counts[0] == 0 and batched_counts[1] >= 2  # the batched run did batch some clients
    assert bat_loss == pytest.approx(seq_loss, rel=1e-5)
    for k, v in seq.models["global"].items():
        torch.testing.assert_close(bat.models["global"][k], v, rtol=1e-5, atol=1e-5)


def test_auto_is_off_on_cpu_and_unsuitable_models_are_skipped():
    exp = prepare(_cfg("auto", {"name": "iid"}))
    assert make_batcher("auto", exp.algorithm, exp.federation, exp.ctx, torch.device("cpu"), lambda r: None) is None
    assert not module_qualifies(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3)))
    assert not module_qualifies(torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Dropout(0.1)))
    assert module_qualifies(torch.nn.Sequential(torch.nn.Linear(3, 3)))
    assert check_setting("true") is True and check_setting("auto") == "auto"
    with pytest.raises(ConfigError):
        check_setting("sometimes")
    with pytest.raises(ConfigError):
        _cfg("maybe", {"name": "iid"})
    assert isinstance(exp.algorithm, FedAvg)


def test_groups_are_cut_into_fixed_chunks_in_task_order():
    from hetfl.engines.batched import MAX_GROUP, Batcher
    from hetfl.model_cache import ModelCache

    exp = prepare(_cfg(True, {"name": "iid"}, num_clients=40))
    models = ModelCache(exp.ctx, torch.device("cpu"))
    batcher = Batcher(exp.algorithm, exp.federation, exp.ctx, torch.device("cpu"), models.get)
    state = exp.algorithm.init_state(exp.ctx)
    steps = TrainConfig(steps=2, batch_size=10)  # the same batch schedule for every client
    tasks = [dataclasses.replace(t, train=steps) for t in exp.algorithm.configure_round(state, 1, range(40), exp.ctx)]
    batcher.plan(tasks)
    sizes = [len(c) for c in batcher.chunks]
    assert sizes == [MAX_GROUP, MAX_GROUP, 40 - 2 * MAX_GROUP]  # equal data sizes: one group, cut in order
    assert [t.client_id for c in batcher.chunks for t in c] == list(range(40))


def test_a_failing_chunk_fails_every_client_of_it(monkeypatch):
    from hetfl.engines import batched
    from hetfl.engines.simulator import Simulator

    exp = prepare(_cfg(True, {"name": "iid"}))
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx, "cpu", batched=True)

    def boom(*a, **k):
        raise RuntimeError("chunk exploded")

    monkeypatch.setattr(batched, "train_group", boom)
    state, report = sim.run_round(exp.algorithm.init_state(exp.ctx), 1)
    m = report.as_metrics()
    chunked = sum(len(c) for c in sim.batcher.chunks)
    assert chunked >= 2 and len(m["failed"]) == chunked and m["clients"] == 6 - chunked  # the rest trained alone
    assert any("chunk exploded" in line for line in report.messages)
