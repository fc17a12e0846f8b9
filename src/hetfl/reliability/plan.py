"""The simulated time model, and the up-front plan of a round: who drops out, who misses the deadline.

A client's simulated round time is its compute time plus its transfer time::

    compute_s = train_flops / (fleet.speed[c] * faults.device_gflops * 1e9)
    comm_s    = (bytes_down + bytes_up) * 8 / (fleet.bandwidth_mbps[c] * 1e6)

where ``train_flops = 3 × forward_flops × planned_samples`` (:func:`hetfl.accounting.train_cost`,
FedScale's rule: compute = 3 × batch × steps × per-sample inference cost), ``planned_samples`` follows
from the client's data size and the task's ``[train]`` config (:func:`hetfl.accounting.planned_samples`),
``bytes_down`` is the task's weights and ``bytes_up`` the same (a result has the task's shapes).  One
link speed serves both directions (the fleet's ``bandwidth_mbps``, a lognormal draw around
``fleet.bandwidth_mbps`` per client).  Without a fleet every client has speed 1 and 20 Mbit/s.

Everything here is known before any client trains, so :func:`plan_round` decides drops up front as a
pure function of (tasks, round, fleet, model costs, seed): a client drops out with probability
``faults.dropout`` (a uniform draw seeded by (seed, round, client), independent of execution order
and of resumes), and a client whose simulated time exceeds ``faults.deadline_s`` is a straggler whose
update is discarded.  Engines skip training both (their updates would be thrown away).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from hetfl.accounting import ModelCost, client_cost, planned_samples  # noqa: F401  (planned_samples: re-exported)
from hetfl.algorithms.base import ClientTask, Context
from hetfl.models import ModelRef
from hetfl.reliability import FaultsConfig

DEFAULT_BANDWIDTH_MBPS = 20.0
DROP_DROPOUT = "dropout"
DROP_DEADLINE = "deadline"


def dropout_draw(seed: int, rnd: int, client_id: int) -> float:
    """The uniform [0, 1) draw that decides whether ``client_id`` drops out in round ``rnd``."""
    return float(np.random.default_rng([seed, rnd, client_id, 0x64726F70]).random())


@dataclass(frozen=True)
class ClientPlan:
    """The planned work and fate of one selected client."""

    client_id: int
    tier: int
    samples: int
    flops: int
    bytes_down: int
    bytes_up: int
    compute_s: float
    comm_s: float
    drop: str | None = None  # None (runs), "dropout" or "deadline"

    @property
    def time_s(self) -> float:
        return self.compute_s + self.comm_s


@dataclass(frozen=True)
class RoundPlan:
    rnd: int
    clients: tuple[ClientPlan, ...]  # one per task, in task order

    def count(self, drop: str | None) -> int:
        return sum(1 for c in self.clients if c.drop == drop)


def client_tiers(ctx: Context) -> np.ndarray:
    """The capability tier of every client (index into ``fleet.levels``, 0 = widest); all 0 without a fleet."""
    if ctx.fleet is None:
        return np.zeros(ctx.num_clients, dtype=np.int64)
    return ctx.fleet.tiers()


def plan_round(tasks: Sequence[ClientTask], rnd: int, ctx: Context, faults: FaultsConfig,
               costs: Mapping[ModelRef, ModelCost], tiers: np.ndarray | None = None) -> RoundPlan:
    """Plan every task of round ``rnd``: its simulated time and whether it drops out or misses the deadline."""
    fleet = ctx.fleet
    tiers = client_tiers(ctx) if tiers is None else tiers
    plans = []
    for task in tasks:
        c = int(task.client_id)
        speed = float(fleet.speed[c]) if fleet is not None else 1.0
        mbps = float(fleet.bandwidth_mbps[c]) if fleet is not None else DEFAULT_BANDWIDTH_MBPS
        cost = client_cost(task, ctx, costs[task.model], int(tiers[c]))
        compute_s = cost.flops / (speed * faults.device_gflops * 1e9)
        comm_s = (cost.bytes_down + cost.bytes_up) * 8 / (mbps * 1e6)
        drop = None
        if faults.dropout > 0 and dropout_draw(ctx.seed, rnd, c) < faults.dropout:
            drop = DROP_DROPOUT
        elif faults.deadline_s > 0 and compute_s + comm_s > faults.deadline_s:
            drop = DROP_DEADLINE
        plans.append(ClientPlan(c, cost.tier, cost.samples, cost.flops, cost.bytes_down, cost.bytes_up, compute_s,
                                comm_s, drop))
    return RoundPlan(rnd, tuple(plans))
