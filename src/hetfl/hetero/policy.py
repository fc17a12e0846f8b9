"""Index policies: which channels of every group a client of a given width keeps.

Config: ``[algorithm] index_policy``, a registered name with its parameters, e.g. ``"prefix"`` or
``"rolling(stride=2)"`` (:func:`index_policy`).  HeteroFL, FedRolex, Federated Dropout and FjORD differ here:

* ``prefix`` (HeteroFL, FjORD): the first ``n`` channels of each group, so widths are nested.
* ``rolling`` (FedRolex): a window of ``n`` consecutive channels with wrap-around that moves with the
  round: in round ``t`` (0-based) a group of ``K`` channels keeps ``{(j - stride*t) mod K : j < n}``.
  FedRolex moves one channel per round (``stride = 1``); every channel is then covered within
  ``K - n + 1`` rounds; ``stride = n`` covers all within ``ceil(K / n)`` rounds.  All clients of a
  round share the window start, so narrower windows are prefixes of wider ones.
* ``random`` (Federated Dropout): a fresh random subset per client, group and round.

Groups whose channels come in blocks (attention heads) are chosen in whole blocks.  A policy is a
pure function of (group sizes, round, client, seed): the server can recompute any client's
selection when its update comes back, so no per-round state is kept.  A new policy is one frozen
dataclass (its fields are its parameters) registered in :data:`INDEX_POLICIES`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hetfl.errors import ConfigError
from hetfl.hetero.spec import Group
from hetfl.registry import Registry, build_entry

INDEX_POLICIES: Registry = Registry("index policy")

Selection = dict[int, torch.Tensor]  # group id -> selected channel indices (int64)


def _expand_blocks(units: np.ndarray, block: int) -> torch.Tensor:
    if block == 1:
        return torch.as_tensor(units, dtype=torch.long)
    return torch.as_tensor((units[:, None] * block + np.arange(block)[None, :]).reshape(-1), dtype=torch.long)


@dataclass(frozen=True)
class IndexPolicy:
    """Base: subclasses choose ``n_units`` of ``units`` for one group."""

    def choose(self, group: Group, n_units: int, *, rnd: int, client: int, seed: int) -> np.ndarray:
        raise NotImplementedError

    def select(self, groups: dict[int, Group], sizes: dict[int, int], *, rnd: int, client: int,
               seed: int) -> Selection:
        """Channel indices per group for a client whose submodel has ``sizes[g]`` channels in group g."""
        out: Selection = {}
        for gid, n in sizes.items():
            g = groups[gid]
            n_units = n // g.block
            if n_units >= g.units:
                out[gid] = torch.arange(g.size)
                continue
            out[gid] = _expand_blocks(self.choose(g, n_units, rnd=rnd, client=client, seed=seed), g.block)
        return out


@INDEX_POLICIES.register("prefix")
@dataclass(frozen=True)
class Prefix(IndexPolicy):
    """HeteroFL / FjORD: the first n channels of every group (nested submodels)."""

    def choose(self, group: Group, n_units: int, *, rnd: int, client: int, seed: int) -> np.ndarray:
        return np.arange(n_units)


@INDEX_POLICIES.register("rolling")
@dataclass(frozen=True)
class Rolling(IndexPolicy):
    """FedRolex: a wrap-around window moving ``stride`` channels per round; default rolling(stride=1)."""

    stride: int = 1

    def __post_init__(self) -> None:
        if self.stride < 1:
            raise ConfigError(f"stride must be >= 1, got {self.stride}")

    def choose(self, group: Group, n_units: int, *, rnd: int, client: int, seed: int) -> np.ndarray:
        t = rnd - 1  # FedRolex's server round counter starts at 0
        return (np.arange(n_units) - self.stride * t) % group.units


@INDEX_POLICIES.register("random")
@dataclass(frozen=True)
class RandomSubset(IndexPolicy):
    """Federated Dropout: a random subset of channels per client, group and round."""

    def choose(self, group: Group, n_units: int, *, rnd: int, client: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng([seed, rnd, client + 1, group.id, 0x72646D])
        return np.sort(rng.choice(group.units, size=n_units, replace=False))


def index_policy(text: str, where: str = "algorithm.index_policy") -> IndexPolicy:
    """The policy a config string names, e.g. ``"prefix"`` or ``"rolling(stride=2)"``."""
    return build_entry(INDEX_POLICIES, text, where)
