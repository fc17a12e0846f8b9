"""The embedded engine: runs every client of a round in this process, one after another.

It keeps one reusable module per distinct :class:`~hetfl.algorithms.base.ModelRef` (no deepcopy
per client), loads each task's weights with ``load_state_dict``, gathers the client's samples by
index from the in-memory dataset, and hands results to the algorithm's aggregation as a stream,
so only one client's update is alive beyond the running sum.  Every round goes through a
:class:`~hetfl.reliability.guard.RoundGuard` (``[faults]``): planned dropouts and stragglers are not
trained, a client's exception is recorded, and only validated results reach the aggregation.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hetfl.accounting import Accountant, TierLedger
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context, ServerState, nbytes
from hetfl.data.federation import Federation
from hetfl.models import ModelRef
from hetfl.reliability.guard import RoundGuard, skip_round


@dataclass
class RoundReport:
    """What happened in one round, for metrics.jsonl."""

    clients: list[int] = field(default_factory=list)
    samples: int = 0
    train_loss_sum: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    train_time_s: float = 0.0
    faults: dict[str, Any] | None = None  # per-round fault metrics (hetfl.reliability.guard), if guarded
    tiers: TierLedger | None = None  # costs summed per capability tier (hetfl.accounting), tier.<label>.<field>
    messages: list[str] = field(default_factory=list)  # lines for the progress console

    def as_metrics(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "samples": self.samples,
            "train_loss": self.train_loss_sum / self.samples if self.samples else float("nan"),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "train_time_s": round(self.train_time_s, 4),
            **(self.faults or {}),
            **(self.tiers.metrics() if self.tiers is not None else {}),
        }


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
        self.guard = RoundGuard(ctx, federation.dataset.train.x[:1])  # dropouts, deadlines, validation
        self.accountant = Accountant(ctx, costs=self.guard.costs)  # per-tier costs in every round's metrics
        # same-shape clients trained as one vmapped model (hetfl.engines.batched); None: sequential
        from hetfl.engines.batched import make_batcher

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

    def dispatch(self, tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Callable[[ClientTask], ClientResult]]]:
        """``(task, run_client)`` pairs in task order; a client-parallel engine overrides this
        (:class:`hetfl.engines.workers.ParallelSimulator`)."""
        return ((task, self.run_client) for task in tasks)

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundReport]:
        algo, ctx = self.algorithm, self.ctx
        rng = np.random.default_rng([ctx.seed, rnd, 0x73616D70])
        clients = algo.sample_clients(state, rnd, ctx, rng)
        tasks = algo.configure_round(state, rnd, clients, ctx)
        report = RoundReport(tiers=self.accountant.ledger())
        book = self.guard.begin(rnd, tasks)  # dropouts and stragglers are decided before anyone trains
        if self.batcher is not None:
            self.batcher.plan(book.to_run)
        report.bytes_down = sum(nbytes(task.weights) for task in tasks)
        costs = {id(task): self.accountant.cost(task) for task in tasks}
        for task in tasks:
            report.tiers.sent(costs[id(task)])

        def stream() -> Iterator[ClientResult]:
            for task, run_client in self.dispatch(book.to_run):
                t0 = time.perf_counter()
                res = book.run(task, run_client)  # None: it raised (recorded as a failure)
                report.train_time_s += time.perf_counter() - t0
                if res is None:
                    continue
                report.bytes_up += nbytes(task.weights)  # a valid result has the task's shapes and dtypes
                report.tiers.trained(costs[id(task)])
                if not book.accept(task, res):  # invalid: rejected with its reason
                    continue
                report.clients.append(res.client_id)
                report.samples += res.num_samples
                loss = res.metrics.get("train_loss", float("nan"))
                if np.isfinite(loss):
                    report.train_loss_sum += loss * res.num_samples
                yield res

        update = None if book.early_skip else algo.aggregate(state, rnd, stream(), ctx)
        report.faults = book.finish()
        report.messages = book.messages
        if book.skipped:  # fewer than faults.min_clients accepted: the global model stays as it was
            return skip_round(state), report
        return algo.server_step(state, update, ctx), report
