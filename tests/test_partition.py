"""Partitioners: disjoint, covering, seeded; each one's skew; user errors name the field."""

from __future__ import annotations

import dataclasses
import json
import time

import numpy as np
import pytest

from hetfl.data.partition import (
    PARTITIONERS,
    Dirichlet,
    Natural,
    PartitionSummary,
    Quantity,
    Shards,
    make_partitioner,
    natural_num_clients,
    partition,
    summarize,
)
from hetfl.errors import ConfigError
from hetfl.registry import describe

N, C, K = 3000, 10, 20


@pytest.fixture(scope="module")
def labels() -> np.ndarray:
    return np.random.default_rng(123).integers(0, C, size=N)


@pytest.fixture(scope="module")
def groups() -> np.ndarray:
    # 25 groups of uneven size, shuffled over the samples
    g = np.repeat(np.arange(25), np.linspace(40, 200, 25).astype(int))
    g = np.concatenate([g, np.full(N - len(g), 7)])
    return np.random.default_rng(7).permutation(g)


CASES = [
    ("iid", {}),
    ("dirichlet", {"alpha": 0.5}),
    ("dirichlet", {"alpha": 0.05}),
    ("shards", {"shards_per_client": 2}),
    ("shards", {"shards_per_client": 7}),  # 140 shards: 3000 does not divide
    ("quantity", {"distribution": "lognormal"}),
    ("quantity", {"distribution": "powerlaw"}),
    ("natural", {}),
]


def _run(name, params, labels, groups, seed):
    part = make_partitioner(name, **params)
    k = 0 if name == "natural" else K
    return part(labels, k, np.random.default_rng(seed), groups=groups if name == "natural" else None)


def _assert_valid(parts, n):
    for p in parts:
        assert p.dtype == np.int64
        assert np.all(np.diff(p) > 0), "sorted and without duplicates"
    allidx = np.concatenate(parts)
    assert len(allidx) == n, "disjoint and covering"
    assert np.array_equal(np.sort(allidx), np.arange(n))


@pytest.mark.parametrize(("name", "params"), CASES)
def test_disjoint_covering_deterministic(name, params, labels, groups):
    a = _run(name, params, labels, groups, seed=1)
    _assert_valid(a, N)
    assert len(a) == (25 if name == "natural" else K)
    b = _run(name, params, labels, groups, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    if name != "natural":  # natural without max_clients uses no randomness
        c = _run(name, params, labels, groups, seed=2)
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_registry_and_docstrings():
    assert PARTITIONERS.names() == ["dirichlet", "iid", "natural", "quantity", "shards"]
    for name, cls in PARTITIONERS.items():
        assert dataclasses.is_dataclass(cls) and cls.__dataclass_params__.frozen
        assert describe(cls), name
        assert cls().name == name
        with pytest.raises(dataclasses.FrozenInstanceError):
            cls().foo = 1


def test_iid_sizes_near_equal(labels):
    parts = partition("iid", labels, 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    s = summarize(parts, labels, C)
    assert s.mean_tv_distance < 0.15 and s.mean_classes_per_client == C


def test_dirichlet_alpha_controls_skew(labels):
    skewed = summarize(partition(Dirichlet(alpha=0.05), labels, K, seed=0), labels, C)
    flat = summarize(partition(Dirichlet(alpha=100.0), labels, K, seed=0), labels, C)
    assert skewed.mean_tv_distance > 0.6
    assert skewed.mean_classes_per_client < 5
    assert flat.mean_tv_distance < 0.15
    assert flat.mean_classes_per_client == C
    assert skewed.min_size >= 1


def test_dirichlet_min_size_respected(labels):
    parts = partition(Dirichlet(alpha=0.3, min_size=50, max_tries=1000), labels, 10, seed=3)
    assert min(len(p) for p in parts) >= 50


def test_dirichlet_gives_up_with_advice():
    y = np.random.default_rng(0).integers(0, 10, size=2000)
    with pytest.raises(ConfigError, match="use a larger alpha, fewer data.num_clients"):
        partition(Dirichlet(alpha=0.01, min_size=1, max_tries=3), y, 1000, seed=0)


def test_dirichlet_fast_100k_by_1000():
    y = np.random.default_rng(0).integers(0, 10, size=100_000)
    t0 = time.perf_counter()
    parts = partition("dirichlet", y, 1000, seed=0)
    assert time.perf_counter() - t0 < 2.0
    assert len(parts) == 1000 and sum(len(p) for p in parts) == 100_000


def test_shards_two_labels_per_client():
    # MNIST-like: sorted labels, 10 classes × 600, 100 clients × 2 shards of 30
    y = np.repeat(np.arange(10), 600)
    parts = partition(Shards(shards_per_client=2), y, 100, seed=0)
    _assert_valid(parts, len(y))
    assert all(len(p) == 60 for p in parts)
    nlab = np.array([len(np.unique(y[p])) for p in parts])
    assert nlab.max() <= 2
    assert np.mean(nlab == 2) > 0.8


def test_shards_remainder_goes_to_first_shards():
    y = np.repeat(np.arange(3), [34, 33, 33])  # 100 samples, 6 shards: 4 of 17, 2 of 16
    parts = partition(Shards(shards_per_client=2), y, 3, seed=0)
    _assert_valid(parts, 100)
    assert sorted(len(p) for p in parts) in ([32, 34, 34], [33, 33, 34])


def test_quantity_sizes_skewed(labels):
    for dist in ("lognormal", "powerlaw"):
        parts = partition(Quantity(distribution=dist, min_size=5), labels, K, seed=0)
        sizes = np.array([len(p) for p in parts])
        assert sizes.min() >= 5 and sizes.sum() == N
        assert sizes.max() / sizes.min() > 5, dist
        # labels stay roughly IID on the bigger clients
        s = summarize([p for p in parts if len(p) >= 300], labels, C)
        assert s.mean_tv_distance < 0.2


def test_quantity_sigma_zero_is_equal(labels):
    sizes = [len(p) for p in partition(Quantity(sigma=0.0), labels, 7, seed=0)]
    assert max(sizes) - min(sizes) <= 1


def test_natural_follows_groups(labels, groups):
    parts = partition("natural", labels, None, seed=0, groups=groups)
    uniq = np.unique(groups)
    assert len(parts) == len(uniq) == natural_num_clients(groups, 0)
    for g, p in zip(uniq, parts, strict=True):
        assert np.array_equal(p, np.flatnonzero(groups == g))
    same = partition("natural", labels, 25, seed=0, groups=groups)  # explicit matching count is fine
    assert all(np.array_equal(a, b) for a, b in zip(parts, same, strict=True))


def test_natural_max_clients_keeps_subset(labels, groups):
    part = Natural(max_clients=5)
    assert natural_num_clients(groups, 5) == 5 and natural_num_clients(groups, 100) == 25
    a = part(labels, 5, np.random.default_rng(0), groups)
    b = part(labels, 0, np.random.default_rng(0), groups)
    assert len(a) == 5 and all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    for p in a:
        assert len(np.unique(groups[p])) == 1
        assert np.array_equal(p, np.flatnonzero(groups == groups[p[0]]))  # whole groups kept
    c = part(labels, 5, np.random.default_rng(1), groups)
    kept = lambda parts: {int(groups[p[0]]) for p in parts}  # noqa: E731
    assert kept(a) != kept(c)


def test_natural_string_groups():
    g = np.array(["romeo", "juliet", "romeo", "nurse", "juliet"])
    parts = partition("natural", np.zeros(5, dtype=int), 0, seed=0, groups=g)
    assert [p.tolist() for p in parts] == [[1, 4], [3], [0, 2]]


def test_summary_fields_and_json(labels):
    parts = partition("dirichlet", labels, K, seed=0)
    s = summarize(parts, labels, C)
    assert isinstance(s, PartitionSummary)
    assert s.label_hist.shape == (K, C) and s.label_hist.sum() == N
    assert np.array_equal(s.sizes, s.label_hist.sum(axis=1))
    assert s.min_size <= s.median_size <= s.max_size
    d = json.loads(json.dumps(s.to_dict()))
    assert d["num_clients"] == K and d["num_samples"] == N and len(d["label_hist"]) == K
    assert d["sizes"] == s.sizes.tolist()
    text = s.describe()
    assert f"{K} clients" in text and "TV distance" in text
    assert not s.sizes.flags.writeable


def test_to_dict_of_partitioner():
    assert Dirichlet(alpha=2).to_dict() == {
        "name": "dirichlet",
        "alpha": 2.0,
        "min_size": 1,
        "max_tries": 100,
    }


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda: Dirichlet(alpha=-1.0), "data.partition.alpha must be > 0, got -1.0"),
        (lambda: Dirichlet(alpha=0), "data.partition.alpha must be > 0, got 0.0"),
        (lambda: Dirichlet(max_tries=0), "data.partition.max_tries must be >= 1, got 0"),
        (lambda: Dirichlet(min_size=1.5), "data.partition.min_size must be an integer >= 0, got 1.5"),
        (lambda: Shards(shards_per_client=0), "data.partition.shards_per_client must be >= 1, got 0"),
        (
            lambda: Quantity(distribution="zipf"),
            "data.partition.distribution must be one of 'lognormal', 'powerlaw', got 'zipf'",
        ),
        (lambda: Quantity(sigma=-0.5), "data.partition.sigma must be >= 0, got -0.5"),
        (lambda: Natural(max_clients=-2), "data.partition.max_clients must be >= 0, got -2"),
        (lambda: make_partitioner("dirichlet", alpa=1.0), "data.partition.alpa: unknown option"),
        (lambda: make_partitioner("zipf"), "unknown partitioner 'zipf'; choose one of: dirichlet, iid"),
    ],
)
def test_bad_parameters(make, message):
    with pytest.raises(ConfigError) as exc:
        make()
    assert message in str(exc.value)


def test_impossible_requests():
    y = np.zeros(300, dtype=int)
    for name in ("iid", "dirichlet", "shards", "quantity"):
        with pytest.raises(ConfigError, match=r"data.num_clients=500 exceeds the 300 training samples"):
            partition(name, y, 500, seed=0)
    with pytest.raises(ConfigError, match=r"data.num_clients must be >= 1, got 0"):
        partition("iid", y, 0, seed=0)
    with pytest.raises(ConfigError, match=r"= 400 shards exceeds the 300 training samples"):
        partition(Shards(shards_per_client=2), y, 200, seed=0)
    with pytest.raises(ConfigError, match=r"data.partition.min_size=10 = 1000 exceeds the 300"):
        partition(Dirichlet(min_size=10), y, 100, seed=0)


def test_natural_errors(groups):
    y = np.zeros(N, dtype=int)
    msg = (
        "the 'natural' partitioner needs a dataset with natural groups (shakespeare, synthetic, synthetic_text); "
        "digits has none"
    )
    with pytest.raises(ConfigError) as exc:
        partition("natural", y, 0, seed=0, dataset="digits")
    assert str(exc.value) == msg
    with pytest.raises(ConfigError, match="this dataset has none"):
        Natural()(y, 0, np.random.default_rng(0))
    with pytest.raises(ConfigError, match="digits has none"):
        natural_num_clients(None, dataset="digits")
    with pytest.raises(ConfigError, match=r"data.num_clients=10 does not match the 25 natural groups"):
        partition("natural", y, 10, seed=0, groups=groups)
