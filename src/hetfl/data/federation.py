"""A dataset split over clients: index arrays into one in-memory copy of the data.

Memory grows with the dataset, not with the number of clients: every client's training indices and
held-out local test indices live in two flat arrays with offsets (:class:`ClientIndex`, no Python object
per client), and a client's tensors are gathered only when it is sampled.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from hetfl.data.base import ClientSplit, Dataset, Split
from hetfl.data.partition import PartitionSummary, summarize_index
from hetfl.errors import ConfigError


class ClientIndex(Sequence[np.ndarray]):
    """Per-client index arrays stored as one flat ``int64`` array plus offsets (CSR layout).

    ``index[c]`` is a view of client ``c``'s indices (do not write to it); nothing per client is a Python object,
    so a 100 000-client federation costs two arrays, not 100 000.  It behaves as a sequence of arrays
    (``len``, iteration, indexing), so code written against a tuple of arrays keeps working.
    """

    __slots__ = ("flat", "offsets")

    def __init__(self, flat: np.ndarray, offsets: np.ndarray) -> None:
        flat = np.ascontiguousarray(flat, dtype=np.int64)
        offsets = np.ascontiguousarray(offsets, dtype=np.int64)
        if offsets.ndim != 1 or len(offsets) < 1 or offsets[0] != 0 or offsets[-1] != len(flat):
            raise ValueError("offsets must start at 0 and end at len(flat)")
        self.flat = flat
        self.offsets = offsets

    @classmethod
    def from_arrays(cls, arrays: Sequence[np.ndarray]) -> ClientIndex:
        sizes = np.fromiter((len(a) for a in arrays), dtype=np.int64, count=len(arrays))
        flat = np.concatenate([np.asarray(a, dtype=np.int64) for a in arrays]) if len(arrays) else \
            np.empty(0, dtype=np.int64)
        return cls(flat, np.concatenate([[0], np.cumsum(sizes)]))

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def nbytes(self) -> int:
        return self.flat.nbytes + self.offsets.nbytes

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, cid):  # type: ignore[override]
        if isinstance(cid, slice):
            return [self[i] for i in range(*cid.indices(len(self)))]
        cid = int(cid)
        if cid < 0:
            cid += len(self)
        if not 0 <= cid < len(self):
            raise IndexError(f"client {cid} out of range ({len(self)} clients)")
        return self.flat[self.offsets[cid]:self.offsets[cid + 1]]

    def __iter__(self) -> Iterator[np.ndarray]:
        for cid in range(len(self)):
            yield self.flat[self.offsets[cid]:self.offsets[cid + 1]]

    def gather(self, clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The concatenated indices of ``clients`` and, for each, its position in ``clients`` (vectorised)."""
        clients = np.asarray(clients, dtype=np.int64)
        sizes = self.sizes[clients]
        owner = np.repeat(np.arange(len(clients)), sizes)
        starts = np.repeat(self.offsets[clients] - np.concatenate([[0], np.cumsum(sizes)[:-1]]), sizes)
        return self.flat[starts + np.arange(len(owner))], owner


@dataclass(frozen=True)
class Federation:
    dataset: Dataset
    train: Split  # the dataset's training split, on the run's device
    train_idx: ClientIndex  # per client, indices into ``train`` used for local training
    test_idx: ClientIndex  # per client, held-out indices into ``train`` for local evaluation
    summary: PartitionSummary

    def __post_init__(self) -> None:
        for name in ("train_idx", "test_idx"):
            value = getattr(self, name)
            if not isinstance(value, ClientIndex):
                object.__setattr__(self, name, ClientIndex.from_arrays(value))

    @property
    def num_clients(self) -> int:
        return len(self.train_idx)

    @property
    def sizes(self) -> np.ndarray:
        return self.train_idx.sizes

    def client_train(self, cid: int) -> ClientSplit:
        """Client ``cid``'s training samples (rows gathered when used: :class:`~hetfl.data.base.ClientSplit`)."""
        return self._gather(self.train_idx[cid])

    def client_test(self, cid: int) -> ClientSplit:
        return self._gather(self.test_idx[cid])

    def _gather(self, idx: np.ndarray) -> ClientSplit:
        return ClientSplit(self.train, torch.as_tensor(idx, dtype=torch.long, device=self.train.x.device))


def build_federation(dataset: Dataset, parts: Sequence[np.ndarray], *, local_test_fraction: float,
                     seed: int, device: torch.device | str = "cpu") -> Federation:
    """Hold out ``local_test_fraction`` of each client's samples (at random, under ``seed``).

    The result stores every client's indices in two flat arrays (:class:`ClientIndex`); with no local
    test split nothing is done per client at all.
    """
    k = len(parts)
    sizes = np.fromiter((len(p) for p in parts), dtype=np.int64, count=k)
    empty = np.flatnonzero(sizes == 0)
    if len(empty):
        raise ConfigError(
            f"client {int(empty[0])} received no training samples; use fewer data.num_clients or a partition "
            f"that gives every client data (e.g. data.partition.min_size)"
        )
    all_idx = np.concatenate([np.asarray(p, dtype=np.int64) for p in parts]) if k else np.empty(0, np.int64)
    n_test = np.floor(local_test_fraction * sizes).astype(np.int64)
    n_test = np.where((n_test > 0) & (sizes - n_test < 1), sizes - 1, n_test)
    if not n_test.any():
        train_idx = ClientIndex(all_idx, np.concatenate([[0], np.cumsum(sizes)]))
        test_idx = ClientIndex(np.empty(0, np.int64), np.zeros(k + 1, np.int64))
    else:
        # the per-client draws keep the seeded split of earlier versions (one permutation per client)
        rng = np.random.default_rng([seed, 0x7465_7374])
        n_train = sizes - n_test
        tr_off = np.concatenate([[0], np.cumsum(n_train)])
        te_off = np.concatenate([[0], np.cumsum(n_test)])
        tr_flat = np.empty(int(tr_off[-1]), np.int64)
        te_flat = np.empty(int(te_off[-1]), np.int64)
        src = np.concatenate([[0], np.cumsum(sizes)])
        for cid in range(k):
            idx = all_idx[src[cid]:src[cid + 1]]
            t = int(n_test[cid])
            if t:
                perm = rng.permutation(idx)
                te_flat[te_off[cid]:te_off[cid + 1]] = np.sort(perm[:t])
                tr_flat[tr_off[cid]:tr_off[cid + 1]] = np.sort(perm[t:])
            else:
                tr_flat[tr_off[cid]:tr_off[cid + 1]] = idx
        train_idx, test_idx = ClientIndex(tr_flat, tr_off), ClientIndex(te_flat, te_off)
    labels = dataset.train.y.numpy()
    summary = summarize_index(train_idx.flat, train_idx.sizes, labels, dataset.info.num_classes)
    return Federation(dataset, dataset.train.to(device), train_idx, test_idx, summary)
