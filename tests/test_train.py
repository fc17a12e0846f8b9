"""The local training loop's execution choices: the memory format of 4-D weights."""

from __future__ import annotations

import pytest
import torch

from hetfl.config import TrainConfig, load_config
from hetfl.data.base import DataInfo, Split
from hetfl.errors import ConfigError
from hetfl.models import build_model
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
