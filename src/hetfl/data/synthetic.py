"""Generated datasets with natural groups and a heterogeneity knob: no files, fast tests."""

from __future__ import annotations

import numbers

import numpy as np
import torch

from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.checks import check_fraction, check_int, split_counts
from hetfl.data.registry import DATASETS
from hetfl.errors import ConfigError

__all__ = ["synthetic", "synthetic_text"]


def _largest_remainder(weights: np.ndarray, total: int, minimum: int) -> np.ndarray:
    """Integer sizes proportional to ``weights`` that sum to ``total``, each at least ``minimum``."""
    k = len(weights)
    spare = total - minimum * k
    raw = weights / weights.sum() * spare
    sizes = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - sizes), kind="stable")
    sizes[order[: spare - int(sizes.sum())]] += 1
    return sizes + minimum


@DATASETS.register("synthetic")
def synthetic(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_samples: int = 2000,
    num_features: int = 20,
    num_classes: int = 10,
    num_groups: int = 10,
    heterogeneity: float = 0.5,
    test_fraction: float = 0.2,
) -> Dataset:
    """Gaussian classes split over natural groups whose label mix and features drift with heterogeneity.

    With ``h = heterogeneity`` (0..1), group ``g`` draws

    * its size from weights ``exp(h * z_g)``, ``z_g ~ N(0, 1)`` (equal sizes at h = 0);
    * its labels from ``(1 - h) * uniform + h * Dirichlet(0.3)`` (label skew);
    * a sample of class ``c`` as ``mu_c + h * (delta_gc + s_g) + noise`` where ``mu_c`` are shared class
      means, ``delta_gc`` a per-group shift of each class mean (concept shift), ``s_g`` a per-group
      offset of all features (covariate shift) and ``noise ~ N(0, I)``.

    At h = 0 all groups sample one distribution (IID); at h = 1 every group has its own class means,
    label mix and size.  Per group, a ``test_fraction`` of its samples goes to the (global) test set.
    """
    num_samples = check_int("num_samples", num_samples, 2)
    num_features = check_int("num_features", num_features, 1)
    num_classes = check_int("num_classes", num_classes, 2)
    num_groups = check_int("num_groups", num_groups, 1)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if isinstance(heterogeneity, bool) or not isinstance(heterogeneity, numbers.Real) or not 0 <= heterogeneity <= 1:
        raise ConfigError(f"data.heterogeneity must be in [0, 1], got {heterogeneity!r}")
    h = float(heterogeneity)
    if num_samples < 2 * num_groups:
        raise ConfigError(
            f"data.num_samples must be at least 2 per group ({2 * num_groups} for {num_groups} groups), "
            f"got {num_samples}"
        )

    rng = np.random.default_rng(seed)
    d, c, k = num_features, num_classes, num_groups
    scale = 3.0 / np.sqrt(d)  # class means ~3 noise sd apart whatever the dimension
    class_means = rng.normal(0.0, scale, size=(c, d))
    class_shift = rng.normal(0.0, 1.5 * scale, size=(k, c, d))
    group_offset = rng.normal(0.0, 1.0, size=(k, d)) * scale * 2.0
    label_skew = rng.dirichlet(np.full(c, 0.3), size=k)
    sizes = _largest_remainder(np.exp(h * rng.normal(size=k)), num_samples, minimum=2)

    xs, ys, gs = [], [], []
    for g in range(k):
        p = (1.0 - h) / c + h * label_skew[g]
        y = rng.choice(c, size=sizes[g], p=p / p.sum())
        x = class_means[y] + h * (class_shift[g, y] + group_offset[g]) + rng.normal(size=(sizes[g], d))
        xs.append(x)
        ys.append(y)
        gs.append(np.full(sizes[g], g))
    x_all = np.concatenate(xs).astype(np.float32)
    y_all = np.concatenate(ys).astype(np.int64)
    g_all = np.concatenate(gs).astype(np.int64)

    test_mask = np.zeros(len(y_all), dtype=bool)
    for g in range(k):
        idx = np.flatnonzero(g_all == g)
        test_mask[rng.permutation(idx)[: split_counts(len(idx), test_fraction)]] = True
    tr, te = ~test_mask, test_mask
    return Dataset(
        name="synthetic",
        train=Split(torch.from_numpy(x_all[tr]), torch.from_numpy(y_all[tr])),
        test=Split(torch.from_numpy(x_all[te]), torch.from_numpy(y_all[te])),
        info=DataInfo(input_shape=(d,), num_classes=c),
        groups=g_all[tr],
        group_names=tuple(f"group{g}" for g in range(k)),
        notes={
            "source": "generated",
            "heterogeneity": h,
            "sizes": {"train": int(tr.sum()), "test": int(te.sum())},
            "group_sizes": np.bincount(g_all[tr], minlength=k).tolist(),
        },
    )


@DATASETS.register("synthetic_text")
def synthetic_text(
    *,
    data_dir: str | None = None,
    seed: int = 0,
    num_groups: int = 8,
    samples_per_group: int = 64,
    seq_len: int = 16,
    vocab_size: int = 24,
    heterogeneity: float = 0.5,
    test_fraction: float = 0.2,
) -> Dataset:
    """Token sequences from per-group bigram Markov chains (next-token task, natural groups): fast text tests.

    Group ``g`` draws text from a transition matrix ``(1 - h) * T + h * T_g`` where ``T`` is shared and
    ``T_g`` its own (both sparse-ish Dirichlet rows); a sample is ``seq_len`` tokens and the label is the
    next token, as in the Shakespeare task.
    """
    num_groups = check_int("num_groups", num_groups, 1)
    samples_per_group = check_int("samples_per_group", samples_per_group, 2)
    seq_len = check_int("seq_len", seq_len, 2)
    vocab_size = check_int("vocab_size", vocab_size, 2)
    test_fraction = check_fraction("test_fraction", test_fraction)
    if isinstance(heterogeneity, bool) or not 0 <= heterogeneity <= 1:
        raise ConfigError(f"data.heterogeneity must be in [0, 1], got {heterogeneity!r}")
    rng = np.random.default_rng(seed)
    shared = rng.dirichlet(np.full(vocab_size, 0.2), size=vocab_size)
    xs, ys, gs, test = [], [], [], []
    for g in range(num_groups):
        trans = (1 - heterogeneity) * shared + heterogeneity * rng.dirichlet(np.full(vocab_size, 0.2), size=vocab_size)
        cum = np.cumsum(trans, axis=1)
        n = samples_per_group + seq_len
        tokens = np.empty(n, dtype=np.int64)
        tokens[0] = rng.integers(vocab_size)
        u = rng.random(n)
        for i in range(1, n):
            tokens[i] = min(int(np.searchsorted(cum[tokens[i - 1]], u[i])), vocab_size - 1)
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:-1], seq_len)[:samples_per_group]
        xs.append(windows)
        ys.append(tokens[seq_len:seq_len + samples_per_group])
        gs.append(np.full(samples_per_group, g))
        n_test = split_counts(samples_per_group, test_fraction)
        test.append(np.arange(samples_per_group) >= samples_per_group - n_test)  # the last windows, LEAF-style
    x, y, grp, te = (np.concatenate(a) for a in (xs, ys, gs, test))
    tr = ~te
    return Dataset(
        name="synthetic_text",
        train=Split(torch.from_numpy(np.ascontiguousarray(x[tr])), torch.from_numpy(y[tr])),
        test=Split(torch.from_numpy(np.ascontiguousarray(x[te])), torch.from_numpy(y[te])),
        info=DataInfo(input_shape=(seq_len,), num_classes=vocab_size, vocab_size=vocab_size),
        groups=grp[tr],
        group_names=tuple(f"group{g}" for g in range(num_groups)),
        notes={"source": "generated", "heterogeneity": float(heterogeneity)},
    )

