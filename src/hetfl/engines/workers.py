"""Client-parallel worker processes for the simulator: the clients of a round train side by side.

A :class:`WorkerPool` starts ``workers`` processes once per run.  Each one sets
``torch.set_num_threads(threads_per_worker)``, builds its own :class:`~hetfl.engines.simulator.ModelCache`
and holds the federation's in-memory dataset once.  Per client, only small control messages (the
task's client id, ModelRef, TrainConfig, seed and ``extra``; the result's metrics and ``extra``) go
through a pipe, pickled.  Weights go through **shared memory**: per worker and per weight layout
(the keys, shapes and dtypes of a task's weights, i.e. one per submodel shape) the parent maps one
buffer, the first time that worker needs it, and reuses it every round: the parent copies the task's
weights in, the worker loads them, trains, copies its result back into the same buffer, and the
parent copies them out.  The buffers are files in ``/dev/shm`` that are unlinked as soon as both
processes have mapped them, so nothing is left behind even if the run is killed.

Start method.  ``fork`` (Linux) is the default: workers share the parent's dataset copy-on-write and
start in milliseconds.  A forked child that runs more than one OpenMP thread after its parent has
used OpenMP hangs (GNU libgomp keeps no usable thread pool across fork), while one thread never enters
a parallel region; so ``fork`` is used only with ``threads_per_worker = 1``.  With more threads per
worker the pool uses ``forkserver``: workers come from a fresh server process that never ran a
parallel region, and receive the federation once, pickled (its tensors travel through torch's shared
memory, not copied per worker).

Order and equality.  Results are handed back in the order of the tasks, whichever worker finishes
first, so the aggregation sees exactly the sequence of the in-process loop; since every client
update seeds itself (:func:`hetfl.train.local_sgd`), a run with workers equals the in-process run bit
for bit when both train with the same number of threads per client.

Failures.  A client's exception is sent back and re-raised in the parent, where the round's
:class:`~hetfl.reliability.guard.RoundBook` records it as a failure; the worker lives on.  A worker
that dies (killed, segfault, ``os._exit``) or exceeds ``worker_timeout_s`` on one client is detected
through its process sentinel (never a blocking read), reported, and restarted; its client is retried
once, and if it kills a worker again it is counted as a failed (dropped) client.
"""

from __future__ import annotations

import contextlib
import math
import os
import pickle
import signal
import sys
import tempfile
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing import connection
from typing import Any

import numpy as np
import torch

from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context
from hetfl.engines.simulator import ModelCache, Simulator
from hetfl.errors import ConfigError, HetflError

START_TIMEOUT_S = 120.0  # a worker must report ready within this (forkserver imports torch: seconds)
STOP_TIMEOUT_S = 5.0  # close(): wait this long for a clean exit, then terminate, then kill
_ALIGN = 64
Layout = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]


class WorkerDiedError(RuntimeError):
    """A client could not be trained because the worker process running it died (twice)."""


class RemoteTraceback(Exception):
    """The traceback of a client's exception, as the worker process printed it."""

    def __str__(self) -> str:
        return self.args[0] if self.args else ""


# ------------------------------------------------------------------------------------------ auto rule


def available_cores() -> int:
    """Cores this process may run on (the CPU affinity mask, which containers and taskset narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: ``auto`` goes parallel when one round's client work is estimated above this many seconds.
AUTO_MIN_ROUND_S = 0.1
_STEP_OVERHEAD_S = 1e-4  # per SGD step: Python and dispatch work that does not scale with the model
_FLOPS_PER_S = 5e9  # one core, conservative


def estimate_round_s(algorithm: Algorithm, ctx: Context) -> float:
    """Seconds one round of client training takes on one core, estimated from the model's FLOPs."""
    from hetfl.accounting import model_cost

    t = ctx.train
    clients = algorithm.clients_for(ctx.num_clients)
    mean_size = float(np.mean(ctx.client_sizes)) if len(ctx.client_sizes) else 0.0
    if t.steps > 0:
        steps, samples = t.steps, t.steps * t.batch_size
    else:
        steps = t.epochs * math.ceil(mean_size / t.batch_size)
        samples = t.epochs * mean_size
    try:
        with torch.random.fork_rng(devices=[]):
            example = torch.zeros((1, *ctx.info.input_shape),
                                  dtype=torch.long if ctx.info.vocab_size else torch.float32)
            flops = model_cost(ctx.model.build(ctx.info), example).forward_flops
    except Exception:  # an estimate only: an unusual model just counts its per-step overhead
        flops = 0
    return clients * (steps * _STEP_OVERHEAD_S + 3.0 * flops * samples / _FLOPS_PER_S)


def resolve_workers(setting: int | str, threads_per_worker: int, algorithm: Algorithm, ctx: Context,
                    device: torch.device) -> tuple[int, str]:
    """The number of worker processes for a ``workers`` setting, and why (for the console).

    ``auto`` (or 0): the cores this process may use divided by ``threads_per_worker``, capped by the
    clients per round, when a round's client work is estimated at :data:`AUTO_MIN_ROUND_S` or more;
    otherwise 1 (in process).  Also 1 on a CUDA device, inside another worker process (a sweep cell)
    and where ``fork``/``forkserver`` do not exist.
    """
    clients = algorithm.clients_for(ctx.num_clients)
    if setting not in ("auto", 0):
        n = int(setting)
        if n > 1 and device.type != "cpu":
            raise ConfigError(f"workers={n}: worker processes train on the CPU; with device {str(device)!r} "
                              f"clients train in this process (use workers=1 or workers=\"auto\")")
        if n > 1 and not _can_fork():
            raise ConfigError(f"workers={n} needs the fork start method (Linux); use workers=1 here")
        return max(1, min(n, clients)), f"workers={n}"
    import multiprocessing

    if device.type != "cpu":
        return 1, f"auto: device {device}"
    if multiprocessing.parent_process() is not None:
        return 1, "auto: already inside a worker process"
    if not _can_fork():
        return 1, "auto: no fork start method"
    n = min(available_cores() // max(threads_per_worker, 1), clients)
    if n < 2:
        return 1, f"auto: {available_cores()} core(s), {clients} client(s) per round"
    est = estimate_round_s(algorithm, ctx)
    if est < AUTO_MIN_ROUND_S:
        return 1, f"auto: ~{est * 1e3:.0f} ms of client work per round is too little to pay for processes"
    return n, f"auto: ~{est:.2g} s of client work per round on {available_cores()} cores"


def _can_fork() -> bool:
    import multiprocessing

    return "fork" in multiprocessing.get_all_start_methods() and sys.platform.startswith("linux")


# ------------------------------------------------------------------------------------------ shared memory


def layout_of(weights: dict[str, torch.Tensor]) -> Layout:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in weights.items())


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _offsets(layout: Layout) -> tuple[list[int], int]:
    offs, pos = [], 0
    for _, shape, dtype in layout:
        offs.append(pos)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        pos += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return offs, max(pos, _ALIGN)


def map_views(path: str, layout: Layout) -> dict[str, torch.Tensor]:
    """Map the shared file at ``path`` and return one tensor view per layout entry."""
    offs, total = _offsets(layout)
    buf = torch.from_file(path, shared=True, size=total, dtype=torch.uint8)
    views = {}
    for (key, shape, dtype), off in zip(layout, offs):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        views[key] = buf[off:off + nbytes].view(dtype).view(shape)
    return views


def create_shared(layout: Layout) -> tuple[str, dict[str, torch.Tensor]]:
    """A new shared file sized for ``layout`` (a name to hand to the worker) and the parent's views."""
    _, total = _offsets(layout)
    fd, path = tempfile.mkstemp(prefix="hetfl-w-", dir=_shm_dir())
    try:
        os.ftruncate(fd, total)
    finally:
        os.close(fd)
    return path, map_views(path, layout)


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


# ------------------------------------------------------------------------------------------ worker side


def _dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _exception_payload(exc: BaseException) -> tuple[Any, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = _dumps(exc)
        pickle.loads(blob)
        return blob, tb
    except Exception:
        return (type(exc).__name__, str(exc)), tb


def _worker_main(conn: Any, algorithm: Algorithm, federation: Any, ctx: Context, threads: int) -> None:
    """The loop of one worker process: map buffers, train the clients it is sent, reply."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us cleanly
    torch.set_num_threads(threads)
    parent = os.getppid()
    device = torch.device("cpu")
    models = ModelCache(ctx, device)
    slots: dict[int, dict[str, torch.Tensor]] = {}
    conn.send_bytes(_dumps(("ready", os.getpid())))
    while True:
        while not conn.poll(1.0):
            if os.getppid() != parent:  # the parent died without stopping us
                return
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            return
        if msg[0] == "stop":
            return
        _, seq, slot_id, slot_new, meta = msg
        if slot_new is not None:
            path, layout = slot_new
            slots[slot_id] = map_views(path, layout)
            _unlink(path)  # both sides hold the mapping now: no name is left in /dev/shm
        views = slots[slot_id]
        client_id, ref, train, cseed, extra = meta
        t0 = time.perf_counter()
        try:
            task = ClientTask(client_id, ref, views, train, cseed, extra)
            model = models.loaded(ref, views)
            data = federation.client_train(client_id)
            res = algorithm.local_update(task, model, data, device)
            in_slot = layout_of(res.weights) == layout_of(views)
            if in_slot:
                for k, v in res.weights.items():
                    views[k].copy_(v)
            reply = ("done", seq, time.perf_counter() - t0,
                     (res.client_id, res.num_samples, res.metrics, res.extra),
                     None if in_slot else res.weights)
        except Exception as exc:  # the client failed, the worker lives on
            reply = ("error", seq, time.perf_counter() - t0, *_exception_payload(exc))
        conn.send_bytes(_dumps(reply))


# ------------------------------------------------------------------------------------------ parent side


@dataclass
class _Worker:
    index: int
    proc: Any
    conn: Any
    slots: dict[Layout, tuple[int, dict[str, torch.Tensor]]] = field(default_factory=dict)
    pending_paths: list[str] = field(default_factory=list)  # shared files sent but maybe not yet mapped
    job: tuple[int, int] | None = None  # (task index, attempt) it is training
    started: float = 0.0


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
        self.messages: list[str] = []  # worker deaths and restarts since the last take_events()
        self.restarts = 0  # since the last take_events()
        self.restarts_total = 0
        self._seq = 0
        self._slot_ids = 0
        self._closed = False
        self._workers: list[_Worker] = []
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
        proc = self._mp.Process(target=_worker_main, name=f"hetfl-worker-{index}", daemon=True,
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
        for path in w.pending_paths:
            _unlink(path)
        w.pending_paths.clear()
        w.slots.clear()

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
                w.conn.send_bytes(_dumps(("stop",)))
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

    # -------------------------------------------------------------- running a round
    def _send(self, w: _Worker, index: int, attempt: int, task: ClientTask) -> None:
        layout = layout_of(task.weights)
        slot = w.slots.get(layout)
        slot_new = None
        if slot is None:
            path, views = create_shared(layout)
            self._slot_ids += 1
            slot = (self._slot_ids, views)
            w.slots[layout] = slot
            w.pending_paths.append(path)
            slot_new = (path, layout)
        slot_id, views = slot
        for k, v in task.weights.items():
            views[k].copy_(v)
        self._seq += 1
        meta = (task.client_id, task.model, task.train, task.seed, task.extra)
        w.job = (index, attempt)
        w.started = time.monotonic()
        # a broken pipe means the worker is gone: its sentinel says so in the next wait
        with contextlib.suppress(OSError, ValueError):
            w.conn.send_bytes(_dumps(("task", self._seq, slot_id, slot_new, meta)))

    def _receive(self, w: _Worker, tasks: Sequence[ClientTask]) -> tuple[int, _Outcome]:
        msg = pickle.loads(w.conn.recv_bytes())
        for path in w.pending_paths:  # the worker has mapped (and unlinked) them before replying
            _unlink(path)
        w.pending_paths.clear()
        index, _ = w.job  # type: ignore[misc]
        w.job = None
        kind = msg[0]
        if kind == "done":
            _, _, _, (cid, n, metrics, extra), sent = msg
            if sent is None:
                _, views = w.slots[layout_of(tasks[index].weights)]
                sent = {k: v.clone() for k, v in views.items()}
            return index, _Outcome(ClientResult(cid, n, sent, metrics, extra))
        _, _, _, payload, tb = msg
        if isinstance(payload, bytes):
            exc = pickle.loads(payload)
        else:
            exc = RuntimeError(f"{payload[0]}: {payload[1]}")
        exc.__cause__ = RemoteTraceback(tb)
        return index, _Outcome(error=exc)

    def run(self, tasks: Sequence[ClientTask]) -> Iterator[tuple[ClientTask, Callable[[ClientTask], ClientResult]]]:
        """Train ``tasks`` on the workers; yield ``(task, outcome)`` in task order, where ``outcome(task)``
        returns the client's result or raises its exception (the engine passes it to ``RoundBook.run``)."""
        if self._closed:
            raise HetflError("the worker pool is closed")
        todo: deque[tuple[int, int]] = deque((i, 0) for i in range(len(tasks)))  # (task index, attempt)
        done: dict[int, _Outcome] = {}
        lookahead = 4 * len(self._workers)  # results buffered ahead of the one the aggregation waits for
        try:
            for nxt in range(len(tasks)):
                while nxt not in done:
                    self._step(tasks, todo, done, nxt + lookahead)
                outcome = done.pop(nxt)
                yield tasks[nxt], _replay(outcome)
        finally:
            self._drain(tasks, done)

    def _step(self, tasks: Sequence[ClientTask], todo: deque[tuple[int, int]], done: dict[int, _Outcome],
              limit: int) -> None:
        for w in self._workers:  # hand out work in task order to idle workers
            if w.job is None and todo and todo[0][0] < limit:
                index, attempt = todo.popleft()
                self._send(w, index, attempt, tasks[index])
        busy = [w for w in self._workers if w.job is not None]
        if not busy:
            raise HetflError("internal error: no worker is busy but results are missing")  # pragma: no cover
        timeout = 1.0
        if self.timeout_s > 0:
            now = time.monotonic()
            timeout = max(0.0, min(timeout, min(w.started + self.timeout_s - now for w in busy)))
        waitables = [w.conn for w in busy] + [w.proc.sentinel for w in busy]
        ready = set(connection.wait(waitables, timeout=timeout))
        for w in busy:
            if w.conn in ready:
                try:
                    index, outcome = self._receive(w, tasks)
                    done[index] = outcome
                    continue
                except (EOFError, OSError):
                    pass  # died while replying: handled as a death below
            if w.conn in ready or w.proc.sentinel in ready:
                w.proc.join(0.5)
                self._lost(w, tasks, todo, done, f"died ({self._exit_text(w)})")
            elif self.timeout_s > 0 and time.monotonic() - w.started > self.timeout_s:
                self._lost(w, tasks, todo, done, f"took longer than worker_timeout_s={self.timeout_s:g}")

    def _lost(self, w: _Worker, tasks: Sequence[ClientTask], todo: deque[tuple[int, int]],
              done: dict[int, _Outcome], why: str) -> None:
        index, attempt = w.job  # type: ignore[misc]
        cid = tasks[index].client_id
        if attempt == 0:
            todo.appendleft((index, 1))
            self._replace(w, f"{why} while training client {cid}; client {cid} is retried once")
        else:
            done[index] = _Outcome(error=WorkerDiedError(
                f"the worker training client {cid} {why}, twice; the client is dropped"))
            self._replace(w, f"{why} while training client {cid} (retry)")

    def _drain(self, tasks: Sequence[ClientTask], done: dict[int, _Outcome]) -> None:
        """Collect (and discard) the replies of tasks still running, so the next round starts clean."""
        todo: deque[tuple[int, int]] = deque()
        while any(w.job is not None for w in self._workers):
            self._step(tasks, todo, done, 0)
        done.clear()


def _replay(outcome: _Outcome) -> Callable[[ClientTask], ClientResult]:
    def outcome_of(task: ClientTask) -> ClientResult:
        if outcome.error is not None:
            raise outcome.error
        assert outcome.result is not None
        return outcome.result

    return outcome_of


# ------------------------------------------------------------------------------------------ the engine


class _Threads:
    """Run a block with ``n`` torch intra-op threads in this process, then restore the previous count."""

    def __init__(self, n: int) -> None:
        self.n = n
        self.before = 0

    def __enter__(self) -> None:
        self.before = torch.get_num_threads()
        if self.before != self.n:
            torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        if torch.get_num_threads() != self.before:
            torch.set_num_threads(self.before)


class ParallelSimulator(Simulator):
    """The simulator with its clients trained by a :class:`WorkerPool`; rounds are otherwise identical.

    While a round runs, this process keeps one intra-op thread (it only sends tasks and aggregates
    while the workers train; spinning OpenMP threads would take their cores); evaluation between
    rounds gets its threads back.  ``train_time_s`` in the round's report is wall time (clients overlap).
    """

    def __init__(self, algorithm: Algorithm, federation: Any, ctx: Context, device: Any = "cpu", *,
                 workers: int = 2, threads_per_worker: int = 1, timeout_s: float = 0.0,
                 start_method: str | None = None, note: str = "") -> None:
        super().__init__(algorithm, federation, ctx, device)
        if self.device.type != "cpu":
            raise ConfigError(f"worker processes train on the CPU; with device {str(self.device)!r} "
                              f"use workers=1")
        self.pool = WorkerPool(algorithm, federation, ctx, workers, threads_per_worker=threads_per_worker,
                               timeout_s=timeout_s, start_method=start_method)
        self.workers = workers
        self._note = note or f"{workers} worker processes x {threads_per_worker} thread(s)"

    def dispatch(self, tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Callable[[ClientTask],
                                                                                      ClientResult]]]:
        return self.pool.run(tasks)

    def run_round(self, state: Any, rnd: int) -> Any:
        t0 = time.perf_counter()
        with _Threads(1):
            state, report = super().run_round(state, rnd)
        report.train_time_s = time.perf_counter() - t0  # wall time: clients overlap
        restarts, messages = self.pool.take_events()
        if self._note:
            report.messages.insert(0, f"clients train in {self._note}")
            self._note = ""
        if restarts:
            report.messages.extend(messages)
            report.faults = {**(report.faults or {}), "worker_restarts": restarts}
        return state, report

    def close(self) -> None:
        self.pool.close()
