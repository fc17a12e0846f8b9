"""FedDyn for the depth methods (``algorithm.dyn``): off is today's DepthFL, one step by hand, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hetfl.algorithms.feddyn import DYN
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.results import read_metrics, strip_timing
from hetfl.runner import prepare, run

FLEET = ('fleet.source="tiers"', 'fleet.mix="a-c"', "data.num_clients=6", 'model={name="mlp", hidden="32,16"}')


def _final(cfg, rounds=2):
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    for rnd in range(1, rounds + 1):
        state, _ = sim.run_round(state, rnd)
    return state


def test_alpha_zero_is_todays_depthfl_bit_for_bit(digits_cfg):
    plain = _final(digits_cfg(*FLEET, 'algorithm={name="depthfl", clients_per_round=4, levels="1x1,1x0.5"}'))
    off = _final(digits_cfg(*FLEET, 'algorithm={name="depthfl", clients_per_round=4, levels="1x1,1x0.5", '
                                    'dyn=0.0}'))
    assert plain.buffers == off.buffers == {}
    for k, v in plain.models["global"].items():
        assert torch.equal(v, off.models["global"][k]), k


def test_one_client_step_by_hand(digits_cfg):
    alpha, lr = 0.3, 0.1
    cfg = digits_cfg(*FLEET, "train.steps=1", "train.batch_size=1000", f"train.lr={lr}",
                     f'algorithm={{name="depthfl", clients_per_round=1, levels="1x1,1x0.5", loss="exits", '
                     f'dyn={alpha}}}')
    exp = prepare(cfg)
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    shallow = int(np.flatnonzero(ctx.fleet.tiers() == 1)[0])  # a client of the half-depth level
    task = algo.configure_round(state, 1, [shallow], ctx)[0]
    assert all(not v.any() for v in task.extra["dyn_h"].values())  # never trained: zero state
    h = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) * 0.01
         for i, (k, v) in enumerate(sorted(task.extra["dyn_h"].items()))}
    task.extra["dyn_h"] = h
    data = exp.federation.client_train(shallow)
    model = task.model.build(ctx.info)
    model.load_state_dict(task.weights)
    res = algo.local_update(task, model, data, torch.device("cpu"))

    # by hand: one full-batch step of (exits' CE - <theta, h> + alpha/2 ||theta - theta_g||^2) at theta = theta_g
    ref = task.model.build(ctx.info)
    ref.load_state_dict(task.weights)
    ref.train()
    z = ref(data.x)
    z = z if z.dim() == 3 else z[None]
    loss = sum(F.cross_entropy(z[i], data.y) for i in range(z.shape[0]))
    loss = loss - sum(torch.sum(p * h[k]) for k, p in ref.named_parameters())
    loss.backward()
    theta = {k: task.weights[k] - lr * p.grad for k, p in ref.named_parameters()}
    for k, v in theta.items():
        assert torch.allclose(res.weights[k], v, atol=1e-6, rtol=0), k
        assert torch.allclose(res.extra["dyn_h"][k], h[k] - alpha * (res.weights[k] - task.weights[k]),
                              atol=1e-7, rtol=0), k

    # the server: one holder of N clients, h_s = -alpha (1 / N) (theta' - theta), theta_new = theta' - h_s / alpha
    new = algo.server_step(state, algo.aggregate(state, 1, [res], ctx), ctx)
    old, glob, n = state.models["global"], new.models["global"], ctx.num_clients
    for k in theta:
        h_s = -alpha * (res.weights[k] - old[k]) / n
        assert torch.allclose(new.buffers[DYN]["h"][k], h_s, atol=1e-8, rtol=0), k
        assert torch.allclose(glob[k], res.weights[k] - h_s / alpha, atol=1e-6, rtol=0), k
        assert torch.equal(new.buffers[DYN]["clients"][shallow][k], res.extra["dyn_h"][k]), k
    deep = [k for k in old if k not in res.weights]
    assert deep  # the blocks the shallow client never held: value and state untouched
    for k in deep:
        assert torch.equal(glob[k], old[k]) and not new.buffers[DYN]["h"][k].any(), k


def test_resume_equals_an_uninterrupted_run(tmp_path, digits_cfg):
    cfg = digits_cfg(*FLEET, "rounds=3", 'algorithm={name="depthfl", clients_per_round=3, levels="1x1,1x0.5", '
                                         'dyn=0.1}')
    full = run(cfg, tmp_path / "full", quiet=True)
    part = run(cfg.replace(rounds=2), tmp_path / "part", quiet=True)
    assert full["status"] == part["status"] == "complete"
    run(cfg, resume=tmp_path / "part", quiet=True)
    assert strip_timing(read_metrics(tmp_path / "full")) == strip_timing(read_metrics(tmp_path / "part"))
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=True)["state"]
    assert a["buffers"][DYN]["clients"].keys() == b["buffers"][DYN]["clients"].keys()
    for c, st in a["buffers"][DYN]["clients"].items():
        assert all(torch.equal(v, b["buffers"][DYN]["clients"][c][k]) for k, v in st.items())


def test_width_levels_and_scalefl_run(digits_cfg):
    state = _final(digits_cfg(*FLEET, 'algorithm={name="scalefl", clients_per_round=4, levels="1x1,0.5x0.5", '
                                      'dyn=0.1}'))
    assert all(torch.isfinite(v).all() for v in state.models["global"].values())
    assert state.buffers[DYN]["clients"]


def test_bad_dyn_configs(digits_cfg):
    with pytest.raises(ConfigError, match=r"algorithm.dyn \(FedDyn's alpha\) must be >= 0"):
        digits_cfg('algorithm={name="depthfl", dyn=-0.1}')
    with pytest.raises(ConfigError, match="not available for inclusivefl"):
        digits_cfg('algorithm={name="inclusivefl", dyn=0.1}')
    with pytest.raises(ConfigError, match=r"keeps per-client state.*set algorithm.dyn = 0"):
        prepare(digits_cfg(*FLEET, 'algorithm={name="depthfl", dyn=0.1}', "privacy.clip=1.0",
                           "privacy.noise_multiplier=1.0"))
    with pytest.raises(ConfigError, match="reads results beside the mean"):
        prepare(digits_cfg(*FLEET, 'algorithm={name="depthfl", dyn=0.1}', 'asynchronous.mode="fedbuff"'))


def test_client_state_travels_through_worker_processes(tmp_path, digits_cfg, one_thread):
    cfg = digits_cfg(*FLEET, "rounds=2", 'algorithm={name="depthfl", clients_per_round=4, levels="1x1,1x0.5", '
                                         'dyn=0.1}')
    run(cfg, tmp_path / "inproc", quiet=True)
    run(cfg.with_engine(workers=2), tmp_path / "workers", quiet=True)
    a = torch.load(tmp_path / "inproc" / "checkpoint.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "workers" / "checkpoint.pt", weights_only=True)["state"]
    for k, v in a["models"]["global"].items():
        assert torch.equal(v, b["models"]["global"][k]), k
    for c, st in a["buffers"][DYN]["clients"].items():
        assert all(torch.equal(v, b["buffers"][DYN]["clients"][c][k]) for k, v in st.items()), c


def test_large_client_state_through_workers_does_not_deadlock(tmp_path, digits_cfg, one_thread):
    """FedDyn's state goes to the worker in the task and comes back in the result: with a model of ~1 MB both
    messages outgrow the pipe's buffer, and a parent sending the next task while the worker sends its reply
    used to wait on each other for ever (the crossover pilot's depthfl-dyn cell hung in round 1)."""
    cfg = digits_cfg('fleet.source="tiers"', 'fleet.mix="a-c"', "data.num_clients=8", "rounds=1",
                     'model={name="mlp", hidden="512,512"}',
                     'algorithm={name="depthfl", clients_per_round=8, levels="1x1,1x0.5", dyn=0.1}')
    run(cfg, tmp_path / "inproc", quiet=True)
    run(cfg.with_engine(workers=2), tmp_path / "workers", quiet=True)
    a = torch.load(tmp_path / "inproc" / "checkpoint.pt", weights_only=True)["state"]
    b = torch.load(tmp_path / "workers" / "checkpoint.pt", weights_only=True)["state"]
    for k, v in a["models"]["global"].items():
        assert torch.equal(v, b["models"]["global"][k]), k
