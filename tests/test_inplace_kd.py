"""In-place distillation for the width family (``algorithm.inplace_kd``): off is today's rule, one step by hand."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetfl.algorithms.heterofl import HeteroFL
from hetfl.data.base import DataInfo, Split
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.hetero.ordered import InplaceDistill, inplace_loss
from hetfl.models import ModelRef
from hetfl.runner import prepare
from hetfl.sections import TrainConfig
from hetfl.train import local_sgd

FLEET = ('fleet.source="tiers"', 'fleet.mix="a-c-e"', "data.num_clients=6", 'model={name="mlp", hidden="32"}')


def _final(cfg, rounds=2):
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    for rnd in range(1, rounds + 1):
        state, _ = sim.run_round(state, rnd)
    return state.models["global"]


def test_off_is_todays_heterofl_bit_for_bit(digits_cfg):
    plain = _final(digits_cfg(*FLEET, 'algorithm={name="heterofl", clients_per_round=4}'))
    off = _final(digits_cfg(*FLEET, 'algorithm={name="heterofl", clients_per_round=4, inplace_kd=0.0}'))
    for k in plain:
        assert torch.equal(plain[k], off[k]), k
    exp = prepare(digits_cfg(*FLEET, 'algorithm={name="heterofl", clients_per_round=4}'))
    tasks = exp.algorithm.configure_round(exp.algorithm.init_state(exp.ctx), 1, [0, 1, 2], exp.ctx)
    assert all("widths" not in t.extra for t in tasks)  # nothing new travels when it is off


def test_one_width_fleet_is_plain_heterofl_bit_for_bit(digits_cfg):
    # every client holds only its own width: nothing narrower to teach, the same arithmetic as without
    common = ('model={name="mlp", hidden="32"}',)
    plain = _final(digits_cfg(*common, 'algorithm={name="heterofl", clients_per_round=3}'))
    kd = _final(digits_cfg(*common, 'algorithm={name="heterofl", clients_per_round=3, inplace_kd=1.0}'))
    for k in plain:
        assert torch.equal(plain[k], kd[k]), k


def test_one_step_by_hand():
    info = DataInfo((64,), 10, None)
    ref = ModelRef("mlp", 1.0, (("hidden", "4"),))
    torch.manual_seed(0)
    model = ref.build(info)
    w0 = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(6, 64), torch.tensor([0, 1, 2, 3, 4, 5])
    weight, lr = 0.7, 0.1
    fwd = InplaceDistill(model, ref, info, [1.0, 0.5, 0.25], seed=3)
    local_sgd(model, Split(x, y), TrainConfig(epochs=1, batch_size=6, lr=lr), seed=1,
              forward=fwd, loss_fn=inplace_loss(F.cross_entropy, weight))

    # by hand: the full MLP on the labels; its prefixes of 2 and 1 hidden units on its detached softmax
    p = {k: v.clone().requires_grad_(True) for k, v in w0.items()}

    def mlp(h: int) -> torch.Tensor:
        hidden = torch.relu(x @ p["fc1.weight"][:h].T + p["fc1.bias"][:h])
        return hidden @ p["out.weight"][:, :h].T + p["out.bias"]

    full = mlp(4)
    soft = torch.softmax(full.detach(), dim=-1)
    loss = F.cross_entropy(full, y)
    for h in (2, 1):
        loss = loss + weight * (-(soft * torch.log_softmax(mlp(h), dim=-1)).sum(-1)).mean()
    loss.backward()
    got = model.state_dict()
    for k in w0:
        assert torch.allclose(got[k], w0[k] - lr * p[k].grad, atol=1e-6, rtol=0), k
        assert not torch.equal(got[k], w0[k]), k


def test_sandwich_draw_keeps_the_smallest():
    info = DataInfo((64,), 10, None)
    ref = ModelRef("mlp", 1.0, (("hidden", "8"),))
    fwd = InplaceDistill(ref.build(info), ref, info, [1.0, 0.75, 0.5, 0.25, 0.125], seed=0, sample=2)
    draws = {fwd.draw() for _ in range(40)}
    assert all(len(d) == 2 and d[-1] == 0.125 and d[0] > d[1] for d in draws)
    assert {d[0] for d in draws} == {0.75, 0.5, 0.25}  # the others drawn uniformly
    every = InplaceDistill(ref.build(info), ref, info, [1.0, 0.5, 0.25], seed=0)
    assert every.draw() == (0.5, 0.25)
    z = every(every.model, torch.randn(3, 64))
    assert z.shape == (3, 3, 10)  # widest first, then the narrower widths


def test_fleet_run_trains_and_differs(digits_cfg):
    plain = _final(digits_cfg(*FLEET, 'algorithm={name="heterofl", clients_per_round=5}'))
    kd = _final(digits_cfg(*FLEET, 'algorithm={name="heterofl", clients_per_round=5, inplace_kd=1.0, '
                                   'inplace_sample=1}'))
    assert all(torch.isfinite(v).all() for v in kd.values())
    assert not torch.equal(plain["fc1.weight"], kd["fc1.weight"])


def test_bad_inplace_configs(digits_cfg):
    with pytest.raises(ConfigError, match="inplace_kd must be >= 0"):
        digits_cfg('algorithm={name="heterofl", inplace_kd=-1.0}')
    with pytest.raises(ConfigError, match="inplace_sample >= 0"):
        digits_cfg('algorithm={name="heterofl", inplace_kd=1.0, inplace_sample=-2}')
    with pytest.raises(ConfigError, match="set algorithm.ordered = false"):
        digits_cfg('algorithm={name="fjord", inplace_kd=1.0}')
    with pytest.raises(ConfigError, match="inplace_kd needs nested submodels"):
        digits_cfg('algorithm={name="fedrolex", inplace_kd=1.0}')
    assert HeteroFL().inplace_kd == 0.0  # off by default
