"""The one submodel round: a client trains a *level* of the global model, and its result lands back on it.

Width methods (HeteroFL, FedRolex, Federated Dropout, FjORD: :mod:`hetfl.algorithms.heterofl`) and depth methods
(DepthFL, ScaleFL, InclusiveFL: :mod:`hetfl.algorithms.depthfl`) differ in what a level is (a width, or a
``(width, depth)`` pair of a model with early exits), in the client's loss and in the server's post-processing.
Everything else is this base, composed of registered parts from :mod:`hetfl.hetero`:

* the **level plan** of a round (:meth:`SubmodelFL.level_plan`): which level every client, sampled or not,
  trains in round ``rnd`` (its fleet tier's, or a draw of the level schedule), made once per round and kept;
* the **index policy** (``algorithm.index_policy``: prefix, rolling, random, ...): which channels a level narrower
  than the global model keeps;
* the **placement** of a result (:meth:`placer`): the level's keys at its channels, in the global tensors
  (:func:`hetfl.hetero.extract.place_slice`), for the round's reducer (:mod:`hetfl.aggregation`);
* the **footprints** (:meth:`footprints`): every level a client may train this round, with its probability, as
  the elements it would cover (differential privacy's expected counts), and the deployed submodels' footprints.

A subclass gives the level's model (:meth:`level_ref`), its width (:meth:`level_width`; or its channels per group,
:meth:`level_selection`), the schedule's law over levels (:meth:`plan_law`) and the keys the server never averages
(:meth:`skip_keys`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import torch

from hetfl.aggregation import Placement
from hetfl.algorithms.base import Algorithm, ClientResult, Context, ServerState, Weights
from hetfl.data.base import DataInfo
from hetfl.hetero import group_sizes, spec_for
from hetfl.hetero.extract import place_slice, selection_signature, slice_footprint
from hetfl.hetero.policy import IndexPolicy, Prefix, Selection, index_policy
from hetfl.models import ModelRef

Level = Hashable  # a width (float) or a (width, depth) pair


@dataclass(frozen=True)
class LevelPlan:
    """One round's levels: ``of(client)`` the level it trains, ``law(client)`` as ``{level: probability}``."""

    rnd: int
    of: Callable[[int], Any]
    law: Callable[[int], dict[Any, float]]


@dataclass(frozen=True)
class SubmodelFL(Algorithm):
    """Base of the width and depth submodel methods (not registered): see the module docstring."""

    #: which channels a level narrower than the global model keeps (hetfl.hetero.policy)
    index_policy: str = "prefix"

    @cached_property
    def channels(self) -> IndexPolicy:
        """The index policy: which channels a client of a given width keeps."""
        return index_policy(self.index_policy)

    # ------------------------------------------------------------------ what a subclass defines
    def global_ref(self, ctx: Context) -> ModelRef:
        """The model whose weights the server holds (every level's keys are a subset of its keys)."""
        return ctx.model

    def level_ref(self, ctx: Context, level: Any) -> ModelRef:
        """The model a client of ``level`` trains."""
        raise NotImplementedError

    def level_width(self, level: Any) -> float:
        raise NotImplementedError

    def plan_law(self, state: ServerState, ctx: Context, rnd: int) -> tuple[Callable[[int], Any],
                                                                             Callable[[int], dict[Any, float]]]:
        """``(of, law)`` of round ``rnd``: a client's level, and its law (pure in seed, round, client, state)."""
        raise NotImplementedError

    def skip_keys(self, glob: Weights) -> frozenset[str]:
        """Keys the server keeps out of the average (e.g. static BatchNorm's statistics)."""
        return frozenset()

    def class_mask(self, res: ClientResult) -> torch.Tensor | None:
        """Per-class weights of a result's output rows (HeteroFL's classifier rule), or None."""
        return None

    # ------------------------------------------------------------------ the round's plan, once
    def level_plan(self, state: ServerState, ctx: Context, rnd: int) -> LevelPlan:
        """The levels of round ``rnd``, planned once per round and state (configure, place and footprints
        all read this one plan)."""
        held = _PLANS.get(id(self))
        if held is not None and held[0] is self and held[1] == rnd and held[2] is state.buffers and held[3] is ctx:
            return held[4]
        of, law = self.plan_law(state, ctx, rnd)
        plan = LevelPlan(rnd, of, law)
        _PLANS[id(self)] = (self, rnd, state.buffers, ctx, plan)  # strong references: no id is reused meanwhile
        while len(_PLANS) > 8:
            _PLANS.pop(next(iter(_PLANS)))
        return plan

    def selection(self, ctx: Context, width: float, rnd: int = 0, client: int = 0,
                  policy: IndexPolicy | None = None) -> Selection:
        """The channels a client of ``width`` keeps in round ``rnd`` (the index policy; ``policy``: another,
        e.g. the prefix a deployed submodel is evaluated with)."""
        ref = self.global_ref(ctx)
        spec = spec_for(ref, ctx.info)
        return (policy or self.channels).select(spec.groups, group_sizes(ref, ctx.info, width), rnd=rnd,
                                                client=client, seed=ctx.seed)

    def level_selection(self, ctx: Context, level: Any, rnd: int = 0, client: int = 0,
                        policy: IndexPolicy | None = None) -> Selection:
        """The channels a client of ``level`` keeps: by default the selection of the level's width (a method
        whose levels have per-layer widths, e.g. successive layer training, overrides this)."""
        return self.selection(ctx, self.level_width(level), rnd, client, policy)

    def level_keys(self, ctx: Context, level: Any, glob: Weights) -> list[str]:
        """The floating tensors a client of ``level`` holds and the server averages."""
        skip = self.skip_keys(glob)
        keys = keys_of(self.level_ref(ctx, level), ctx.info)
        return [k for k in keys if k in glob and glob[k].is_floating_point() and k not in skip]

    # ------------------------------------------------------------------ aggregation parts
    def placer(self, state: ServerState, rnd: int, ctx: Context) -> Callable[[ClientResult], Placement]:
        """A result's level at its channels, in the global tensors: the server recomputes the level it
        assigned and the index policy's selection (both pure in seed, round, client and state)."""
        glob = state.models["global"]
        spec = spec_for(self.global_ref(ctx), ctx.info)
        skip = self.skip_keys(glob)
        plan = self.level_plan(state, ctx, rnd)

        def place(res: ClientResult) -> Placement:
            sel = self.level_selection(ctx, plan.of(res.client_id), rnd, res.client_id)
            return place_slice(glob, spec, res.weights, sel, self.weight_of(res), self.class_mask(res), skip)

        return place

    def footprints(self, state: ServerState, rnd: int, ctx: Context
                   ) -> Callable[[int], list[tuple[float, Placement]]]:
        """Every level a client may train this round (its law), at its channels, as the elements it covers."""
        plan = self.level_plan(state, ctx, rnd)
        cache: dict[tuple, Placement] = {}

        def footprints(client: int) -> list[tuple[float, Placement]]:
            return [(p, self._footprint(state, ctx, level, self.level_selection(ctx, level, rnd, client), cache))
                    for level, p in plan.law(client).items()]

        return footprints

    def deployed_levels(self, ctx: Context) -> dict[str, Any]:
        """The levels devices deploy, by label (for per-level noise figures under ``[privacy]``)."""
        return {}

    def deployed_footprints(self, state: ServerState, ctx: Context) -> dict[str, Placement]:
        """Every deployed level's submodel: its keys at the prefix of its width."""
        cache: dict[tuple, Placement] = {}
        return {label: self._footprint(state, ctx, level, self.level_selection(ctx, level, policy=Prefix()), cache)
                for label, level in self.deployed_levels(ctx).items()}

    def _footprint(self, state: ServerState, ctx: Context, level: Any, sel: Selection, cache: dict) -> Placement:
        key = (level, selection_signature(sel))
        if key not in cache:
            glob = state.models["global"]
            cache[key] = slice_footprint(glob, spec_for(self.global_ref(ctx), ctx.info), sel,
                                         self.level_keys(ctx, level, glob), key)
        return cache[key]


#: the last round's plan per algorithm object (kept out of the object: it must stay picklable for worker processes)
_PLANS: dict[int, tuple] = {}
@lru_cache(maxsize=256)
def keys_of(ref: ModelRef, info: DataInfo) -> tuple[str, ...]:
    """State-dict keys of the model ``ref`` builds (built once, without moving the global generator)."""
    with torch.random.fork_rng(devices=[]):
        return tuple(ref.build(info).state_dict())


__all__ = ["Level", "LevelPlan", "SubmodelFL", "keys_of"]
