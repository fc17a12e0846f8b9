"""The server side: a strategy that carries any hetfl algorithm's rounds over a Flower Grid.

:class:`HetflStrategy` is a hetfl engine (``run_round(state, rnd)`` / ``close()``) whose transport is
a Flower :class:`~flwr.serverapp.Grid`, so the same object serves Flower's simulation engine (Ray)
and a real deployment (SuperLink + SuperNodes).  One hetfl round is:

1. ``sample_clients`` and ``configure_round`` (the algorithm, on the server, exactly as in the
   simulator: same RNG streams, same seeds);
2. one ``train`` Message per task to the node that holds that client's partition, each carrying its
   own ModelRef (submodel shape), weights, local config and seed (:mod:`hetfl.flower.codec`);
3. replies are pulled as they arrive (:class:`FlowerSession`, the streaming transport of
   :class:`hetfl.rounds.Round`, which hands them to the aggregation in task order): the round itself
   (fault plan, validation, ``min_clients``, aggregation, accounting) is the one every engine runs, so
   ``[faults]`` behaves here as in the simulator.

Before the first round a ``query`` round asks every node for its partition id and capability; the
strategy keeps the reports (:attr:`HetflStrategy.capabilities`) and hands them to the algorithm as the
run's :class:`~hetfl.fleet.Fleet` (``ctx.fleet``: ``max_width``, ``speed``, ...), so a weak device's
own report decides what it is asked to train.

A ClientApp that raises, or a node that disappears (Flower answers ``NODE_UNAVAILABLE``, or no reply
comes within ``engine.flower_round_timeout_s``) is logged and counted in the round's ``failed_clients``
(and in ``dropped_failure``, as any failed client); the round aggregates the others as long as at least
``faults.min_success_fraction`` of the clients sent a task replied, otherwise it raises
:class:`~hetfl.errors.HetflError` (the run stops and can be resumed): the rule of every engine
(:class:`~hetfl.reliability.guard.RoundBook`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context, ServerState
from hetfl.config import EngineConfig
from hetfl.errors import ClientLost, HetflError
from hetfl.flower import codec
from hetfl.rounds import Outcome, Round, RoundReport

log = logging.getLogger("hetfl.flower")


@dataclass(frozen=True)
class FlowerOptions:
    """How hetfl talks to Flower: the ``flower_*`` keys of ``[engine]`` (:meth:`of`), or ``FlowerOptions(...)``
    in library use.

    ``round_timeout_s``: a client that has not replied by then is reported lost (0 = wait forever).
    ``query_timeout_s``: how long to wait for nodes to connect and answer the capability query.
    ``num_cpus`` / ``num_gpus``: Flower simulation client resources (``num_cpus=None``: Flower's default).
    ``poll_interval_s`` / ``ray_init_args``: library use only.
    """

    round_timeout_s: float = 0.0
    query_timeout_s: float = 600.0
    poll_interval_s: float = 0.01
    num_cpus: float | None = None
    num_gpus: float = 0.0
    ray_init_args: dict[str, Any] = field(default_factory=dict)
    verbose: bool = False

    def __post_init__(self) -> None:
        if self.round_timeout_s < 0 or self.query_timeout_s <= 0:
            raise HetflError("flower round_timeout_s must be >= 0 and query_timeout_s > 0")

    @classmethod
    def of(cls, engine: EngineConfig) -> FlowerOptions:
        """The options an ``[engine]`` section sets."""
        return cls(round_timeout_s=engine.flower_round_timeout_s, query_timeout_s=engine.flower_query_timeout_s,
                   num_cpus=engine.flower_num_cpus or None, num_gpus=engine.flower_num_gpus,
                   verbose=engine.flower_verbose)


@dataclass
class FlowerRoundReport(RoundReport):
    """A RoundReport plus Flower's own columns: ``failed_clients`` and the time nodes spent in their
    ClientApp (``client_time_s``)."""

    def as_metrics(self) -> dict[str, float | int]:
        return {**super().as_metrics(), "failed_clients": len(self.failed)}


def _remote_error(rep: Message) -> str:
    """One line for a ClientApp's error: Flower's code and the reason's last line (the exception itself;
    the lines before it are the remote traceback)."""
    lines = [line.strip() for line in str(rep.error.reason).splitlines() if line.strip()]
    return f"ClientApp error (code {rep.error.code}): {lines[-1] if lines else 'no reason given'}"


class FlowerSession:
    """Tasks out as ``train`` Messages, replies back as they arrive (the streaming session of
    :mod:`hetfl.rounds`).

    What it can do: ``submit`` queues a task for the node holding that client; the next ``next_result``
    pushes every queued task in one ``push_messages`` call and then returns whichever reply is pulled
    first (a client with no node fails at once); a client silent for ``round_timeout_s`` after its push is
    reported lost (its late reply is ignored).  So tasks can be submitted while others are out, as a
    buffered asynchronous server needs.  What it cannot do: cancel a task that is out (Flower's Grid has
    no such call: leaving the session just stops listening, and the node's reply is dropped), or tell
    when a node *started* a task; a node trains the tasks it receives one after another.
    """

    def __init__(self, strategy: HetflStrategy, group: str) -> None:
        self.strategy = strategy
        self.group = group
        self._queued: list[tuple[ClientTask, int]] = []  # submitted, not pushed yet: (task, node)
        self._out: dict[str, tuple[ClientTask, float]] = {}  # message id -> (task, deadline)
        self._ready: deque[tuple[ClientTask, Outcome]] = deque()
        self._submitted = self._returned = 0

    def __enter__(self) -> FlowerSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self._queued.clear()
        self._out.clear()  # replies still to come are ignored
        self._ready.clear()

    @property
    def in_flight(self) -> int:
        return self._submitted - self._returned

    def submit(self, task: ClientTask) -> None:
        self._submitted += 1
        node = self.strategy.node_of.get(task.client_id)
        if node is None:
            self._ready.append((task, _raises(ClientLost("no Flower node holds this client's partition"))))
        else:
            self._queued.append((task, node))

    def next_result(self) -> tuple[ClientTask, Outcome]:
        if self._queued:
            self._push()
        strategy, options = self.strategy, self.strategy.options
        sleep = options.poll_interval_s
        while not self._ready:
            if not self._out:
                raise HetflError("next_result(): no task is in flight")
            replies = list(strategy.grid.pull_messages(set(self._out)))
            for rep in replies:
                entry = self._out.pop(rep.metadata.reply_to_message_id, None)
                if entry is None:
                    continue
                task = entry[0]
                if rep.has_error():  # the ClientApp raised: the client's own failure
                    self._ready.append((task, _raises(RuntimeError(_remote_error(rep)))))
                else:
                    self._ready.append((task, strategy._decoded(rep)))
            if replies:
                sleep = options.poll_interval_s
                continue
            now = time.monotonic()
            for mid, (task, deadline) in list(self._out.items()):
                if now >= deadline:
                    del self._out[mid]
                    why = f"no reply within round_timeout_s={options.round_timeout_s:g} s (node lost?)"
                    self._ready.append((task, _raises(ClientLost(why))))
            if self._ready:
                break
            if strategy._alive is not None:
                strategy._alive()
            time.sleep(sleep)
            sleep = min(sleep * 1.5, 0.2)
        self._returned += 1
        return self._ready.popleft()

    def _push(self) -> None:
        strategy = self.strategy
        messages = [Message(codec.encode_task(task, strategy.algorithm, strategy.run_record), node, "train",
                            group_id=self.group) for task, node in self._queued]
        ids = list(strategy.grid.push_messages(messages))
        if len(ids) != len(messages):
            raise HetflError(f"Flower accepted {len(ids)} of {len(messages)} messages")
        timeout = strategy.options.round_timeout_s
        deadline = time.monotonic() + timeout if timeout > 0 else math.inf
        for (task, _), mid in zip(self._queued, ids):
            self._out[mid] = (task, deadline)
        self._queued.clear()


def _raises(exc: BaseException) -> Outcome:
    def outcome(task: ClientTask) -> ClientResult:
        raise exc

    return outcome


class HetflStrategy:
    """Runs an algorithm's rounds over a Flower Grid (a hetfl engine)."""

    name = "flower"

    def __init__(self, algorithm: Algorithm, ctx: Context, grid: Grid, config_toml: str, *,
                 device: str = "cpu", options: FlowerOptions | None = None, expected_nodes: int | None = None,
                 on_close: Any = None, alive: Any = None) -> None:
        self.algorithm = algorithm
        self.base_ctx = ctx
        self.ctx = ctx
        self.grid = grid
        self.options = options or FlowerOptions()
        self.run_record = codec.run_record(config_toml, device)
        self.expected_nodes = ctx.num_clients if expected_nodes is None else expected_nodes
        self.node_of: dict[int, int] = {}  # client id -> Flower node id
        self.capabilities: dict[int, dict[str, Any]] = {}
        self._on_close = on_close
        self._alive = alive  # raises if the transport died (a crashed simulation), checked while waiting
        self._closed = False
        self._round_logic: Round | None = None  # hetfl's round over this transport; rebuilt when ctx changes
        self._round = 0
        self._client_time_s = 0.0

    # ------------------------------------------------------------------ plumbing
    def _exchange(self, messages: list[Message], timeout_s: float, what: str = "round_timeout_s"
                  ) -> Iterator[Message | str]:
        """Push messages; yield each one's reply in the order given (a str reason if none came)."""
        ids = list(self.grid.push_messages(messages))
        if len(ids) != len(messages):
            raise HetflError(f"Flower accepted {len(ids)} of {len(messages)} messages")
        index = {mid: i for i, mid in enumerate(ids)}
        pending = set(ids)
        got: dict[int, Message] = {}
        deadline = time.monotonic() + timeout_s if timeout_s > 0 else math.inf
        nxt = 0
        sleep = self.options.poll_interval_s
        while nxt < len(ids):
            if nxt in got:
                yield got.pop(nxt)
                nxt += 1
                continue
            if not pending:  # pragma: no cover - every id resolves either way
                break
            replies = list(self.grid.pull_messages(pending))
            for rep in replies:
                mid = rep.metadata.reply_to_message_id
                if mid in pending:
                    pending.discard(mid)
                    got[index[mid]] = rep
            if replies:
                sleep = self.options.poll_interval_s
                continue
            if time.monotonic() >= deadline:
                for mid in pending:
                    got[index[mid]] = f"no reply within {what}={timeout_s:g} s (node lost?)"  # type: ignore
                pending.clear()
                continue
            if self._alive is not None:
                self._alive()
            time.sleep(sleep)
            sleep = min(sleep * 1.5, 0.2)

    @staticmethod
    def _error(rep: Message | str) -> str | None:
        if isinstance(rep, str):
            return rep
        if rep.has_error():
            return f"error code {rep.error.code}: {rep.error.reason}"
        return None

    # ------------------------------------------------------------------ query round
    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.options.query_timeout_s
        while True:
            nodes = sorted(int(n) for n in self.grid.get_node_ids())
            if len(nodes) >= self.expected_nodes or time.monotonic() >= deadline:
                return nodes
            if self._alive is not None:
                self._alive()
            time.sleep(0.2)

    def query(self) -> dict[int, dict[str, Any]]:
        """Ask every connected node who it is and what it can train; set ``ctx.fleet`` from the answers."""
        nodes = self._wait_for_nodes()
        if not nodes:
            raise HetflError(f"no Flower node connected within {self.options.query_timeout_s:g} s")
        msgs = [Message(RecordDict({codec.RUN: self.run_record}), node, "query", group_id="query") for node in nodes]
        self.node_of.clear()
        self.capabilities.clear()
        for node, rep in zip(nodes, self._exchange(msgs, self.options.query_timeout_s, "query_timeout_s")):
            err = self._error(rep)
            if err is not None:
                log.warning("node %s did not answer the capability query (%s); it gets no tasks", node, err)
                continue
            cap = dict(rep.content.config_records[codec.CAPABILITY].items())
            cid = int(cap["partition-id"])
            if not 0 <= cid < self.base_ctx.num_clients:
                log.warning("node %s holds partition %d but the run has %d clients; it gets no tasks",
                            node, cid, self.base_ctx.num_clients)
                continue
            if cid in self.node_of:
                log.warning("nodes %s and %s both hold partition %d; using the first", self.node_of[cid], node, cid)
                continue
            self.node_of[cid] = node
            self.capabilities[cid] = cap
        missing = self.base_ctx.num_clients - len(self.node_of)
        if missing:
            log.warning("%d of %d clients have no Flower node; when sampled they count as failed",
                        missing, self.base_ctx.num_clients)
        self.ctx = self._context_from_reports()
        return self.capabilities

    def _context_from_reports(self) -> Context:
        """The run's Context with client sizes and the fleet replaced by what the nodes reported."""
        ctx = self.base_ctx
        sizes = np.array(ctx.client_sizes, copy=True)
        for cid, cap in self.capabilities.items():
            if "num-examples" in cap:
                sizes[cid] = int(cap["num-examples"])
        ctx = dataclasses.replace(ctx, client_sizes=sizes)
        fleet = getattr(ctx, "fleet", None)
        if fleet is None or not self.capabilities:
            return ctx
        arrays = {"max_width": ("max-width", fleet.max_width), "speed": ("speed", fleet.speed),
                  "memory_gb": ("memory-gb", fleet.memory_gb),
                  "bandwidth_mbps": ("bandwidth-mbps", fleet.bandwidth_mbps)}
        changes: dict[str, Any] = {}
        for attr, (key, old) in arrays.items():
            new = np.array(old, dtype=np.float64, copy=True)
            for cid, cap in self.capabilities.items():
                if key in cap:
                    new[cid] = float(cap[key])
            changes[attr] = new
        levels = tuple(float(w) for w in fleet.levels)
        extra = sorted({float(w) for w in changes["max_width"]} - set(levels), reverse=True)
        if extra:  # a node reported a width the configured mix lacks: it becomes a level of its own
            levels = tuple(sorted(set(levels) | set(extra), reverse=True))
            share = np.array([np.mean(np.isclose(changes["max_width"], w)) for w in levels])
            changes["levels"] = levels
            changes["proportions"] = share / share.sum()
        if len(fleet.device):
            names = list(fleet.device)
            for cid, cap in self.capabilities.items():
                if "device-name" in cap:
                    names[cid] = str(cap["device-name"])
            changes["device"] = np.asarray(names)
        return dataclasses.replace(ctx, fleet=dataclasses.replace(fleet, **changes))

    # ------------------------------------------------------------------ a round
    def open(self) -> FlowerSession:
        """The transport of :class:`hetfl.rounds.Round`: a :class:`FlowerSession` on this Grid."""
        return FlowerSession(self, str(self._round))

    def _decoded(self, rep: Message) -> Outcome:
        def outcome(task: ClientTask) -> ClientResult:
            try:
                res, client_time = codec.decode_result(rep.content)
            except Exception as exc:  # a malformed reply is a lost client, not a crashed server
                raise ClientLost(f"unreadable reply: {exc!r}") from exc
            self._client_time_s += client_time
            return res

        return outcome

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, FlowerRoundReport]:
        if self._round_logic is None or self._round_logic.ctx is not self.ctx:  # the query may replace ctx
            self._round_logic = Round(self.algorithm, self.ctx, self)
        self._round, self._client_time_s = rnd, 0.0
        new_state, report = self._round_logic.run(state, rnd)
        report = FlowerRoundReport(**{f.name: getattr(report, f.name) for f in dataclasses.fields(report)})
        report.extra["client_time_s"] = round(self._client_time_s, 4)
        for cid, why in sorted(report.failed.items()):
            log.warning("round %d: client %d failed: %s", rnd, cid, why)
        return new_state, report

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            if self._on_close is not None:
                self._on_close()
