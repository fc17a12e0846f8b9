"""What a dataset is inside hetfl: in-memory tensors plus the facts models and partitioners need."""

from __future__ import annotations

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
