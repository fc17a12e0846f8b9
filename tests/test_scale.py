"""Scale: what a run holds per client is arrays, and a round's memory follows the clients sampled.

Structural properties only (sizes of what is stored, Python-heap peaks under tracemalloc), never timings.
"""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.federation import ClientIndex, build_federation
from hetfl.data.partition import partition
from hetfl.engines.simulator import Simulator
from hetfl.fleet import FleetConfig, build_fleet
from hetfl.resolve import load_config
from hetfl.runner import prepare


def _dataset(n: int, classes: int = 10) -> Dataset:
    rng = np.random.default_rng(0)
    y = torch.from_numpy(rng.integers(0, classes, size=n))
    x = torch.zeros(n, 1)
    return Dataset("tiny", Split(x, y), Split(x[:10], y[:10]), DataInfo((1,), classes))


def _reference_split(parts, fraction, seed):
    """The per-client split as hetfl stored it before (a tuple of arrays per side)."""
    rng = np.random.default_rng([seed, 0x7465_7374])
    train, test = [], []
    for idx in parts:
        idx = np.asarray(idx, dtype=np.int64)
        n_test = int(np.floor(fraction * len(idx)))
        if n_test and len(idx) - n_test < 1:
            n_test = len(idx) - 1
        if n_test:
            perm = rng.permutation(idx)
            test.append(np.sort(perm[:n_test]))
            train.append(np.sort(perm[n_test:]))
        else:
            test.append(np.empty(0, dtype=np.int64))
            train.append(idx)
    return train, test


@pytest.mark.parametrize("fraction", [0.0, 0.2, 0.5])
def test_federation_index_arrays_equal_per_client_split(fraction):
    ds = _dataset(600)
    parts = partition({"name": "quantity", "sigma": 1.0, "min_size": 1}, ds.train.y.numpy(), 57, seed=3)
    fed = build_federation(ds, parts, local_test_fraction=fraction, seed=5)
    train, test = _reference_split(parts, fraction, 5)
    assert isinstance(fed.train_idx, ClientIndex) and isinstance(fed.test_idx, ClientIndex)
    assert len(fed.train_idx) == len(fed.test_idx) == fed.num_clients == 57
    for c in range(57):
        assert np.array_equal(fed.train_idx[c], train[c])
        assert np.array_equal(fed.test_idx[c], test[c])
    assert np.array_equal(fed.sizes, [len(t) for t in train])
    clients = np.array([3, 10, 56])
    idx, owner = fed.test_idx.gather(clients)
    assert np.array_equal(idx, np.concatenate([test[c] for c in clients]))
    assert np.array_equal(owner, np.repeat(np.arange(3), [len(test[c]) for c in clients]))


def test_federation_of_100k_clients_is_two_flat_arrays():
    n, k = 300_000, 100_000
    ds = _dataset(n)
    parts = partition({"name": "quantity", "sigma": 0.5, "min_size": 2}, ds.train.y.numpy(), k, seed=0)
    tracemalloc.start()
    try:
        fed = build_federation(ds, parts, local_test_fraction=0.0, seed=0)
        held, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # no Python object per client: the indices live in one flat array with offsets
    assert isinstance(fed.train_idx.flat, np.ndarray) and fed.train_idx.flat.shape == (n,)
    assert fed.train_idx.offsets.shape == (k + 1,)
    assert fed.train_idx.nbytes + fed.test_idx.nbytes <= 8 * (n + 2 * (k + 1))
    # what building keeps is the indices (2.4 MB), offsets (0.8 MB each) and the label histogram
    # (clients x classes, 8 MB); 100 000 separate index arrays would add ~11 MB of array headers alone
    assert held < 16 * 2**20, held
    assert peak < 48 * 2**20, (held, peak)  # the histogram's temporaries, in bounded blocks


def test_fleet_tiers_vectorised_and_device_names_an_array():
    fleet = build_fleet(FleetConfig(source="phones", mix="a-b-c-d-e"), 5000, seed=1)
    assert np.array_equal(fleet.tiers(), [fleet.tier(w) for w in fleet.max_width])
    assert isinstance(fleet.device, np.ndarray) and fleet.device.shape == (5000,)
    widths = fleet.widths(3, 0)
    assert np.array_equal(fleet.tiers_of(widths), [fleet.tier(w) for w in widths])


def _round_heap_peak(clients: int) -> int:
    cfg = load_config(None, (), base={
        "rounds": 2, "seed": 0,
        "data": {"name": "synthetic", "num_samples": 260_000, "num_features": 4, "heterogeneity": 0.0,
                 "num_clients": clients, "local_test_fraction": 0.0,
                 "partition": {"name": "quantity", "sigma": 0.5, "min_size": 2}},
        "model": {"name": "mlp", "hidden": "8"},
        "algorithm": {"name": "heterofl", "clients_per_round": 20},
        "fleet": {"source": "tiers", "mix": "a-b-c"},
        "train": {"steps": 1, "batch_size": 4},
    })
    exp = prepare(cfg)
    engine = Simulator(exp.algorithm, exp.federation, exp.ctx, exp.device)
    state = exp.algorithm.init_state(exp.ctx)
    state, _ = engine.run_round(state, 1)  # first-round imports and caches out of the measurement
    tracemalloc.start()
    try:
        start = tracemalloc.get_traced_memory()[0]
        engine.run_round(state, 2)
        peak = tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()
    return peak


def test_round_memory_follows_sampled_clients_not_fleet():
    small, large = _round_heap_peak(1_000), _round_heap_peak(100_000)
    # a 100x larger fleet may add a few fleet-sized numpy arrays (0.8 MB each), nothing per client
    assert large < small + 2 * 2**20, (small, large)
