"""FIARSE (Wu et al., NeurIPS 2024): element-level submodels chosen by parameter magnitude.

Every round each client of capacity ``r`` trains the elements of the current global model whose
magnitude reaches its threshold (:mod:`hetfl.hetero.importance`): the mask is data-free, re-derived
from the global weights every round, and needs no state.  Locally the forward pass uses the masked
weights recomputed at every step, with FIARSE's threshold-aware gradient (TCB-GD).  The server averages
every element over the clients that kept it (unweighted, as FIARSE), then ``theta <- theta - server_lr *
(theta - average)``.

Capacity: FIARSE's sizes are fractions of the parameters ({1, 1/4, 1/16, 1/64} in its experiments).  A
fleet level of width ``w`` (HeteroFL's notation, whose width-``w`` submodel has about ``w^2`` of the
parameters) gives ``r = w^2`` by default (``capacity = "width_squared"``; ``"width"``: ``r = w``), so the
mix ``a-b-c-d`` is FIARSE's four sizes.

Where this follows the code and where it does not: FIARSE's server counts an element for every client
whose update of it is *non-zero*; we count the clients whose mask keeps it (``count = "mask"``, the
default; ``"nonzero"`` is the code's rule), so a kept element that happened not to move still counts and
what a client's data did never changes which elements it reports.  Uploads here are dense tensors, as in
FIARSE's code; the metrics report what a sparse upload would cost (``sparse_bytes_up``) next to it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch
from torch import nn

from hetfl.aggregation import Placement
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
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.data.base import DataInfo, Split
from hetfl.errors import ConfigError
from hetfl.hetero.importance import (
    THRESHOLDS,
    MaskedForward,
    mask_footprint,
    maskable_keys,
    masked_weights,
    masks,
    place_masked,
    sparse_bytes,
    thresholds,
)
from hetfl.models import ModelRef
from hetfl.train import local_sgd


@lru_cache(maxsize=64)
def _maskable(ref: ModelRef, info: DataInfo) -> tuple[str, ...]:
    with torch.random.fork_rng(devices=[]):
        return maskable_keys(ref.build(info))


@ALGORITHMS.register("fiarse")
@dataclass(frozen=True)
class FIARSE(Algorithm):
    """FIARSE: each client trains the largest-magnitude elements for its capacity, with threshold-aware gradients."""

    capacity: str = "width_squared"  # fleet width w -> capacity w^2 ("width": w)
    threshold: str = "global"  # one top-k over all maskable elements, or "tensor": one per tensor
    count: str = "mask"  # per-element average over clients whose mask keeps it; "nonzero": FIARSE's code
    server_lr: float = 1.0
    eval_levels: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.capacity not in ("width_squared", "width"):
            raise ConfigError(f'algorithm.capacity must be "width_squared" or "width", got {self.capacity!r}')
        if self.threshold not in THRESHOLDS:
            raise ConfigError(f"algorithm.threshold must be one of {', '.join(THRESHOLDS)}, got {self.threshold!r}")
        if self.count not in ("mask", "nonzero"):
            raise ConfigError(f'algorithm.count must be "mask" or "nonzero", got {self.count!r}')
        if self.server_lr <= 0:
            raise ConfigError(f"algorithm.server_lr must be > 0, got {self.server_lr}")

    # ------------------------------------------------------------------ capacities and thresholds
    def to_capacity(self, width: float) -> float:
        return float(width) ** 2 if self.capacity == "width_squared" else float(width)

    def capacities(self, ctx: Context, rnd: int) -> np.ndarray:
        if ctx.fleet is None:
            return np.ones(ctx.num_clients)
        return np.array([self.to_capacity(w) for w in ctx.fleet.widths(rnd, ctx.seed)])

    def taus(self, glob: Weights, ctx: Context, capacity: float) -> dict[str, float]:
        return thresholds(glob, _maskable(ctx.model, ctx.info), capacity, self.threshold)

    # ------------------------------------------------------------------ server
    def init_state(self, ctx: Context) -> ServerState:
        torch.manual_seed(round_seed(ctx.seed, 0))  # the same initial model as FedAvg
        return ServerState(round=0, models={"global": weights_of(ctx.model.build(ctx.info))})

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int], ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        glob = state.models["global"]
        caps = self.capacities(ctx, rnd)
        keys = _maskable(ctx.model, ctx.info)
        tasks = []
        for c in clients:
            r = float(caps[int(c)])
            taus = self.taus(glob, ctx, r)
            extra: dict[str, object] = {"capacity": r}
            if taus:
                extra["tau"] = torch.tensor([taus[k] for k in keys], dtype=torch.float64)
            tasks.append(ClientTask(int(c), ctx.model, glob, train, round_seed(ctx.seed, rnd, int(c)), extra))
        return tasks

    def _masks(self, glob: Weights, ctx: Context, capacity: float, cache: dict[float, dict[str, torch.Tensor]]
               ) -> dict[str, torch.Tensor]:
        if capacity not in cache:
            cache[capacity] = masks(glob, self.taus(glob, ctx, capacity))
        return cache[capacity]

    def placer(self, state: ServerState, rnd: int, ctx: Context) -> Callable[[ClientResult], Placement]:
        """A result on the elements its capacity's mask keeps (recomputed: pure in the global model and the
        client's capacity); ``count = "nonzero"``: on the elements it changed (FIARSE's code)."""
        glob = state.models["global"]
        caps = self.capacities(ctx, rnd)
        cache: dict[float, dict[str, torch.Tensor]] = {}

        def place(res: ClientResult) -> Placement:
            r = float(caps[res.client_id])
            if self.count == "nonzero":
                kept = {k: res.weights[k] != glob[k] for k in self.taus(glob, ctx, r)}
                return place_masked(res.weights, kept, self.weight_of(res), public=False)
            return place_masked(res.weights, self._masks(glob, ctx, r, cache), self.weight_of(res))

        return place

    def footprints(self, state: ServerState, rnd: int, ctx: Context
                   ) -> Callable[[int], list[tuple[float, Placement]]]:
        glob = state.models["global"]
        caps = self.capacities(ctx, rnd)
        cache: dict[float, dict[str, torch.Tensor]] = {}
        prints: dict[float, Placement] = {}

        def footprints(client: int) -> list[tuple[float, Placement]]:
            r = float(caps[int(client)])
            if r not in prints:
                prints[r] = mask_footprint(glob, self._masks(glob, ctx, r, cache), r)
            return [(1.0, prints[r])]

        return footprints

    def deployed_footprints(self, state: ServerState, ctx: Context) -> dict[str, Placement]:
        glob = state.models["global"]
        cache: dict[float, dict[str, torch.Tensor]] = {}
        return {f"r{r:g}": mask_footprint(glob, self._masks(glob, ctx, r, cache), r)
                for r in sorted(set(self.capacities(ctx, 1).tolist()), reverse=True)}

    def server_step(self, state: ServerState, update: Weights, ctx: Context) -> ServerState:
        old = state.models["global"]
        metrics = self._cost_metrics(old, ctx, state.round + 1)
        if not update:
            return ServerState(state.round + 1, state.models, {**state.buffers, "metrics": metrics})
        if self.server_lr == 1.0:
            new = update
        else:
            new = {k: (v - self.server_lr * (v - update[k]) if v.is_floating_point() else update[k])
                   for k, v in old.items()}
        return ServerState(state.round + 1, {**state.models, "global": new}, {**state.buffers, "metrics": metrics})

    def _cost_metrics(self, glob: Weights, ctx: Context, rnd: int) -> dict[str, float]:
        """Per capacity: elements kept and the bytes of a sparse upload, next to the dense model's."""
        dense = sum(v.numel() for v in glob.values() if v.is_floating_point())
        dense_bytes = sum(v.numel() * v.element_size() for v in glob.values())
        out: dict[str, float] = {"dense_params": dense, "dense_bytes": dense_bytes}
        for r in sorted(set(self.capacities(ctx, rnd).tolist()), reverse=True):
            kept, nbytes = sparse_bytes(glob, self.taus(glob, ctx, r))
            out[f"kept_params.r{r:g}"] = kept
            out[f"sparse_bytes.r{r:g}"] = nbytes
        return out

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        glob = state.models["global"]
        fleet = ctx.fleet
        levels = fleet.levels if fleet is not None else (1.0,)
        tiers = fleet.tiers() if fleet is not None else np.zeros(ctx.num_clients, dtype=np.int64)
        hetero = len(levels) > 1
        targets = {"global": EvalTarget(ctx.model, glob, clients=np.flatnonzero(tiers == 0) if hetero else None)}
        if not self.eval_levels:
            return targets
        for t, w in enumerate(levels):
            r = self.to_capacity(w)
            if r >= 1.0:
                continue
            targets[f"r{r:g}"] = EvalTarget(ctx.model, masked_weights(glob, self.taus(glob, ctx, r)),
                                            clients=np.flatnonzero(tiers == t))
        return targets

    # ------------------------------------------------------------------ client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        tau = task.extra.get("tau")
        kwargs = {}
        if tau is not None:
            keys = maskable_keys(model)
            kwargs["forward"] = MaskedForward({k: float(t) for k, t in zip(keys, tau.tolist())})
        stats = local_sgd(model, data, task.train, seed=task.seed, device=device, **kwargs)
        return ClientResult(task.client_id, len(data), weights_of(model),
                            {"train_loss": stats.loss, "steps": stats.steps}, {"capacity": task.extra.get("capacity")})
