"""FedTGP (Zhang, Liu, Hua, Cao, AAAI 2024): FedProto with trainable global prototypes and an adaptive margin.

Clients are FedProto's (:mod:`hetfl.algorithms.fedproto`: own models, upload per-class prototypes and counts,
train with ``CE + proto_weight * MSE`` to the global prototypes, evaluated by the nearest global prototype).
The server, instead of averaging, keeps a small trainable network ``G``: a learned embedding per class ->
Linear(d, h) -> ReLU -> Linear(h, d) (``h = tgp_hidden``, 0 = d, the feature size).  Every round:

1. the *adaptive margin* ``delta = min(max_c gap_c, margin_cap)`` with ``gap_c = min_{c' != c} ||Q_c - Q_c'||``,
   ``Q_c`` the unweighted mean of the round's uploaded prototypes of class c; a class without a neighbour (not
   uploaded, or the only class uploaded) takes the smallest gap of the others (none at all: ``margin_cap``);
2. ``server_epochs`` shuffled passes over the round's uploaded (prototype, class) pairs in batches of
   ``server_batch`` (0 = the clients' batch size), plain SGD at ``server_lr`` (0 = the clients' lr), on the
   contrastive loss ``CE(-(||P - G(c')|| + delta * [c' = y]), y)`` over all classes c';
3. the global prototypes sent to clients are ``G(c)`` for every class.

Seen from the clients nothing changes but the prototypes, so this file is the server rule only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetfl.algorithms.base import Context, ServerState, Weights, round_seed, weights_of
from hetfl.algorithms.fedproto import FedProto, ProtoUpdate
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.train import SGD

GENERATOR_KEY = "prototypes"


class TrainablePrototypes(nn.Module):
    """A class id -> its global prototype: embedding (d) -> Linear(d, h) -> ReLU -> Linear(h, d)."""

    def __init__(self, num_classes: int, feature_dim: int, hidden: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(num_classes, feature_dim)
        self.body = nn.Sequential(nn.Linear(feature_dim, hidden), nn.ReLU(), nn.Linear(hidden, feature_dim))

    def forward(self, classes: torch.Tensor) -> torch.Tensor:
        return self.body(self.embedding(classes))


def class_gaps(labels: torch.Tensor, protos: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``gap_c``: the distance from the unweighted mean of class c's uploaded prototypes to the nearest other
    class's mean; classes without a neighbour take the smallest gap found (+inf if there is none)."""
    gap = torch.full((num_classes,), float("inf"), dtype=torch.float64)
    classes = torch.unique(labels)
    if len(classes) < 2:
        return gap
    means = torch.stack([protos[labels == c].to(torch.float64).mean(0) for c in classes])
    dist = torch.cdist(means, means)
    dist.fill_diagonal_(float("inf"))
    gap[classes] = dist.min(1).values
    gap[torch.isinf(gap)] = gap[classes].min()
    return gap


def adaptive_margin(labels: torch.Tensor, protos: torch.Tensor, num_classes: int, cap: float) -> float:
    """FedTGP's margin: ``min(max_c gap_c, cap)``."""
    return float(min(class_gaps(labels, protos, num_classes).max().item(), cap))


@ALGORITHMS.register("fedtgp")
@dataclass(frozen=True)
class FedTGP(FedProto):
    """FedTGP: FedProto whose global prototypes come from a server network trained with an adaptive-margin loss."""

    proto_weight: float = 10.0
    tgp_hidden: int = 0
    server_epochs: int = 100
    server_lr: float = 0.0
    server_batch: int = 0
    margin_cap: float = 100.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_fields([
            (self.tgp_hidden >= 0, "tgp_hidden", "must be >= 0 (0 = the feature dimension)"),
            (self.server_epochs >= 0, "server_epochs", "must be >= 0 (0 = never train the prototypes)"),
            (self.server_lr >= 0, "server_lr", "must be >= 0 (0 = the clients' train.lr)"),
            (self.server_batch >= 0, "server_batch", "must be >= 0 (0 = the clients' train.batch_size)"),
            (self.margin_cap >= 0, "margin_cap", "must be >= 0"),
        ])

    def _net(self, ctx: Context) -> TrainablePrototypes:
        d = self.feature_dim(ctx)
        return TrainablePrototypes(ctx.info.num_classes, d, self.tgp_hidden or d)

    def init_state(self, ctx: Context) -> ServerState:
        state = super().init_state(ctx)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(round_seed(ctx.seed, 0, 0x7467_7000))
            state.models[GENERATOR_KEY] = weights_of(self._net(ctx))
        return state

    def train_prototypes(self, weights: Weights, upd: ProtoUpdate, rnd: int,
                         ctx: Context) -> tuple[Weights, dict[str, Any]]:
        """``server_epochs`` passes of SGD on the round's uploads; returns the new weights and statistics."""
        labels = torch.cat(upd.labels)
        protos = torch.cat(upd.protos)
        margin = adaptive_margin(labels, protos, ctx.info.num_classes, self.margin_cap)
        net = self._net(ctx)
        net.load_state_dict(weights)
        net.train()
        lr = self.server_lr or self.round_train_config(ctx, rnd).lr
        batch = self.server_batch or ctx.train.batch_size
        opt = SGD(list(net.parameters()), lr=lr)
        every = torch.arange(ctx.info.num_classes)
        gen = torch.Generator().manual_seed(round_seed(ctx.seed, rnd, 0x7467_7001))
        loss = torch.zeros(())
        for _ in range(self.server_epochs):
            perm = torch.randperm(len(labels), generator=gen)
            for start in range(0, len(labels), batch):
                idx = perm[start:start + batch]
                p, y = protos[idx], labels[idx]
                dist = torch.cdist(p, net(every))
                logits = -(dist + margin * F.one_hot(y, ctx.info.num_classes))
                loss = F.cross_entropy(logits, y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        return weights_of(net), {"tgp_margin": margin, "tgp_loss": float(loss.detach()), "tgp_pairs": len(labels)}

    def update_prototypes(self, state: ServerState, update: ProtoUpdate, rnd: int,
                          ctx: Context) -> tuple[dict[str, Weights], dict[str, Any], dict[str, Any]]:
        if not update.labels or self.server_epochs == 0:
            return {}, {}, {}
        weights, stats = self.train_prototypes(state.models[GENERATOR_KEY], update, rnd, ctx)
        net = self._net(ctx)
        net.load_state_dict(weights)
        net.eval()
        with torch.no_grad():
            protos = net(torch.arange(ctx.info.num_classes)).detach()
        total = torch.zeros(ctx.info.num_classes, dtype=torch.int64)
        for lab, n in zip(update.labels, update.counts):
            total.index_add_(0, lab, n.to(torch.int64))
        buffers = {"prototypes": protos, "proto_present": torch.ones(ctx.info.num_classes, dtype=torch.bool),
                   "proto_counts": torch.where(total > 0, total, state.buffers["proto_counts"])}
        return {GENERATOR_KEY: weights}, buffers, stats

