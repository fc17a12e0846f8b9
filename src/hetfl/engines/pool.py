"""Client-parallel worker processes: the parent's side of the pool and its streaming sessions.

A :class:`WorkerPool` starts ``workers`` processes once per run (:mod:`hetfl.engines.worker_process` is
their loop).  Per client, only small control messages (the task's client id, ModelRef, TrainConfig, seed
and ``extra``; the result's metrics and ``extra``) go through a pipe, pickled.  Weights go through
**shared memory** (:mod:`hetfl.engines.shm`): per worker, per lane (a worker has :data:`DEPTH` lanes: the
next task waits in its pipe while it trains the current one) and per weight layout the parent maps one
pair of buffers the first time it is needed and reuses it every round: the parent copies the task's
weights into the *in* buffer (unless the very same unchanged tensors are already there), the worker
loads them, trains, and copies its result into the *out* buffer, and the parent copies them out.

Start method.  ``fork`` (Linux) is the default: workers share the parent's dataset copy-on-write and
start in milliseconds.  A forked child that runs more than one OpenMP thread after its parent has
used OpenMP hangs (GNU libgomp keeps no usable thread pool across fork), while one thread never enters
a parallel region; so ``fork`` is used only with ``threads_per_worker = 1``.  With more threads per
worker the pool uses ``forkserver``: workers come from a fresh server process that never ran a
parallel region, and receive the federation once, pickled (its tensors travel through torch's shared
memory, not copied per worker).  The main process warms up (builds the models, takes one SGD step on a
throwaway copy) before forking, so workers inherit lazy imports and do not pay them inside the first round.

Sessions.  Work goes through a :class:`PoolSession` (``pool.open(chunks)``), the streaming transport of
:mod:`hetfl.rounds`: ``submit(task)`` at any time, ``next_result()`` returns whichever client finished
first, as ``(task, outcome)``.  Units of work (one task, or a planned chunk of same-shape tasks that one
worker trains batched) are handed out oldest first, at most :data:`DEPTH` per worker, and never more than
``lookahead`` units past the oldest unfinished one, so results that finish early wait in bounded number.
Every client update seeds itself (:func:`hetfl.train.local_sgd`), so which worker trains it, and when,
changes no bit: a run with workers equals the in-process run when both use one thread per client.

Failures.  A client's exception is sent back and re-raised in the parent (its outcome raises), where the
round's :class:`~hetfl.reliability.guard.RoundBook` records it as a failure; the worker lives on.  A
worker that dies (killed, segfault, ``os._exit``) or exceeds ``worker_timeout_s`` on one client is
detected through its process sentinel (never a blocking read), reported, and restarted; its client is
retried once, and if it kills a worker again it is counted as a failed (dropped) client.
"""

from __future__ import annotations

import bisect
import contextlib
import math
import pickle
import select
import signal
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any

import torch

from hetfl import packed
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context
from hetfl.engines import worker_process
from hetfl.engines.shm import Layout, Views, client_views, create_shared, group_layout, layout_of, unlink
from hetfl.engines.worker_process import dumps
from hetfl.errors import ConfigError, HetflError
from hetfl.rounds import Outcome

START_TIMEOUT_S = 120.0  # a worker must report ready within this (forkserver imports torch: seconds)
STOP_TIMEOUT_S = 5.0  # close(): wait this long for a clean exit, then terminate, then kill


class WorkerDiedError(RuntimeError):
    """A client could not be trained because the worker process running it died (twice)."""


class RemoteTraceback(Exception):
    """The traceback of a client's exception, as the worker process printed it."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


#: Tasks queued per worker: the next one waits in the worker's pipe while it trains the current one,
#: so a worker never idles while this process aggregates.
DEPTH = 2


@dataclass
class _Slot:
    """One shared buffer pair (task weights in, result out) of a worker, for one lane and layout."""

    id: int
    inp: Views
    out: Views
    sent: list[torch.Tensor] = field(default_factory=list)  # the tensors last copied in (kept alive)
    versions: list[int] = field(default_factory=list)  # and their in-place versions then
    spans: dict[int, Any] = field(default_factory=dict)  # client in the buffer -> its packed span (or None)

    def result(self, c: int = -1) -> dict[str, torch.Tensor]:
        """A copy of the result in the out buffer (``c``: the client's, in a chunk's buffer): one copy of
        its span, the span looked up once per buffer."""
        views = self.out if c < 0 else client_views(self.out, layout_of(self.inp), c)
        if c not in self.spans:
            self.spans[c] = packed.span(views)
        known = self.spans[c]
        if known is None:  # mixed dtypes (e.g. BatchNorm's int64 counter): tensor by tensor
            return packed.clone(views)
        return packed.views(known[0].clone(), known[1])

    def load(self, weights: dict[str, torch.Tensor]) -> None:
        """Copy ``weights`` in, unless these very tensors, unchanged, are already there (FedAvg sends one
        global dict to every client: it is copied once per worker and round, not once per client)."""
        tensors = list(weights.values())
        if len(tensors) == len(self.sent) and all(
                a is b and a._version == v for a, b, v in zip(tensors, self.sent, self.versions)):
            return
        for k, v in weights.items():
            self.inp[k].copy_(v)
        self.sent, self.versions = tensors, [t._version for t in tensors]


@dataclass
class _Job:
    index: int  # the session's unit (one task, or a chunk of tasks trained batched): its id
    attempt: int  # 0, or 1 for the retry after a worker died
    lane: int
    seq: int = 0
    path: str | None = None  # a shared file this job hands over (the worker maps it first)
    slot: _Slot | None = None  # the buffers it was sent with


@dataclass
class _Worker:
    index: int
    proc: Any
    conn: Any
    slots: dict[tuple[int, Layout], _Slot] = field(default_factory=dict)
    pending_paths: list[str] = field(default_factory=list)  # shared files sent but maybe not yet mapped
    jobs: deque[_Job] = field(default_factory=deque)  # sent, in the order the worker runs them
    started: float = 0.0  # when the first of ``jobs`` started
    poller: Any = None  # a poll object for ``conn`` alone (see WorkerPool._readable)

    def free_lane(self) -> int | None:
        used = {j.lane for j in self.jobs}
        return next((lane for lane in range(len(used) + 1) if lane not in used), None)


@dataclass
class _Outcome:
    result: ClientResult | None = None
    error: BaseException | None = None


class WorkerPool:
    """``workers`` long-lived processes that train clients; see the module docstring."""

    def __init__(self, algorithm: Algorithm, federation: Any, ctx: Context, workers: int, *,
                 threads_per_worker: int = 1, timeout_s: float = 0.0, start_method: str | None = None) -> None:
        import multiprocessing

        if workers < 1:
            raise ConfigError(f"workers must be >= 1, got {workers}")
        if threads_per_worker < 1:
            raise ConfigError(f"threads_per_worker must be >= 1, got {threads_per_worker}")
        method = start_method or ("fork" if threads_per_worker == 1 else "forkserver")
        self._mp = multiprocessing.get_context(method)
        if method == "forkserver":
            self._mp.set_forkserver_preload(["torch", "hetfl.engines.workers"])
        self.method = method
        self.algorithm, self.federation, self.ctx = algorithm, federation, ctx
        self.threads = threads_per_worker
        self.timeout_s = timeout_s
        self.depth = DEPTH
        self.messages: list[str] = []  # worker deaths and restarts since the last take_events()
        self.restarts = 0  # since the last take_events()
        self.restarts_total = 0
        self._seq = 0
        self._slot_ids = 0
        self._closed = False
        self._workers: list[_Worker] = []
        self._pollers: dict[tuple[Any, ...], tuple[Any, dict[int, Any]]] = {}  # see _wait
        if method == "fork":  # imports and set-up done once here are inherited by every worker
            with contextlib.suppress(Exception):
                worker_process.warm_up(None, algorithm, federation, ctx)
        try:
            for i in range(workers):
                self._workers.append(self._start(i))
            for w in self._workers:
                self._await_ready(w)
        except BaseException:
            self.close()
            raise

    # -------------------------------------------------------------- process lifecycle
    @property
    def size(self) -> int:
        return len(self._workers)

    @property
    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers]

    def _start(self, index: int) -> _Worker:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=worker_process.worker_main, name=f"hetfl-worker-{index}", daemon=True,
                                args=(child_conn, self.algorithm, self.federation, self.ctx, self.threads))
        try:
            proc.start()
        except AssertionError as exc:  # "daemonic processes are not allowed to have children"
            raise HetflError(f"cannot start worker processes here ({exc}); use workers=1") from None
        child_conn.close()
        return _Worker(index, proc, parent_conn)

    def _await_ready(self, w: _Worker) -> None:
        ready = connection.wait([w.conn, w.proc.sentinel], timeout=START_TIMEOUT_S)
        if w.conn in ready:
            try:
                msg = pickle.loads(w.conn.recv_bytes())
                if msg[0] == "ready":
                    return
            except (EOFError, OSError):
                pass
        self._kill(w)
        raise HetflError(f"worker process {w.index} did not start ({self._exit_text(w)}); use workers=1 "
                         f"to train in this process")

    @staticmethod
    def _exit_text(w: _Worker) -> str:
        code = w.proc.exitcode
        if code is None:
            return "no answer"
        if code < 0:
            try:
                return f"killed by signal {signal.Signals(-code).name}"
            except ValueError:
                return f"killed by signal {-code}"
        return f"exit code {code}"

    def _kill(self, w: _Worker) -> None:
        if w.proc.is_alive():
            w.proc.kill()
        w.proc.join(STOP_TIMEOUT_S)
        w.conn.close()
        self._pollers.clear()  # they may hold this worker's file descriptors
        for path in w.pending_paths:
            unlink(path)
        w.pending_paths.clear()
        w.slots.clear()
        w.jobs.clear()

    def _replace(self, w: _Worker, why: str) -> None:
        """Kill (if needed) and restart worker ``w``; its shared buffers are mapped afresh on demand."""
        self._kill(w)
        new = self._start(w.index)
        self._await_ready(new)
        self._workers[w.index] = new
        self.restarts += 1
        self.restarts_total += 1
        self.messages.append(f"worker {w.index} (pid {w.proc.pid}) {why}; restarted as pid {new.proc.pid}")

    def take_events(self) -> tuple[int, list[str]]:
        """Restarts and messages since the last call (the engine puts them in the round's report)."""
        out = (self.restarts, self.messages)
        self.restarts, self.messages = 0, []
        return out

    def close(self) -> None:
        """Stop every worker (politely, then by force) and release the shared buffers."""
        if self._closed:
            return
        self._closed = True
        for w in self._workers:
            with contextlib.suppress(OSError, ValueError):
                w.conn.send_bytes(dumps(("stop",)))
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for w in self._workers:
            w.proc.join(max(0.0, deadline - time.monotonic()))
            if w.proc.is_alive():
                w.proc.terminate()
                w.proc.join(1.0)
            self._kill(w)
        self._workers = []

    def __del__(self) -> None:  # a forgotten close() still stops the workers
        with contextlib.suppress(Exception):
            self.close()

    # -------------------------------------------------------------- sessions
    def open(self, chunks: Sequence[Sequence[ClientTask]] = (), lookahead: int = 0) -> PoolSession:
        """A streaming session (see :class:`PoolSession`); one at a time.  Workers that an interrupted
        session stopped are restarted first."""
        if self._closed:
            raise HetflError("the worker pool is closed")
        for w in list(self._workers):
            if not w.proc.is_alive():
                self._kill(w)
                new = self._start(w.index)
                self._await_ready(new)
                self._workers[w.index] = new
        return PoolSession(self, chunks, lookahead or 4 * len(self._workers))

    def _send(self, w: _Worker, job: _Job, unit: Sequence[ClientTask]) -> None:
        task = unit[0]
        layout = layout_of(task.weights)
        k = len(unit)  # > 1: a chunk, its tasks share one weights dict (see ParallelSimulator.open)
        slot = w.slots.get((job.lane, layout, k))
        slot_new = None
        if slot is None:
            out_layout = group_layout(layout, k) if k > 1 else layout
            path, inp, out = create_shared(layout, out_layout)
            self._slot_ids += 1
            slot = w.slots[(job.lane, layout, k)] = _Slot(self._slot_ids, inp, out)
            w.pending_paths.append(path)
            slot_new = (path, layout, out_layout)
            job.path = path
        slot.load(task.weights)
        job.slot = slot
        self._seq += 1
        job.seq = self._seq
        if not w.jobs:
            w.started = time.monotonic()
        w.jobs.append(job)
        metas = [(t.client_id, t.model, t.train, t.seed, t.extra) for t in unit]
        msg = ("chunk", job.seq, slot.id, slot_new, metas) if k > 1 else ("task", job.seq, slot.id, slot_new, metas[0])
        # a broken pipe means the worker is gone: its sentinel says so in the next wait
        with contextlib.suppress(OSError, ValueError):
            w.conn.send_bytes(dumps(msg))

    def _receive(self, w: _Worker, members: Sequence[int]) -> tuple[_Job, list[_Outcome]]:
        """``w``'s oldest job and the outcome of each task of its unit (``members``: the unit of that job,
        looked up by the caller from ``job.index``)."""
        msg = pickle.loads(w.conn.recv_bytes())
        job = w.jobs.popleft()
        w.started = time.monotonic()  # the next job (if any) starts now
        if msg[1] != job.seq:  # pragma: no cover - a protocol bug, not a client fault
            raise HetflError(f"worker {w.index} answered task {msg[1]}, expected {job.seq}")
        if job.path is not None:  # mapped (and unlinked) by the worker before it replied
            unlink(job.path)
            w.pending_paths.remove(job.path)
        if msg[0] == "done":
            _, _, _, info, sent = msg
            assert job.slot is not None
            if len(members) > 1:  # a chunk: each client's weights are one span of the result buffer
                return job, [_Outcome(ClientResult(cid, n, job.slot.result(c), metrics, extra))
                             for c, (cid, n, metrics, extra) in enumerate(info)]
            cid, n, metrics, extra = info
            if sent is None:  # in the slot's out buffer: one copy of the whole buffer (hetfl.packed)
                sent = job.slot.result()
            return job, [_Outcome(ClientResult(cid, n, sent, metrics, extra))]
        _, _, _, payload, tb = msg
        out = []
        for _ in members:  # a chunk's exception is every one of its clients' (as in process)
            exc = pickle.loads(payload) if isinstance(payload, bytes) else RuntimeError(f"{payload[0]}: {payload[1]}")
            exc.__cause__ = RemoteTraceback(tb)
            out.append(_Outcome(error=exc))
        return job, out

    @staticmethod
    def _readable(w: _Worker) -> bool:
        """Whether a reply from ``w`` is waiting (``Connection.poll`` would build a selector per call)."""
        if w.poller is None:
            w.poller = select.poll()
            w.poller.register(w.conn.fileno(), select.POLLIN | select.POLLPRI)
        return bool(w.poller.poll(0))

    def _wait(self, busy: list[_Worker], timeout: float) -> set[Any]:
        """The pipes and process sentinels of ``busy`` that are ready (``multiprocessing.connection.wait``
        builds a selector and registers every object on each call; a poll object per set of busy workers
        is kept instead, so waiting for a reply costs one system call)."""
        key = tuple((w.conn, w.proc.sentinel) for w in busy)
        entry = self._pollers.get(key)
        if entry is None:
            poller = select.poll()
            objects: dict[int, Any] = {}
            for conn, sentinel in key:
                for obj, fd in ((conn, conn.fileno()), (sentinel, sentinel)):
                    poller.register(fd, select.POLLIN | select.POLLPRI)
                    objects[fd] = obj
            entry = self._pollers[key] = (poller, objects)
        poller, objects = entry
        while True:
            try:
                events = poller.poll(max(0, math.ceil(timeout * 1000)))
                break
            except InterruptedError:  # pragma: no cover - PEP 475 retries; kept for clarity
                continue
        return {objects[fd] for fd, _ in events}


class PoolSession:
    """Tasks submitted at any time, results as they finish: the pool's streaming transport.

    ``submit(task)`` queues a task (a task of a planned chunk waits until every task of its chunk is
    submitted, then the chunk is one unit); ``next_result()`` trains until some unit finishes and returns
    one ``(task, outcome)``, whichever finished first (``outcome(task)`` returns the result or raises the
    client's exception); ``in_flight`` counts tasks submitted and not yet returned.  As a context manager
    the session ends cleanly (running clients finish, their results are dropped) when its block ends
    normally or by ``GeneratorExit``, and stops busy workers at once on any other exception (Ctrl-C):
    the next session restarts them.
    """

    def __init__(self, pool: WorkerPool, chunks: Sequence[Sequence[ClientTask]], lookahead: int) -> None:
        self.pool = pool
        self.lookahead = lookahead  # units handed out past the oldest unfinished one, at most
        self._chunk_of = {id(t): k for k, chunk in enumerate(chunks) for t in chunk}
        self._chunk_size = [len(chunk) for chunk in chunks]
        self._held: dict[int, list[int]] = {}  # chunk -> its tasks submitted so far (submission numbers)
        self._tasks: dict[int, ClientTask] = {}  # submission number -> task, until its outcome is ready
        self._units: dict[int, tuple[int, ...]] = {}  # unit id (its first task's number) -> its tasks
        self._todo: list[tuple[int, int]] = []  # (unit id, attempt) waiting for a worker, sorted
        self._formed: list[int] = []  # unit ids from the oldest unfinished one on, sorted
        self._ready: deque[tuple[ClientTask, Outcome]] = deque()
        self._submitted = self._returned = 0

    def __enter__(self) -> PoolSession:
        return self

    def __exit__(self, kind: Any, exc: Any, tb: Any) -> None:
        if kind is None or issubclass(kind, GeneratorExit):
            self.close()
        else:
            self.abort()

    @property
    def in_flight(self) -> int:
        return self._submitted - self._returned

    def submit(self, task: ClientTask) -> None:
        i = self._submitted
        self._submitted += 1
        self._tasks[i] = task
        k = self._chunk_of.pop(id(task), None)
        if k is None:
            self._form((i,))
            return
        held = self._held.setdefault(k, [])
        held.append(i)
        if len(held) == self._chunk_size[k]:
            self._form(tuple(self._held.pop(k)))

    def next_result(self) -> tuple[ClientTask, Outcome]:
        while not self._ready:
            if not self._units:
                if not self._held:
                    raise HetflError("next_result(): no task is in flight")
                for members in self._held.values():  # a chunk that will not be completed: its tasks one by one
                    for i in members:
                        self._form((i,))
                self._held.clear()
                continue
            self._step()
        self._returned += 1
        return self._ready.popleft()

    def close(self) -> None:
        """Let the clients still running finish (their results are dropped), so the next session starts clean."""
        self._todo.clear()
        while any(w.jobs for w in self.pool._workers):
            self._step()
            self._todo.clear()  # a retry of a lost unit is not needed any more
        self._forget()

    def abort(self) -> None:
        """Stop every busy worker now (restarted by the next session); no waiting for long clients."""
        for w in self.pool._workers:
            if w.jobs:
                self.pool._kill(w)
        self._forget()

    def _forget(self) -> None:
        self._todo.clear()
        self._units.clear()
        self._held.clear()
        self._tasks.clear()
        self._formed.clear()
        self._ready.clear()

    # -------------------------------------------------------------- units
    def _form(self, members: tuple[int, ...]) -> None:
        uid = members[0]
        self._units[uid] = members
        bisect.insort(self._todo, (uid, 0))
        bisect.insort(self._formed, uid)

    def _finish(self, uid: int, outcomes: Sequence[_Outcome]) -> None:
        for i, outcome in zip(self._units.pop(uid), outcomes):
            self._ready.append((self._tasks.pop(i), _replay(outcome)))
        while self._formed and self._formed[0] not in self._units:
            self._formed.pop(0)

    def _dispatch(self) -> None:
        """Hand out units oldest first, no further than ``lookahead`` units past the oldest unfinished one:
        first one to every idle worker, then queue more per worker (up to DEPTH) while enough units remain
        (at the end of a round, an idle worker beats a queue)."""
        workers = self.pool._workers
        for depth in range(self.pool.depth):
            for w in workers:
                if not self._todo or bisect.bisect_left(self._formed, self._todo[0][0]) >= self.lookahead:
                    return
                if len(w.jobs) > depth or (depth > 0 and len(self._todo) <= depth * len(workers)):
                    continue
                lane = w.free_lane()
                if lane is None:
                    continue
                uid, attempt = self._todo.pop(0)
                self.pool._send(w, _Job(uid, attempt, lane), [self._tasks[i] for i in self._units[uid]])

    def _step(self) -> None:
        pool = self.pool
        self._dispatch()
        busy = [w for w in pool._workers if w.jobs]
        if not busy:
            raise HetflError("internal error: no worker is busy but results are missing")  # pragma: no cover
        timeout = 1.0
        if pool.timeout_s > 0:
            now = time.monotonic()
            timeout = max(0.0, min(timeout, min(w.started + pool.timeout_s - now for w in busy)))
        ready = pool._wait(busy, timeout)
        for w in busy:
            if w.conn in ready:
                try:
                    while w.jobs and pool._readable(w):  # every reply that is there
                        uid = w.jobs[0].index
                        _, outcomes = pool._receive(w, self._units[uid])
                        self._finish(uid, outcomes)
                    continue
                except (EOFError, OSError):
                    pass  # died while replying: handled as a death below
            if w.conn in ready or w.proc.sentinel in ready:
                w.proc.join(0.5)
                self._lost(w, f"died ({pool._exit_text(w)})")
            elif pool.timeout_s > 0 and time.monotonic() - w.started > pool.timeout_s:
                self._lost(w, f"took longer than worker_timeout_s={pool.timeout_s:g}")

    def _lost(self, w: _Worker, why: str) -> None:
        """Worker ``w`` died or stalled: retry its running unit once (or drop its clients), requeue the rest."""
        head, *queued = list(w.jobs)
        cids = [self._tasks[i].client_id for i in self._units[head.index]]
        if len(cids) == 1:
            who, retry = f"client {cids[0]}", f"client {cids[0]} is retried once"
        else:
            who, retry = f"clients {', '.join(map(str, cids))} (one batched chunk)", "they are retried once"
        again = [(j.index, j.attempt) for j in queued]
        if head.attempt == 0:
            again.append((head.index, 1))
            self.pool._replace(w, f"{why} while training {who}; {retry}")
        else:
            self._finish(head.index, [_Outcome(error=WorkerDiedError(
                f"the worker training client {cid} {why}, twice; the client is dropped")) for cid in cids])
            self.pool._replace(w, f"{why} while training {who} (retry)")
        self._todo[:] = sorted(self._todo + again)


def _replay(outcome: _Outcome) -> Outcome:
    def outcome_of(task: ClientTask) -> ClientResult:
        if outcome.error is not None:
            raise outcome.error
        assert outcome.result is not None
        return outcome.result

    return outcome_of
