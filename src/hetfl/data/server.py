"""Data that lives on the server, for algorithms that need some (FedDF's transfer set and validation split).

An algorithm declares what it needs by returning a :class:`ServerDataSpec` from
:meth:`~hetfl.algorithms.base.Algorithm.server_data_spec`; :func:`hetfl.runner.prepare` then calls
:func:`draw_server_data` *before* the training split is partitioned and hands the result to the algorithm as
``ctx.server_data``.  The server never reads a client's data: everything here is drawn from

* ``"heldout"``: a seeded random slice of the training split, removed from the clients' pool, so no client
  sample is also a server sample;
* ``"noise"``: inputs drawn uniformly at random (float inputs: uniform between the training inputs' global
  minimum and maximum, i.e. the data format's range; token inputs: uniform token ids);
* another registered dataset (its train and test splits pooled): used as is when its input shape matches,
  resized (bilinear, antialiased) when both are images with the same number of channels (e.g. ``digits``
  8x8 as a transfer set for ``mnist`` 28x28); the run's own dataset name is refused (use ``"heldout"``).

The small *labeled* validation split (``val_size`` samples, used for early stopping) is always a held-out
slice of the training split, as in FedDF's published recipe (10% of the training set there).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from hetfl.data.base import Dataset, Split
from hetfl.data.datasets import DATASETS, load_dataset
from hetfl.errors import ConfigError

BUILTIN_SOURCES = ("heldout", "noise")


@dataclass(frozen=True)
class ServerDataSpec:
    """What server data an algorithm needs; ``where`` names the config fields in error messages."""

    source: str = "heldout"
    size: int = 5000  # unlabeled inputs (0: none, only the validation split)
    val_size: int = 500  # labeled validation samples, held out of the training split
    where: str = "algorithm.server_data"  # the config field named in error messages

    def __post_init__(self) -> None:
        if not self.source:
            raise ConfigError(f"{self.where} must name a source: 'heldout', 'noise' or a dataset name")
        if self.size < 0:
            raise ConfigError(f"{self.where}_size must be >= 0 (0: only the validation split), got {self.size}")
        if self.val_size < 0:
            raise ConfigError(f"{self.where.replace('server_data', 'server_val_size')} must be >= 0, "
                              f"got {self.val_size}")


@dataclass(frozen=True)
class ServerData:
    """Unlabeled server inputs ``x``, an optional labeled validation split, and where they came from."""

    x: torch.Tensor
    val: Split | None
    source: str

    def to(self, device: torch.device | str) -> ServerData:
        return ServerData(self.x.to(device), None if self.val is None else self.val.to(device), self.source)

    def describe(self) -> dict[str, object]:
        return {"source": self.source, "size": len(self.x), "val_size": 0 if self.val is None else len(self.val)}


def _resize_images(x: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    return F.interpolate(x.float(), size=tuple(shape[1:]), mode="bilinear", align_corners=False, antialias=True)


def _other_dataset(dataset: Dataset, spec: ServerDataSpec, seed: int, data_dir: str | None,
                   rng: np.random.Generator) -> torch.Tensor:
    if spec.source == dataset.name:
        raise ConfigError(f"{spec.where}={spec.source!r} is the run's own dataset; use 'heldout' to take a "
                          f"held-out slice of it (removed from the clients' pool)")
    if spec.source not in DATASETS:
        raise ConfigError(f"{spec.where} must be 'heldout', 'noise' or a registered dataset "
                          f"({', '.join(DATASETS.names())}), got {spec.source!r}")
    other = load_dataset(spec.source, data_dir=data_dir, seed=seed)
    want, have = tuple(dataset.info.input_shape), tuple(other.info.input_shape)
    if (dataset.info.vocab_size is None) != (other.info.vocab_size is None):
        raise ConfigError(f"{spec.where}={spec.source!r}: its inputs are "
                          f"{'tokens' if other.info.vocab_size else 'floats'}, the run's are "
                          f"{'tokens' if dataset.info.vocab_size else 'floats'}")
    pool = torch.cat([other.train.x, other.test.x])
    if have != want:
        if len(want) == 3 and len(have) == 3 and want[0] == have[0] and dataset.info.vocab_size is None:
            pool = _resize_images(pool, want)
        else:
            raise ConfigError(f"{spec.where}={spec.source!r} has inputs shaped {have}, the run's dataset "
                              f"{dataset.name!r} {want}; only images with the same channels are resized")
    if spec.size > len(pool):
        raise ConfigError(f"{spec.where}_size={spec.size} exceeds the {len(pool)} samples of dataset "
                          f"{spec.source!r}")
    return pool[torch.as_tensor(np.sort(rng.permutation(len(pool))[:spec.size]))].contiguous()


def _noise(dataset: Dataset, size: int, rng: np.random.Generator) -> torch.Tensor:
    shape = (size, *dataset.info.input_shape)
    gen = torch.Generator().manual_seed(int(rng.integers(2**62)))
    if dataset.info.vocab_size is not None:
        return torch.randint(0, dataset.info.vocab_size, shape, generator=gen)
    lo, hi = float(dataset.train.x.min()), float(dataset.train.x.max())
    return lo + (hi - lo) * torch.rand(shape, generator=gen)


def draw_server_data(dataset: Dataset, spec: ServerDataSpec | None, seed: int,
                     data_dir: str | None = None) -> tuple[Dataset, ServerData | None]:
    """The dataset with the server's held-out samples removed from ``train``, and the server's data.

    Without a spec the dataset is returned unchanged.  Deterministic in ``seed``.
    """
    if spec is None:
        return dataset, None
    rng = np.random.default_rng([seed, 0x7365_7276])
    n = len(dataset.train)
    take_x = spec.size if spec.source == "heldout" else 0
    held = take_x + spec.val_size
    if held >= n:
        raise ConfigError(f"{spec.where}_size + server_val_size = {held} leave no training samples for the clients "
                          f"(dataset {dataset.name!r} has {n}); lower them")
    perm = rng.permutation(n)
    val_idx, x_idx, keep = perm[:spec.val_size], perm[spec.val_size:held], np.sort(perm[held:])
    val = dataset.train.subset(np.sort(val_idx)) if spec.val_size else None
    if spec.source == "heldout":
        x = dataset.train.x[torch.as_tensor(np.sort(x_idx))]
    elif spec.source == "noise":
        x = _noise(dataset, spec.size, rng)
    else:
        x = _other_dataset(dataset, spec, seed, data_dir, rng)
    if held:
        groups = None if dataset.groups is None else dataset.groups[keep]
        dataset = dataclasses.replace(dataset, train=dataset.train.subset(keep), groups=groups)
    return dataset, ServerData(x, val, spec.source)


def hold_out_validation(dataset: Dataset, fraction: float, seed: int) -> Dataset:
    """The dataset with ``fraction`` of its training samples moved to ``val`` (``data.validation_fraction``): a
    seeded draw made before partitioning, so no client trains on them.  ``fraction = 0``: unchanged."""
    if fraction <= 0:
        return dataset
    if dataset.val is not None:
        raise ConfigError(f"data.validation_fraction = {fraction:g}: dataset {dataset.name!r} already has its own "
                          f"validation split (e.g. mnist's train_split = \"train\"), which the server scores; set "
                          f"data.validation_fraction = 0")
    n = len(dataset.train)
    k = int(round(fraction * n))
    if not 1 <= k < n:
        raise ConfigError(f"data.validation_fraction = {fraction:g} of the {n} training samples of {dataset.name!r} "
                          f"holds out {k}: it must leave at least one sample on each side")
    perm = np.random.default_rng([seed, 0x76616C]).permutation(n)
    val_idx, keep = np.sort(perm[:k]), np.sort(perm[k:])
    groups = None if dataset.groups is None else dataset.groups[keep]
    return dataclasses.replace(dataset, train=dataset.train.subset(keep), val=dataset.train.subset(val_idx),
                               groups=groups)
