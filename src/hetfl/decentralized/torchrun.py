"""Decentralized rounds across OS processes: ``torch.distributed`` with the gloo backend.

Node ``i`` lives in process (rank) ``i mod W``; models travel between processes point-to-point, never
through a server.  Rank 0 is the process running :func:`hetfl.runner.run`: besides its own nodes it
tells the others which round to run and, after each round, collects a copy of every node's model and
statistics (the monitor's copy, for metrics.jsonl, evaluation and checkpoints; not counted as protocol
traffic).  Two ways to start it:

* ``hetfl run CONFIG --engine torchrun``: hetfl starts ``W - 1`` worker processes itself
  (``graph.processes``, 0 = one per node) on 127.0.0.1 and a free port;
* ``torchrun --nproc-per-node W -m hetfl run CONFIG --engine torchrun`` (or several machines with
  ``--nnodes``/``--rdzv-endpoint``): every rank runs the same command; ranks above 0 serve their nodes
  and write nothing, rank 0 sends them the resolved config and writes the run directory.

Protocol safety: the only process group is the default one, created once; every host walks the same
globally ordered list of messages of a phase and sends or receives the ones it is part of (blocking
gloo ``send``/``recv``): the earliest unfinished message always has both ends waiting on it, so the
exchange cannot deadlock.  Every wait is bounded by ``graph.timeout_s``; spawned workers are reaped
(killed after a grace period) when the engine closes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch

from hetfl.algorithms.base import Context, ServerState, Weights
from hetfl.config import RunConfig, parse_toml
from hetfl.decentralized.engine import GraphReport, LonelyLog, models_of, require_graph, state_of
from hetfl.decentralized.host import NodeHost, Template, round_report
from hetfl.errors import ConfigError, HetflError
from hetfl.models import ModelRef
from hetfl.resolve import config_from_dict

ENV_TIMEOUT = "HETFL_DIST_TIMEOUT"
GRACE_S = 10.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launched_rank() -> tuple[int, int] | None:
    """(rank, world size) when started by torchrun (or an equivalent launcher), else None."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def owned(n: int, rank: int, world: int) -> list[int]:
    return [i for i in range(n) if i % world == rank]


# --------------------------------------------------------------------------------------------------
# transport
# --------------------------------------------------------------------------------------------------



def pack(weights: Weights, template: Template) -> list[torch.Tensor]:
    """One flat CPU buffer per dtype (in the template's key order)."""
    groups: dict[torch.dtype, list[torch.Tensor]] = {}
    for key, _, dtype in template:
        groups.setdefault(dtype, []).append(weights[key].detach().reshape(-1).to("cpu", dtype))
    return [torch.cat(parts) for parts in groups.values()]


def buffers_for(template: Template) -> list[torch.Tensor]:
    sizes: dict[torch.dtype, int] = {}
    for _, shape, dtype in template:
        sizes[dtype] = sizes.get(dtype, 0) + int(torch.Size(shape).numel())
    return [torch.empty(n, dtype=dtype) for dtype, n in sizes.items()]


def unpack(buffers: list[torch.Tensor], template: Template, device: torch.device) -> Weights:
    by_dtype = dict(zip(dict.fromkeys(d for _, _, d in template), buffers))
    offsets = dict.fromkeys(by_dtype, 0)
    out = {}
    for key, shape, dtype in template:
        n = int(torch.Size(shape).numel())
        off = offsets[dtype]
        out[key] = by_dtype[dtype][off:off + n].view(shape).to(device)
        offsets[dtype] = off + n
    return out


class DistTransport:
    """Point-to-point exchange over the default gloo process group (see the module doc for the ordering)."""

    def __init__(self, rank: int, world: int, template_of: Callable[[ModelRef], Template],
                 device: torch.device) -> None:
        self.rank = rank
        self.world = world
        self.template_of = template_of
        self.device = device

    def exchange(self, phase: str, messages: Sequence[tuple[int, int]], payload: Callable[[int, int], Weights],
                 template: Callable[[int, int], ModelRef | Template]) -> dict[tuple[int, int], Weights]:
        import torch.distributed as dist

        def layout(s: int, d: int) -> Template:
            t = template(s, d)
            return t if isinstance(t, list) else self.template_of(t)

        out: dict[tuple[int, int], Weights] = {}
        for s, d in messages:
            rs, rd = s % self.world, d % self.world
            if rs == self.rank and rd == self.rank:
                out[(s, d)] = payload(s, d)
            elif rs == self.rank:
                for buf in pack(payload(s, d), layout(s, d)):
                    dist.send(buf, dst=rd)
            elif rd == self.rank:
                tmpl = layout(s, d)
                bufs = buffers_for(tmpl)
                for buf in bufs:
                    dist.recv(buf, src=rs)
                out[(s, d)] = unpack(bufs, tmpl, self.device)
        return out


def _host(algorithm: Any, federation: Any, ctx: Context, device: torch.device, graph: Any, rank: int,
          world: int) -> NodeHost:
    holder: dict[str, NodeHost] = {}
    templates: dict[ModelRef, Template] = {}

    def template_of(ref: ModelRef) -> Template:
        if ref not in templates:
            state = holder["host"].models.get(ref).state_dict()
            templates[ref] = [(k, tuple(v.shape), v.dtype) for k, v in state.items()]
        return templates[ref]

    transport = DistTransport(rank, world, template_of, device)
    host = NodeHost(algorithm, federation, ctx, device, graph, owned(ctx.num_clients, rank, world), transport)
    holder["host"] = host
    return host


def _bcast(obj: Any = None) -> Any:
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


# --------------------------------------------------------------------------------------------------
# rank 0: the engine the runner drives
# --------------------------------------------------------------------------------------------------


class TorchrunEngine:
    """The runner's engine on rank 0; see the module doc."""

    name = "torchrun"

    def __init__(self, algorithm: Any, federation: Any, ctx: Context, device: torch.device | str,
                 cfg: RunConfig) -> None:
        import torch.distributed as dist

        self.algorithm = require_graph(algorithm, "torchrun")
        self.procs: list[subprocess.Popen] = []
        self.broken = False
        self.closed = False
        n = ctx.num_clients
        timeout = timedelta(seconds=cfg.graph.timeout_s)
        if dist.is_initialized():
            raise HetflError("engine 'torchrun': a torch.distributed process group already exists in this process")
        launched = launched_rank()
        if launched is not None and launched[0] != 0:
            raise HetflError(f"engine 'torchrun': rank {launched[0]} reached the runner; ranks above 0 serve nodes "
                             f"(hetfl.decentralized.torchrun.serve)")
        world, port = (launched[1] if launched is not None else cfg.graph.processes or n), 0
        try:
            if launched is not None:
                dist.init_process_group("gloo", init_method="env://", rank=0, world_size=world, timeout=timeout)
            else:
                port = free_port()
                env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world),
                       ENV_TIMEOUT: str(cfg.graph.timeout_s), "HETFL_SPAWNED": "1"}
                for r in range(1, world):
                    self.procs.append(subprocess.Popen(
                        [sys.executable, "-m", "hetfl.torchrun_worker"],
                        env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.DEVNULL))
                dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=world,
                                        timeout=timeout)
        except Exception as exc:
            self.broken = True
            self.close()
            where = os.environ.get("MASTER_ADDR", "127.0.0.1") + ":" + os.environ.get("MASTER_PORT", "?") \
                if launched is not None else f"127.0.0.1:{port}"
            raise HetflError(f"engine 'torchrun': the {world} processes did not all join at {where} within "
                             f"graph.timeout_s={cfg.graph.timeout_s:g} s ({type(exc).__name__}: {exc})") from exc
        except BaseException:
            self.broken = True
            self.close()
            raise
        self.world = world
        problem = None if world <= n else (f"engine 'torchrun': {world} processes for {n} nodes; use at most one "
                                           f"process per node (graph.processes or torchrun --nproc-per-node)")
        _bcast({"config": cfg.to_toml(), "error": problem})
        if problem:
            self.broken = True  # the workers stop on their own after this message
            self.close()
            raise ConfigError(problem)
        self.host = _host(self.algorithm, federation, ctx, torch.device(device), cfg.graph, 0, world)
        self.n = n
        self.loaded: int | None = None  # the round whose models the workers hold
        self.local: dict[int, Weights] = {}
        self.lonely = LonelyLog()

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, GraphReport]:
        import torch.distributed as dist

        lay = self.host.layout
        try:
            models = models_of(state, self.n)
            if self.loaded != state.round:  # first round, or a resumed run: hand every worker its nodes
                _bcast({"op": "load"})
                parts = [{i: models[i] for i in owned(self.n, r, self.world)} for r in range(self.world)]
                box: list[Any] = [None]
                dist.scatter_object_list(box, parts, src=0)
                self.local = box[0]
            _bcast({"op": "round", "round": rnd})
            t0 = time.perf_counter()
            new_local, stats_local, plan = self.host.round(rnd, self.local)
            gathered: list[Any] = [None] * self.world
            dist.gather_object((new_local, stats_local), gathered, dst=0)
            elapsed = time.perf_counter() - t0
        except RuntimeError as exc:  # gloo: a peer died ("Connection closed by peer") or a wait timed out
            self.broken = True
            raise HetflError(f"engine 'torchrun': round {rnd} failed: a node process died or did not answer within "
                             f"graph.timeout_s ({type(exc).__name__}: {exc})") from exc
        except BaseException:
            self.broken = True
            raise
        new: dict[int, Weights] = {}
        stats = {}
        for part_models, part_stats in gathered:
            new.update(part_models)
            stats.update(part_stats)
        self.local, self.loaded = new_local, rnd
        metrics = round_report(lay, plan, stats, new, elapsed)
        metrics["processes"] = self.world
        return state_of(rnd, new), GraphReport(metrics, self.lonely(plan))

    def close(self) -> None:
        import torch.distributed as dist

        if self.closed:
            return
        self.closed = True
        if dist.is_initialized():
            if not self.broken:
                try:
                    _bcast({"op": "stop"})
                except Exception:  # noqa: BLE001 - a dead worker: reaped below
                    self.broken = True
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        deadline = time.monotonic() + (1.0 if self.broken else GRACE_S)
        for p in self.procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


# --------------------------------------------------------------------------------------------------
# ranks above 0
# --------------------------------------------------------------------------------------------------


def serve(cfg: Any, prepare: Callable[[Any], Any]) -> dict[str, Any]:
    """Serve this rank's nodes until rank 0 says stop; returns a small summary (rank 0 writes every file).
    ``prepare``: :func:`hetfl.runner.prepare`, passed in by the layer above (the runner, or the worker
    entry point :mod:`hetfl.torchrun_worker`) so that this engine does not import the runner."""
    import torch.distributed as dist


    launched = launched_rank()
    if launched is None:
        raise HetflError("hetfl.decentralized.torchrun.serve needs RANK and WORLD_SIZE (set by torchrun)")
    rank, world = launched
    t_start = time.perf_counter()
    seconds = float(os.environ.get(ENV_TIMEOUT) or (cfg.graph.timeout_s if cfg is not None else 600.0))
    if os.environ.get("HETFL_SPAWNED"):
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world,
                            timeout=timedelta(seconds=seconds))
    rounds = 0
    try:
        hello = _bcast()
        if hello.get("error"):
            return {"status": "worker", "run_dir": f"(torchrun rank {rank}: {hello['error']})", "rounds_completed": 0,
                    "test_accuracy": None, "wall_time_s": time.perf_counter() - t_start}
        cfg = config_from_dict(parse_toml(hello["config"], "<config from rank 0>"))
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cfg.device.startswith("cuda") and torch.cuda.is_available():
            cfg = cfg.replace(device=f"cuda:{local_rank % torch.cuda.device_count()}")
        exp = prepare(cfg)
        host = _host(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg.graph, rank, world)
        local: dict[int, Weights] = {}
        while True:
            cmd = _bcast()
            if cmd["op"] == "load":
                box: list[Any] = [None]
                dist.scatter_object_list(box, None, src=0)
                local = box[0]
            elif cmd["op"] == "round":
                local, stats, _ = host.round(int(cmd["round"]), local)
                dist.gather_object((local, stats), None, dst=0)
                rounds += 1
            else:
                break
    finally:
        dist.destroy_process_group()
    return {"status": "worker", "run_dir": f"(torchrun rank {rank}: rank 0 writes the run directory)",
            "rounds_completed": rounds, "test_accuracy": None, "wall_time_s": time.perf_counter() - t_start}


def serve_if_worker(cfg: Any, prepare: Callable[[Any], Any]) -> dict[str, Any] | None:
    """In a torchrun rank above 0 running the torchrun engine: serve and return its summary; else None."""
    launched = launched_rank()
    if launched is None or launched[0] == 0 or (cfg is not None and cfg.engine.name != "torchrun"):
        return None
    return serve(cfg, prepare)
