"""Run a round's clients through the fault plan, catch their exceptions and validate their results.

The round (:class:`hetfl.rounds.Round`, the same for every engine) uses a :class:`RoundGuard` like this::

    book = guard.begin(rnd, tasks)            # plans dropouts and stragglers (no client has run yet)
    for task, outcome in transport results of book.to_run:
        res = book.run(task, outcome)         # None: it raised or was lost (a failure, with its reason)
        if res is not None and book.accept(task, res):   # validated
            ...                               # aggregated
    metrics = book.finish()                   # per-round fault metrics; raises if every client raised
    state = skip_round(state) if book.skipped else algo.server_step(state, update, ctx)

``book.to_run`` holds only the clients that neither drop out nor miss the deadline; ``run`` catches a
client's exception (counted as a failure with its message, unless ``faults.fail_fast``), and ``accept``
lets through only results that pass :func:`~hetfl.reliability.validate.validate_result`.  A round with fewer than
``faults.min_clients`` accepted results is *skipped*: the caller keeps the global model (when the plan
already leaves too few clients, nobody is trained at all).  A round in which *every* client that
trained raised an exception is not a fault but a bug: :meth:`RoundBook.finish` raises
:class:`ClientsFailedError` with the first exception as its cause.  A round in which fewer than
``faults.min_success_fraction`` of the clients that were sent a task came back (the rest raised or were
lost: vanished nodes, dead workers) raises :class:`~hetfl.errors.HetflError`: the run stops, resumable.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch

from hetfl.accounting import CostCache, example_input
from hetfl.algorithms.base import ClientResult, ClientTask, Context, ServerState
from hetfl.errors import ClientLost, HetflError
from hetfl.reliability import FaultsConfig
from hetfl.reliability.plan import DROP_DEADLINE, DROP_DROPOUT, ClientPlan, client_tiers, plan_round
from hetfl.reliability.validate import validate_result

#: Per-round fields a guarded engine adds to metrics.jsonl.
ROUND_FIELDS = ("clients_selected", "clients_reported", "dropped_failure", "dropped_deadline", "rejected_invalid",
                "round_sim_time_s", "skipped", "tier_selected", "tier_reported")


class ClientsFailedError(RuntimeError):
    """Every client that trained in a round raised: a bug in the local update, not a simulated fault."""


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:300] if text else type(exc).__name__


class RoundGuard:
    """Fault handling for every round of one run: the plan's inputs and the run-long warnings."""

    def __init__(self, ctx: Context, example: torch.Tensor | None = None, faults: FaultsConfig | None = None) -> None:
        self.ctx = ctx
        self.faults = faults if faults is not None else (getattr(ctx, "faults", None) or FaultsConfig())
        self.costs = CostCache(ctx.info, example if example is not None else example_input(ctx.info))
        self.tiers = client_tiers(ctx)
        self.levels: tuple[float, ...] = ctx.fleet.levels if ctx.fleet is not None else (1.0,)
        self._warned_tiers: set[int] = set()

    def begin(self, rnd: int, tasks: Sequence[ClientTask]) -> RoundBook:
        plan = plan_round(tasks, rnd, self.ctx, self.faults, self.costs.for_tasks(tasks), self.tiers)
        return RoundBook(self, rnd, list(tasks), plan.clients)


class RoundBook:
    """The bookkeeping of one round: which clients run, fail, are rejected or accepted."""

    def __init__(self, guard: RoundGuard, rnd: int, tasks: list[ClientTask], plans: Sequence[ClientPlan]) -> None:
        self.guard = guard
        self.faults = guard.faults
        self.rnd = rnd
        self.tasks = tasks
        self.plans = {id(t): p for t, p in zip(tasks, plans)}
        self.plan_list = list(plans)
        runnable = [t for t, p in zip(tasks, plans) if p.drop is None]
        self.early_skip = len(runnable) < self.faults.min_clients
        self.to_run: list[ClientTask] = [] if self.early_skip else runnable
        self.ran = 0
        self.failed: list[dict[str, Any]] = []
        self.rejected: list[dict[str, Any]] = []
        self.accepted: list[int] = []
        self.arrived: list[ClientPlan] = []
        self.messages: list[str] = []
        self._first_error: BaseException | None = None

    # ---------------------------------------------------------------- per client
    def run(self, task: ClientTask, run_client: Callable[[ClientTask], ClientResult]) -> ClientResult | None:
        """``run_client(task)``, or ``None`` (recorded as a failure) if it raises an ``Exception``."""
        self.ran += 1
        try:
            return run_client(task)
        except Exception as exc:
            if self.faults.fail_fast:
                raise
            if self._first_error is None and not isinstance(exc, ClientLost):  # a lost client is no bug
                self._first_error = exc
            reason = _reason(exc)
            self.failed.append({"client": int(task.client_id), "reason": reason})
            self.messages.append(f"client {task.client_id} failed: {reason}")
            return None

    def accept(self, task: ClientTask, result: ClientResult, reason: Any = ...) -> bool:
        """Validate ``result`` against ``task``; record it as accepted or rejected (with the reason).
        ``reason``: the verdict of :func:`validate_result` when it was already checked where the client ran
        (a pre-summed block, :func:`hetfl.rounds.presum`: the result's weights are in the block's sum)."""
        self.arrived.append(self.plans[id(task)])
        if reason is ...:
            reason = validate_result(task, result, self.faults)
        if reason is not None:
            self.rejected.append({"client": int(task.client_id), "reason": reason})
            self.messages.append(f"client {task.client_id} rejected: {reason}")
            return False
        self.accepted.append(int(task.client_id))
        return True

    # ---------------------------------------------------------------- per round
    @property
    def skipped(self) -> bool:
        return len(self.accepted) < self.faults.min_clients

    def finish(self) -> dict[str, Any]:
        """The round's fault metrics (and console messages); raises if every client that ran raised."""
        if self.ran and len(self.failed) == self.ran and self._first_error is not None:
            raise ClientsFailedError(
                f"round {self.rnd}: every client that trained ({self.ran}) raised an exception, the first "
                f"{_reason(self._first_error)}; this is a bug in the local update, not a simulated fault "
                f"(simulate failures with faults.dropout)"
            ) from self._first_error
        f = self.faults
        replied = self.ran - len(self.failed)
        if self.ran and replied < math.ceil(f.min_success_fraction * self.ran - 1e-9):
            detail = "; ".join(f"client {x['client']}: {x['reason']}" for x in self.failed[:5])
            raise HetflError(f"round {self.rnd}: only {replied} of {self.ran} clients replied, fewer than "
                             f"faults.min_success_fraction={f.min_success_fraction:g} requires ({detail})")
        levels = self.guard.levels
        sel = np.zeros(len(levels), dtype=np.int64)
        rep = np.zeros(len(levels), dtype=np.int64)
        accepted = set(self.accepted)
        for p in self.plan_list:
            sel[p.tier] += 1
            if p.client_id in accepted:
                rep[p.tier] += 1
        deadline = [p for p in self.plan_list if p.drop == DROP_DEADLINE]
        if deadline:
            sim_time = f.deadline_s  # the server waited until the deadline for the stragglers
        else:
            timed = self.arrived if not self.early_skip else [p for p in self.plan_list if p.drop is None]
            sim_time = max((p.time_s for p in timed), default=0.0)
        row: dict[str, Any] = {
            "clients_selected": len(self.plan_list),
            "clients_reported": len(self.accepted),
            "dropped_failure": sum(p.drop == DROP_DROPOUT for p in self.plan_list) + len(self.failed),
            "dropped_deadline": len(deadline),
            "rejected_invalid": len(self.rejected),
            "round_sim_time_s": round(float(sim_time), 6),
            "skipped": self.skipped,
        }
        for t in range(len(levels)):
            if sel[t]:
                row[f"participation.tier{t}"] = round(float(rep[t] / sel[t]), 6)
        row["tier_selected"] = sel.tolist()
        row["tier_reported"] = rep.tolist()
        if self.failed:
            row["failed"] = self.failed
        if self.rejected:
            row["rejected"] = self.rejected
        for p in deadline:
            if p.tier not in self.guard._warned_tiers:
                self.guard._warned_tiers.add(p.tier)
                self.messages.append(
                    f"tier {p.tier} (width {levels[p.tier]:g}) misses the faults.deadline_s={f.deadline_s:g} deadline "
                    f"(client {p.client_id}: {p.time_s:.3g} simulated s); its updates are discarded: see "
                    f"participation.tier{p.tier} in metrics.jsonl"
                )
        if self.skipped:
            self.messages.append(
                f"skipped: {len(self.accepted)} of {len(self.plan_list)} clients reported, fewer than "
                f"faults.min_clients={f.min_clients} ({row['dropped_failure']} failed, {len(deadline)} missed the "
                f"deadline, {len(self.rejected)} invalid); the global model is unchanged"
            )
        return row


def skip_round(state: ServerState) -> ServerState:
    """The state after a skipped round: the round counter advances, models and buffers are unchanged
    (except the server-side ``metrics`` of the previous round, which this round did not produce)."""
    return ServerState(state.round + 1, state.models, {k: v for k, v in state.buffers.items() if k != "metrics"})


def fault_summary(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """Run totals of the per-round fault metrics (empty if the rows have none), for summary.json."""
    rows = [r for r in rows if "clients_selected" in r]
    if not rows:
        return {}
    out: dict[str, Any] = {
        "rounds_skipped": sum(bool(r.get("skipped")) for r in rows),
        "sim_time_s": round(sum(r.get("round_sim_time_s", 0.0) or 0.0 for r in rows), 6),
    }
    for key in ("clients_selected", "clients_reported", "dropped_failure", "dropped_deadline", "rejected_invalid"):
        out[key] = int(sum(r.get(key, 0) for r in rows))
    width = max(len(r.get("tier_selected", [])) for r in rows)
    sel, rep = np.zeros(width, dtype=np.int64), np.zeros(width, dtype=np.int64)
    for r in rows:
        s, p = r.get("tier_selected", []), r.get("tier_reported", [])
        sel[:len(s)] += s
        rep[:len(p)] += p
    out["participation_by_tier"] = {f"tier{t}": round(float(rep[t] / sel[t]), 6) for t in range(width) if sel[t]}
    return out
