"""Packed weights (hetfl.packed) and the packed fast path of FedAvg's average: same numbers, bit for bit."""

from __future__ import annotations

import pytest
import torch

from hetfl import packed
from hetfl.aggregation import reducers
from hetfl.algorithms.base import ClientResult
from hetfl.algorithms.fedavg import average_weights
from hetfl.engines.shm import create_shared, layout_of

SHAPES = {"a.weight": (7, 13), "a.bias": (7,), "b.weight": (3, 7), "b.bias": (3,)}


def _weights(seed: int, dtype=torch.float32) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: (torch.randn(s, generator=gen) * 10 ** torch.randint(-3, 4, (), generator=gen)).to(dtype)
            for k, s in SHAPES.items()}


def _pack(weights: dict[str, torch.Tensor], gap: int = 5) -> dict[str, torch.Tensor]:
    """The same values, as views of one buffer with ``gap`` garbage elements between tensors."""
    total = sum(v.numel() + gap for v in weights.values())
    flat = torch.full((total,), float("nan"), dtype=next(iter(weights.values())).dtype)
    out, pos = {}, gap
    for k, v in weights.items():
        out[k] = flat[pos:pos + v.numel()].view(v.shape)
        out[k].copy_(v)
        pos += v.numel() + gap
    return out


def test_span_of_packed_and_unpacked_weights():
    w = _weights(0)
    assert packed.span(w) is None  # separate tensors
    p = _pack(w)
    flat, offsets = packed.span(p)
    assert flat.numel() == sum(v.numel() for v in w.values()) + 3 * 5  # the gaps between, not around
    for k, v in packed.views(flat, offsets).items():
        assert torch.equal(v, w[k]) and v.data_ptr() == p[k].data_ptr()
    assert packed.span({"x": p["a.weight"], "y": p["a.weight"].t()}) is None  # not contiguous
    assert packed.span({"x": p["a.bias"], "y": p["a.bias"].double()}) is None  # dtypes differ
    assert packed.span(_pack(w, gap=2 * packed.MAX_GAP)) is None  # too far apart
    assert packed.span({}) is None


def test_clone_of_packed_weights_is_one_packed_copy():
    _, inp, out = create_shared(layout_of(_weights(0)))  # the worker pool's shared buffers (aligned)
    for k, v in _weights(1).items():
        out[k].copy_(v)
    copy = packed.clone(out)
    assert packed.span(copy) is not None
    for k in out:
        assert torch.equal(copy[k], out[k]) and copy[k].data_ptr() != out[k].data_ptr()
    out["a.bias"].fill_(0.0)  # the copy does not follow the buffer
    assert not torch.equal(copy["a.bias"], out["a.bias"])
    plain = packed.clone(_weights(2))
    assert torch.equal(plain["a.weight"], _weights(2)["a.weight"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block", [1, 3, 8])
def test_packed_average_equals_unpacked_bit_for_bit(monkeypatch, dtype, block):
    monkeypatch.setattr(reducers, "BLOCK_RESULTS", block)
    monkeypatch.setattr(reducers, "BLOCK_ELEMENTS", 16)  # several blocks, the last one partial
    sizes = [3, 600, 1, 17, 250, 9, 1000, 44, 5, 77, 2]
    plain = [ClientResult(i, n, _weights(i, dtype)) for i, n in enumerate(sizes)]
    expected, count, samples = average_weights(plain)
    for weighted in (True, False):
        want, _, _ = average_weights(plain, weighted=weighted)
        # all packed; packed and unpacked mixed (in both orders of which comes first)
        for mask in ([True] * len(sizes), [i % 3 != 1 for i in range(len(sizes))],
                     [i % 2 == 1 for i in range(len(sizes))]):
            results = [ClientResult(r.client_id, r.num_samples, _pack(r.weights) if m else r.weights)
                       for r, m in zip(plain, mask)]
            got, c, s = average_weights(results, weighted=weighted)
            assert (c, s) == (count, samples)
            for k in want:
                assert got[k].dtype == dtype and torch.equal(got[k], want[k]), (weighted, mask, k)


def test_packed_average_with_a_different_layout_midway():
    a = [ClientResult(i, 10 + i, _pack(_weights(i))) for i in range(4)]
    b = [ClientResult(i, 20 + i, _pack(_weights(10 + i), gap=2)) for i in range(3)]  # other offsets
    want, _, _ = average_weights([ClientResult(r.client_id, r.num_samples, {k: v.clone() for k, v in
                                                                           r.weights.items()}) for r in a + b])
    got, _, _ = average_weights(a + b)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_a_clone_remembers_its_span_and_forgets_it_when_changed(tmp_path):
    p = packed.clone(_pack(_weights(0)))
    known = packed.span(p)
    fresh = packed.span(dict(p))  # computed from the tensors' storage
    assert known[1] == fresh[1] and known[0].data_ptr() == fresh[0].data_ptr() and known[0].numel() == fresh[0].numel()
    torch.save(p, tmp_path / "w.pt")
    back = torch.load(tmp_path / "w.pt", weights_only=True)
    assert all(torch.equal(back[k], p[k]) for k in p)
    p["a.bias"] = torch.zeros(7)  # no longer packed: a separate tensor
    assert packed.span(p) is None
    q = packed.clone(_pack(_weights(1)))
    q["a.weight"] = q.pop("a.weight")  # the same tensors in another order: another layout
    assert packed.span(q)[1] == packed.span(dict(q))[1]


def test_validation_of_packed_results_checks_the_tensors_not_the_gaps():
    from hetfl.algorithms.base import ClientTask
    from hetfl.config import TrainConfig
    from hetfl.models import ModelRef
    from hetfl.reliability.validate import validate_result

    task = ClientTask(0, ModelRef("mlp"), _weights(0), TrainConfig(), 0)
    gaps_nan = _pack(_weights(1))  # NaN between the tensors only: valid
    assert packed.span(gaps_nan) is not None
    assert validate_result(task, ClientResult(0, 5, gaps_nan)) is None
    clean = packed.clone(_pack(_weights(1)))
    clean["b.bias"][1] = float("inf")
    assert validate_result(task, ClientResult(0, 5, clean)) == "b.bias has 1 non-finite value(s) (NaN/Inf) of 3"
