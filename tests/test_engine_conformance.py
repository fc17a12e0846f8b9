"""One round for every engine: with [faults] on, in process, 2 worker processes and Flower's simulation
engine give the same global model and the same fault rows (dropouts, a NaN client, a deadline that drops
a tier, min_clients).  The round is :class:`hetfl.rounds.Round`; engines are only its transport."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hetfl.accounting import CostCache, example_input
from hetfl.algorithms import ALGORITHMS
from hetfl.reliability.plan import plan_round
from hetfl.results import read_metrics
from hetfl.runner import prepare, run

try:
    import flwr  # noqa: F401
    import ray  # noqa: F401

    HAVE_FLWR = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_FLWR = False

BAD = (0, 1)  # these clients' every update carries a NaN: validation must reject it on every engine
COMMON = ["data.num_clients=6", 'data.partition={name="iid"}', "data.local_test_fraction=0.0", "rounds=3", "seed=5",
          'fleet.source="tiers"', 'fleet.mix="a2-c2-e2"', "faults.dropout=0.3", "faults.min_clients=2"]
ALGOS = {
    "fedavg": ['algorithm={name="fedavg", clients_per_round=6}', 'model={name="mlp", hidden="32"}'],
    "heterofl": ['algorithm={name="heterofl", clients_per_round=6}', 'model={name="mlp", hidden="64"}'],
}
FAULT_KEYS = ("clients", "samples", "bytes_down", "bytes_up", "clients_selected", "clients_reported",
              "rejected_invalid", "dropped_failure", "dropped_deadline", "skipped", "tier_selected", "tier_reported",
              "round_sim_time_s")


def poison(res):
    """The update of a client in BAD with one NaN (the other clients' results untouched)."""
    if res.client_id in BAD:
        key = next(k for k, v in res.weights.items() if v.is_floating_point())
        res.weights[key].view(-1)[0] = float("nan")
    return res


def _nan_train(msg, context):  # a module-level ClientApp handler, so Ray's workers import it by name
    from flwr.app import Message

    from hetfl.flower import client, codec

    reply = client.handle_train(msg, context)
    res, seconds = codec.decode_result(reply.content)
    return Message(codec.encode_result(poison(res), seconds), reply_to=msg)


def _nan_app():
    from flwr.clientapp import ClientApp

    from hetfl.flower import client

    app = ClientApp()
    app.query()(client.handle_query)
    app.train()(_nan_train)
    return app


def _deadline(cfg) -> float:
    """A deadline in the widest gap between round 1's simulated client times: the clients above it miss it
    (for FedAvg, whose weakest tier trains the full model at 1/256 of the speed, that is the whole tier)."""
    exp = prepare(cfg)
    cache = CostCache(exp.ctx.info, example_input(exp.ctx.info))
    state = exp.algorithm.init_state(exp.ctx)
    tasks = exp.algorithm.configure_round(state, 1, np.arange(exp.federation.num_clients), exp.ctx)
    plan = plan_round(tasks, 1, exp.ctx, exp.ctx.faults, {t.model: cache(t.model) for t in tasks})
    times = sorted(p.time_s for p in plan.clients)
    gap = max(range(1, len(times)), key=lambda i: times[i] / times[i - 1])
    return math.sqrt(times[gap] * times[gap - 1])


def _weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]


@pytest.mark.parametrize("algo", list(ALGOS))
def test_faults_behave_the_same_on_every_engine(tmp_path, digits_cfg, monkeypatch, algo):
    base = [*COMMON, *ALGOS[algo]]
    deadline = _deadline(digits_cfg(*base))
    cfg = digits_cfg(*base, f"faults.deadline_s={deadline!r}")
    cls = ALGORITHMS.get(algo)
    original = cls.local_update
    monkeypatch.setattr(cls, "local_update", lambda self, *a, **k: poison(original(self, *a, **k)))

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process run at one thread per client, as each worker trains
    try:
        run(cfg, tmp_path / "inproc", quiet=True)
    finally:
        torch.set_num_threads(threads)
    run(cfg.with_engine(workers=2), tmp_path / "workers", quiet=True)  # forked workers inherit the poison
    engines = ["inproc", "workers"]
    if HAVE_FLWR:
        from hetfl.flower import FlowerOptions, FlowerSimulation
        def flower(algorithm, federation, ctx, device, cfg):
            return FlowerSimulation(algorithm, federation, ctx, device, cfg, client_app=_nan_app(),
                                    options=FlowerOptions(num_cpus=1))

        run(cfg.with_engine(name="flower"), tmp_path / "flower", quiet=True, engine=flower)
        engines.append("flower")

    rows = {e: read_metrics(tmp_path / e) for e in engines}
    ref = rows["inproc"]
    total = {k: sum(r[k] for r in ref) for k in ("rejected_invalid", "dropped_deadline", "dropped_failure")}
    assert all(total.values()), f"the setting must exercise every fault: {total}"
    if algo == "fedavg":  # the deadline drops the weakest tier (2 of 6 clients) in every round
        assert all(r["participation.tier2"] == 0.0 for r in ref if "participation.tier2" in r)
    for e in engines[1:]:
        assert len(rows[e]) == len(ref) == 3
        for a, b in zip(ref, rows[e]):
            for key in FAULT_KEYS:
                assert a[key] == b[key], (e, a["round"], key)
            assert {k: v for k, v in a.items() if k.startswith("participation.")} == \
                   {k: v for k, v in b.items() if k.startswith("participation.")}, e
            assert a.get("rejected") == b.get("rejected"), e
            for key in ("train_loss", "test_accuracy", "test_loss"):
                assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), (e, key)
        w_ref, w = _weights(tmp_path / "inproc"), _weights(tmp_path / e)
        for k in w_ref:
            if e == "workers":  # one thread per client in both: bit for bit
                assert torch.equal(w_ref[k], w[k]), (e, k)
            else:
                assert torch.allclose(w_ref[k], w[k], rtol=0, atol=1e-6), (e, k)
