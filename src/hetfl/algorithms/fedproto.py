"""FedProto (Tan, Long, Liu, Zhou, Lu, Jiang, Zhang, AAAI 2022): clients share per-class feature prototypes only.

Every client keeps its own model (any architecture family, see :mod:`hetfl.algorithms.families`); no weights
are exchanged.  A *prototype* of class c on client i is the mean of the features in front of the classifier head
(the input of the model's last ``nn.Linear``, the head :func:`hetfl.algorithms.fedgen.find_head` finds) over the
client's training samples of c.  Every round:

1. the server sends every sampled client the global prototypes ``P[c]`` of the classes it has one for;
2. the client trains its own model with local SGD on ``CE(h(f(x)), y) + proto_weight * MSE`` where the MSE is
   the sum over the batch's samples whose label has a global prototype of ``||f(x) - P[y]||^2``, divided by
   batch size x feature size (a sample without a global prototype adds 0, as in FedProto's code);
3. after training it computes its prototypes in eval mode over its training data and uploads, for each class
   it holds, the prototype and the class's sample count (``extra["proto_labels"/"prototypes"/"proto_counts"]``);
4. the server sets ``P[c]`` to the mean of the uploaded prototypes of c, weighted by their counts
   (``weighting = "counts"``) or uniform over clients (``"uniform"``, FedProto's code); a class no client of
   the round uploads keeps its previous global prototype.

Client-held models live in ``ServerState.models["client.<id>"]`` because hetfl's engines are stateless (each
client's result lands whole on its own key through the ordinary reducer); a deployment keeps them on the device.
So the round's ``bytes_down``/``bytes_up`` count those weights (what the engine carries), and the protocol's own
traffic is reported as ``proto_bytes_down``/``proto_bytes_up``.  Every client is evaluated with its own model
(``personal`` targets): by the nearest global prototype (``eval_by = "prototype"``, the paper's inference rule)
or by its head (``"head"``).  :mod:`hetfl.algorithms.fedtgp` replaces step 4 with trainable global prototypes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hetfl.aggregation import Placement, whole
from hetfl.algorithms.base import (
    ClientResult,
    ClientTask,
    Context,
    EvalTarget,
    ServerState,
    Weights,
    round_seed,
    weights_of,
)
from hetfl.algorithms.families import FamilyAlgorithm, family_index
from hetfl.algorithms.fedgen import find_head, head_shape
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.data.base import Split
from hetfl.errors import ConfigError
from hetfl.models import ModelRef
from hetfl.train import local_sgd

WEIGHTINGS = ("counts", "uniform")
EVAL_MODES = ("prototype", "head")
ABSENT_LOGIT = -1e9  # a class without a global prototype is never the nearest


# ---------------------------------------------------------------------------------------------- pieces
class FeatureTap:
    """Records the input of a model's classifier head (:func:`find_head`) at every forward pass, so one forward
    gives both the logits and the features (``tap.features``); ``close()`` removes the hook."""

    def __init__(self, model: nn.Module) -> None:
        self.features: torch.Tensor | None = None
        self._handle = find_head(model)[1].register_forward_pre_hook(self._record)

    def _record(self, module: nn.Module, inputs: tuple[Any, ...]) -> None:
        self.features = inputs[0]

    def close(self) -> None:
        self._handle.remove()


@torch.no_grad()
def class_prototypes(model: nn.Module, data: Split, num_classes: int,
                     batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sums / counts, counts)``: every class's mean head-input feature over ``data`` (eval mode; zero rows for
    classes the data lacks) and its sample count (int64)."""
    tap = FeatureTap(model)
    model.eval()
    try:
        sums: torch.Tensor | None = None
        for i in range(0, len(data), batch_size):
            xb, yb = data.x[i:i + batch_size], data.y[i:i + batch_size]
            model(xb)
            f = tap.features.float()
            if sums is None:
                sums = f.new_zeros(num_classes, f.shape[1], dtype=torch.float64)
            sums.index_add_(0, yb, f.to(torch.float64))
    finally:
        tap.close()
    counts = torch.bincount(data.y, minlength=num_classes).to(torch.int64)
    if sums is None:
        return torch.zeros(num_classes, 0), counts
    return (sums / counts.clamp_min(1)[:, None]).to(torch.float32), counts


def average_prototypes(labels: Sequence[torch.Tensor], protos: Sequence[torch.Tensor], counts: Sequence[torch.Tensor],
                       num_classes: int, weighting: str = "counts") -> tuple[torch.Tensor, torch.Tensor]:
    """The server's per-class mean of uploaded prototypes: ``(means [classes x d], total counts [classes])``.

    Client k uploads ``labels[k]``, ``protos[k]`` (one row per label) and ``counts[k]``; class c's mean weights
    each client's prototype by its count of c (``"counts"``) or equally (``"uniform"``).  Classes nobody uploaded
    get a zero row and count 0."""
    dim = protos[0].shape[1]
    num = torch.zeros(num_classes, dim, dtype=torch.float64)
    den = torch.zeros(num_classes, dtype=torch.float64)
    total = torch.zeros(num_classes, dtype=torch.int64)
    for lab, p, n in zip(labels, protos, counts):
        w = n.to(torch.float64) if weighting == "counts" else torch.ones(len(lab), dtype=torch.float64)
        num.index_add_(0, lab, p.to(torch.float64) * w[:, None])
        den.index_add_(0, lab, w)
        total.index_add_(0, lab, n.to(torch.int64))
    return (num / den.clamp_min(1e-300)[:, None]).to(torch.float32), total


def prototype_forward(protos: torch.Tensor, present: torch.Tensor):
    """A ``forward(model, x) -> logits`` for :func:`hetfl.train.evaluate`: minus the squared Euclidean distance of
    the head-input features to every present prototype (absent classes: a logit of -1e9), so argmax = nearest."""

    def forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        tap = FeatureTap(model)
        try:
            model(x)
            f = tap.features.float()
        finally:
            tap.close()
        p = protos.to(f.device)
        dist = (f[:, None, :] - p[None, :, :]).pow(2).sum(-1)
        return (-dist).masked_fill(~present.to(f.device)[None, :], ABSENT_LOGIT)

    return forward


def tensor_bytes(*tensors: torch.Tensor) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


def client_key(client: int) -> str:
    return f"client.{int(client)}"


@dataclass
class ProtoUpdate:
    """What :meth:`FedProto.aggregate` hands to :meth:`FedProto.server_step` (server side only)."""

    models: dict[str, Weights] = field(default_factory=dict)  # client.<id> -> the client's own trained model
    families: dict[int, int] = field(default_factory=dict)  # client -> family index of the model it trained
    labels: list[torch.Tensor] = field(default_factory=list)
    protos: list[torch.Tensor] = field(default_factory=list)
    counts: list[torch.Tensor] = field(default_factory=list)
    bytes_up: int = 0


class _Uploads:
    """The side channel: every result's prototypes, class counts and the family of the model it trained."""

    def __init__(self, algo: FedProto, state: ServerState, rnd: int, ctx: Context) -> None:
        self.family = algo.client_families(state, rnd, ctx)
        self.upd = ProtoUpdate()

    def add(self, res: ClientResult, placement: Placement) -> None:
        upd, ex = self.upd, res.extra
        upd.families[int(res.client_id)] = int(self.family[res.client_id])
        if len(ex["proto_labels"]):
            upd.labels.append(ex["proto_labels"].cpu())
            upd.protos.append(ex["prototypes"].detach().float().cpu())
            upd.counts.append(ex["proto_counts"].cpu())
        upd.bytes_up += tensor_bytes(ex["proto_labels"], ex["prototypes"], ex["proto_counts"])


# ---------------------------------------------------------------------------------------------- algorithm
@ALGORITHMS.register("fedproto")
@dataclass(frozen=True)
class FedProto(FamilyAlgorithm):
    """FedProto: clients keep their own models and share only per-class feature prototypes, averaged per class."""

    private_refusal: ClassVar[str | None] = (
        "FedProto's clients upload, beside no model update at all, per-class means of their features with the "
        "class counts, which reveal each client's label set, its label histogram and its class-conditional feature "
        "means; the DP-FedAvg accountant covers clipped model updates, not these releases")

    proto_weight: float = 1.0
    weighting: str = "counts"
    eval_by: str = "prototype"
    proto_batch: int = 1000

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_fields([
            (self.proto_weight >= 0, "proto_weight", "must be >= 0 (0 = plain local training)"),
            (self.weighting in WEIGHTINGS, "weighting", f"must be one of {', '.join(WEIGHTINGS)}"),
            (self.eval_by in EVAL_MODES, "eval_by", f"must be one of {', '.join(EVAL_MODES)}"),
            (self.proto_batch >= 1, "proto_batch", "must be >= 1"),
            # no weights are averaged: flags of the weight mean would silently do nothing
            (not self.weighted, "weighted", "has no effect (no weights are averaged; the prototype mean is set by "
                                            "algorithm.weighting), so it must be false"),
            (self.aggregator == "mean", "aggregator", "has no effect (no weights are averaged), so it must be 'mean'"),
        ])

    # ---------------------------------------------------------------- hooks
    def model_refs(self, ctx: Context) -> list[ModelRef]:
        fams = self.family_list(ctx)
        dims = {f.key: head_shape(f.ref, ctx.info)[1] for f in fams}
        if len(set(dims.values())) > 1:
            listed = ", ".join(f"{k}: {d}" for k, d in dims.items())
            raise ConfigError(f"algorithm.families: {type(self).__name__.lower()}'s prototypes need one feature "
                              f"dimension in front of every family's head, got {listed}; give the families equal "
                              f"head inputs (e.g. cnn(fc=32), mlp(hidden=200,32))")
        return [f.ref for f in fams]

    def feature_dim(self, ctx: Context) -> int:
        return head_shape(self.family_list(ctx)[0].ref, ctx.info)[1]

    def client_families(self, state: ServerState, rnd: int, ctx: Context) -> np.ndarray:
        """Each client's family: that of the model it holds, else its tier's in round ``rnd``."""
        held = state.buffers.get("family")
        idx = family_index(ctx, max(rnd, 1), len(self.family_list(ctx))).copy()
        if held is not None:
            held = held.numpy()
            idx[held >= 0] = held[held >= 0]
        return idx

    # ---------------------------------------------------------------- server
    def init_state(self, ctx: Context) -> ServerState:
        c, d = ctx.info.num_classes, self.feature_dim(ctx)
        buffers = {"prototypes": torch.zeros(c, d), "proto_present": torch.zeros(c, dtype=torch.bool),
                   "proto_counts": torch.zeros(c, dtype=torch.int64),
                   "family": torch.full((ctx.num_clients,), -1, dtype=torch.int64)}
        return ServerState(round=0, models=self.initial_models(ctx), buffers=buffers)

    def global_prototypes(self, state: ServerState) -> tuple[torch.Tensor, torch.Tensor]:
        """The prototypes the server sends: ``(classes x d, present mask)``."""
        return state.buffers["prototypes"], state.buffers["proto_present"]

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int],
                        ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        fams = self.family_list(ctx)
        idx = self.client_families(state, rnd, ctx)
        protos, present = self.global_prototypes(state)
        extra = {"prototypes": protos[present], "proto_labels": torch.nonzero(present).flatten()}
        tasks = []
        for c in map(int, clients):
            f = fams[idx[c]]
            weights = state.models.get(client_key(c), state.models[f.key])
            tasks.append(ClientTask(c, f.ref, weights, train, round_seed(ctx.seed, rnd, c), dict(extra)))
        return tasks

    def placer(self, state: ServerState, rnd: int, ctx: Context):
        """A result lands whole on its client's own model (a mean of one: the weights it sent)."""
        return lambda res: whole(res.weights, model=client_key(res.client_id), weight=1.0)

    def side_channel(self, state: ServerState, rnd: int, ctx: Context) -> _Uploads:
        return _Uploads(self, state, rnd, ctx)

    def combine(self, state: ServerState, rnd: int, models: dict[str, Weights], side: _Uploads | None,
                ctx: Context) -> ProtoUpdate:
        upd = side.upd if side is not None else ProtoUpdate()
        upd.models = {k: w for k, w in models.items() if w}
        return upd

    def update_prototypes(self, state: ServerState, update: ProtoUpdate, rnd: int,
                          ctx: Context) -> tuple[dict[str, Weights], dict[str, Any], dict[str, Any]]:
        """FedProto's server rule: the count-weighted (or uniform) per-class mean; absent classes keep theirs."""
        buffers = {}
        metrics: dict[str, Any] = {}
        if update.labels:
            mean, total = average_prototypes(update.labels, update.protos, update.counts, ctx.info.num_classes,
                                             self.weighting)
            got = total > 0
            protos = state.buffers["prototypes"].clone()
            protos[got] = mean[got]
            buffers = {"prototypes": protos, "proto_present": state.buffers["proto_present"] | got,
                       "proto_counts": torch.where(got, total, state.buffers["proto_counts"])}
        return {}, buffers, metrics

    def server_step(self, state: ServerState, update: ProtoUpdate, ctx: Context) -> ServerState:
        rnd = state.round + 1
        models = {**state.models, **update.models}
        buffers = dict(state.buffers)
        family = buffers["family"].clone()
        for c, f in update.families.items():
            family[c] = f
        buffers["family"] = family
        sent_protos, sent_present = self.global_prototypes(state)
        sent = tensor_bytes(sent_protos[sent_present], torch.nonzero(sent_present).flatten())
        new_models, new_buffers, metrics = self.update_prototypes(state, update, rnd, ctx)
        models.update(new_models)
        buffers.update(new_buffers)
        metrics.update(proto_bytes_up=update.bytes_up, proto_bytes_down=sent * len(update.families),
                       proto_classes=int(buffers["proto_present"].sum()))
        buffers["metrics"] = metrics
        return ServerState(rnd, models, buffers)

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        """Every client's own model (a family's initial model until it trains), scored as a personal target of its
        family, by the nearest global prototype or by its head."""
        fams = self.family_list(ctx)
        idx = self.client_families(state, state.round, ctx)
        by_proto = self.global_prototypes(state) if self.eval_by == "prototype" else None
        out = {}
        for c in range(ctx.num_clients):
            f = fams[idx[c]]
            out[client_key(c)] = EvalTarget(f.ref, state.models.get(client_key(c), state.models[f.key]),
                                            clients=np.array([c]), personal=f.key, prototypes=by_proto)
        return out

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().summarize(rows)
        out["eval_by"] = self.eval_by
        ups = [r["proto_bytes_up"] for r in rows if "proto_bytes_up" in r]
        if ups:
            out["proto_bytes_up"] = int(sum(ups))
            out["proto_bytes_down"] = int(sum(r.get("proto_bytes_down", 0) for r in rows))
        return out

    # ---------------------------------------------------------------- client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        num_classes = find_head(model)[1].out_features
        labels = task.extra.get("proto_labels")
        terms = []
        if self.proto_weight > 0 and labels is not None and len(labels):
            target = torch.zeros(num_classes, task.extra["prototypes"].shape[1], device=device)
            target[labels.to(device)] = task.extra["prototypes"].to(device)
            present = torch.zeros(num_classes, dtype=torch.bool, device=device)
            present[labels.to(device)] = True
            tap = FeatureTap(model)
            lam = self.proto_weight

            def proto_term(m: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
                f = tap.features.float()
                has = present[y]
                # FedProto's MSE: samples without a global prototype count in the mean with a zero distance
                return lam * (f[has] - target[y[has]]).pow(2).sum() / f.numel()

            terms.append(proto_term)
        try:
            stats = local_sgd(model, data, task.train, seed=task.seed, device=device, loss_terms=terms)
        finally:
            if terms:
                tap.close()
        protos, counts = class_prototypes(model, data, num_classes, self.proto_batch)
        held = torch.nonzero(counts > 0).flatten()
        return ClientResult(client_id=task.client_id, num_samples=len(data), weights=weights_of(model),
                            metrics={"train_loss": stats.loss, "steps": stats.steps},
                            extra={"proto_labels": held.cpu(), "prototypes": protos[held].cpu(),
                                   "proto_counts": counts[held].cpu()})
