"""FedAvg (McMahan et al., 2017), with optional server learning rate and server momentum (FedAvgM)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

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
from hetfl.packed import span as packed_span
from hetfl.packed import views as packed_views
from hetfl.robust import check_method, robust_average
from hetfl.train import local_sgd


def average_weights(results: Iterable[ClientResult], weighted: bool = True) -> tuple[Weights, int, int]:
    """Streaming (sample-)weighted average of client weights.

    Results are consumed one at a time and only a float64 running sum is kept, so a round's memory
    does not grow with the number of clients.  With one client the average equals its weights.
    Returns (average, clients, samples).

    Results whose weights are packed in one buffer (:mod:`hetfl.packed`; worker processes hand them
    back so) are added through the whole buffer instead of tensor by tensor, and a few of them
    (:data:`BLOCK_RESULTS`) at a time, block by block (:data:`BLOCK_ELEMENTS`), so that the float64
    running sum stays in cache while they are added: per element the additions happen in the same
    order, so the sum is the same.  It is also the same float64 arithmetic as the tensor-by-tensor sum:
    each ``w * x`` is exact in float64 for float32 or narrower weights and an integer ``w``, so packed
    and unpacked results give bit-identical averages.
    """
    sums: dict[str, torch.Tensor] = {}
    dtypes: dict[str, torch.dtype] = {}
    flat_sum: torch.Tensor | None = None  # when the first result was packed: ``sums`` are views of it
    flat_layout = None
    pending: list[tuple[torch.Tensor, float]] = []  # packed results not yet added to flat_sum
    block = 1
    single: Weights | None = None
    total = 0.0
    count = samples = 0
    for res in results:
        w = float(res.num_samples) if weighted else 1.0
        if w <= 0:
            continue
        packed = packed_span(res.weights) if _exact_products(res.weights, w) else None
        if count == 0:
            single = res.weights
            dtypes = {k: v.dtype for k, v in res.weights.items()}
            if packed is not None:
                flat_sum = packed[0].to(torch.float64) * w
                flat_layout = packed[1]
                sums = packed_views(flat_sum, flat_layout)
                block = max(1, min(BLOCK_RESULTS, BLOCK_BYTES // max(1, flat_sum.numel() * 4)))
            else:
                sums = {k: v.detach().to(torch.float64) * w for k, v in res.weights.items()}
        else:
            single = None
            if flat_sum is not None and packed is not None and packed[1] == flat_layout:
                pending.append((packed[0], w))
                if len(pending) >= block:
                    _add_blocked(flat_sum, pending)
            else:
                if pending:
                    _add_blocked(flat_sum, pending)
                for k, v in res.weights.items():
                    sums[k].add_(v.detach().to(torch.float64), alpha=w)
        total += w
        count += 1
        samples += res.num_samples
    if pending:
        _add_blocked(flat_sum, pending)
    if count == 0:
        return {}, 0, 0
    if single is not None:
        return dict(single), 1, samples
    out = {}
    for k, s in sums.items():
        avg = s / total
        out[k] = avg.round().to(dtypes[k]) if not dtypes[k].is_floating_point else avg.to(dtypes[k])
    return out, count, samples


#: Packed results added together, block by block (bounded by BLOCK_BYTES of buffered results).
BLOCK_RESULTS = 8
BLOCK_BYTES = 64 << 20
#: Elements per block: the block's float64 sum and its slice of each result stay in a core's L2 cache.
BLOCK_ELEMENTS = 32768


def _add_blocked(flat_sum: torch.Tensor | None, pending: list[tuple[torch.Tensor, float]]) -> None:
    """``flat_sum += w * x`` for every ``(x, w)`` in ``pending``, in order, one block of elements at a time."""
    assert flat_sum is not None
    for i in range(0, flat_sum.numel(), BLOCK_ELEMENTS):
        acc = flat_sum[i:i + BLOCK_ELEMENTS]
        for x, w in pending:
            acc.add_(x[i:i + BLOCK_ELEMENTS], alpha=w)  # float32 promoted to float64 inside the kernel
    pending.clear()


_NARROW = (torch.float32, torch.float16, torch.bfloat16)


def _exact_products(weights: Weights, w: float) -> bool:
    """Whether ``w * x`` is exact in float64 for every element (float32 or narrower, integer ``w`` < 2**29)."""
    first = next(iter(weights.values()), None)
    return first is not None and first.dtype in _NARROW and w.is_integer() and w < 2**29


@ALGORITHMS.register("fedavg")
@dataclass(frozen=True)
class FedAvg(Algorithm):
    """FedAvg: clients run local SGD on the global model; the server averages (sample-weighted).

    ``aggregator = "median"`` or ``"trimmed_mean"`` (cutting ``trim`` of each end) replaces the mean
    with a coordinate-wise robust reducer (:mod:`hetfl.robust`, unweighted; it holds every update of
    the round, n × the model's memory, where the default streaming mean holds one running sum).
    """

    batchable: ClassVar[bool] = True  # plain local SGD: same-shape clients may train as one batched model
    weighted: bool = True
    server_lr: float = 1.0
    server_momentum: float = 0.0
    aggregator: str = "mean"
    trim: float = 0.1
    min_width: float = 0.0  # sample only clients whose fleet capability is at least this width

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 <= self.min_width <= 1.0:
            raise ConfigError(f"algorithm.min_width must be in [0, 1] (0 = every client), got {self.min_width}")
        if self.server_lr <= 0:
            raise ConfigError(f"algorithm.server_lr must be > 0, got {self.server_lr}")
        if not 0 <= self.server_momentum < 1:
            raise ConfigError(f"algorithm.server_momentum must be in [0, 1), got {self.server_momentum}")
        check_method(self.aggregator, self.trim)

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

    def aggregate(self, state: ServerState, rnd: int, results: Iterable[ClientResult],
                  ctx: Context) -> Weights:
        if self.aggregator != "mean":
            return robust_average((r.weights for r in results if r.num_samples > 0), self.aggregator, self.trim)
        avg, _, _ = average_weights(results, self.weighted)
        return avg

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
