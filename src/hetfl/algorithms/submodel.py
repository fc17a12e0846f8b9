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
* the **per-level keys** (:meth:`owned_keys`, none by default): keys the server holds once per level, which a
  client reads and writes at its own level (:meth:`view`; its pieces relabelled by
  :func:`hetfl.aggregation.owned_by_level`);
* the **footprints** (:meth:`footprints`): every level a client may train this round, with its probability, as
  the elements it would cover (differential privacy's expected counts), and the deployed submodels' footprints.

A subclass gives the level's model (:meth:`level_ref`), its width (:meth:`level_width`; or its channels per group,
:meth:`level_selection`), the schedule's law over levels (:meth:`plan_law`) and the keys the server never averages
(:meth:`skip_keys`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import Any

import torch

from hetfl.aggregation import Placement, Reducer, level_view, owned_by_level
from hetfl.algorithms.base import Algorithm, ClientResult, Context, ServerState, Weights
from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
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


#: ``algorithm.eval_window``: which channels a narrower tier's submodel is evaluated with
EVAL_WINDOWS = ("prefix", "trained")
#: the state buffer of the last trained window per width (``eval_window = "trained"``)
WINDOWS = "windows"


class TrainedUpdate(dict):
    """A round's new global weights, with ``windows``: per width (``f"{w:g}"``) the ``[round, client]`` whose
    selection it last trained (the smallest client id among the round's results of that width)."""

    windows: dict[str, list[int]]


@dataclass(frozen=True)
class SubmodelFL(Algorithm):
    """Base of the width and depth submodel methods (not registered): see the module docstring."""

    #: which channels a level narrower than the global model keeps (hetfl.hetero.policy)
    index_policy: str = "prefix"
    #: which channels a narrower tier is evaluated with: "prefix" (the first ones, whatever the index policy
    #: trained), or "trained": the window its clients last trained (rolling, random policies), the prefix
    #: score then reported beside it as ``prefix_w<width>``
    eval_window: str = "prefix"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.eval_window not in EVAL_WINDOWS:
            raise ConfigError(f"algorithm.eval_window must be one of {', '.join(EVAL_WINDOWS)}, "
                              f"got {self.eval_window!r}")

    @property
    def tracks_windows(self) -> bool:
        """Whether tiers are evaluated with their last trained window (and the state records it)."""
        return self.eval_window == "trained" and not isinstance(self.channels, Prefix)

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

    def owned_keys(self, ctx: Context) -> frozenset[str]:
        """Keys kept as one copy per level ("inconsistent parameters", NeFL): the server holds ``key@<label>``
        for every level, a client reads and writes its own level's copy, averaged over that level's clients
        only (:func:`hetfl.aggregation.owned_by_level`).  Default: none (every key shared by the levels)."""
        return frozenset()

    def level_tag(self, level: Any) -> str:
        """A level's label in per-level keys and evaluation labels."""
        return f"{level}"

    def view(self, glob: Weights, ctx: Context, level: Any) -> Weights:
        """The global weights as a client of ``level`` sees them (its own copies of the per-level keys)."""
        return level_view(glob, self.owned_keys(ctx), self.level_tag(level))

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
        """The floating tensors a client of ``level`` holds and the server averages (plain names)."""
        skip = self.skip_keys(glob)
        seen = self.view(glob, ctx, level)
        keys = keys_of(self.level_ref(ctx, level), ctx.info)
        return [k for k in keys if k in seen and seen[k].is_floating_point() and k not in skip]

    # ------------------------------------------------------------------ the windows tiers last trained
    def aggregate(self, state: ServerState, rnd: int, results: Iterable[ClientResult], ctx: Context,
                  reducer: Reducer | None = None) -> Any:
        """The base's aggregate; with ``eval_window = "trained"`` the update also carries, per width, the
        ``(round, client)`` whose selection was trained (:class:`TrainedUpdate`)."""
        if not self.tracks_windows:
            return super().aggregate(state, rnd, results, ctx, reducer)
        plan = self.level_plan(state, ctx, rnd)
        windows: dict[str, list[int]] = {}

        def tap(results: Iterable[ClientResult]) -> Iterator[ClientResult]:
            for res in results:
                width = self.level_width(plan.of(res.client_id))
                key = f"{width:g}"
                if width < 1.0 and (key not in windows or res.client_id < windows[key][1]):
                    windows[key] = [int(rnd), int(res.client_id)]
                yield res

        update = TrainedUpdate(super().aggregate(state, rnd, tap(results), ctx, reducer) or {})
        update.windows = windows
        return update

    def split_update(self, state: ServerState, update: Any) -> tuple[Any, dict[str, list[int]] | None]:
        """``(weights, windows)`` of an update: the plain weights, and the windows after this round (None: the
        state keeps none)."""
        if not self.tracks_windows:
            return update, None
        windows = {**state.buffers.get(WINDOWS, {}), **getattr(update, "windows", {})}
        return (dict(update) if isinstance(update, TrainedUpdate) else update), windows

    @staticmethod
    def keep_windows(new: ServerState, windows: dict[str, list[int]] | None) -> ServerState:
        return new if windows is None else ServerState(new.round, new.models, {**new.buffers, WINDOWS: windows})

    def eval_selection(self, state: ServerState, ctx: Context, width: float) -> Selection | None:
        """The channels the tier of ``width`` is evaluated with: None for the prefix; with ``eval_window =
        "trained"``, the selection of the last ``(round, client)`` that trained that width (the prefix until
        one has)."""
        if not self.tracks_windows or width >= 1.0:
            return None
        rec = state.buffers.get(WINDOWS, {}).get(f"{width:g}")
        return None if rec is None else self.selection(ctx, width, int(rec[0]), int(rec[1]))

    def check_windows(self, ctx: Context) -> None:
        if self.tracks_windows and ctx.privacy is not None:
            raise ConfigError('algorithm.eval_window = "trained" evaluates each tier with the channels of the last '
                              'client that trained it, which reveals who took part in a round: not with [privacy] '
                              '(use eval_window = "prefix")')

    # ------------------------------------------------------------------ aggregation parts
    def placer(self, state: ServerState, rnd: int, ctx: Context) -> Callable[[ClientResult], Placement]:
        """A result's level at its channels, in the global tensors: the server recomputes the level it
        assigned and the index policy's selection (both pure in seed, round, client and state)."""
        glob = state.models["global"]
        spec = spec_for(self.global_ref(ctx), ctx.info)
        skip = self.skip_keys(glob)
        plan = self.level_plan(state, ctx, rnd)
        owned = self.owned_keys(ctx)

        def place(res: ClientResult) -> Placement:
            level = plan.of(res.client_id)
            sel = self.level_selection(ctx, level, rnd, res.client_id)
            if not owned:
                return place_slice(glob, spec, res.weights, sel, self.weight_of(res), self.class_mask(res), skip)
            tag = self.level_tag(level)
            return owned_by_level(place_slice(level_view(glob, owned, tag), spec, res.weights, sel,
                                              self.weight_of(res), self.class_mask(res), skip), owned, tag)

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
            fp = slice_footprint(self.view(glob, ctx, level), spec_for(self.global_ref(ctx), ctx.info), sel,
                                 self.level_keys(ctx, level, glob), key)
            cache[key] = owned_by_level(fp, self.owned_keys(ctx), self.level_tag(level))
        return cache[key]


#: the last round's plan per algorithm object (kept out of the object: it must stay picklable for worker processes)
_PLANS: dict[int, tuple] = {}
@lru_cache(maxsize=256)
def keys_of(ref: ModelRef, info: DataInfo) -> tuple[str, ...]:
    """State-dict keys of the model ``ref`` builds (built once, without moving the global generator)."""
    with torch.random.fork_rng(devices=[]):
        return tuple(ref.build(info).state_dict())


__all__ = ["EVAL_WINDOWS", "Level", "LevelPlan", "SubmodelFL", "TrainedUpdate", "keys_of"]
