"""Running one client, written once for every engine that carries server algorithms.

:class:`ClientRunner` is what the in-process simulator, a worker process and a Flower ClientApp each call
with a :class:`~hetfl.algorithms.base.ClientTask`: it loads the task's weights into the reusable module of
the task's :class:`~hetfl.models.ModelRef` (:class:`~hetfl.model_cache.ModelCache`: no module built or
deep-copied per client), gathers the client's samples from the federation, and calls the algorithm's own
``local_update``.  :meth:`ClientRunner.timed` also says how long that took (a worker and a Flower node
report it).  Engines differ only in how a task reaches the runner and how its result comes back.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context
from hetfl.model_cache import ModelCache


class ClientRunner:
    """Runs clients' tasks in this process with one :class:`ModelCache` (one module per model shape)."""

    def __init__(self, algorithm: Algorithm, federation: Any, ctx: Context, device: torch.device | str,
                 models: ModelCache | None = None) -> None:
        self.algorithm = algorithm
        self.federation = federation
        self.device = torch.device(device)
        self.models = models if models is not None else ModelCache(ctx, self.device)

    def __call__(self, task: ClientTask) -> ClientResult:
        """The client's result: ``local_update`` on its own data, from the task's weights."""
        model = self.models.loaded(task.model, task.weights)
        data = self.federation.client_train(task.client_id)
        return self.algorithm.local_update(task, model, data, self.device)

    def timed(self, task: ClientTask) -> tuple[ClientResult, float]:
        """The client's result and the seconds it took (loading, training)."""
        t0 = time.perf_counter()
        result = self(task)
        return result, time.perf_counter() - t0
