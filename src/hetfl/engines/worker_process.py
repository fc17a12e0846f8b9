"""The worker side of the client-parallel pool (:mod:`hetfl.engines.pool`): one process's loop.

A worker maps the shared buffers it is told about (:mod:`hetfl.engines.shm`), trains each client it is
sent with the one :class:`~hetfl.client.ClientRunner` (or a chunk of same-shape clients batched,
:mod:`hetfl.engines.batched`), writes the result into the buffer's *out* half and replies with the small
rest (client id, sample count, metrics, ``extra``; an exception with its traceback if the client raised).
A *block* (``"block"``: consecutive tasks that share the weights in the slot, :mod:`hetfl.aggregation.blocks`)
is run by :func:`hetfl.rounds.presum`: every client trained, its result validated (the round's ``[faults]``,
sent with the block) and the valid ones summed in float64 into the slot's out buffer; the reply carries each
client's entry (id, samples, metrics, ``extra``, the rejection reason or its exception) and the sum's
weight and count, no weights.
Messages are pickled tuples: ``("task" | "chunk" | "block", seq, slot id, new slot or None, meta)`` in,
``("done", seq, seconds, info, weights or None)`` / ``("block", seq, seconds, entries, sum summary)`` /
``("error", seq, seconds, exception, traceback)`` out, ``("ready", pid)`` once at start, ``("stop",)`` to end.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import queue
import signal
import threading
import time
import traceback
from typing import Any

import torch

from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context
from hetfl.client import ClientRunner
from hetfl.engines.batched import train_tasks
from hetfl.engines.shm import Views, client_views, layout_of, map_views, unlink
from hetfl.errors import HetflError
from hetfl.model_cache import ModelCache
from hetfl.rounds import presum
from hetfl.train import SGD


def dumps(obj: Any) -> bytes:
    return pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


def _exception_payload(exc: BaseException) -> tuple[Any, str]:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    try:
        blob = dumps(exc)
        pickle.loads(blob)
        return blob, tb
    except Exception:
        return (type(exc).__name__, str(exc)), tb


def warm_up(models: ModelCache | None, algorithm: Algorithm, federation: Any, ctx: Context) -> None:
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


def worker_main(conn: Any, algorithm: Algorithm, federation: Any, ctx: Context, threads: int) -> None:
    """The loop of one worker process: map buffers, train the clients it is sent, reply."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us cleanly
    torch.set_num_threads(threads)
    parent = os.getppid()
    models = ModelCache(ctx, torch.device("cpu"))
    run_client = ClientRunner(algorithm, federation, ctx, "cpu", models)
    with contextlib.suppress(Exception):  # an error here is met again, and reported, by the first client
        warm_up(models, algorithm, federation, ctx)
    slots: dict[int, tuple[Views, Views]] = {}
    conn.send_bytes(dumps(("ready", os.getpid())))
    inbox = _Inbox(conn)
    while True:
        msg = inbox.get(parent)
        if msg is None or msg[0] == "stop":
            return
        kind, seq, slot_id, slot_new, meta = msg
        if slot_new is not None:
            path, layout, out_layout = slot_new
            if not os.path.exists(path):  # torch.from_file would create an empty one
                raise HetflError(f"internal error: shared buffer {path} vanished before the worker mapped it")
            slots[slot_id] = map_views(path, layout, out_layout)
            unlink(path)  # both sides hold the mapping now: no name is left in /dev/shm
        weights, out = slots[slot_id]
        t0 = time.perf_counter()
        try:
            if kind == "block":  # consecutive clients, their valid results summed here: one reply, no weights
                entries, summary = _run_block(meta, weights, out, run_client, algorithm)
                reply: tuple = ("block", seq, time.perf_counter() - t0, entries, summary)
            else:
                info, sent = _run_unit(kind, meta, weights, out, run_client, models, federation)
                reply = ("done", seq, time.perf_counter() - t0, info, sent)
        except Exception as exc:  # the client failed, the worker lives on
            reply = ("error", seq, time.perf_counter() - t0, *_exception_payload(exc))
        conn.send_bytes(dumps(reply))


class _Inbox:
    """The worker's incoming messages, read by a thread of their own.

    The parent queues a worker's next tasks while it trains, and a message and a reply can both be larger
    than the pipe's buffer (FedDyn's per-client state travels in ``extra`` both ways).  If the worker only
    read between replies, a parent blocked sending the next task and a worker blocked sending its reply would
    wait on each other for ever; a reader that always drains the pipe makes that impossible."""

    def __init__(self, conn: Any) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        threading.Thread(target=self._read, args=(conn,), daemon=True, name="hetfl-inbox").start()

    def _read(self, conn: Any) -> None:
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                self._queue.put(None)
                return
            self._queue.put(msg)
            if msg[0] == "stop":
                return

    def get(self, parent: int) -> Any:
        """The next message; None once the pipe closed or the parent is gone without stopping us."""
        while True:
            try:
                return self._queue.get(timeout=1.0)
            except queue.Empty:
                if os.getppid() != parent:
                    return None


def _run_unit(kind: str, meta: Any, weights: Views, out: Views, run_client: ClientRunner, models: ModelCache,
              federation: Any) -> tuple[Any, Any]:
    """One task (or a chunk of them, trained batched): the reply's info, and the weights when they do not
    fit the slot's out buffer (else None: they are in it)."""
    if kind == "chunk":  # same-shape clients trained as one batched model (hetfl.engines.batched)
        return _train_chunk(meta, weights, out, models, federation), None
    client_id, ref, train, cseed, extra = meta
    res = run_client(ClientTask(client_id, ref, weights, train, cseed, extra))
    sent = None
    if layout_of(res.weights) == layout_of(out):
        for k, v in res.weights.items():
            out[k].copy_(v)
    else:
        sent = res.weights
    return (res.client_id, res.num_samples, res.metrics, res.extra), sent


def _train_chunk(metas: list[tuple], weights: Views, out: Views, models: ModelCache, federation: Any) -> list[tuple]:
    """Train a chunk of clients batched, their results straight into the chunk's result buffer."""

    layout = layout_of(weights)
    tasks = [ClientTask(cid, ref, weights, train, cseed, extra) for cid, ref, train, cseed, extra in metas]
    into = [client_views(out, layout, c) for c in range(len(tasks))]
    results = train_tasks(models.get(tasks[0].model), tasks, federation, into)
    return [(r.client_id, r.num_samples, r.metrics, r.extra) for r in results]



def _run_block(meta: tuple, weights: Views, out: Views, run_client: ClientRunner, algorithm: Algorithm
               ) -> tuple[list[tuple], tuple]:
    """Run a block of clients (:func:`hetfl.rounds.presum`), their sum into the slot's out buffer; each
    client's entry as a picklable tuple, and the sum's summary (its values stay in shared memory)."""
    metas, faults = meta
    tasks = [ClientTask(cid, ref, weights, train, cseed, extra) for cid, ref, train, cseed, extra in metas]
    entries, total = presum(tasks, lambda task: run_client, algorithm.weight_of, faults, into=out["sum"])
    info = []
    for task, e in zip(tasks, entries):
        if e.error is not None:
            info.append(("error", *_exception_payload(e.error)))
        elif isinstance(e.result, ClientResult):
            r = e.result
            info.append(("ok", r.client_id, r.num_samples, r.metrics, r.extra, e.reason))
        else:  # not a ClientResult: rejected (e.reason says why); the round needs only the reason
            info.append(("ok", task.client_id, 0, {}, {}, e.reason))
    return info, total.summary()
