"""Client-parallel worker processes for the simulator: the clients of a round train side by side.

:class:`ParallelSimulator` is the simulator with a :class:`~hetfl.engines.pool.WorkerPool` as its
transport (the pool, its shared-memory buffers and its worker loop: :mod:`hetfl.engines.pool`,
:mod:`hetfl.engines.shm`, :mod:`hetfl.engines.worker_process`); :func:`resolve_workers` is the rule that
turns ``engine.workers`` (``"auto"`` or a number) into a number of processes.

Order and equality.  The round hands results to the aggregation in the order of the tasks, whichever
worker finishes first, so the aggregation sees exactly the sequence of the in-process loop; since every
client update seeds itself (:func:`hetfl.train.local_sgd`), a run with workers equals the in-process run
bit for bit when both train with the same number of threads per client.  For a plain weighted mean
(:attr:`~hetfl.algorithms.base.Algorithm.block_sums`: FedAvg) a worker takes a whole block of consecutive
tasks, validates and sums their results itself and sends one message per block
(:mod:`hetfl.aggregation.blocks`); the in-process engine sums the same blocks the same way.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from hetfl.accounting import model_cost
from hetfl.algorithms.base import Algorithm, ClientTask, Context
from hetfl.engines.pool import WorkerPool
from hetfl.engines.session import PoolSession, open_session
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError

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
    """The simulator with its clients trained by a :class:`~hetfl.engines.pool.WorkerPool`; rounds are
    otherwise identical.

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

    @contextlib.contextmanager
    def open(self) -> Iterator[PoolSession]:
        """A streaming session on the worker pool (:class:`~hetfl.engines.session.PoolSession`), with the
        batcher's planned chunks; this process keeps one thread while it is open (it aggregates between
        results, beside the workers), and its wall time is the round's ``train_time_s``."""
        t0 = time.perf_counter()
        try:
            with _Threads(1), open_session(self.pool, self._chunks()) as session:
                yield session
        finally:
            self._stream_s += time.perf_counter() - t0

    def open_blocks(self) -> contextlib.AbstractContextManager[PoolSession] | None:
        """A session for blocks of pre-summed results (:func:`hetfl.rounds.carry_blocks`): the workers train,
        validate and sum each block, one message per block.  None while the batcher plans chunks (the round
        then gets results one by one and sums the blocks here, to the same numbers)."""
        return self.open() if self.batcher is None else None

    def _chunks(self) -> list[list[ClientTask]]:
        """The batcher's chunks of this round (planned by ``plan``); a worker trains each chunk as one
        batched model, exactly as this process would."""
        if self.batcher is None:
            return []
        return [chunk for chunk in self.batcher.chunks
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


__all__ = ["AUTO_MIN_ROUND_S", "ParallelSimulator", "available_cores", "estimate_round_s", "resolve_workers"]
