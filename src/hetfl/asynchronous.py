"""Buffered asynchronous aggregation (FedBuff) on a virtual clock: a server rule on the one round's parts.

In a real fleet a synchronous round waits for its slowest reporting client.  FedBuff (Nguyen et al., AISTATS
2022) keeps ``concurrency`` clients training at all times; each starts from the server model of the moment it
is dispatched, and the server takes a step whenever ``buffer`` results have arrived, weighting a result
trained on a model ``s`` steps old by ``1 / sqrt(1 + s)`` (or 1).  hetfl simulates it on a virtual clock:
a task's duration is its client's compute (the task's training FLOPs over the device's throughput) plus its
transfer (bytes over bandwidth), the time model of :mod:`hetfl.reliability.plan` that synchronous rounds
use for deadlines.  Results are pure functions of their tasks, so the simulation trains a task when its
virtual arrival comes (on whatever transport the engine has: in process or worker processes) and the run
is deterministic under its seed.

One call of :meth:`BufferedRound.run` is one server step (a "round" in metrics.jsonl and checkpoints):

1. pop the earliest arrivals on the virtual clock (simultaneous arrivals together), train them, add the
   reported ones to the buffer; every popped client frees a slot, refilled at once from the idle clients
   with the current model (so replacements dispatched before the step are stale by one);
2. once the buffer holds ``buffer`` results: if every result was trained on the current model and the
   server learning rate is 1, the algorithm's own aggregate and server step (so ``buffer = concurrency =
   clients per round`` with equal durations is synchronous FedAvg bit for bit); otherwise the mean of the
   updates (result - its task's weights, each scaled by its staleness weight), placed by the algorithm's
   placer *of the round it was dispatched in* (a stale slice lands where it was cut), averaged per element
   over the clients covering it (:mod:`hetfl.aggregation`), and applied with ``server_lr``;
3. refill the freed slots with the new model.

Where hetfl differs from the paper: results arriving at the same virtual instant are buffered together (a
step may take more than ``buffer``); a client is not dispatched twice on the same model.  The in-flight
clients, the clock and the models they were dispatched with are part of the server state, so a resumed run
equals an uninterrupted one.  Not with ``[privacy]`` (who reports is no longer a Poisson sample: the
accountant's amplification does not apply; refused), ``faults.deadline_s`` (a deadline is a synchronous
notion; refused), algorithms with several server models or side channels (FedDF, FedGen) or graph
algorithms, or the Flower engine (its Grid drives synchronous rounds; refused).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from hetfl.accounting import Accountant
from hetfl.aggregation import WeightedMean
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context, ServerState, nbytes, returned
from hetfl.errors import ConfigError, HetflError
from hetfl.reliability.guard import RoundGuard
from hetfl.reliability.plan import plan_round
from hetfl.rounds import Round, RoundReport, round_rng, state_bytes, synchronous

#: ServerState.buffers key of the asynchronous book (clock, clients in flight, models they were sent).
BOOK = "fedbuff"
#: Third word of the seed of a replacement draw ("asyc").
ASYNC_STREAM = 0x61737963


def check_async(algorithm: Any, private: bool, deadline_s: float, engine: str) -> None:
    """A ConfigError if ``[asynchronous]`` cannot run with this algorithm, ``[privacy]``, deadline or engine
    (checked before any data is loaded or file written)."""
    if getattr(algorithm, "decentralized", False) or not hasattr(algorithm, "placer"):
        raise ConfigError("[asynchronous] mode = \"fedbuff\" needs a server algorithm; decentralized algorithms have "
                          "no server to buffer results")
    if algorithm.reads_beside_mean:
        raise ConfigError(f"[asynchronous] mode = \"fedbuff\" averages updates of one global model; algorithm "
                          f"{type(algorithm).__name__} keeps several server models or reads results beside the mean "
                          f"(FedDF, FedGen): use mode = \"sync\"")
    if private:
        raise ConfigError("[asynchronous] mode = \"fedbuff\" cannot run with [privacy]: who reports is no longer a "
                          "Poisson sample of the clients, so the accountant's sampling amplification does not hold "
                          "(docs/async.md)")
    if deadline_s > 0:
        raise ConfigError("[asynchronous] mode = \"fedbuff\" has no rounds to wait for: faults.deadline_s must be 0 "
                          "(slow clients simply arrive later, with more staleness)")
    if engine == "flower":
        raise ConfigError("[asynchronous] mode = \"fedbuff\" runs on the simulator (engine = \"simulator\", with or "
                          "without worker processes): Flower's Grid drives synchronous rounds")


def make_round(algorithm: Algorithm, ctx: Context, transport: Any, example: torch.Tensor | None = None):
    """The round rule of a run: :class:`hetfl.rounds.Round`, or :class:`BufferedRound` under FedBuff."""
    cfg = getattr(ctx, "asynchronous", None)
    if cfg is not None and cfg.active:
        return BufferedRound(algorithm, ctx, transport, example)
    return Round(algorithm, ctx, transport, example)


def staleness_weight(kind: str, s: int) -> float:
    return 1.0 / math.sqrt(1.0 + s) if kind == "sqrt" else 1.0


class BufferedRound:
    """FedBuff's server rule (see the module docstring); ``run(state, step)`` is one server step."""

    def __init__(self, algorithm: Algorithm, ctx: Context, transport: Any, example: torch.Tensor | None = None
                 ) -> None:
        self.algorithm = algorithm
        self.ctx = ctx
        self.transport = transport
        self.cfg = ctx.asynchronous
        self.guard = RoundGuard(ctx, example)
        self.accountant = Accountant(ctx, costs=self.guard.costs)
        k = algorithm.clients_for(ctx.num_clients)
        self.concurrency = min(self.cfg.concurrency or k, ctx.num_clients)
        self.buffer = min(self.cfg.buffer or k, self.concurrency)

    # ------------------------------------------------------------------ the book in the server state
    def _book(self, state: ServerState) -> dict[str, Any]:
        book = state.buffers.get(BOOK)
        if book is None:
            return {"now": 0.0, "dispatched": 0, "in_flight": [], "used": [], "snapshots": {}}
        return {"now": float(book["now"]), "dispatched": int(book["dispatched"]),
                "in_flight": [list(e) for e in book["in_flight"]], "used": list(book["used"]),
                "snapshots": dict(book["snapshots"])}

    @staticmethod
    def _snapshot(state: ServerState) -> dict[str, Any]:
        return {"models": state.models, "buffers": {k: v for k, v in state.buffers.items() if k != BOOK}}

    def _state_at(self, book: dict[str, Any], version: int) -> ServerState:
        snap = book["snapshots"][version]
        return ServerState(version, snap["models"], snap["buffers"])

    # ------------------------------------------------------------------ dispatch and arrival
    def _dispatch(self, book: dict[str, Any], state: ServerState, m: int, report: RoundReport) -> None:
        """Send ``m`` idle clients the model of ``state`` (version ``state.round``), starting now."""
        if m <= 0:
            return
        algo, ctx, version = self.algorithm, self.ctx, state.round
        book["snapshots"].setdefault(version, self._snapshot(state))
        busy = {int(e[0]) for e in book["in_flight"]} | {int(c) for c in book["used"]}
        if not busy and m == algo.clients_for(ctx.num_clients):  # a fresh cohort: the synchronous round's draw
            clients = algo.sample_clients(state, version + 1, ctx, round_rng(ctx.seed, version + 1))
        else:
            idle = np.array([c for c in range(ctx.num_clients) if c not in busy], dtype=np.int64)
            rng = np.random.default_rng([ctx.seed, version + 1, ASYNC_STREAM, book["dispatched"]])
            clients = np.sort(rng.choice(idle, size=min(m, len(idle)), replace=False)) if len(idle) else idle
        tasks = algo.configure_round(state, version + 1, [int(c) for c in clients], ctx)
        plans = plan_round(tasks, version + 1, ctx, self.guard.faults, self.guard.costs.for_tasks(tasks),
                           self.guard.tiers)
        for task, plan in zip(tasks, plans.clients):
            book["in_flight"].append([int(task.client_id), version, book["now"], book["now"] + plan.time_s,
                                      book["dispatched"], int(plan.drop is not None)])
            book["used"].append(int(task.client_id))
            book["dispatched"] += 1
            report.bytes_down += nbytes(task.weights)
            report.tiers.sent(self.accountant.cost(task))

    def _task(self, book: dict[str, Any], entry: Sequence[Any]) -> ClientTask:
        """The task of an in-flight entry, made again from the model it was dispatched with (pure)."""
        state = self._state_at(book, int(entry[1]))
        return self.algorithm.configure_round(state, int(entry[1]) + 1, [int(entry[0])], self.ctx)[0]

    def _train(self, tasks: list[ClientTask]) -> list[ClientResult | None]:
        """Train a group of arrivals through the transport's session (in task order, so deterministic)."""
        plan = getattr(self.transport, "plan", None)
        if plan is not None:
            plan(tasks)
        out: dict[int, ClientResult | None] = {}
        for task, outcome in synchronous(self.transport, tasks):
            try:
                out[id(task)] = outcome(task)
            except Exception:  # noqa: BLE001  (a failed or lost client reports nothing; counted as dropped)
                out[id(task)] = None
        return [out.get(id(t)) for t in tasks]

    # ------------------------------------------------------------------ one server step
    def run(self, state: ServerState, step: int) -> tuple[ServerState, RoundReport]:
        book = self._book(state)
        report = RoundReport(tiers=self.accountant.ledger())
        start = book["now"]
        if not book["in_flight"]:
            self._dispatch(book, state, self.concurrency, report)
        arrived: list[tuple[list[Any], ClientTask, ClientResult]] = []
        dropped = pops = 0
        while len(arrived) < self.buffer:
            if not book["in_flight"]:
                raise HetflError(f"asynchronous step {step}: no client is in flight and none is idle")
            pops += 1
            if pops > 100 * max(self.concurrency, 1):
                raise HetflError(f"asynchronous step {step}: {pops} arrivals without {self.buffer} reports "
                                 f"(faults.dropout too high?)")
            t = min(e[3] for e in book["in_flight"])
            group = sorted((e for e in book["in_flight"] if e[3] == t), key=lambda e: e[4])
            book["in_flight"] = [e for e in book["in_flight"] if e[3] != t]
            book["now"] = t
            live = [e for e in group if not e[5]]
            tasks = [self._task(book, e) for e in live]
            for e, task, res in zip(live, tasks, self._train(tasks)):
                if res is None:
                    dropped += 1
                    continue
                arrived.append((e, task, res))
                report.bytes_up += nbytes(returned(task))
                report.tiers.trained(self.accountant.cost(task))
            dropped += len(group) - len(live)
            if len(arrived) < self.buffer:  # not yet a step: the freed slots get the current model
                self._dispatch(book, state, len(group), report)
        version = state.round
        stale = [version - int(e[1]) for e, _, _ in arrived]
        new_state = self._step(state, book, arrived, stale)
        book["used"] = []
        self._dispatch(book, new_state, self.concurrency - len(book["in_flight"]), report)
        keep = {int(e[1]) for e in book["in_flight"]}
        book["snapshots"] = {v: s for v, s in book["snapshots"].items() if v in keep}
        new_state = ServerState(new_state.round, new_state.models, {**new_state.buffers, BOOK: book})
        for _, _, res in arrived:
            report.clients.append(res.client_id)
            report.samples += res.num_samples
            loss = res.metrics.get("train_loss", float("nan"))
            if np.isfinite(loss):
                report.train_loss_sum += loss * res.num_samples
        report.faults = {"clients_reported": len(arrived), "dropped_failure": dropped,
                         "round_sim_time_s": round(book["now"] - start, 6)}
        report.extra.update({"virtual_time_s": round(book["now"], 6), "staleness_mean": float(np.mean(stale)),
                             "staleness_max": int(max(stale)), "in_flight": len(book["in_flight"])})
        report.server_state_bytes = state_bytes(new_state)
        return new_state, report

    def _step(self, state: ServerState, book: dict[str, Any], arrived: list, stale: list[int]) -> ServerState:
        algo, ctx, cfg = self.algorithm, self.ctx, self.cfg
        results = [res for _, _, res in arrived]
        if max(stale) == 0 and cfg.server_lr == 1.0:  # all fresh: the synchronous aggregate, exactly
            return algo.server_step(state, algo.aggregate(state, state.round + 1, results, ctx), ctx)
        cur = state.models["global"]
        mean = WeightedMean({"global": {k: torch.zeros_like(v) for k, v in cur.items() if v.is_floating_point()}})
        placers: dict[int, Any] = {}
        for (e, task, res), s in zip(arrived, stale):
            version = int(e[1])
            if version not in placers:
                placers[version] = algo.placer(self._state_at(book, version), version + 1, ctx)
            w = staleness_weight(cfg.staleness, s)
            delta = {k: (v.detach().to(torch.float64) - task.weights[k].detach().to(torch.float64)) * w
                     for k, v in res.weights.items() if v.is_floating_point()}
            mean.add(placers[version](ClientResult(res.client_id, res.num_samples, delta, res.metrics, res.extra)))
        step = mean.result().get("global", {})
        new = {k: (v + cfg.server_lr * step[k].to(v.dtype)) if k in step else v for k, v in cur.items()}
        return algo.server_step(state, new, ctx)


__all__ = ["ASYNC_STREAM", "BOOK", "BufferedRound", "check_async", "make_round", "staleness_weight"]
