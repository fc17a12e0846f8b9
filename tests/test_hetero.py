"""The width mechanism: spec derivation, policies, extract / scatter-aggregate, identities with FedAvg."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.hetero import example_input, group_sizes, spec_for, submodel_ref
from hetfl.hetero.extract import OverlapAverage, extract
from hetfl.hetero.policy import Prefix, RandomSubset, Rolling
from hetfl.hetero.spec import WidthSpecError, derive_spec
from hetfl.models import ModelRef, count_parameters

IMG = DataInfo((1, 12, 12), 10)
TOK = DataInfo((16,), 30, 30)
ARCHS = [
    (ModelRef("mlp"), IMG),
    (ModelRef("cnn"), IMG),
    (ModelRef("heterofl_conv", params=(("hidden", "8,16,32"),)), IMG),
    (ModelRef("resnet", params=(("base_channels", 8), ("depth", 10))), IMG),
    (ModelRef("lstm", params=(("hidden", 32),)), TOK),
    (ModelRef("transformer", params=(("d_model", 32), ("ffn", 64), ("heads", 4))), TOK),
]
IDS = [r.name for r, _ in ARCHS]


def _zero_dropped(full: nn.Module, spec, selection) -> None:
    """Zero every weight of the full model that lies outside the selected sub-block."""
    state = full.state_dict()
    ones = {k: torch.ones_like(v, dtype=torch.float64) for k, v in state.items() if v.is_floating_point()}
    keep = extract(ones, spec, selection)
    acc = OverlapAverage({k: torch.zeros_like(v) for k, v in ones.items()}, spec)
    acc.add(keep, selection)
    mask = acc.result()
    with torch.no_grad():
        for k, v in state.items():
            if k in mask:
                v.mul_(mask[k].to(v.dtype))


def _no_layernorm(model: nn.Module) -> None:
    for name, child in list(model.named_children()):
        if isinstance(child, nn.LayerNorm):
            setattr(model, name, nn.Identity())
        else:
            _no_layernorm(child)


@pytest.mark.parametrize("ref, info", ARCHS, ids=IDS)
def test_width_one_extract_and_scatter_are_identities(ref, info):
    spec = spec_for(ref, info)
    torch.manual_seed(0)
    weights = ref.build(info).state_dict()
    sel = Prefix().select(spec.groups, group_sizes(ref, info, 1.0), rnd=1, client=0, seed=0)
    sub = extract(weights, spec, sel)
    assert all(sub[k] is weights[k] for k in weights)
    acc = OverlapAverage(weights, spec)
    acc.add(sub, sel)
    out = acc.result()
    assert all(torch.equal(out[k], weights[k]) for k in weights)


@pytest.mark.parametrize("policy", [Prefix(), Rolling(stride=1), RandomSubset()], ids=["prefix", "rolling", "random"])
@pytest.mark.parametrize("rate", [0.5, 0.25])
@pytest.mark.parametrize("ref, info", ARCHS, ids=IDS)
def test_submodel_forward_equals_full_model_with_dropped_channels_zeroed(ref, info, rate, policy):
    spec = spec_for(ref, info)
    torch.manual_seed(1)
    full = ref.build(info)
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in full.modules()):
        with torch.no_grad():  # non-trivial running statistics, so eval-mode BN is exercised
            for m in full.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    sel = policy.select(spec.groups, group_sizes(ref, info, rate), rnd=3, client=2, seed=7)
    sub = submodel_ref(ref, rate).build(info)
    sub.load_state_dict(extract(full.state_dict(), spec, sel))
    _zero_dropped(full, spec, sel)
    _no_layernorm(full)
    _no_layernorm(sub)
    x = example_input(info, 4) if info.vocab_size else torch.randn(4, *info.input_shape)
    if info.vocab_size:
        x = torch.randint(0, info.vocab_size, (4, *info.input_shape))
    full.eval()
    sub.eval()
    with torch.no_grad():
        torch.testing.assert_close(sub(x), full(x), rtol=1e-4, atol=1e-5)
    assert count_parameters(sub) < count_parameters(full)


def test_parameter_count_scales_with_rate_squared():
    for name in ("cnn", "mlp"):
        ref = ModelRef(name)
        info = DataInfo((1, 28, 28), 10)
        full = count_parameters(ref.build(info))
        for rate in (0.5, 0.25):
            ratio = count_parameters(submodel_ref(ref, rate).build(info)) / full
            assert rate**2 * 0.9 < ratio < rate * 1.1, (name, rate, ratio)  # input/output layers are not sliced
    ref = ModelRef("heterofl_conv")
    info = DataInfo((1, 28, 28), 10)
    ratio = count_parameters(submodel_ref(ref, 0.5).build(info)) / count_parameters(ref.build(info))
    assert abs(ratio - 0.25) < 0.01  # a conv stack: ~r^2


def test_aggregation_golden_two_clients():
    """2-client tiny MLP, hand-computed overlap averages."""
    info = DataInfo((2,), 2)
    ref = ModelRef("mlp", params=(("hidden", "4"),))
    spec = spec_for(ref, info)
    glob = {k: torch.zeros_like(v) for k, v in ref.build(info).state_dict().items()}
    sel_a = Prefix().select(spec.groups, group_sizes(ref, info, 1.0), rnd=1, client=0, seed=0)
    sel_b = Prefix().select(spec.groups, group_sizes(ref, info, 0.5), rnd=1, client=1, seed=0)
    a = {k: torch.full_like(v, 2.0) for k, v in glob.items()}
    b = {k: torch.full(extract(glob, spec, sel_b)[k].shape, 4.0) for k in glob}
    acc = OverlapAverage(glob, spec)
    acc.add(a, sel_a, weight=1.0)
    acc.add(b, sel_b, weight=3.0)
    out = acc.result()
    # hidden units 0,1 are trained by both (weights 1 and 3): (2*1 + 4*3) / 4 = 3.5; units 2,3 only by A: 2
    assert out["fc1.weight"][:2].eq(3.5).all() and out["fc1.weight"][2:].eq(2.0).all()
    assert out["fc1.bias"].tolist() == [3.5, 3.5, 2.0, 2.0]
    assert out["out.weight"][:, :2].eq(3.5).all() and out["out.weight"][:, 2:].eq(2.0).all()
    assert out["out.bias"].eq(3.5).all()  # every client holds the (unsliced) output bias
    # classifier rule: B holds only class 1, so row 0 is averaged over A alone
    acc = OverlapAverage(glob, spec)
    acc.add(a, sel_a, 1.0, class_mask=torch.tensor([True, True]))
    acc.add(b, sel_b, 3.0, class_mask=torch.tensor([False, True]))
    out = acc.result()
    assert out["out.bias"].tolist() == [2.0, 3.5]
    assert out["out.weight"][0].tolist() == [2.0, 2.0, 2.0, 2.0]
    assert out["out.weight"][1].tolist() == [3.5, 3.5, 2.0, 2.0]
    # elements nobody trained keep their value
    acc = OverlapAverage({k: torch.full_like(v, -1.0) for k, v in glob.items()}, spec)
    acc.add(b, sel_b, 1.0)
    assert acc.result()["fc1.bias"].tolist() == [4.0, 4.0, -1.0, -1.0]


@pytest.mark.parametrize("K, rate", [(32, 0.5), (64, 0.25), (200, 0.0625)])
def test_rolling_windows_cover_every_channel(K, rate):
    from hetfl.hetero.spec import Group

    g = Group(1, K)
    n = math.ceil(rate * K)
    seen, rounds = set(), 0
    while len(seen) < K:
        rounds += 1
        seen |= set(Rolling(stride=1).choose(g, n, rnd=rounds, client=0, seed=0).tolist())
    assert rounds == K - n + 1  # FedRolex: one channel per round
    seen, rounds = set(), 0
    while len(seen) < K:
        rounds += 1
        seen |= set(Rolling(stride=n).choose(g, n, rnd=rounds, client=0, seed=0).tolist())
    assert rounds == math.ceil(1 / rate)
    a = Rolling().choose(g, n, rnd=5, client=0, seed=0)
    assert set(Rolling().choose(g, n // 2, rnd=5, client=1, seed=0)) <= set(a)  # nested within a round


def test_transformer_heads_are_sliced_whole():
    ref, info = ARCHS[-1]
    spec = spec_for(ref, info)
    blocked = [g for g in spec.groups.values() if g.block > 1]
    assert blocked and all(g.block == 8 for g in blocked)  # d_model 32 / 4 heads
    sel = RandomSubset().select(spec.groups, group_sizes(ref, info, 0.5), rnd=1, client=0, seed=0)
    for g in blocked:
        idx = sel[g.id].view(-1, g.block)
        assert torch.equal(idx - idx[:, :1], torch.arange(g.block).expand_as(idx))


def test_errors_are_clear():
    ref, info = ARCHS[0]
    with pytest.raises(ConfigError, match=r"width rate must be in \(0, 1\], got 1.5"):
        group_sizes(ref, info, 1.5)
    with pytest.raises(ConfigError, match="got 0"):
        group_sizes(ref, info, 0.0)

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 8)
            self.bilinear = nn.Bilinear(8, 8, 3)

        def forward(self, x):
            h = self.fc(x)
            return self.bilinear(h, h)

    with pytest.raises(WidthSpecError, match="cannot slice layer 'bilinear' of type Bilinear"):
        derive_spec(Odd(), torch.randn(2, 4))

    class Dynamic(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            if x.sum() > 0:
                return self.fc(x)
            return -self.fc(x)

    with pytest.raises(WidthSpecError, match="cannot trace Dynamic with torch.fx"):
        derive_spec(Dynamic(), torch.randn(2, 4))


def test_random_policy_is_seeded_per_client_and_round():
    spec = spec_for(*ARCHS[0])
    sizes = group_sizes(*ARCHS[0], 0.25)
    a = RandomSubset().select(spec.groups, sizes, rnd=1, client=3, seed=0)
    b = RandomSubset().select(spec.groups, sizes, rnd=1, client=3, seed=0)
    c = RandomSubset().select(spec.groups, sizes, rnd=2, client=3, seed=0)
    g = next(iter(a))
    assert torch.equal(a[g], b[g]) and not torch.equal(a[g], c[g])
    assert np.all(np.diff(a[g].numpy()) > 0)
