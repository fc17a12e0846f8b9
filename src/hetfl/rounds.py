"""One federated round, written once for every engine; and the streaming transport it runs on.

A round is: sample the clients -> configure their tasks -> plan faults (dropouts, deadlines, per-tier
participation; :mod:`hetfl.reliability`) -> the *transport* carries the tasks of the clients that run
-> validate and accept each result -> the algorithm aggregates the accepted ones as a stream -> the
server step (or a skipped round under ``faults.min_clients``) -> cost accounting and the metrics row.

Transports
----------
Engines only carry tasks to clients and results back.  A transport (:class:`Transport`) offers

* ``open()``: a context manager that yields a :class:`Session`, a stream of client work that stays open
  as long as the server wants it:

  - ``session.submit(task)``: hand over one :class:`~hetfl.algorithms.base.ClientTask`, at any time,
    also while other tasks are out;
  - ``session.next_result() -> (task, outcome)``: the next task that finished, *in the order they
    finish*, blocking until one does (raises :class:`~hetfl.errors.HetflError` if nothing is in
    flight); ``outcome(task)`` returns the client's :class:`~hetfl.algorithms.base.ClientResult` or
    raises (the client failed; :class:`ClientLost` if the transport lost it);
  - ``session.in_flight``: tasks submitted whose result ``next_result`` has not returned yet.

  Leaving the ``with`` block normally (or by ``GeneratorExit``) lets clients still running finish and
  drops their results; any other exception stops them as fast as the transport can;
* optionally ``plan(tasks)``, told which clients will be submitted before any of them is (the batcher
  groups same-shape clients there; a worker trains a planned chunk as one unit once all its tasks are in).

What each engine's session does: the in-process simulator runs a task when its outcome is called (so
"finishes" = submission order); the worker pool trains up to two tasks per worker and returns whichever
is done first (:class:`hetfl.engines.session.PoolSession`); Flower pushes the submitted tasks as messages
and returns replies as they are pulled (:class:`hetfl.flower.strategy.FlowerSession`).

The synchronous round is the special case :func:`synchronous`: submit all of a round's tasks, then hand
the results to the aggregation in *task order* (held back until their turn), so aggregation is
deterministic and every engine gives the same model bit for bit.

A transport-level loss (no node holds the client, no reply in time, an unreadable reply) raises
:class:`ClientLost`: it counts as a failed client like an exception raised by the client's own code,
but a round in which every client was *lost* is a network fault, not a bug, so it does not raise
:class:`~hetfl.reliability.guard.ClientsFailedError`.

Because every engine runs this one function, every ``[faults]`` option, accounting key and metrics key
behaves the same on all of them (tests/test_engine_conformance.py).

Buffered asynchronous aggregation (FedBuff) on the same loop
------------------------------------------------------------
:mod:`hetfl.asynchronous` implements it as a server rule beside :class:`Round` (``[asynchronous]``); it
orders arrivals by simulated time, as below, and trains each group of simultaneous arrivals through
:func:`synchronous`.  The design it follows:

FedBuff (Nguyen et al., 2022) keeps a fixed number of clients training at all times and updates the
server model every K results; a result's *staleness* is the number of server versions between the model
its task was built from and the model it is applied to.  It needs nothing from an engine beyond the
session above, so it will be a server rule beside :class:`Round`, not a new engine:

1. open one session for the whole run (or one per evaluation period) instead of one per round;
2. keep ``concurrency`` tasks out: ``configure`` one client at a time from the *current* server state,
   stamp the task with the server version (``task.extra["version"]``, or a dict kept by the rule, keyed
   by ``id(task)``), ``submit`` it;
3. loop on ``next_result()``: run the result through the same :class:`~hetfl.reliability.guard.RoundBook`
   checks (``run``/``accept``), weight it by a staleness function of ``version_now - version_sent``,
   feed it to a running aggregate, and submit a replacement task at once;
4. every K accepted results: ``server_step``, version += 1, one metrics row (a "round" = one server
   version), checkpoint as today.

Order of arrival then matters.  On the worker pool it is the real finishing order, which depends on
the machine's load; a reproducible simulation should order arrivals by *simulated* time instead (each
client's simulated compute + transfer time from the fault plan, :mod:`hetfl.reliability.plan`): the rule
keeps the outcomes it has taken and applies them in simulated-time order, which costs nothing in process
(a task there runs only when its outcome is called) and bounds memory by ``concurrency`` on workers.
Flower's session streams replies as they come but cannot cancel a task that is out; leaving a session
abandons its replies.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

import numpy as np
import torch

from hetfl.accounting import Accountant, TierLedger
from hetfl.aggregation import make_reducer
from hetfl.aggregation.blocks import BlockSum
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context, ServerState, nbytes, returned
from hetfl.errors import ClientLost, HetflError
from hetfl.privacy.mechanism import PrivateRound
from hetfl.reliability.guard import RoundGuard, skip_round
from hetfl.reliability.validate import validate_result

#: Third word of a round's sampling seed ``[run seed, round, SAMPLING_STREAM]`` ("samp").
SAMPLING_STREAM = 0x73616D70

Outcome = Callable[[ClientTask], ClientResult]

#: Consecutive tasks of a round whose results are pre-summed together (:mod:`hetfl.aggregation.blocks`; one
#: message per block from a worker process).  Small enough that a round's last blocks balance over the
#: workers (100 clients on 2 workers: 13 blocks, at most 4 clients more on one; a cohort of 50: 7 blocks),
#: large enough that a small model's hand-off is paid once per 8 clients.  Changing it moves the last bits
#: of the means of rounds with more clients than one block.
BLOCK_TASKS = 8


def round_rng(seed: int, rnd: int) -> np.random.Generator:
    """The generator a round samples its clients with: a pure function of (run seed, round)."""
    return np.random.default_rng([seed, rnd, SAMPLING_STREAM])


class Session(Protocol):
    """An open stream of client work on a transport (see the module docstring)."""

    @property
    def in_flight(self) -> int: ...

    def submit(self, task: ClientTask) -> None: ...

    def next_result(self) -> tuple[ClientTask, Outcome]: ...


class Transport(Protocol):
    def open(self) -> AbstractContextManager[Session]: ...


def synchronous(transport: Transport, tasks: Sequence[ClientTask]) -> Iterator[tuple[ClientTask, Outcome]]:
    """A synchronous round on a streaming transport: submit every task, yield ``(task, outcome)`` in task
    order whatever order the clients finish in.  Closing the generator early ends the session cleanly."""
    with transport.open() as session:
        for task in tasks:
            session.submit(task)
        position = {id(task): i for i, task in enumerate(tasks)}
        held: dict[int, tuple[ClientTask, Outcome]] = {}  # finished ahead of their turn
        for i in range(len(tasks)):
            while i not in held:
                task, outcome = session.next_result()
                held[position[id(task)]] = (task, outcome)
            yield held.pop(i)


@dataclass
class Entry:
    """One client of a block, as the round books it: its result without weights (``None`` if it raised:
    ``error``) and why validation rejected it (``None``: valid, summed)."""

    result: Any = None  # a ClientResult whose weights are {} (they are in the block's sum)
    reason: str | None = None
    error: BaseException | None = None

    def outcome(self, task: ClientTask) -> ClientResult:
        """The entry as a transport's outcome: its result, or its exception raised."""
        if self.error is not None:
            raise self.error
        return self.result


def presum(tasks: Sequence[Any], outcome_of: Callable[[Any], Outcome], weight_of: Callable[[Any], float],
           faults: Any, into: torch.Tensor | None = None) -> tuple[list[Entry], BlockSum]:
    """Run a block's tasks in order, validate each result and add the valid ones to the block's sum; the
    entries for the round's books and the sum.  ``outcome_of(task)``: the task's outcome (a transport's
    error there propagates), whose call gives the client's result or raises the client's exception."""
    entries: list[Entry] = []
    total = BlockSum.like(tasks[0].weights, into)
    for task in tasks:
        outcome = outcome_of(task)
        try:
            res = outcome(task)
        except Exception as exc:  # the round books it as a failure (or re-raises under faults.fail_fast)
            entries.append(Entry(error=exc))
            continue
        reason = validate_result(task, res, faults)
        if reason is None:
            total.add(res.weights, weight_of(res))
        try:
            bare = replace(res, weights={})
        except TypeError:  # not a ClientResult: validation said so
            bare = res
        entries.append(Entry(bare, reason))
    return entries, total


def carry_blocks(transport: Transport, tasks: Sequence[ClientTask], weight_of: Callable[[ClientResult], float],
                 faults: Any) -> Iterator[tuple[list[ClientTask], list[Entry], BlockSum]]:
    """A synchronous round in blocks of :data:`BLOCK_TASKS` consecutive tasks: for each block in order, its
    tasks, their entries and the block's sum (:func:`presum`).  A transport with ``open_blocks()`` (the
    worker pool) runs :func:`presum` where the clients train, one message per block (``submit_block``,
    ``next_block``; a block it had to run client by client comes back as outcomes, summed here); any other
    transport carries the clients one by one and the blocks are summed here, the same way."""
    blocks = [list(tasks[i:i + BLOCK_TASKS]) for i in range(0, len(tasks), BLOCK_TASKS)]
    opener = getattr(transport, "open_blocks", None)
    session_cm = opener() if opener is not None else None
    if session_cm is not None:
        with session_cm as session:
            for block in blocks:
                session.submit_block(block, faults)
            held: dict[int, Any] = {}
            for i, block in enumerate(blocks):
                while i not in held:
                    k, done = session.next_block()
                    held[k] = done
                done = held.pop(i)
                if done.total is not None:
                    yield block, done.entries, done.total
                else:
                    yield block, *presum(block, _replaying(done.outcomes), weight_of, faults)
        return
    stream = synchronous(transport, tasks)
    try:
        for block in blocks:
            yield block, *presum(block, lambda task: _next_outcome(stream, task), weight_of, faults)
    finally:
        stream.close()


def _replaying(outcomes: Sequence[Outcome]) -> Callable[[ClientTask], Outcome]:
    """``outcome_of(task)`` for :func:`presum` that hands out the given outcomes in order."""
    it = iter(outcomes)
    return lambda task: next(it)


def _next_outcome(stream: Iterator[tuple[ClientTask, Outcome]], task: ClientTask) -> Outcome:
    got, outcome = next(stream)
    if got is not task:  # pragma: no cover - synchronous() yields in task order
        raise HetflError("internal error: results out of task order")
    return outcome


class InProcess:
    """The simplest session: every client in this process, run when its outcome is called (so results come
    in submission order); what :class:`hetfl.engines.simulator.Simulator` opens."""

    def __init__(self, run_client: Outcome) -> None:
        self.run_client = run_client
        self._queue: deque[ClientTask] = deque()

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queue.clear()

    @property
    def in_flight(self) -> int:
        return len(self._queue)

    def submit(self, task: ClientTask) -> None:
        self._queue.append(task)

    def next_result(self) -> tuple[ClientTask, Outcome]:
        if not self._queue:
            raise HetflError("next_result(): no task is in flight")
        return self._queue.popleft(), self.run_client


@dataclass
class RoundReport:
    """What happened in one round, for metrics.jsonl."""

    clients: list[int] = field(default_factory=list)
    samples: int = 0
    train_loss_sum: float = 0.0
    bytes_down: int = 0
    bytes_up: int = 0
    train_time_s: float = 0.0
    server_time_s: float = 0.0  # the server's own work: sampling, configure, aggregate, server step
    server_state_bytes: int = 0  # tensors the server keeps between rounds (models and algorithm buffers)
    faults: dict[str, Any] | None = None  # per-round fault metrics (hetfl.reliability.guard)
    tiers: TierLedger | None = None  # costs summed per capability tier (hetfl.accounting), tier.<label>.<field>
    messages: list[str] = field(default_factory=list)  # lines for the progress console
    extra: dict[str, Any] = field(default_factory=dict)  # a transport's own columns (Flower: client_time_s)

    @property
    def failed(self) -> dict[int, str]:
        """Clients that failed this round (raised, or were lost by the transport), with the reason."""
        return {int(f["client"]): f["reason"] for f in (self.faults or {}).get("failed", [])}

    def as_metrics(self) -> dict[str, Any]:
        return {
            "clients": len(self.clients),
            "samples": self.samples,
            "train_loss": self.train_loss_sum / self.samples if self.samples else float("nan"),
            "bytes_down": self.bytes_down,
            "bytes_up": self.bytes_up,
            "train_time_s": round(self.train_time_s, 4),
            "server_time_s": round(self.server_time_s, 4),
            "server_state_bytes": self.server_state_bytes,
            **(self.faults or {}),
            **(self.tiers.metrics() if self.tiers is not None else {}),
            **self.extra,
        }


class Round:
    """The round of one run: fault handling and cost accounting over any transport."""

    def __init__(self, algorithm: Algorithm, ctx: Context, transport: Transport,
                 example: torch.Tensor | None = None) -> None:
        self.algorithm = algorithm
        self.ctx = ctx
        self.transport = transport
        self.guard = RoundGuard(ctx, example)  # dropouts, deadlines, validation, min_clients
        self.accountant = Accountant(ctx, costs=self.guard.costs)  # per-tier costs in every round's metrics
        self.privacy = None  # [privacy]: Poisson sampling, clipped updates, noise on the sum (hetfl.privacy)
        if getattr(ctx, "privacy", None) is not None:
            self.privacy = PrivateRound(algorithm, ctx, ctx.privacy)

    def run(self, state: ServerState, rnd: int) -> tuple[ServerState, RoundReport]:
        """One round; its report also carries the server's own time and the size of the state it keeps.

        The server's time is the round's wall time less the time spent inside the stream of results
        (waiting on the transport and checking each result), so it is the same measure for every engine.
        """
        t0 = time.perf_counter()
        waited = [0.0]
        new_state, report = self._run(state, rnd, waited)
        report.server_time_s = time.perf_counter() - t0 - waited[0]
        report.server_state_bytes = state_bytes(new_state)
        return new_state, report

    def _run(self, state: ServerState, rnd: int, waited: list[float]) -> tuple[ServerState, RoundReport]:
        algo, ctx, dp = self.algorithm, self.ctx, self.privacy
        clients = dp.sample(rnd) if dp is not None else algo.sample_clients(state, rnd, ctx, round_rng(ctx.seed, rnd))
        tasks = algo.configure_round(state, rnd, clients, ctx)
        report = RoundReport(tiers=self.accountant.ledger())
        book = self.guard.begin(rnd, tasks)  # dropouts and stragglers are decided before anyone trains
        plan = getattr(self.transport, "plan", None)
        if plan is not None:
            plan(book.to_run)
        sizes: dict[int, int] = {}  # bytes of each distinct weights dict (FedAvg sends one to every client)

        def size(task: ClientTask) -> int:
            n = sizes.get(id(task.weights))
            if n is None:
                n = sizes[id(task.weights)] = nbytes(task.weights)
            return n

        report.bytes_down = sum(size(task) for task in tasks)
        costs = {id(task): self.accountant.cost(task) for task in tasks}
        for task in tasks:
            report.tiers.sent(costs[id(task)])

        def book_result(task: ClientTask, res: ClientResult | None, reason: Any = ...) -> bool:
            """Book one client's (non-None) result; whether it was accepted."""
            back = returned(task)  # a valid result has the task's shapes and dtypes, less its frozen keys
            report.bytes_up += size(task) if back is task.weights else nbytes(back)
            report.tiers.trained(costs[id(task)])
            if not book.accept(task, res, reason):  # invalid: rejected with its reason
                return False
            report.clients.append(res.client_id)
            report.samples += res.num_samples
            loss = res.metrics.get("train_loss", float("nan"))
            if np.isfinite(loss):
                report.train_loss_sum += loss * res.num_samples
            return True

        def stream() -> Iterator[ClientResult]:
            if not book.to_run:
                return
            t_in = time.perf_counter()  # time inside this generator is the transport's and the clients'
            for task, outcome in synchronous(self.transport, book.to_run):
                t0 = time.perf_counter()
                res = book.run(task, outcome)  # None: it raised or was lost (recorded as a failure)
                report.train_time_s += time.perf_counter() - t0
                if res is None:
                    continue
                if not book_result(task, res):
                    continue
                waited[0] += time.perf_counter() - t_in
                yield res
                t_in = time.perf_counter()
            waited[0] += time.perf_counter() - t_in

        def block_sums() -> Iterator[BlockSum]:
            """The blocks' sums in block order; each block's clients booked as single results are."""
            if not book.to_run:
                return
            t_in = time.perf_counter()
            for tasks, entries, total in carry_blocks(self.transport, book.to_run, algo.weight_of, book.faults):
                report.train_time_s += time.perf_counter() - t_in  # the block's clients trained (and were summed)
                for task, entry in zip(tasks, entries):
                    res = book.run(task, entry.outcome)
                    if res is not None:
                        book_result(task, res, entry.reason)
                waited[0] += time.perf_counter() - t_in
                yield total
                t_in = time.perf_counter()
            waited[0] += time.perf_counter() - t_in

        reducer = dp.reducer(state, rnd) if dp is not None else None  # [privacy]: the private reducer
        if reducer is None and algo.block_sums:  # a plain weighted mean: results may be pre-summed in blocks
            mean = make_reducer(state.models, algo.aggregator, algo.trim)
            if mean.accepts_sums:
                reducer = mean
        if book.early_skip and dp is None:
            update = None
        elif getattr(reducer, "accepts_sums", False):
            update = algo.aggregate_sums(state, rnd, block_sums(), ctx, reducer)
        else:
            update = algo.aggregate(state, rnd, stream(), ctx, reducer)
        report.faults = book.finish()
        report.messages = book.messages
        if dp is not None:  # the noised aggregate is released every round, never skipped
            report.faults["skipped"] = False
            report.messages = [m for m in book.messages if not m.startswith("skipped:")]
            report.extra.update(dp.metrics(rnd))
            return dp.finish(algo.server_step(state, update, ctx)), report
        if book.skipped:  # fewer than faults.min_clients accepted: the global model stays as it was
            return skip_round(state), report
        return algo.server_step(state, update, ctx), report


def state_bytes(state: ServerState) -> int:
    """Bytes of every tensor the server keeps between rounds: its models and its algorithm's buffers."""
    seen: set[int] = set()

    def walk(obj: Any) -> int:
        if isinstance(obj, torch.Tensor):
            if id(obj) in seen:
                return 0
            seen.add(id(obj))
            return obj.numel() * obj.element_size()
        if isinstance(obj, np.ndarray):
            return int(obj.nbytes)
        if isinstance(obj, dict):
            return sum(walk(v) for v in obj.values())
        if isinstance(obj, (list, tuple)):
            return sum(walk(v) for v in obj)
        return 0

    return walk(state.models) + walk(state.buffers)


__all__ = ["BLOCK_TASKS", "ClientLost", "Entry", "InProcess", "Outcome", "Round", "RoundReport", "SAMPLING_STREAM",
           "Session", "Transport", "carry_blocks", "presum", "round_rng", "state_bytes", "synchronous"]
