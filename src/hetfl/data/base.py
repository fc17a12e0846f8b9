"""What a dataset is inside hetfl: in-memory tensors plus the facts models and partitioners need."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np
import torch


@dataclass(frozen=True)
class Split:
    """Inputs and integer labels of one split, as tensors on the CPU.

    ``x`` is float32 for images/features (``(n, *input_shape)``) and int64 token ids for text
    (``(n, seq_len)``); ``y`` is int64 ``(n,)`` (the class, or the next character).
    """

    x: torch.Tensor
    y: torch.Tensor

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ValueError(f"x has {len(self.x)} rows but y has {len(self.y)}")

    def __len__(self) -> int:
        return len(self.y)

    def subset(self, idx: np.ndarray | torch.Tensor) -> Split:
        idx = torch.as_tensor(idx, dtype=torch.long)
        return Split(self.x[idx], self.y[idx])

    @property
    def device(self) -> torch.device:
        return self.x.device

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and labels of the rows ``idx`` (a minibatch)."""
        return self.x[idx], self.y[idx]

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


class ClientSplit:
    """One client's samples as row indices into a larger :class:`Split`, gathered only when used.

    It offers what a :class:`Split` offers.  :meth:`rows` gathers one minibatch straight from the
    larger split, so a client that trains a few steps on a large local dataset copies only the rows
    it trains on (for MNIST's 600 samples per client, 1.9 MB per client and ~0.7 ms of a 2NN client's
    ~6 ms update, when it trains 5 steps of 10); ``x`` and ``y`` gather every row once, on first use,
    for code that needs the whole local dataset.  The rows are the same either way, so results are too.
    """

    def __init__(self, base: Split, idx: torch.Tensor) -> None:
        self.base = base
        self.idx = idx  # int64, on the base split's device

    def __len__(self) -> int:
        return len(self.idx)

    @property
    def device(self) -> torch.device:
        return self.base.x.device

    @functools.cached_property
    def x(self) -> torch.Tensor:
        return self.base.x[self.idx]

    @functools.cached_property
    def y(self) -> torch.Tensor:
        return self.base.y[self.idx]

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.idx[idx]
        return self.base.x[rows], self.base.y[rows]

    def subset(self, idx: np.ndarray | torch.Tensor) -> ClientSplit:
        return ClientSplit(self.base, self.idx[torch.as_tensor(idx, dtype=torch.long, device=self.idx.device)])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))


@dataclass(frozen=True)
class DataInfo:
    """What a model needs to know about the data to be built."""

    input_shape: tuple[int, ...]
    num_classes: int
    vocab_size: int | None = None  # set for token inputs (x holds ids < vocab_size)


@dataclass(frozen=True)
class Dataset:
    """A loaded dataset: train/test splits, optional validation, optional natural groups.

    ``groups`` (same length as ``train``) gives the natural owner of every training sample
    (a Shakespeare role, a writer); the ``natural`` partitioner uses it.  ``group_names`` names them.
    ``notes`` holds human-readable facts about the source (sizes, where it was read from).
    """

    name: str
    train: Split
    test: Split
    info: DataInfo
    val: Split | None = None
    groups: np.ndarray | None = None
    group_names: tuple[str, ...] | None = None
    notes: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.groups is not None and len(self.groups) != len(self.train):
            raise ValueError("groups must have one entry per training sample")
