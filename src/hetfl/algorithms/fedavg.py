"""FedAvg (McMahan et al., 2017), with optional server learning rate and server momentum (FedAvgM)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hetfl.aggregation import WeightedMean, whole
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
from hetfl.data.base import Split
from hetfl.errors import ConfigError
from hetfl.train import local_sgd


def average_weights(results: Iterable[ClientResult], weighted: bool = True) -> tuple[Weights, int, int]:
    """The (sample-)weighted mean of whole client models, streaming (:class:`hetfl.aggregation.WeightedMean`).

    Returns (average, clients, samples); with one client the average is its weights.  A convenience for
    tests and scripts: algorithms aggregate through :meth:`Algorithm.aggregate`.
    """
    mean = WeightedMean()
    samples = 0
    for res in results:
        w = float(res.num_samples) if weighted else 1.0
        if w > 0:
            samples += res.num_samples
        mean.add(whole(res.weights, weight=w))
    if mean.clients == 0:
        return {}, 0, 0
    return mean.result()["global"], mean.clients, samples


@ALGORITHMS.register("fedavg")
@dataclass(frozen=True)
class FedAvg(Algorithm):
    """FedAvg: clients run local SGD on the global model; the server averages (sample-weighted).

    Aggregation is the base's: every result placed whole on ``global``, reduced by ``aggregator``
    (:mod:`hetfl.aggregation`).
    """

    batchable: ClassVar[bool] = True  # plain local SGD: same-shape clients may train as one batched model
    block_sums: ClassVar[bool] = True  # every task the global weights, every result placed whole: blocks pre-summed
    weighted: bool = True
    server_lr: float = 1.0
    server_momentum: float = 0.0
    min_width: float = 0.0  # sample only clients whose fleet capability is at least this width

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.min_width <= 1.0:
            raise ConfigError(f"algorithm.min_width must be in [0, 1] (0 = every client), got {self.min_width}")
        if self.server_lr <= 0:
            raise ConfigError(f"algorithm.server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"algorithm.server_momentum must be in [0, 1), got {self.server_momentum}")

    # ---------------------------------------------------------------- server
    def init_state(self, ctx: Context) -> ServerState:
        torch.manual_seed(round_seed(ctx.seed, 0))
        return ServerState(round=0, models={"global": weights_of(ctx.model.build(ctx.info))})

    def sample_clients(self, state: ServerState, rnd: int, ctx: Context, rng: np.random.Generator) -> np.ndarray:
        """The base sampling, or — with ``min_width`` — only among clients that can afford that width
        (the "drop the weak devices" baseline of width-heterogeneous FL)."""
        if self.min_width <= 0 or ctx.fleet is None:
            return super().sample_clients(state, rnd, ctx, rng)
        capable = np.flatnonzero(ctx.fleet.max_width >= self.min_width - 1e-12)
        if len(capable) == 0:
            raise ConfigError(f"algorithm.min_width={self.min_width}: no client of the fleet can afford it "
                              f"(fleet levels {list(ctx.fleet.levels)})")
        k = min(self.clients_for(ctx.num_clients), len(capable))
        return np.sort(rng.choice(capable, size=k, replace=False))

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int],
                        ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        glob = state.models["global"]
        return [ClientTask(int(c), ctx.model, glob, train, round_seed(ctx.seed, rnd, int(c)))
                for c in clients]

    def server_step(self, state: ServerState, update: Weights, ctx: Context) -> ServerState:
        if not update:  # nobody reported: keep the model
            return ServerState(state.round + 1, state.models, state.buffers)
        old = state.models["global"]
        if self.server_lr == 1.0 and self.server_momentum == 0.0:
            new = update
            buffers = state.buffers
        else:
            new, mom = {}, dict(state.buffers.get("momentum", {}))
            for k, w_old in old.items():
                if not w_old.is_floating_point():
                    new[k] = update[k]
                    continue
                delta = w_old - update[k]  # pseudo-gradient
                if self.server_momentum > 0:
                    buf = mom.get(k)
                    buf = delta.clone() if buf is None else buf.mul(self.server_momentum).add_(delta)
                    mom[k] = buf
                    delta = buf
                new[k] = w_old - self.server_lr * delta
            buffers = {**state.buffers, "momentum": mom}
        return ServerState(state.round + 1, {**state.models, "global": new}, buffers)

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        return {"global": EvalTarget(ctx.model, state.models["global"])}

    # ---------------------------------------------------------------- client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split,
                     device: torch.device) -> ClientResult:
        stats = local_sgd(model, data, task.train, seed=task.seed, device=device)
        return ClientResult(
            client_id=task.client_id,
            num_samples=len(data),
            weights=weights_of(model),
            metrics={"train_loss": stats.loss, "steps": stats.steps},
        )
