"""A dataset split over clients: index arrays into one in-memory copy of the data.

Memory grows with the dataset, not with the number of clients: a client is two index arrays (its
training samples and its held-out local test samples), and its tensors are gathered only when it is
sampled.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetfl.data.base import Dataset, Split
from hetfl.data.partition import PartitionSummary, summarize
from hetfl.errors import ConfigError


@dataclass(frozen=True)
class Federation:
    dataset: Dataset
    train: Split  # the dataset's training split, on the run's device
    train_idx: tuple[np.ndarray, ...]  # per client, indices into ``train`` used for local training
    test_idx: tuple[np.ndarray, ...]  # per client, held-out indices into ``train`` for local evaluation
    summary: PartitionSummary

    @property
    def num_clients(self) -> int:
        return len(self.train_idx)

    @property
    def sizes(self) -> np.ndarray:
        return np.array([len(i) for i in self.train_idx], dtype=np.int64)

    def client_train(self, cid: int) -> Split:
        return self._gather(self.train_idx[cid])

    def client_test(self, cid: int) -> Split:
        return self._gather(self.test_idx[cid])

    def _gather(self, idx: np.ndarray) -> Split:
        return self.train.subset(torch.as_tensor(idx, dtype=torch.long, device=self.train.x.device))


def build_federation(dataset: Dataset, parts: list[np.ndarray], *, local_test_fraction: float,
                     seed: int, device: torch.device | str = "cpu") -> Federation:
    """Hold out ``local_test_fraction`` of each client's samples (at random, under ``seed``)."""
    rng = np.random.default_rng([seed, 0x7465_7374])
    train_idx, test_idx = [], []
    for cid, idx in enumerate(parts):
        idx = np.asarray(idx, dtype=np.int64)
        if len(idx) == 0:
            raise ConfigError(
                f"client {cid} received no training samples; use fewer data.num_clients or a partition "
                f"that gives every client data (e.g. data.partition.min_size)"
            )
        n_test = int(np.floor(local_test_fraction * len(idx)))
        if n_test and len(idx) - n_test < 1:
            n_test = len(idx) - 1
        if n_test:
            perm = rng.permutation(idx)
            test_idx.append(np.sort(perm[:n_test]))
            train_idx.append(np.sort(perm[n_test:]))
        else:
            test_idx.append(np.empty(0, dtype=np.int64))
            train_idx.append(idx)
    labels = dataset.train.y.numpy()
    summary = summarize(train_idx, labels, dataset.info.num_classes)
    return Federation(dataset, dataset.train.to(device), tuple(train_idx), tuple(test_idx), summary)
