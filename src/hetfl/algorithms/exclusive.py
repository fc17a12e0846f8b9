"""Exclusive learning: one independent model per size, each trained by FedAvg over the clients that can run it.

The baseline every submodel method has to beat at every tier.  The sizes are the fleet's levels (HeteroFL's
widths, ``fleet.mix``): size ``s`` is the registered model at ``s`` times the ``[model]`` width, with its own
weights (no sharing between sizes).  Precisely:

* **who trains size s**: in round ``t`` the server samples clients as FedAvg does (``clients_per_round`` or
  ``fraction`` of *all* clients); every sampled client whose capability in round ``t`` (its fleet width, redrawn
  per round under ``fleet.assignment = "dynamic"``) is at least ``s`` trains size ``s``.  A client of the widest
  tier therefore trains every size, one after the other, each from the server's model of that size with the
  same local config and seed; a client of the narrowest tier trains only the smallest.
* **the server**: size ``s``'s new model is the (sample-weighted, ``weighted = true``) mean of the results of the
  clients that trained it, as FedAvg's; a size nobody trained in a round keeps its model.
* **evaluation**: a client runs the largest model it can (its tier's size): ``global`` is the widest size,
  served to the widest tier; ``w<s>`` the size ``s``, served to the tier of width ``s`` (so
  ``deployed_accuracy``, ``smallest_accuracy`` and ``tier_acc.*`` read as for HeteroFL).

Composition: a client's task is one network, the *bundle* of the sizes it trains (the registered model
``exclusive_sizes``: the sizes side by side, state-dict keys ``s<i>.<key>`` with ``i`` the size's index in the
fleet's levels), so one task, one result and one whole-tensor placement per client; the round, the faults,
the costs (the bundle's FLOPs are the sum of its sizes') and ``[privacy]`` (a client's clipped update spans
every size it trained) are the common ones.  With one size (a uniform fleet) exclusive learning *is* FedAvg:
the same clients, initial model, local steps and average, bit for bit (tests/test_exclusive.py).

Sampling among all clients (not among those that can run ``s``, as ``fedavg``'s ``min_width`` does) keeps
the sizes on one shared round: in expectation size ``s`` sees ``clients_per_round`` times the share of
clients that can run it.  ``fedavg`` with ``min_width = s`` is the one-size version that samples only
capable clients.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from torch import nn

from hetfl.aggregation import Placement, footprint_of, whole
from hetfl.algorithms.base import (
    Algorithm,
    ClientResult,
    ClientTask,
    Context,
    EvalTarget,
    ServerState,
    Weights,
    round_seed,
    weights_of,
)
from hetfl.algorithms.families import last_family_accuracies
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.data.base import DataInfo, Split
from hetfl.errors import ConfigError
from hetfl.hetero import submodel_ref
from hetfl.hetero.depth import decode_params, encode_params
from hetfl.models import ModelRef
from hetfl.models.registry import MODELS, build_model, check_width
from hetfl.train import local_sgd


class SizeBundle(nn.Module):
    """Sizes of one registered model side by side (``s<i>`` for the size of index ``i``); the forward pass runs
    every size and returns the mean of their logits (used only to check shapes and count FLOPs: clients train
    and the evaluator scores each size on its own)."""

    def __init__(self, members: dict[str, nn.Module]) -> None:
        super().__init__()
        self.sizes = nn.ModuleDict(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.sizes.values()]).mean(0)


def parse_widths(text: str, where: str = "model.widths of 'exclusive_sizes'") -> tuple[float, ...]:
    try:
        widths = tuple(float(w) for w in str(text).split(",") if w.strip())
    except ValueError:
        raise ConfigError(f"{where} must be comma-separated widths in (0, 1], got {text!r}") from None
    if not widths or not all(0 < w <= 1 for w in widths):
        raise ConfigError(f"{where} must be comma-separated widths in (0, 1], got {text!r}")
    return widths


@MODELS.register("exclusive_sizes")
def exclusive_sizes(info: DataInfo, *, width: float = 1.0, base: str = "mlp", base_params: str = "",
                    widths: str = "1", first: int = 0) -> nn.Module:
    """The sizes ``widths[first:]`` of registered model ``base`` (each at ``width * widths[i]``), side by side:
    what a client of exclusive learning trains in one task (built by the ``exclusive`` algorithm)."""
    width = check_width(width)
    if base == "exclusive_sizes":
        raise ConfigError("model.base of 'exclusive_sizes' cannot be exclusive_sizes")
    sizes = parse_widths(widths)
    if not 0 <= int(first) < len(sizes):
        raise ConfigError(f"model.first of 'exclusive_sizes' must index model.widths ({len(sizes)} sizes), "
                          f"got {first!r}")
    params = dict(decode_params(base_params))
    return SizeBundle({f"s{i}": build_model(base, info, width=width * sizes[i], **params)
                       for i in range(int(first), len(sizes))})


def size_key(index: int) -> str:
    return f"s{index}"


@lru_cache(maxsize=64)
def _bundle_keys(ref: ModelRef, info: DataInfo) -> dict[str, tuple[str, ...]]:
    """Per size key, the bundle's state-dict keys of that size (built once, without moving the global RNG)."""
    with torch.random.fork_rng(devices=[]):
        keys = tuple(ref.build(info).state_dict())
    out: dict[str, list[str]] = {}
    for k in keys:
        out.setdefault(k.split(".", 2)[1], []).append(k)
    return {s: tuple(v) for s, v in out.items()}


@ALGORITHMS.register("exclusive")
@dataclass(frozen=True)
class Exclusive(Algorithm):
    """Exclusive learning: FedAvg of every fleet size over the sampled clients that can run it (see the module)."""

    weighted: bool = True

    # ------------------------------------------------------------------ sizes and tiers
    @staticmethod
    def sizes(ctx: Context) -> tuple[float, ...]:
        """The fleet's levels, widest first (one size without a fleet)."""
        return tuple(ctx.fleet.levels) if ctx.fleet is not None else (1.0,)

    def size_ref(self, ctx: Context, index: int) -> ModelRef:
        """The plain model of size ``index`` (what a client of that tier deploys)."""
        return submodel_ref(ctx.model, self.sizes(ctx)[index])

    def bundle_ref(self, ctx: Context, first: int) -> ModelRef:
        """The bundle of the sizes ``first..`` (a client of tier ``first`` trains them all)."""
        if ctx.model.name == "exclusive_sizes":
            raise ConfigError("the exclusive algorithm builds the exclusive_sizes model itself: set model.name to "
                              "the base model (mlp, cnn, heterofl_conv, ...)")
        params = (("base", ctx.model.name), ("base_params", encode_params(ctx.model.params)),
                  ("first", int(first)), ("widths", ",".join(f"{w!r}" for w in self.sizes(ctx))))
        return ModelRef("exclusive_sizes", ctx.model.width, params)

    def tiers(self, ctx: Context, rnd: int) -> np.ndarray:
        """Every client's tier in round ``rnd`` (0 = widest): the first size it can run."""
        if ctx.fleet is None:
            return np.zeros(ctx.num_clients, dtype=np.int64)
        return ctx.fleet.tiers_of(ctx.fleet.widths(rnd, ctx.seed))

    def model_refs(self, ctx: Context) -> list[ModelRef]:
        return [self.bundle_ref(ctx, 0), *(self.size_ref(ctx, i) for i in range(len(self.sizes(ctx))))]

    # ------------------------------------------------------------------ server
    def init_state(self, ctx: Context) -> ServerState:
        """Every size starts from the model FedAvg would start from at that width (the round-0 seed, per size)."""
        glob: Weights = {}
        for i in range(len(self.sizes(ctx))):
            torch.manual_seed(round_seed(ctx.seed, 0))
            glob.update({f"sizes.{size_key(i)}.{k}": v
                         for k, v in weights_of(self.size_ref(ctx, i).build(ctx.info)).items()})
        return ServerState(round=0, models={"global": glob})

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int], ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        glob = state.models["global"]
        tiers = self.tiers(ctx, rnd)
        tasks = []
        for c in clients:
            ref = self.bundle_ref(ctx, int(tiers[int(c)]))
            keys = [k for ks in _bundle_keys(ref, ctx.info).values() for k in ks]
            tasks.append(ClientTask(int(c), ref, {k: glob[k] for k in keys}, train, round_seed(ctx.seed, rnd, int(c))))
        return tasks

    def placer(self, state: ServerState, rnd: int, ctx: Context) -> Callable[[ClientResult], Placement]:
        """A result lands whole on the sizes its client's tier trains (the tier recomputed by the server)."""
        tiers = self.tiers(ctx, rnd)
        keys = self._keys_by_tier(ctx)
        return lambda res: whole(res.weights, weight=self.weight_of(res), keys=keys[int(tiers[res.client_id])])

    def _keys_by_tier(self, ctx: Context) -> list[list[str]]:
        return [[k for ks in _bundle_keys(self.bundle_ref(ctx, t), ctx.info).values() for k in ks]
                for t in range(len(self.sizes(ctx)))]

    def footprints(self, state: ServerState, rnd: int, ctx: Context
                   ) -> Callable[[int], list[tuple[float, Placement]]]:
        glob = state.models["global"]
        tiers = self.tiers(ctx, rnd)
        prints = [footprint_of(glob, keys=[k for k in ks if glob[k].is_floating_point()], signature=f"tier{t}")
                  for t, ks in enumerate(self._keys_by_tier(ctx))]
        return lambda client: [(1.0, prints[int(tiers[int(client)])])]

    def deployed_footprints(self, state: ServerState, ctx: Context) -> dict[str, Placement]:
        sizes = self.sizes(ctx)
        if len(sizes) == 1:
            return {}
        glob = state.models["global"]
        return {self.label(ctx, i): footprint_of(glob, keys=[k for k in self._size_keys(glob, i)
                                                            if glob[k].is_floating_point()], signature=f"s{i}")
                for i in range(len(sizes))}

    @staticmethod
    def _size_keys(glob: Weights, index: int) -> list[str]:
        head = f"sizes.{size_key(index)}."
        return [k for k in glob if k.startswith(head)]

    def size_weights(self, glob: Weights, index: int) -> Weights:
        """The plain state dict of size ``index`` (its keys without the bundle's prefix)."""
        head = f"sizes.{size_key(index)}."
        return {k[len(head):]: v for k, v in glob.items() if k.startswith(head)}

    def server_step(self, state: ServerState, update: Weights, ctx: Context) -> ServerState:
        if not update:  # nobody reported: keep every size
            return ServerState(state.round + 1, state.models, state.buffers)
        return ServerState(state.round + 1, {**state.models, "global": {**state.models["global"], **update}},
                           state.buffers)

    @staticmethod
    def label(ctx: Context, index: int) -> str:
        sizes = Exclusive.sizes(ctx)
        return "global" if index == 0 else f"w{sizes[index]:g}"

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        """Each size on its own; a client is served by the largest size it can run (its fixed tier's)."""
        glob = state.models["global"]
        sizes = self.sizes(ctx)
        tiers = ctx.fleet.tiers() if ctx.fleet is not None else np.zeros(ctx.num_clients, dtype=np.int64)
        hetero = len(sizes) > 1
        return {self.label(ctx, i): EvalTarget(self.size_ref(ctx, i), self.size_weights(glob, i),
                                               clients=np.flatnonzero(tiers == i) if hetero else None)
                for i in range(len(sizes))}

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return last_family_accuracies(rows)

    # ------------------------------------------------------------------ client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        """FedAvg's local SGD on every size of the bundle in turn (each from its own server model, same seed)."""
        if not isinstance(model, SizeBundle):
            raise ConfigError(f"the exclusive algorithm trains exclusive_sizes bundles, got {type(model).__name__}")
        loss, steps = 0.0, 0
        for member in model.sizes.values():
            stats = local_sgd(member, data, task.train, seed=task.seed, device=device)
            loss += stats.loss
            steps += stats.steps
        n = len(model.sizes)
        return ClientResult(task.client_id, len(data), weights_of(model),
                            {"train_loss": loss / n, "steps": steps})


__all__ = ["Exclusive", "SizeBundle", "exclusive_sizes", "parse_widths"]
