"""The embedded engine: runs every client of a round in this process, one after another.

It keeps one reusable module per distinct :class:`~hetfl.algorithms.base.ModelRef` (no deepcopy
per client), loads each task's weights with ``load_state_dict``, gathers the client's samples by
index from the in-memory dataset, and hands results to the algorithm's aggregation as a stream,
so only one client's update is alive beyond the running sum.  The round itself (sampling, ``[faults]``,
validation, aggregation, accounting) is :class:`hetfl.rounds.Round`, the same for every engine; this
engine is its transport (``execute``).
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context, ModelRef, ServerState
from hetfl.data.federation import Federation
from hetfl.engines.batched import make_batcher
from hetfl.rounds import Outcome, Round, RoundReport, in_order


class ModelCache:
    """One module per ModelRef, built once and reused by every client that trains that model."""

    def __init__(self, ctx: Context, device: torch.device) -> None:
        self.ctx = ctx
        self.device = device
        self._modules: dict[ModelRef, nn.Module] = {}
        self._slots: dict[ModelRef, _StateSlots | None] = {}

    def get(self, ref: ModelRef) -> nn.Module:
        module = self._modules.get(ref)
        if module is None:
            module = ref.build(self.ctx.info).to(self.device)
            self._modules[ref] = module
            self._slots[ref] = _StateSlots.of(module)
        return module

    def loaded(self, ref: ModelRef, weights: dict[str, torch.Tensor]) -> nn.Module:
        """The module of ``ref`` with ``weights`` loaded (``load_state_dict``'s result, strict)."""
        module = self.get(ref)
        slots = self._slots[ref]
        if slots is None or not slots.load(weights):
            module.load_state_dict(weights)
        return module


class _StateSlots:
    """Where each entry of a module's state dict lives (submodule, attribute), to load weights with one
    ``copy_`` per tensor.  ``load_state_dict`` does the same copies but walks the module tree, checks and
    calls hooks in Python on every call (111 us for the 2NN against 51 us by plain copies, one thread).
    Only for modules without load hooks or custom ``_load_from_state_dict``; anything that is not an exact
    match (keys in order, shapes) goes to ``load_state_dict``, which raises its own errors."""

    def __init__(self, keys: tuple[str, ...], places: list[tuple[nn.Module, str]], shapes: list[torch.Size]) -> None:
        self.keys, self.places, self.shapes = keys, places, shapes

    @staticmethod
    def of(module: nn.Module) -> _StateSlots | None:
        base = nn.Module._load_from_state_dict
        for m in module.modules():
            if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks \
                    or type(m)._load_from_state_dict is not base:
                return None
        state = module.state_dict(keep_vars=True)
        places = []
        for key in state:
            path, _, attr = key.rpartition(".")
            places.append((module.get_submodule(path) if path else module, attr))
        return _StateSlots(tuple(state), places, [t.shape for t in state.values()])

    def load(self, weights: dict[str, torch.Tensor]) -> bool:
        """Copy ``weights`` in if they match exactly; False (nothing copied) if they do not."""
        if len(weights) != len(self.keys) or tuple(weights) != self.keys:
            return False
        values = list(weights.values())
        if any(v.shape != s for v, s in zip(values, self.shapes)):
            return False
        with torch.no_grad():
            for (m, attr), v in zip(self.places, values):
                getattr(m, attr).copy_(v)
        return True


class Simulator:
    """In-process engine driving any :class:`~hetfl.algorithms.base.Algorithm`."""

    name = "simulator"

    def __init__(self, algorithm: Algorithm, federation: Federation, ctx: Context,
                 device: torch.device | str = "cpu", batched: bool | str = False) -> None:
        self.algorithm = algorithm
        self.federation = federation
        self.ctx = ctx
        self.device = torch.device(device)
        self.models = ModelCache(ctx, self.device)
        self.round = Round(algorithm, ctx, self, federation.dataset.train.x[:1])  # the round, with [faults]
        # same-shape clients trained as one vmapped model (hetfl.engines.batched); None: sequential
        self.batcher = make_batcher(batched, algorithm, federation, ctx, self.device, self.models.get)

    def close(self) -> None:
        """Nothing to release: everything lives in this process."""

    def run_client(self, task: ClientTask) -> ClientResult:
        res = self.batcher.take(task) if self.batcher is not None else None
        if res is not None:
            return res
        model = self.models.loaded(task.model, task.weights)
        data = self.federation.client_train(task.client_id)
        return self.algorithm.local_update(task, model, data, self.device)

    def execute(self, tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Outcome]]:
        """``(task, run_client)`` pairs in task order (the transport of :class:`hetfl.rounds.Round`); a
        client-parallel engine overrides this (:class:`hetfl.engines.workers.ParallelSimulator`)."""
        return in_order(tasks, self.run_client)

    def plan(self, tasks: list[ClientTask]) -> None:
        """Told which clients will run this round, before any does: the batcher groups same-shape ones."""
        if self.batcher is not None:
            self.batcher.plan(tasks)

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundReport]:
        return self.round.run(state, rnd)
