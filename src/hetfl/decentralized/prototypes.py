"""Neighbour prototype exchange for the graph protocol: a decentralized FedProto (``algorithm.prototypes = λ``).

A node's *prototype* of class ``c`` is the mean of its model's feature vector ``f(x)`` (the input of the
classifier head, the model's last ``nn.Linear``) over its samples of class ``c``.  At the start of every round
after the first, each node computes its prototypes with its current model (eval mode, no gradient) on the
minibatches it is about to train on, and sends them to every graph neighbour; during local training it adds
``λ · ‖f(x) − P̄[y]‖²`` (mean over the feature elements, summed over the batch's rows and divided by the
batch size: FedProto's mean-squared error) to the cross-entropy, where ``P̄[y]`` is the unweighted mean of its
neighbours' prototypes of class ``y``.  Rows whose label no neighbour holds get no term (as FedProto, where a
class without a global prototype gets none).

A message is one ``classes x feature size`` float32 tensor; a class the sender holds no sample of is a row of
NaN, so the message has the same shape whatever the sender's labels (the torchrun transport needs fixed shapes).
Two models can exchange prototypes when their feature vectors have the same size (any architectures: families
with equal head inputs) or when they are width-slices of one architecture: the narrower model's features are a
prefix of the wider one's (HeteroFL's prefix slicing), the sender cuts its prototypes to the receiver's size and
each feature element is averaged over the neighbours whose prototypes hold it, as overlap gossip averages
weights (:mod:`hetfl.decentralized.protocol`).

Where we differ from FedProto (Tan et al., AAAI 2022): no server, the mean is over graph neighbours instead of
all clients; prototypes are computed at the start of the round with the model about to be trained (stateless:
nothing to checkpoint), not collected during the previous round's last epoch; round 1 has no prototype term
(the initial features carry no label information; FedProto has no global prototypes in its first round either).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from hetfl.algorithms.fedgen import find_head, head_shape
from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.train import batch_indices

WHO = "algorithm.prototypes"
PROTO_KEY = "proto"


def feature_size(ref: Any, info: DataInfo) -> int:
    """Size of ``ref``'s feature vector: the input of its classifier head (its last ``nn.Linear``)."""
    try:
        return head_shape(ref, info)[1]
    except ConfigError as exc:
        raise ConfigError(str(exc).replace("fedgen", WHO)) from None


def check_prototypes(refs: list[Any], info: DataInfo, compatible: Any) -> None:
    """Every two node models can compare features: the same feature size, or width-slices of one architecture
    (``compatible(a, b)``); a ConfigError naming the sizes otherwise."""
    sizes = {ref: feature_size(ref, info) for ref in refs}
    for a in refs:
        for b in refs:
            if sizes[a] != sizes[b] and not compatible(a, b):
                listed = ", ".join(f"{_label(r)}: {d}" for r, d in sizes.items())
                raise ConfigError(f"{WHO} needs one feature size in front of every node model's classifier head "
                                  f"(or width-slices of one model), got {listed}; give the families equal head "
                                  f"inputs, e.g. families = \"cnn(fc=32), mlp(hidden=200,32), mlp(hidden=32)\"")


def _label(ref: Any) -> str:
    """A model as the families syntax writes it: ``mlp(hidden=32)``, ``mlp@0.25``."""
    params = f"({';'.join(f'{k}={v}' for k, v in ref.params)})" if ref.params else ""
    return f"{ref.name}{params}" + (f"@{ref.width:g}" if ref.width != 1.0 else "")


class _Features:
    """Captures the input of a module's classifier head on every forward (a forward hook, removed on exit)."""

    def __init__(self, model: nn.Module) -> None:
        self.head = find_head(model, WHO)[1]
        self.value: torch.Tensor | None = None

    def __enter__(self) -> _Features:
        self.handle = self.head.register_forward_hook(self._hook)
        return self

    def _hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
        self.value = inputs[0]

    def __exit__(self, *exc: object) -> None:
        self.handle.remove()
        self.value = None


def node_prototypes(model: nn.Module, data: Any, train: TrainConfig, seed: int,
                    num_classes: int) -> tuple[torch.Tensor, int]:
    """(prototypes, samples): the ``classes x feature`` mean features of ``model`` per class over the minibatches
    ``local_sgd`` draws with ``seed`` (the samples this round's local training visits), NaN rows for the classes
    not seen; and how many samples were forwarded (for the FLOPs count)."""
    n = len(data)
    dim = find_head(model, WHO)[1].in_features
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=data.device if n else None)
    counts = torch.zeros(num_classes, dtype=torch.float64, device=sums.device)
    samples = 0
    if n:
        gen = torch.Generator().manual_seed(seed)
        index_device = None if data.device.type == "cpu" else data.device
        was_training = model.training
        model.eval()
        with _Features(model) as feats, torch.no_grad():
            for idx in batch_indices(n, train.batch_size, train.epochs, train.steps, gen, index_device):
                xb, yb = data.rows(idx)
                model(xb)
                f = feats.value.reshape(len(yb), -1).to(torch.float64)
                sums.index_add_(0, yb, f)
                counts.index_add_(0, yb, torch.ones_like(yb, dtype=torch.float64))
                samples += len(yb)
        model.train(was_training)
    proto = (sums / counts.clamp(min=1.0)[:, None]).to(torch.float32).cpu()
    proto[counts.cpu() == 0] = float("nan")
    return proto, samples


def cut_prototype(proto: torch.Tensor, size: int) -> torch.Tensor:
    """What a node sends a neighbour whose features have ``size`` elements: the first ``size`` columns (all of
    them when its own features are not wider)."""
    return proto[:, :size].contiguous() if proto.shape[1] > size else proto


def neighbour_mean(size: int, received: list[torch.Tensor]) -> torch.Tensor:
    """Per class and feature element, the unweighted mean over the neighbours' prototypes that hold it (NaN where
    none does); prototypes narrower than ``size`` hold a prefix of the elements."""
    rows = []
    for p in received:
        if p.shape[1] < size:
            p = torch.cat([p, torch.full((p.shape[0], size - p.shape[1]), float("nan"))], dim=1)
        rows.append(p)
    return torch.stack(rows).nanmean(0)


class PrototypePull:
    """The loss term ``λ · ‖f(x) − P̄[y]‖²`` of :mod:`hetfl.decentralized.prototypes` for ``local_sgd``'s
    ``loss_terms`` (use as a context manager around the training: it hooks the model's head)."""

    def __init__(self, model: nn.Module, target: torch.Tensor, weight: float, device: torch.device) -> None:
        self.features = _Features(model)
        self.target = torch.nan_to_num(target, nan=0.0).to(device)
        self.mask = torch.isfinite(target).to(device)
        self.weight = float(weight)

    def __enter__(self) -> PrototypePull:
        self.features.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.features.__exit__(*exc)

    def __call__(self, model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        f = self.features.value.reshape(len(yb), -1)
        mask = self.mask[yb].to(f.dtype)
        sq = ((f - self.target[yb].to(f.dtype)) ** 2) * mask
        per_row = sq.sum(1) / mask.sum(1).clamp(min=1.0)
        return self.weight * per_row.sum() / len(yb)


__all__ = ["PrototypePull", "check_prototypes", "cut_prototype", "feature_size", "neighbour_mean",
           "node_prototypes"]
