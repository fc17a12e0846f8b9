"""The simulator's ModelCache: weights loaded by plain copies equal load_state_dict's, errors included."""

from __future__ import annotations

import pytest
import torch

from hetfl.data.base import DataInfo
from hetfl.model_cache import ModelCache, _StateSlots
from hetfl.models import ModelRef, build_model


class _Ctx:
    info = DataInfo((12,), 4)


def _ref(name: str, **params):
    return ModelRef(name, 1.0, tuple(sorted(params.items())))


def test_fast_load_equals_load_state_dict_and_keeps_the_parameters():
    cache = ModelCache(_Ctx(), torch.device("cpu"))
    ref = _ref("mlp", hidden="16,8")
    module = cache.get(ref)
    params = list(module.parameters())
    torch.manual_seed(1)
    weights = {k: torch.randn_like(v) for k, v in module.state_dict().items()}
    assert cache.loaded(ref, weights) is module
    assert [id(p) for p in module.parameters()] == [id(p) for p in params]  # loaded in place
    reference = build_model("mlp", _Ctx.info, hidden="16,8")
    reference.load_state_dict(weights)
    for k, v in reference.state_dict().items():
        assert torch.equal(module.state_dict()[k], v)


def test_mismatched_weights_raise_load_state_dicts_errors():
    cache = ModelCache(_Ctx(), torch.device("cpu"))
    ref = _ref("mlp", hidden="16")
    good = {k: v.clone() for k, v in cache.get(ref).state_dict().items()}
    missing = dict(list(good.items())[1:])
    with pytest.raises(RuntimeError, match="Missing key"):
        cache.loaded(ref, missing)
    wrong = {**good, next(iter(good)): torch.zeros(3, 3)}
    with pytest.raises(RuntimeError, match="size mismatch"):
        cache.loaded(ref, wrong)


def test_modules_with_their_own_loading_use_load_state_dict():
    bn = build_model("heterofl_conv", DataInfo((1, 12, 12), 4), hidden="4,8")  # BatchNorm overrides loading
    assert _StateSlots.of(bn) is None
    lin = torch.nn.Linear(2, 2)
    lin.register_load_state_dict_pre_hook(lambda *a, **k: None)
    assert _StateSlots.of(lin) is None
    assert _StateSlots.of(torch.nn.Linear(2, 2)) is not None
