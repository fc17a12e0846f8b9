"""The embedded engine: runs every client of a round in this process, one after another.

A client runs through the one :class:`~hetfl.client.ClientRunner` (one reusable module per distinct
:class:`~hetfl.algorithms.base.ModelRef`, the task's weights loaded into it, the client's samples
gathered by index from the in-memory dataset), and results go to the algorithm's aggregation as a
stream, so only one client's update is alive beyond the running sum.  The round itself (sampling,
``[faults]``, validation, aggregation, accounting) is :class:`hetfl.rounds.Round`, the same for every
engine; this engine is its transport (``open``: an :class:`~hetfl.rounds.InProcess` session).
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context, ServerState
from hetfl.asynchronous import make_round
from hetfl.client import ClientRunner
from hetfl.data.federation import Federation
from hetfl.engines.batched import make_batcher
from hetfl.model_cache import ModelCache
from hetfl.rounds import InProcess, RoundReport


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
        self.runner = ClientRunner(algorithm, federation, ctx, self.device, self.models)
        # the round, with [faults]; FedBuff's server rule under [asynchronous] (hetfl.asynchronous)
        self.round = make_round(algorithm, ctx, self, federation.dataset.train.x[:1])
        # same-shape clients trained as one vmapped model (hetfl.engines.batched); None: sequential
        self.batcher = make_batcher(batched, algorithm, federation, ctx, self.device, self.models.get)

    def close(self) -> None:
        """Nothing to release: everything lives in this process."""

    def run_client(self, task: ClientTask) -> ClientResult:
        """One client: its batched result if the batcher trained its chunk, else :class:`ClientRunner`'s."""
        res = self.batcher.take(task) if self.batcher is not None else None
        return res if res is not None else self.runner(task)

    def open(self) -> Any:
        """A session that runs each client here when its outcome is called (the transport of
        :class:`hetfl.rounds.Round`); a client-parallel engine overrides this
        (:class:`hetfl.engines.workers.ParallelSimulator`)."""
        return InProcess(self.run_client)

    def plan(self, tasks: list[ClientTask]) -> None:
        """Told which clients will run this round, before any does: the batcher groups same-shape ones."""
        if self.batcher is not None:
            self.batcher.plan(tasks)

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundReport]:
        return self.round.run(state, rnd)
