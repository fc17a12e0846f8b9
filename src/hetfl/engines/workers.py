"""Client-parallel worker processes for the simulator: the clients of a round train side by side.

A :class:`WorkerPool` starts ``workers`` processes once per run.  Each one sets
``torch.set_num_threads(threads_per_worker)``, builds its own :class:`~hetfl.engines.simulator.ModelCache`
and holds the federation's in-memory dataset once.  Per client, only small control messages (the
task's client id, ModelRef, TrainConfig, seed and ``extra``; the result's metrics and ``extra``) go
through a pipe, pickled.  Weights go through **shared memory**: per worker, per lane (a worker has
:data:`DEPTH` lanes: the next task waits in its pipe while it trains the current one) and per weight
layout (the keys, shapes and dtypes of a task's weights, i.e. one per submodel shape) the parent maps
one pair of buffers the first time it is needed and reuses it every round: the parent copies the
task's weights into the *in* buffer (unless the very same unchanged tensors are already there), the
worker loads them, trains, and copies its result into the *out* buffer, and the parent copies them
out.  The buffers are files in ``/dev/shm`` that are unlinked as soon as both processes have mapped
them, so nothing is left behind even if the run is killed.  The main process warms up (builds the
models, takes one SGD step on a throwaway copy) before forking, so workers inherit lazy imports and
do not pay them inside the first round.

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
import select
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

from hetfl import packed
from hetfl.accounting import model_cost
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context
from hetfl.engines.batched import train_tasks
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError, HetflError
from hetfl.model_cache import ModelCache
from hetfl.train import SGD

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
_FLOPS_PER_S = 3e10  # one core with vectorised kernels (the FedAvg CNN trains at ~2.5e10 per core here)


def estimate_round_s(algorithm: Algorithm, ctx: Context) -> float:
    """Seconds one round of client training takes on one core, estimated from the model's FLOPs."""

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
        # the FLOPs estimate only decides; it is no time to show (off by 20x on a busy CPU: 48 s shown, 2.5 s measured)
        return 1, "auto: a round's client work (estimated from the model's FLOPs) is too little to pay for processes"
    return n, f"auto: a round's client work (estimated from the model's FLOPs) pays for processes on " \
              f"{available_cores()} cores"


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


Views = dict[str, torch.Tensor]


def _views(buf: torch.Tensor, base: int, layout: Layout) -> Views:
    offs, _ = _offsets(layout)
    views = {}
    for (key, shape, dtype), off in zip(layout, offs):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        views[key] = buf[base + off:base + off + nbytes].view(dtype).view(shape)
    return views


def group_layout(layout: Layout, k: int) -> Layout:
    """The result buffer of a chunk of ``k`` clients: ``k`` copies of ``layout``, client after client, so
    that each client's weights are packed (one span, :mod:`hetfl.packed`)."""
    return tuple((f"{c}/{key}", shape, dtype) for c in range(k) for key, shape, dtype in layout)


def client_views(out: Views, layout: Layout, c: int) -> Views:
    """Client ``c``'s weights in the result buffer of a chunk (:func:`group_layout`)."""
    return {key: out[f"{c}/{key}"] for key, _, _ in layout}


def map_views(path: str, layout: Layout, out_layout: Layout | None = None) -> tuple[Views, Views]:
    """Map the shared file at ``path``: views of the task's weights (in, ``layout``) and of the
    result's (out, ``out_layout``; by default the same layout)."""
    out_layout = layout if out_layout is None else out_layout
    total_in, total_out = _offsets(layout)[1], _offsets(out_layout)[1]
    buf = torch.from_file(path, shared=True, size=total_in + total_out, dtype=torch.uint8)
    return _views(buf, 0, layout), _views(buf, total_in, out_layout)


def create_shared(layout: Layout, out_layout: Layout | None = None) -> tuple[str, Views, Views]:
    """A new shared file for ``layout`` in and ``out_layout`` out (a name to hand to the worker), mapped."""
    out_layout = layout if out_layout is None else out_layout
    fd, path = tempfile.mkstemp(prefix="hetfl-w-", dir=_shm_dir())
    try:
        os.ftruncate(fd, _offsets(layout)[1] + _offsets(out_layout)[1])
    finally:
        os.close(fd)
    return (path, *map_views(path, layout, out_layout))


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


def _warm_up(models: ModelCache | None, algorithm: Algorithm, federation: Any, ctx: Context) -> None:
    """Build the run's models and take one SGD step at the training batch size on a throwaway copy, so
    that one-time set-up (lazy imports of the optimizer's first step, kernel selection) is not paid
    inside the first round.  Run in the main process before forking, every worker inherits it."""
    x = federation.train.x[:ctx.train.batch_size]
    for ref in algorithm.model_refs(ctx):
        if models is not None:
            models.get(ref)
        with torch.random.fork_rng(devices=[]):
            scratch = ref.build(ctx.info).to(x.device)
            scratch.train()
            opt = SGD(list(scratch.parameters()), lr=0.0)
            scratch(x).float().sum().backward()
            opt.step()


def _worker_main(conn: Any, algorithm: Algorithm, federation: Any, ctx: Context, threads: int) -> None:
    """The loop of one worker process: map buffers, train the clients it is sent, reply."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us cleanly
    torch.set_num_threads(threads)
    parent = os.getppid()
    device = torch.device("cpu")
    models = ModelCache(ctx, device)
    with contextlib.suppress(Exception):  # an error here is met again, and reported, by the first client
        _warm_up(models, algorithm, federation, ctx)
    slots: dict[int, tuple[Views, Views]] = {}
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
        kind, seq, slot_id, slot_new, meta = msg
        if slot_new is not None:
            path, layout, out_layout = slot_new
            if not os.path.exists(path):  # torch.from_file would create an empty one
                raise HetflError(f"internal error: shared buffer {path} vanished before the worker mapped it")
            slots[slot_id] = map_views(path, layout, out_layout)
            _unlink(path)  # both sides hold the mapping now: no name is left in /dev/shm
        weights, out = slots[slot_id]
        t0 = time.perf_counter()
        try:
            sent = None  # the weights, when they do not fit the slot's out buffer
            if kind == "chunk":  # same-shape clients trained as one batched model (hetfl.engines.batched)
                info: Any = _train_chunk(meta, weights, out, models, federation)
            else:
                client_id, ref, train, cseed, extra = meta
                task = ClientTask(client_id, ref, weights, train, cseed, extra)
                model = models.loaded(ref, weights)
                data = federation.client_train(client_id)
                res = algorithm.local_update(task, model, data, device)
                if layout_of(res.weights) == layout_of(out):
                    for k, v in res.weights.items():
                        out[k].copy_(v)
                else:
                    sent = res.weights
                info = (res.client_id, res.num_samples, res.metrics, res.extra)
            reply = ("done", seq, time.perf_counter() - t0, info, sent)
        except Exception as exc:  # the client failed, the worker lives on
            reply = ("error", seq, time.perf_counter() - t0, *_exception_payload(exc))
        conn.send_bytes(_dumps(reply))


def _train_chunk(metas: list[tuple], weights: Views, out: Views, models: ModelCache, federation: Any) -> list[tuple]:
    """Train a chunk of clients batched, their results straight into the chunk's result buffer."""

    layout = layout_of(weights)
    tasks = [ClientTask(cid, ref, weights, train, cseed, extra) for cid, ref, train, cseed, extra in metas]
    into = [client_views(out, layout, c) for c in range(len(tasks))]
    results = train_tasks(models.get(tasks[0].model), tasks, federation, into)
    return [(r.client_id, r.num_samples, r.metrics, r.extra) for r in results]


# ------------------------------------------------------------------------------------------ parent side

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
    index: int  # into the round's units (a unit: one task, or a chunk of tasks trained batched)
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
                _warm_up(None, algorithm, federation, ctx)
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
        self._pollers.clear()  # they may hold this worker's file descriptors
        for path in w.pending_paths:
            _unlink(path)
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
    def _send(self, w: _Worker, job: _Job, unit: Sequence[ClientTask]) -> None:
        task = unit[0]
        layout = layout_of(task.weights)
        k = len(unit)  # > 1: a chunk, its tasks share one weights dict (see ParallelSimulator.execute)
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
            w.conn.send_bytes(_dumps(msg))

    def _receive(self, w: _Worker, units: Sequence[Sequence[int]],
                 tasks: Sequence[ClientTask]) -> list[tuple[int, _Outcome]]:
        """The outcome of ``w``'s oldest job, for each task of its unit: ``[(task index, outcome)]``."""
        msg = pickle.loads(w.conn.recv_bytes())
        job = w.jobs.popleft()
        w.started = time.monotonic()  # the next job (if any) starts now
        if msg[1] != job.seq:  # pragma: no cover - a protocol bug, not a client fault
            raise HetflError(f"worker {w.index} answered task {msg[1]}, expected {job.seq}")
        if job.path is not None:  # mapped (and unlinked) by the worker before it replied
            _unlink(job.path)
            w.pending_paths.remove(job.path)
        members = units[job.index]
        if msg[0] == "done":
            _, _, _, info, sent = msg
            assert job.slot is not None
            if len(members) > 1:  # a chunk: each client's weights are one span of the result buffer
                return [(i, _Outcome(ClientResult(cid, n, job.slot.result(c), metrics, extra)))
                        for c, (i, (cid, n, metrics, extra)) in enumerate(zip(members, info))]
            cid, n, metrics, extra = info
            if sent is None:  # in the slot's out buffer: one copy of the whole buffer (hetfl.packed)
                sent = job.slot.result()
            return [(members[0], _Outcome(ClientResult(cid, n, sent, metrics, extra)))]
        _, _, _, payload, tb = msg
        out = []
        for i in members:  # a chunk's exception is every one of its clients' (as in process)
            exc = pickle.loads(payload) if isinstance(payload, bytes) else RuntimeError(f"{payload[0]}: {payload[1]}")
            exc.__cause__ = RemoteTraceback(tb)
            out.append((i, _Outcome(error=exc)))
        return out

    def run(self, tasks: Sequence[ClientTask], chunks: Sequence[Sequence[int]] = ()
            ) -> Iterator[tuple[ClientTask, Callable[[ClientTask], ClientResult]]]:
        """Train ``tasks`` on the workers; yield ``(task, outcome)`` in task order, where ``outcome(task)``
        returns the client's result or raises its exception (the engine passes it to ``RoundBook.run``).

        ``chunks``: groups of task indices that one worker trains together as one batched model
        (:mod:`hetfl.engines.batched`); the tasks of a chunk must share one weights dict.  Every other
        task is trained on its own.
        """
        if self._closed:
            raise HetflError("the worker pool is closed")
        for w in list(self._workers):  # stopped when an earlier round was interrupted
            if not w.proc.is_alive():
                self._kill(w)
                new = self._start(w.index)
                self._await_ready(new)
                self._workers[w.index] = new
        in_chunk = {i for chunk in chunks for i in chunk}
        units = sorted([tuple(chunk) for chunk in chunks] + [(i,) for i in range(len(tasks)) if i not in in_chunk])
        unit_of = {i: u for u, members in enumerate(units) for i in members}
        todo = [(u, 0) for u in range(len(units))]  # (unit index, attempt), in task order
        done: dict[int, _Outcome] = {}  # by task index
        lookahead = 4 * len(self._workers)  # units sent ahead of the one the aggregation waits for
        try:
            for nxt in range(len(tasks)):
                while nxt not in done:
                    self._step(units, tasks, todo, done, unit_of[nxt] + lookahead)
                yield tasks[nxt], _replay(done.pop(nxt))
        except GeneratorExit:  # the aggregation stopped early: let the running clients finish, quietly
            self._drain(units, tasks, done)
            raise
        except BaseException:  # Ctrl-C or an error here: do not wait for clients that may run for long
            for w in self._workers:
                if w.jobs:
                    self._kill(w)  # restarted by the next run(), if there is one
            raise

    def _dispatch(self, units: Sequence[Sequence[int]], tasks: Sequence[ClientTask], todo: list[tuple[int, int]],
                  limit: int) -> None:
        """Hand out units (below unit index ``limit``) in order: first one to every idle worker, then queue
        more per worker (up to DEPTH) while enough units remain (at the end of a round, an idle worker beats
        a queue)."""
        for depth in range(self.depth):
            for w in self._workers:
                if not todo or todo[0][0] >= limit:
                    return
                if len(w.jobs) > depth or (depth > 0 and len(todo) <= depth * len(self._workers)):
                    continue
                lane = w.free_lane()
                if lane is None:
                    continue
                index, attempt = todo.pop(0)
                self._send(w, _Job(index, attempt, lane), [tasks[i] for i in units[index]])

    def _step(self, units: Sequence[Sequence[int]], tasks: Sequence[ClientTask], todo: list[tuple[int, int]],
              done: dict[int, _Outcome], limit: int) -> None:
        self._dispatch(units, tasks, todo, limit)
        busy = [w for w in self._workers if w.jobs]
        if not busy:
            raise HetflError("internal error: no worker is busy but results are missing")  # pragma: no cover
        timeout = 1.0
        if self.timeout_s > 0:
            now = time.monotonic()
            timeout = max(0.0, min(timeout, min(w.started + self.timeout_s - now for w in busy)))
        ready = self._wait(busy, timeout)
        for w in busy:
            if w.conn in ready:
                try:
                    while w.jobs and self._readable(w):  # every reply that is there
                        done.update(self._receive(w, units, tasks))
                    continue
                except (EOFError, OSError):
                    pass  # died while replying: handled as a death below
            if w.conn in ready or w.proc.sentinel in ready:
                w.proc.join(0.5)
                self._lost(w, units, tasks, todo, done, f"died ({self._exit_text(w)})")
            elif self.timeout_s > 0 and time.monotonic() - w.started > self.timeout_s:
                self._lost(w, units, tasks, todo, done, f"took longer than worker_timeout_s={self.timeout_s:g}")

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

    def _lost(self, w: _Worker, units: Sequence[Sequence[int]], tasks: Sequence[ClientTask],
              todo: list[tuple[int, int]], done: dict[int, _Outcome], why: str) -> None:
        """Worker ``w`` died or stalled: retry its running unit once (or drop its clients), requeue the rest."""
        head, *queued = list(w.jobs)
        cids = [tasks[i].client_id for i in units[head.index]]
        if len(cids) == 1:
            who, retry = f"client {cids[0]}", f"client {cids[0]} is retried once"
        else:
            who, retry = f"clients {', '.join(map(str, cids))} (one batched chunk)", "they are retried once"
        again = [(j.index, j.attempt) for j in queued]
        if head.attempt == 0:
            again.append((head.index, 1))
            self._replace(w, f"{why} while training {who}; {retry}")
        else:
            for i, cid in zip(units[head.index], cids):
                done[i] = _Outcome(error=WorkerDiedError(
                    f"the worker training client {cid} {why}, twice; the client is dropped"))
            self._replace(w, f"{why} while training {who} (retry)")
        todo[:] = sorted(todo + again)

    def _drain(self, units: Sequence[Sequence[int]], tasks: Sequence[ClientTask], done: dict[int, _Outcome]) -> None:
        """Collect (and discard) the replies of tasks still running, so the next round starts clean."""
        todo: list[tuple[int, int]] = []
        while any(w.jobs for w in self._workers):
            self._step(units, tasks, todo, done, 0)
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

    While clients train, this process keeps one intra-op thread (it only hands out tasks and aggregates
    beside the workers; spinning OpenMP threads would take their cores); the server step and evaluation
    get its threads back.  ``train_time_s`` in the round's report is wall time (clients overlap).
    """

    def __init__(self, algorithm: Algorithm, federation: Any, ctx: Context, device: Any = "cpu", *,
                 workers: int = 2, threads_per_worker: int = 1, timeout_s: float = 0.0,
                 start_method: str | None = None, note: str = "", batched: bool | str = False) -> None:
        super().__init__(algorithm, federation, ctx, device, batched=batched)
        if self.device.type != "cpu":
            raise ConfigError(f"worker processes train on the CPU; with device {str(self.device)!r} "
                              f"use workers=1")
        self.pool = WorkerPool(algorithm, federation, ctx, workers, threads_per_worker=threads_per_worker,
                               timeout_s=timeout_s, start_method=start_method)
        self.workers = workers
        self._stream_s = 0.0
        self._note = note or f"{workers} worker processes x {threads_per_worker} thread(s)"

    def execute(self, tasks: list[ClientTask]) -> Iterator[tuple[ClientTask, Callable[[ClientTask],
                                                                                      ClientResult]]]:
        t0 = time.perf_counter()
        try:
            with _Threads(1):  # aggregation runs between yields, beside the workers
                yield from self.pool.run(tasks, self._chunks(tasks))
        finally:
            self._stream_s = time.perf_counter() - t0

    def _chunks(self, tasks: list[ClientTask]) -> list[list[int]]:
        """The batcher's chunks of this round (planned by ``run_round``) as task indices; a worker trains
        each chunk as one batched model, exactly as this process would."""
        if self.batcher is None:
            return []
        where = {id(task): i for i, task in enumerate(tasks)}
        return [[where[id(t)] for t in chunk] for chunk in self.batcher.chunks
                if all(t.weights is chunk[0].weights for t in chunk)]  # one weights buffer per chunk

    def run_round(self, state: Any, rnd: int) -> Any:
        self._stream_s = 0.0
        state, report = super().run_round(state, rnd)
        report.train_time_s = self._stream_s  # wall time of training (and streaming aggregation): clients overlap
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
