"""InclusiveFL (Liu et al., KDD 2022): depth-scaled models, and momentum distillation from deeper layers.

A composition of the depth mechanism (:class:`~hetfl.algorithms.depthfl.MultiExitFL`, depth-only levels:
the paper's 4 / 8 / 12 of 12 Transformer layers are ``"1x1,1x0.66,1x0.33"``) with one classifier per level
(each client trains only its deepest exit, so every level's classifier is local to that level, as with
InclusiveFL's ``--local_cls``) and InclusiveFL's server-side rule, restated on a shared global model:

* after aggregation, the update (new - old, the round's pseudo-gradient) of every block the next deeper
  level has beyond level i is averaged, uniformly over those blocks, into a *momentum* for level i's top
  block (matched parameter by parameter: the same name inside structurally identical blocks, e.g.
  ``layers.5.fc1.weight`` for ``layers.3.fc1.weight``; blocks whose parameters do not match, such as the
  layers of a plain MLP, carry none);
* in the next round, the top block's update becomes beta * momentum + (1 - beta) * its own update
  (beta = ``mom_beta``, 0.2 as in the README), when that block was trained.

Differences from the authors' code, stated: there one model per device group is kept and the top layer
(``--local_one``) and pooler are group-local, so the blend touches only the shallow group's copy; here one
global model is kept, the top block of level i is also trained by deeper clients, and the blend moves that
shared block.  Clients send weights, not gradients; averaging is per element over the clients holding it.
With ``mom_beta = 0`` this is the depth-scaled FedAvg that Flower's DepthFL baseline calls InclusiveFL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from hetfl.algorithms.base import Context, ServerState, Weights
from hetfl.algorithms.depthfl import MultiExitFL, shapes_of
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.errors import ConfigError
from hetfl.hetero.depth import encode_params, plan_for


@ALGORITHMS.register("inclusivefl")
@dataclass(frozen=True)
class InclusiveFL(MultiExitFL):
    """InclusiveFL: depth-scaled clients, one classifier per level, momentum distillation into top layers."""

    levels: str = "1x1,1x0.66,1x0.33"
    mom_beta: float = 0.2

    client_exits: ClassVar[str] = "deepest"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.mom_beta < 1:
            raise ConfigError(f"algorithm.mom_beta must be in [0, 1), got {self.mom_beta}")
        if self.per_level:
            raise ConfigError("algorithm.per_level is not available for inclusivefl: its momentum step matches "
                              "shared keys between blocks; use nefl, depthfl or scalefl, or leave per_level empty")
        if self.dyn > 0:
            raise ConfigError("algorithm.dyn (FedDyn) is not available for inclusivefl: its momentum step rewrites "
                              "the server update; use depthfl, scalefl or nefl, or set algorithm.dyn = 0")

    def transfer_map(self, ctx: Context) -> dict[str, list[str]]:
        """For every parameter of a shallower level's top block, the same parameters of the blocks the next
        deeper level adds."""
        plan = plan_for(ctx.model.name, encode_params(ctx.model.params), ctx.info)
        model_keys = shapes_of(self.global_ref(ctx), ctx.info)
        kept = sorted({plan.kept(d, self.depth_rule) for _, d in self.level_table(ctx)})
        out: dict[str, list[str]] = {}
        for top, deeper in zip(kept, kept[1:]):
            units = [u for u in plan.units[top - 1] if _layer(model_keys, u)]
            if not units:
                continue
            unit = units[-1]
            for key in _layer(model_keys, unit):
                suffix = key[len(unit) + 1:]
                sources = [f"{u}.{suffix}" for b in range(top, deeper) for u in plan.units[b]
                           if f"{u}.{suffix}" in model_keys and u != unit
                           and model_keys[f"{u}.{suffix}"] == model_keys[key]]
                if sources and not key.endswith("num_batches_tracked"):
                    out[key] = sources
        return out

    def server_step(self, state: ServerState, update: Weights, ctx: Context) -> ServerState:
        if not update or self.mom_beta == 0:
            return super().server_step(state, update, ctx)
        update, windows = self.split_update(state, update)
        old = state.models["global"]
        mapping = self.transfer_map(ctx)
        momentum = state.buffers.get("momentum", {})
        new = dict(update)
        blended = 0
        for key, prev in momentum.items():
            own = update[key] - old[key]
            if key in update and bool(own.any()):
                new[key] = old[key] + (1 - self.mom_beta) * own + self.mom_beta * prev
                blended += 1
        fresh = {}
        for key, sources in mapping.items():
            deltas = [update[s] - old[s] for s in sources]
            if any(bool(d.any()) for d in deltas):
                fresh[key] = torch.stack(deltas).mean(0)
        buffers = {**state.buffers, "momentum": {**momentum, **fresh},
                   "metrics": {"momentum_blended_tensors": blended}}
        return self.keep_windows(ServerState(state.round + 1, {**state.models, "global": new}, buffers), windows)


def _layer(keys: dict, unit: str) -> list[str]:
    return [k for k in keys if k.startswith(unit + ".")]
