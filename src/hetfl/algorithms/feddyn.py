"""FedDyn's dynamic regularizer (Acar et al., ICLR 2021) as DepthFL's Flower baseline runs it: the parts.

A client i keeps a state ``h_i`` (one tensor per trainable parameter, zero until it first trains) and minimises

    loss(theta) - <theta, h_i> + (alpha / 2) ||theta - theta_g||^2

from the global weights ``theta_g`` it received; after training ``h_i <- h_i - alpha (theta_i - theta_g)``.  The
server keeps its own ``h`` (global layout) and, for every element that ``n > 0`` of this round's clients hold,
with ``mean`` the round's average of those clients' values and ``N`` the number of clients of the federation:

    h     <- h - alpha (n / N) (mean - theta_old)
    theta <- mean - h / alpha          (trainable parameters; buffers such as BatchNorm statistics: mean)

Elements nobody held keep their value and their ``h``.  Per-element counts make this work for width slices too
(Flower's baseline counts whole tensors, which is the same for depth-only levels).

The client state is explicit: the server side keeps every client's ``h_i`` in ``ServerState.buffers`` (global
layout, so a client whose level changes finds its state where it belongs; never-seen clients have none and
start from zero), ships it in the task beside the weights and stores what the client returns.  In a deployment
``h_i`` would stay on the device; here it rides along because clients are stateless, so it is not counted as
communication.  It is checkpointed and resumed with the rest of the server state.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import nn

from hetfl.aggregation import Placement
from hetfl.algorithms.base import ClientResult, Weights
from hetfl.data.base import DataInfo
from hetfl.models import ModelRef

DYN = "dyn"  # ServerState.buffers key: {"h": server h (global layout), "clients": {client id: h_i (global layout)}}


@lru_cache(maxsize=64)
def param_keys(ref: ModelRef, info: DataInfo) -> tuple[str, ...]:
    """The trainable parameters of the model ``ref`` builds (the regularised tensors; not buffers)."""
    with torch.random.fork_rng(devices=[]):
        return tuple(k for k, p in ref.build(info).named_parameters() if p.requires_grad)


def init_dyn(glob: Weights, keys: tuple[str, ...]) -> dict[str, Any]:
    """The server's FedDyn state at the start: ``h = 0`` and no client state."""
    return {"h": {k: torch.zeros_like(glob[k]) for k in keys}, "clients": {}}


def client_term(model: nn.Module, anchor: Weights, h: Weights, alpha: float):
    """The loss term ``-<theta, h> + (alpha / 2) ||theta - anchor||^2`` over ``model``'s parameters in ``h``
    (a ``loss_terms`` entry of :func:`hetfl.train.local_sgd`)."""
    params = [(p, h[k], anchor[k]) for k, p in model.named_parameters() if k in h]

    def term(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        total = torch.zeros((), device=logits.device)
        for p, hk, ak in params:
            total = total - torch.sum(p * hk) + (alpha / 2.0) * torch.sum(torch.square(p - ak))
        return total

    return term


def client_state_after(model: nn.Module, anchor: Weights, h: Weights, alpha: float) -> Weights:
    """``h_i - alpha (theta_i - anchor)``: the client's new state after its local training."""
    params = dict(model.named_parameters())
    return {k: (h[k] - alpha * (params[k].detach() - anchor[k])).cpu() for k in h}


class DynClients:
    """The round's side channel: per-element counts of the clients holding every parameter, and each client's
    new ``h_i`` placed in the global layout (where it does not reach, its old state stays)."""

    def __init__(self, glob: Weights, keys: tuple[str, ...], clients: dict[int, Weights]) -> None:
        self.glob = glob
        self.keys = keys
        self.old = clients
        self.new: dict[int, Weights] = {}
        self.counts = {k: torch.zeros(glob[k].shape, dtype=torch.float64) for k in keys}

    def add(self, res: ClientResult, placement: Placement) -> None:
        returned = res.extra.get("dyn_h", {})
        prior = self.old.get(res.client_id, {})
        state = dict(prior)
        for k in self.keys:
            piece = placement.pieces.get(k)
            if piece is None:
                continue
            held = piece.coverage(self.glob[k])
            self.counts[k] += held.to(torch.float64)
            if k in returned:
                before = prior.get(k, torch.zeros_like(self.glob[k]))
                state[k] = torch.where(held, piece.scatter(returned[k].to(self.glob[k].dtype), self.glob[k]), before)
        self.new[res.client_id] = state


@dataclass
class DynUpdate:
    """What ``combine`` hands ``server_step`` when FedDyn is on: the corrected weights and the new state."""

    weights: Weights
    state: dict[str, Any]


def server_correction(old: Weights, mean: Weights, dyn: dict[str, Any], side: DynClients, alpha: float,
                      num_clients: int) -> DynUpdate:
    """The server's FedDyn step (module docstring) from the round's mean and the side channel."""
    h = dict(dyn["h"])
    weights = dict(mean)
    for k in side.keys:
        if k not in mean:
            continue
        n = side.counts[k]
        held = n > 0
        step = (n / num_clients).to(h[k].dtype) * (mean[k] - old[k])
        h[k] = torch.where(held, h[k] - alpha * step, h[k])
        weights[k] = torch.where(held, mean[k] - h[k] / alpha, old[k])
    clients = {**dyn["clients"], **side.new}
    return DynUpdate(weights, {"h": h, "clients": clients})


__all__ = ["DYN", "DynClients", "DynUpdate", "client_state_after", "client_term", "init_dyn", "param_keys",
           "server_correction"]
