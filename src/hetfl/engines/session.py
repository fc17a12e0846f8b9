"""The parent's streaming session on the worker pool (:mod:`hetfl.engines.pool`): units of work handed out
oldest first, results as they finish, blocks of pre-summed results, and what a dying worker means for them."""

from __future__ import annotations

import bisect
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

from hetfl.algorithms.base import ClientTask
from hetfl.engines.pool import BlockDone, WorkerDiedError, WorkerPool, _Job, _Outcome, _replay, _Worker
from hetfl.errors import HetflError
from hetfl.rounds import Outcome


def open_session(pool: WorkerPool, chunks: Sequence[Sequence[ClientTask]] = (), lookahead: int = 0) -> PoolSession:
    """A streaming session on ``pool`` (one at a time); workers an interrupted session stopped are restarted
    first."""
    default = pool.revive()
    return PoolSession(pool, chunks, lookahead or default)


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
        # blocks (submit_block): block number -> its tasks; unit id of a whole block -> its number; a block
        # run client by client: its number -> the outcomes so far, and each of its tasks -> the block
        self._blocks: list[tuple[int, ...]] = []
        self._block_of_unit: dict[int, int] = {}
        self._split: dict[int, dict[int, Outcome]] = {}
        self._split_of: dict[int, int] = {}
        self._faults: Any = None
        self._ready_blocks: deque[tuple[int, BlockDone]] = deque()

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

    def submit_block(self, tasks: Sequence[ClientTask], faults: Any) -> int:
        """Queue a block of consecutive tasks whose results a worker validates (against ``faults``) and sums
        (:mod:`hetfl.aggregation.blocks`); its number (0, 1, ... in this session).  A block whose tasks do
        not share one weights dict runs client by client (its :class:`BlockDone` then holds outcomes)."""
        members = tuple(range(self._submitted, self._submitted + len(tasks)))
        self._submitted += len(tasks)
        for i, task in zip(members, tasks):
            self._tasks[i] = task
        k = len(self._blocks)
        self._blocks.append(members)
        self._faults = faults
        if all(t.weights is tasks[0].weights for t in tasks):
            self._block_of_unit[members[0]] = k
            self._form(members)
        else:
            self._split_block(k, 0)
        return k

    def next_block(self) -> tuple[int, BlockDone]:
        """The next block that finished (its number and :class:`BlockDone`), whichever finished first."""
        while not self._ready_blocks:
            if not self._units:
                raise HetflError("next_block(): no block is in flight")
            self._step()
        k, done = self._ready_blocks.popleft()
        self._returned += len(self._blocks[k])
        return k, done

    def _split_block(self, k: int, attempt: int) -> None:
        """Run block ``k`` client by client (each task its own unit, at ``attempt``)."""
        self._split[k] = {}
        for i in self._blocks[k]:
            self._split_of[i] = k
            self._units[i] = (i,)
            bisect.insort(self._todo, (i, attempt))
            j = bisect.bisect_left(self._formed, i)
            if j == len(self._formed) or self._formed[j] != i:
                self._formed.insert(j, i)

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
        for store in (self._blocks, self._block_of_unit, self._split, self._split_of, self._ready_blocks):
            store.clear()
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

    def _finish(self, uid: int, outcomes: Any) -> None:
        members = self._units.pop(uid)
        k = self._block_of_unit.pop(uid, None)
        if k is not None:  # a whole block: its BlockDone
            for i in members:
                del self._tasks[i]
            self._ready_blocks.append((k, outcomes))
        for i, outcome in zip(members, outcomes if k is None else ()):
            task = self._tasks.pop(i)
            b = self._split_of.pop(i, None)
            if b is None:
                self._ready.append((task, _replay(outcome)))
                continue
            got = self._split[b]  # a client of a block run client by client
            got[i] = _replay(outcome)
            if len(got) == len(self._blocks[b]):
                del self._split[b]
                self._ready_blocks.append((b, BlockDone(outcomes=[got[j] for j in self._blocks[b]])))
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
                members = self._units[uid]
                job = _Job(uid, attempt, lane)
                if uid in self._block_of_unit:
                    job.block, job.clients = self._faults, len(members)
                self.pool._send(w, job, [self._tasks[i] for i in members])

    def _step(self) -> None:
        pool = self.pool
        self._dispatch()
        busy = [w for w in pool._workers if w.jobs]
        if not busy:
            raise HetflError("internal error: no worker is busy but results are missing")  # pragma: no cover
        timeout = 1.0
        if pool.timeout_s > 0:
            now = time.monotonic()
            timeout = max(0.0, min(timeout, min(w.started + pool.timeout_s * w.jobs[0].clients - now
                                                for w in busy)))
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
            elif pool.timeout_s > 0 and time.monotonic() - w.started > pool.timeout_s * w.jobs[0].clients:
                self._lost(w, f"took longer than worker_timeout_s={pool.timeout_s:g}")

    def _lost(self, w: _Worker, why: str) -> None:
        """Worker ``w`` died or stalled: retry its running unit once (or drop its clients), requeue the rest."""
        head, *queued = list(w.jobs)
        cids = [self._tasks[i].client_id for i in self._units[head.index]]
        block = self._block_of_unit.get(head.index)
        if len(cids) == 1:
            who, retry = f"client {cids[0]}", f"client {cids[0]} is retried once"
        elif block is not None:
            who, retry = f"clients {', '.join(map(str, cids))} (one block)", "they are retried once, one by one"
        else:
            who, retry = f"clients {', '.join(map(str, cids))} (one batched chunk)", "they are retried once"
        again = [(j.index, j.attempt) for j in queued]
        if block is not None:  # retried client by client: only a client that kills a worker twice is dropped
            del self._units[head.index], self._block_of_unit[head.index]
            self._split_block(block, 1)
            self.pool._replace(w, f"{why} while training {who}; {retry}")
        elif head.attempt == 0:
            again.append((head.index, 1))
            self.pool._replace(w, f"{why} while training {who}; {retry}")
        else:
            self._finish(head.index, [_Outcome(error=WorkerDiedError(
                f"the worker training client {cid} {why}, twice; the client is dropped")) for cid in cids])
            self.pool._replace(w, f"{why} while training {who} (retry)")
        self._todo[:] = sorted(self._todo + again)


__all__ = ["PoolSession"]
