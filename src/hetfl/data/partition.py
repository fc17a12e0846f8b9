"""Partitioners: how a training set is split among federated clients.

Each partitioner is a frozen dataclass registered in :data:`PARTITIONERS`; its fields are its parameters
(validated in ``__post_init__``, errors name the field as ``data.partition.<field>``).  Calling one::

    part(labels, num_clients, rng, groups=None) -> list[np.ndarray]

returns one sorted ``int64`` index array per client.  The arrays are disjoint and together hold every
training index (the single exception is ``natural`` with ``max_clients > 0``, which drops whole groups).
All randomness comes from ``rng``, so the same seed gives the same split.  Everything is vectorised
(no Python loop over samples); a 100k-sample, 1000-client Dirichlet split takes milliseconds.

:func:`summarize` turns a split into a :class:`PartitionSummary` (sizes, label histogram, skew
statistics) for logs and the run directory; :func:`partition` is the one-call convenience.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np

from hetfl.errors import ConfigError
from hetfl.registry import Registry

__all__ = [
    "NATURAL_DATASETS",
    "PARTITIONERS",
    "Dirichlet",
    "IID",
    "Natural",
    "PartitionSummary",
    "Partitioner",
    "Quantity",
    "Shards",
    "check_groups",
    "make_partitioner",
    "natural_num_clients",
    "partition",
    "summarize",
    "summarize_index",
]

PARTITIONERS: Registry[type[Partitioner]] = Registry("partitioner")

#: Datasets that ship natural groups; only used to make the "no groups" error helpful.
NATURAL_DATASETS: tuple[str, ...] = ("shakespeare", "synthetic", "synthetic_text")


# ----------------------------------------------------------------------------------------------------------
# validation helpers


def _key(name: str) -> str:
    return f"data.partition.{name}"


def _set(obj: object, name: str, value: object) -> None:
    object.__setattr__(obj, name, value)


def _check_int(obj: object, name: str, *, min_value: int) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ConfigError(f"{_key(name)} must be an integer >= {min_value}, got {value!r}")
    value = int(value)
    if value < min_value:
        raise ConfigError(f"{_key(name)} must be >= {min_value}, got {value}")
    _set(obj, name, value)


def _check_float(obj: object, name: str, *, gt: float | None = None, ge: float | None = None) -> None:
    value = getattr(obj, name)
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise ConfigError(f"{_key(name)} must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{_key(name)} must be finite, got {value}")
    if gt is not None and not value > gt:
        raise ConfigError(f"{_key(name)} must be > {gt:g}, got {value}")
    if ge is not None and not value >= ge:
        raise ConfigError(f"{_key(name)} must be >= {ge:g}, got {value}")
    _set(obj, name, value)


def _check_choice(obj: object, name: str, allowed: tuple[str, ...]) -> None:
    value = getattr(obj, name)
    if not isinstance(value, str) or value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"{_key(name)} must be one of {choices}, got {value!r}")


def _check_num_clients(num_clients: Any, n: int) -> int:
    if isinstance(num_clients, bool) or not isinstance(num_clients, (int, np.integer)):
        raise ConfigError(f"data.num_clients must be an integer >= 1, got {num_clients!r}")
    k = int(num_clients)
    if k < 1:
        raise ConfigError(f"data.num_clients must be >= 1, got {k}")
    if k > n:
        raise ConfigError(f"data.num_clients={k} exceeds the {n} training samples")
    return k


# ----------------------------------------------------------------------------------------------------------
# vectorised building blocks


def _split_by_owner(owner: np.ndarray, k: int) -> list[np.ndarray]:
    """Turn ``owner[i]`` (client of sample i, or -1 for nobody) into sorted per-client index arrays."""
    order = np.argsort(owner, kind="stable")  # stable: indices stay increasing within a client
    dropped = int(np.count_nonzero(owner < 0))
    order = order[dropped:].astype(np.int64, copy=False)
    counts = np.bincount(owner[owner >= 0], minlength=k)
    return [np.ascontiguousarray(a) for a in np.split(order, np.cumsum(counts)[:-1])]


def _apportion(weights: np.ndarray, total: int) -> np.ndarray:
    """Integers proportional to ``weights`` summing exactly to ``total``.

    Largest-remainder rounding; ties go to the lower index, so the result is deterministic.
    """
    w = np.asarray(weights, dtype=np.float64)
    s = w.sum()
    if total == 0 or len(w) == 0:
        return np.zeros(len(w), dtype=np.int64)
    raw = w / s * total if s > 0 else np.full(len(w), total / len(w))
    base = np.floor(raw).astype(np.int64)
    rest = total - int(base.sum())
    if rest > 0:
        base[np.argsort(-(raw - base), kind="stable")[:rest]] += 1
    return base


def _class_sorted_order(labels: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Indices grouped by class (classes ascending, random order within a class) and the class counts."""
    _, inv = np.unique(labels, return_inverse=True)
    inv = inv.ravel()
    perm = rng.permutation(len(labels))
    order = perm[np.argsort(inv[perm], kind="stable")]
    return order, np.bincount(inv)


# ----------------------------------------------------------------------------------------------------------
# partitioners


@dataclass(frozen=True)
class Partitioner:
    """Base class: validates the common inputs, then calls :meth:`_split`."""

    name: ClassVar[str] = ""
    needs_groups: ClassVar[bool] = False

    def __call__(
        self,
        labels: np.ndarray,
        num_clients: int | None,
        rng: np.random.Generator | int,
        groups: np.ndarray | None = None,
    ) -> list[np.ndarray]:
        labels = np.asarray(labels)
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {labels.shape}")
        if groups is not None:
            groups = np.asarray(groups)
            if groups.shape != labels.shape:
                raise ValueError(f"groups has shape {groups.shape} but labels has {labels.shape}")
        if not isinstance(rng, np.random.Generator):
            rng = np.random.default_rng(rng)
        return self._split(labels, num_clients, rng, groups)

    def _split(
        self, labels: np.ndarray, num_clients: Any, rng: np.random.Generator, groups: np.ndarray | None
    ) -> list[np.ndarray]:
        raise NotImplementedError

    def to_dict(self) -> dict[str, Any]:
        """``{"name": ..., <field>: <value>, ...}`` for the run directory."""
        return {"name": self.name, **dataclasses.asdict(self)}


@PARTITIONERS.register("iid")
@dataclass(frozen=True)
class IID(Partitioner):
    """IID: shuffle and split into near-equal parts (sizes differ by at most one)."""

    name: ClassVar[str] = "iid"

    def _split(self, labels, num_clients, rng, groups):
        n = len(labels)
        k = _check_num_clients(num_clients, n)
        owner = np.empty(n, dtype=np.int64)
        # The first n % k clients get one extra sample.
        owner[rng.permutation(n)] = np.repeat(np.arange(k), _apportion(np.ones(k), n))
        return _split_by_owner(owner, k)


@PARTITIONERS.register("dirichlet")
@dataclass(frozen=True)
class Dirichlet(Partitioner):
    """Label skew: per class, client shares ~ Dirichlet(alpha); small alpha = few classes per client."""

    name: ClassVar[str] = "dirichlet"
    alpha: float = 0.5
    min_size: int = 1
    max_tries: int = 100

    def __post_init__(self) -> None:
        _check_float(self, "alpha", gt=0)
        _check_int(self, "min_size", min_value=0)
        _check_int(self, "max_tries", min_value=1)

    def _split(self, labels, num_clients, rng, groups):
        n = len(labels)
        k = _check_num_clients(num_clients, n)
        if k * self.min_size > n:
            raise ConfigError(
                f"data.num_clients={k} × {_key('min_size')}={self.min_size} = {k * self.min_size} "
                f"exceeds the {n} training samples"
            )
        order, class_counts = _class_sorted_order(labels, rng)
        for _ in range(self.max_tries):
            props = rng.dirichlet(np.full(k, self.alpha), size=len(class_counts))  # classes × clients
            # Cut each class's shuffled samples at floor(cumulative share × class size).
            bounds = np.floor(np.cumsum(props, axis=1) * class_counts[:, None]).astype(np.int64)
            bounds = np.minimum(bounds, class_counts[:, None])
            bounds[:, -1] = class_counts
            counts = np.diff(bounds, axis=1, prepend=0)  # classes × clients
            if counts.sum(axis=0).min() >= self.min_size:
                break
        else:
            raise ConfigError(
                f"the 'dirichlet' partitioner could not give each of the {k} clients at least "
                f"{_key('min_size')}={self.min_size} samples in {self.max_tries} draws with "
                f"{_key('alpha')}={self.alpha}; use a larger alpha, fewer data.num_clients, "
                f"a smaller min_size or a larger {_key('max_tries')}"
            )
        owner = np.empty(n, dtype=np.int64)
        owner[order] = np.repeat(np.tile(np.arange(k), len(class_counts)), counts.ravel())
        return _split_by_owner(owner, k)


@PARTITIONERS.register("shards")
@dataclass(frozen=True)
class Shards(Partitioner):
    """FedAvg pathological split: sort by label, cut into shards, give each client shards_per_client.

    The samples are sorted by label (random order within a label) and cut into
    ``num_clients * shards_per_client`` contiguous shards.  When the sample count does not divide,
    the first ``n % num_shards`` shards in label order are one sample longer, so every sample
    belongs to exactly one shard.  A random permutation of the shards deals ``shards_per_client``
    of them to each client.
    """

    name: ClassVar[str] = "shards"
    shards_per_client: int = 2

    def __post_init__(self) -> None:
        _check_int(self, "shards_per_client", min_value=1)

    def _split(self, labels, num_clients, rng, groups):
        n = len(labels)
        k = _check_num_clients(num_clients, n)
        num_shards = k * self.shards_per_client
        if num_shards > n:
            raise ConfigError(
                f"data.num_clients={k} × {_key('shards_per_client')}={self.shards_per_client} = "
                f"{num_shards} shards exceeds the {n} training samples; use fewer clients or shards"
            )
        order, _ = _class_sorted_order(labels, rng)
        shard_sizes = _apportion(np.ones(num_shards), n)  # first n % num_shards shards get +1
        shard_of_pos = np.repeat(np.arange(num_shards), shard_sizes)
        client_of_shard = np.empty(num_shards, dtype=np.int64)
        client_of_shard[rng.permutation(num_shards)] = np.arange(num_shards) // self.shards_per_client
        owner = np.empty(n, dtype=np.int64)
        owner[order] = client_of_shard[shard_of_pos]
        return _split_by_owner(owner, k)


@PARTITIONERS.register("quantity")
@dataclass(frozen=True)
class Quantity(Partitioner):
    """Quantity skew: IID labels, client sizes from a lognormal or power law.

    ``lognormal``: weights ~ lognormal(0, sigma) (sigma = 0 gives equal sizes).  ``powerlaw``: weights
    ~ Pareto with tail index ``exponent`` (density ∝ w^-(exponent+1), w >= 1; smaller = more skew).
    Each client first gets ``min_size`` samples; the rest are shared in proportion to the weights
    (largest-remainder rounding, so sizes sum exactly to the dataset size).
    """

    name: ClassVar[str] = "quantity"
    distribution: str = "lognormal"
    sigma: float = 1.0
    exponent: float = 1.5
    min_size: int = 1

    DISTRIBUTIONS: ClassVar[tuple[str, ...]] = ("lognormal", "powerlaw")

    def __post_init__(self) -> None:
        _check_choice(self, "distribution", self.DISTRIBUTIONS)
        _check_float(self, "sigma", ge=0)
        _check_float(self, "exponent", gt=0)
        _check_int(self, "min_size", min_value=0)

    def _split(self, labels, num_clients, rng, groups):
        n = len(labels)
        k = _check_num_clients(num_clients, n)
        if k * self.min_size > n:
            raise ConfigError(
                f"data.num_clients={k} × {_key('min_size')}={self.min_size} = {k * self.min_size} "
                f"exceeds the {n} training samples"
            )
        if self.distribution == "lognormal":
            logw = rng.normal(0.0, self.sigma, size=k)
            weights = np.exp(logw - logw.max())  # same proportions as lognormal, no overflow
        else:
            weights = rng.pareto(self.exponent, size=k) + 1.0
            weights = weights / weights.max()
        sizes = self.min_size + _apportion(weights, n - k * self.min_size)
        owner = np.empty(n, dtype=np.int64)
        owner[rng.permutation(n)] = np.repeat(np.arange(k), sizes)
        return _split_by_owner(owner, k)


def _no_groups_error(dataset: str | None) -> ConfigError:
    who = dataset if dataset else "this dataset"
    return ConfigError(
        f"the 'natural' partitioner needs a dataset with natural groups ({', '.join(NATURAL_DATASETS)}); "
        f"{who} has none"
    )


def natural_num_clients(
    groups: np.ndarray | None, max_clients: int = 0, *, dataset: str | None = None
) -> int:
    """How many clients ``natural(max_clients)`` makes from ``groups``: one per non-empty group,
    capped at ``max_clients`` when that is > 0."""
    if groups is None:
        raise _no_groups_error(dataset)
    num_groups = len(np.unique(np.asarray(groups)))
    return num_groups if max_clients <= 0 else min(num_groups, int(max_clients))


@PARTITIONERS.register("natural")
@dataclass(frozen=True)
class Natural(Partitioner):
    """Natural split: one client per natural group of the dataset (a Shakespeare role, a writer).

    ``num_clients`` must be ``None``/``<= 0`` (one client per group) or equal to
    :func:`natural_num_clients`.  Clients are ordered by sorted group value.  With ``max_clients > 0``
    and more groups than that, a random (rng) subset of ``max_clients`` groups is kept and the other
    groups' samples belong to no client: the one case where the split does not cover the dataset.
    """

    name: ClassVar[str] = "natural"
    needs_groups: ClassVar[bool] = True
    max_clients: int = 0

    def __post_init__(self) -> None:
        _check_int(self, "max_clients", min_value=0)

    def _split(self, labels, num_clients, rng, groups):
        if groups is None:
            raise _no_groups_error(None)
        _, inv = np.unique(groups, return_inverse=True)
        inv = inv.ravel()
        num_groups = int(inv.max()) + 1 if len(inv) else 0
        k = natural_num_clients(groups, self.max_clients)
        if num_clients is not None and not (
            isinstance(num_clients, (int, np.integer)) and not isinstance(num_clients, bool)
        ):
            raise ConfigError(f"data.num_clients must be an integer, got {num_clients!r}")
        if num_clients is not None and num_clients > 0 and num_clients != k:
            raise ConfigError(
                f"data.num_clients={num_clients} does not match the {num_groups} natural groups "
                f"(kept: {k}); set data.num_clients=0 for one client per group, or "
                f"{_key('max_clients')}={num_clients} to keep a random subset of groups"
            )
        if k == 0:
            raise ConfigError("the 'natural' partitioner found no groups (the training set is empty)")
        if k == num_groups:
            kept = np.arange(num_groups)
        else:
            kept = np.sort(rng.choice(num_groups, size=k, replace=False))
        client_of_group = np.full(num_groups, -1, dtype=np.int64)
        client_of_group[kept] = np.arange(k)
        return _split_by_owner(client_of_group[inv], k)


# ----------------------------------------------------------------------------------------------------------
# construction and convenience


def make_partitioner(spec: str | Mapping[str, Any] | Partitioner, **params: Any) -> Partitioner:
    """Build a partitioner from a name (+ params), a ``{"name": ..., <field>: ...}`` mapping, or pass
    an instance through.  Unknown option names raise :class:`ConfigError` listing the allowed ones."""
    if isinstance(spec, Partitioner):
        if params:
            return dataclasses.replace(spec, **params)
        return spec
    if isinstance(spec, Mapping):
        params = {**{k: v for k, v in spec.items() if k != "name"}, **params}
        if "name" not in spec:
            raise ConfigError(f"data.partition.name is missing; choose one of: {', '.join(PARTITIONERS)}")
        spec = spec["name"]
    if not isinstance(spec, str):
        raise ConfigError(f"data.partition.name must be a string, got {spec!r}")
    cls = PARTITIONERS.get(spec, where="data.partition.name")
    allowed = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(params) - set(allowed))
    if unknown:
        raise ConfigError(
            f"{_key(unknown[0])}: unknown option for the {spec!r} partitioner; "
            f"allowed: {', '.join(allowed) if allowed else '(none)'}"
        )
    return cls(**params)


def check_groups(part: Partitioner, groups: np.ndarray | None, dataset: str | None = None) -> None:
    """Raise the helpful :class:`ConfigError` early when ``part`` needs natural groups and there are none."""
    if part.needs_groups and groups is None:
        raise _no_groups_error(dataset)


def partition(
    name_or_obj: str | Mapping[str, Any] | Partitioner,
    labels: np.ndarray,
    num_clients: int | None,
    seed: int | np.random.Generator,
    groups: np.ndarray | None = None,
    *,
    dataset: str | None = None,
) -> list[np.ndarray]:
    """Split ``labels`` among ``num_clients`` with the named partitioner (default params) or an instance.

    ``dataset`` only names the dataset in error messages.
    """
    part = make_partitioner(name_or_obj)
    check_groups(part, groups, dataset)
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    return part(labels, num_clients, rng, groups)


# ----------------------------------------------------------------------------------------------------------
# summary


def _frozen(a: np.ndarray) -> np.ndarray:
    a = np.array(a, copy=True)
    a.setflags(write=False)
    return a


@dataclass(frozen=True, eq=False)
class PartitionSummary:
    """Client sizes and label histogram of a split, with skew statistics.

    ``mean_tv_distance`` is the mean over non-empty clients of the total-variation distance
    ``0.5 * sum |p_client - p_global|`` between the client's label distribution and the global one
    (0 = IID, close to 1 = each client sees classes that are rare overall).
    ``mean_classes_per_client`` counts classes with at least one sample on the client.
    """

    sizes: np.ndarray = field(repr=False)
    label_hist: np.ndarray = field(repr=False)  # clients × classes
    num_clients: int = field(init=False)
    num_samples: int = field(init=False)
    num_classes: int = field(init=False)
    min_size: int = field(init=False)
    median_size: float = field(init=False)
    max_size: int = field(init=False)
    mean_size: float = field(init=False)
    mean_classes_per_client: float = field(init=False)
    mean_tv_distance: float = field(init=False)

    def __post_init__(self) -> None:
        hist = np.asarray(self.label_hist, dtype=np.int64)
        if hist.ndim != 2:
            raise ValueError(f"label_hist must be clients × classes, got shape {hist.shape}")
        sizes = np.asarray(self.sizes, dtype=np.int64)
        if sizes.shape != (hist.shape[0],):
            raise ValueError(f"sizes has shape {sizes.shape} but label_hist has {hist.shape[0]} rows")
        _set(self, "sizes", _frozen(sizes))
        _set(self, "label_hist", _frozen(hist))
        k, c = hist.shape
        total = int(hist.sum())
        _set(self, "num_clients", k)
        _set(self, "num_samples", int(sizes.sum()))
        _set(self, "num_classes", c)
        _set(self, "min_size", int(sizes.min()) if k else 0)
        _set(self, "median_size", float(np.median(sizes)) if k else 0.0)
        _set(self, "max_size", int(sizes.max()) if k else 0)
        _set(self, "mean_size", float(sizes.mean()) if k else 0.0)
        _set(self, "mean_classes_per_client", float((hist > 0).sum(axis=1).mean()) if k else 0.0)
        row = hist.sum(axis=1)
        nonempty = row > 0
        if total == 0 or not nonempty.any():
            tv = 0.0
        else:
            p_global = hist.sum(axis=0) / total
            # in blocks of clients: the float temporaries stay bounded for 100 000-client fleets
            # (up to 16 384 clients one block: the same arithmetic as a single mean)
            block, tv_sum = 1 << 14, 0.0
            for s in range(0, k, block):
                keep = nonempty[s:s + block]
                p_client = hist[s:s + block][keep] / row[s:s + block][keep, None]
                tv_sum += float((0.5 * np.abs(p_client - p_global).sum(axis=1)).sum())
            tv = tv_sum / int(nonempty.sum())
        _set(self, "mean_tv_distance", tv)

    def to_dict(self) -> dict[str, Any]:
        """JSON-friendly: plain ints/floats and lists."""
        return {
            "num_clients": self.num_clients,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "min_size": self.min_size,
            "median_size": self.median_size,
            "max_size": self.max_size,
            "mean_size": self.mean_size,
            "mean_classes_per_client": self.mean_classes_per_client,
            "mean_tv_distance": self.mean_tv_distance,
            "sizes": self.sizes.tolist(),
            "label_hist": self.label_hist.tolist(),
        }

    def describe(self) -> str:
        """A few human-readable lines."""
        return "\n".join(
            [
                f"{self.num_clients} clients, {self.num_samples} samples, {self.num_classes} classes",
                f"client sizes: min {self.min_size}, median {self.median_size:g}, "
                f"max {self.max_size}, mean {self.mean_size:.1f}",
                f"classes per client: mean {self.mean_classes_per_client:.2f} of {self.num_classes}",
                f"label skew: mean TV distance to the global label distribution {self.mean_tv_distance:.3f}",
            ]
        )


def summarize(
    parts: list[np.ndarray], labels: np.ndarray, num_classes: int | None = None
) -> PartitionSummary:
    """Build a :class:`PartitionSummary`; ``labels`` are ints in ``[0, num_classes)``
    (``num_classes`` defaults to ``max(labels) + 1``)."""
    sizes = np.array([len(p) for p in parts], dtype=np.int64)
    idx = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if len(parts) else np.empty(0, np.int64)
    return summarize_index(idx, sizes, labels, num_classes)


def summarize_index(
    flat: np.ndarray, sizes: np.ndarray, labels: np.ndarray, num_classes: int | None = None
) -> PartitionSummary:
    """:func:`summarize` for a split given as the clients' concatenated indices and their sizes."""
    labels = np.asarray(labels).astype(np.int64, copy=False)
    if num_classes is None:
        num_classes = int(labels.max()) + 1 if len(labels) else 0
    sizes = np.asarray(sizes, dtype=np.int64)
    k = len(sizes)
    if k == 0:
        return PartitionSummary(sizes=sizes, label_hist=np.zeros((0, num_classes), dtype=np.int64))
    owner = np.repeat(np.arange(k), sizes)
    hist = np.bincount(owner * num_classes + labels[np.asarray(flat, dtype=np.int64)], minlength=k * num_classes)
    return PartitionSummary(sizes=sizes, label_hist=hist.reshape(k, num_classes))
