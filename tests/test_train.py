"""The local training loop's execution choices: the memory format of 4-D weights."""

from __future__ import annotations

import pytest
import torch

from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo, Split
from hetfl.errors import ConfigError
from hetfl.models import build_model
from hetfl.resolve import load_config
from hetfl.train import local_sgd, training_memory_format

INFO = DataInfo((1, 12, 12), 4)


def _train(model, fmt):
    g = torch.Generator().manual_seed(0)
    data = Split(torch.randn(40, 1, 12, 12, generator=g), torch.randint(4, (40,), generator=g))
    seen = []

    def spy(m, x, y, logits):  # records the layout the conv weight has while training
        seen.append(m.conv2.weight.is_contiguous(memory_format=torch.channels_last)
                    and not m.conv2.weight.is_contiguous())
        return logits.sum() * 0.0

    local_sgd(model, data, TrainConfig(batch_size=8, lr=0.1, memory_format=fmt), seed=1, loss_terms=[spy])
    return seen


def test_cnn_trains_channels_last_on_cpu_and_hands_back_contiguous_weights():
    torch.manual_seed(0)
    cnn = build_model("cnn", INFO, conv1=4, conv2=8, fc=16)
    start = {k: v.clone() for k, v in cnn.state_dict().items()}
    assert training_memory_format("auto", cnn, "cpu") is torch.channels_last
    assert training_memory_format("auto", cnn, "cuda") is torch.contiguous_format  # a CPU choice only
    assert all(_train(cnn, "auto"))
    auto = {k: v.clone() for k, v in cnn.state_dict().items()}
    assert all(v.is_contiguous() for v in auto.values())
    cnn.load_state_dict(start)
    assert not any(_train(cnn, "contiguous"))
    for k, v in cnn.state_dict().items():  # the same SGD steps; convolutions only sum in another order
        torch.testing.assert_close(auto[k], v, rtol=1e-4, atol=1e-5)


def test_models_that_do_not_ask_for_it_stay_contiguous():
    net = build_model("heterofl_conv", INFO, hidden="4,8")
    assert training_memory_format("auto", net, "cpu") is torch.contiguous_format
    assert training_memory_format("channels_last", net, "cpu") is torch.channels_last


def test_bad_memory_format_names_the_field_and_the_choices():
    with pytest.raises(ConfigError, match=r"train.memory_format must be one of 'auto', 'contiguous', "
                                          r"'channels_last', got 'nhwc'"):
        load_config(None, ('train.memory_format="nhwc"',))


@pytest.mark.parametrize("momentum, weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.5, 5e-4)])
def test_sgd_is_torch_optim_sgd_bit_for_bit(momentum, weight_decay):
    from hetfl.train import SGD

    torch.manual_seed(0)
    nets = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3)) for _ in range(2)]
    nets[1].load_state_dict(nets[0].state_dict())
    nets[1][2].bias.requires_grad_(False)  # a frozen parameter stays as it is in both
    nets[0][2].bias.requires_grad_(False)
    ours = SGD([p for p in nets[0].parameters() if p.requires_grad], lr=0.1, momentum=momentum,
               weight_decay=weight_decay)
    ref = torch.optim.SGD(nets[1].parameters(), lr=0.1, momentum=momentum, weight_decay=weight_decay)
    g = torch.Generator().manual_seed(1)
    for _ in range(4):
        x, y = torch.randn(8, 6, generator=g), torch.randint(3, (8,), generator=g)
        for net, opt in zip(nets, (ours, ref)):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x), y).backward()
            opt.step()
    for a, b in zip(nets[0].state_dict().values(), nets[1].state_dict().values()):
        assert torch.equal(a, b)


def test_a_run_does_not_import_dynamo():
    """Local training must not pay torch._dynamo's ~1 s import (torch.optim's first optimizer does)."""
    import subprocess
    import sys

    code = ("import sys, torch\n"
            "from hetfl.config import TrainConfig\nfrom hetfl.data.base import Split\n"
            "from hetfl.train import local_sgd\n"
            "m = torch.nn.Sequential(torch.nn.Linear(4, 3))\n"
            "local_sgd(m, Split(torch.randn(20, 4), torch.randint(3, (20,))), TrainConfig(batch_size=5, momentum=0.9),"
            " seed=0)\n"
            "print('torch._dynamo' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_client_split_gathers_rows_lazily_and_trains_bit_for_bit_as_a_gathered_split():
    from hetfl.data.base import ClientSplit

    g = torch.Generator().manual_seed(0)
    base = Split(torch.randn(200, 12, generator=g), torch.randint(4, (200,), generator=g))
    idx = torch.randperm(200, generator=g)[:60]
    lazy, eager = ClientSplit(base, idx), base.subset(idx)
    assert len(lazy) == 60 and lazy.device == eager.device
    b = torch.tensor([5, 0, 59])
    for got, want in zip(lazy.rows(b), eager.rows(b)):
        assert torch.equal(got, want)
    assert "x" not in vars(lazy)  # nothing gathered for a minibatch...
    assert torch.equal(lazy.x, eager.x) and torch.equal(lazy.y, eager.y)  # ...every row on first use of x
    sub = lazy.subset([3, 1])
    assert torch.equal(sub.x, eager.x[[3, 1]])
    cfg = TrainConfig(steps=7, batch_size=8, lr=0.1, momentum=0.9)
    weights = []
    for data in (lazy, eager):
        torch.manual_seed(0)
        model = build_model("mlp", DataInfo((12,), 4), hidden="16")
        stats = local_sgd(model, data, cfg, seed=3)
        weights.append((stats.loss, model.state_dict()))
    assert weights[0][0] == weights[1][0]
    assert all(torch.equal(weights[0][1][k], weights[1][1][k]) for k in weights[1][1])


def _bn_net(pool_to_one: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU()]
    if pool_to_one:  # a BatchNorm on 1 x 1 maps: one value per channel for a one-sample batch
        layers += [torch.nn.AdaptiveAvgPool2d(1), torch.nn.BatchNorm2d(4)]
    return torch.nn.Sequential(*layers, torch.nn.Flatten(), torch.nn.Linear(4 if pool_to_one else 144, 3))


def test_a_lone_sample_batchnorm_cannot_normalise_is_skipped_cleanly():
    """17 samples at batch 16 leave a one-sample batch; where torch would raise (a BatchNorm on 1 x 1 maps) it
    is skipped, and the BatchNorms before the failing one keep the statistics of the first batch alone."""
    g = torch.Generator().manual_seed(5)
    data = Split(torch.randn(17, 1, 6, 6, generator=g), torch.randint(3, (17,), generator=g))
    cfg = TrainConfig(batch_size=16, lr=0.1)
    model = _bn_net(pool_to_one=True)
    stats = local_sgd(model, data, cfg, seed=3)
    assert (stats.steps, stats.samples) == (1, 16)
    first = torch.randperm(17, generator=torch.Generator().manual_seed(3))[:16]  # local_sgd's first batch
    ref = _bn_net(pool_to_one=True)
    local_sgd(ref, data.subset(first), cfg, seed=3)
    for a, b in zip(model.modules(), ref.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert int(a.num_batches_tracked) == 1
            assert torch.allclose(a.running_mean, b.running_mean, atol=1e-6)
            assert torch.allclose(a.running_var, b.running_var, atol=1e-6)


def test_a_lone_sample_batchnorm_can_normalise_still_trains():
    """On 6 x 6 maps a one-sample batch has 36 values per channel: it trains, as before."""
    g = torch.Generator().manual_seed(5)
    data = Split(torch.randn(17, 1, 6, 6, generator=g), torch.randint(3, (17,), generator=g))
    model = _bn_net(pool_to_one=False)
    stats = local_sgd(model, data, TrainConfig(batch_size=16, lr=0.1), seed=3)
    assert (stats.steps, stats.samples) == (2, 17)


def test_recalibration_leaves_out_a_lone_sample_batchnorm_cannot_normalise():
    from hetfl.evaluation import recalibrate_bn

    g = torch.Generator().manual_seed(5)
    data = Split(torch.randn(17, 1, 6, 6, generator=g), torch.randint(3, (17,), generator=g))
    model, ref = _bn_net(pool_to_one=True), _bn_net(pool_to_one=True)
    assert recalibrate_bn(model, data, 16) == 16
    assert recalibrate_bn(ref, data.subset(torch.arange(16)), 16) == 16
    for a, b in zip(model.modules(), ref.modules()):
        if isinstance(a, torch.nn.BatchNorm2d):
            assert torch.equal(a.running_mean, b.running_mean) and torch.equal(a.running_var, b.running_var)
