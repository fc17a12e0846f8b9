"""Engines carry an algorithm's rounds to clients and back: two protocols, each with the engines that fit it.

* **Server algorithms** (:class:`hetfl.algorithms.base.Algorithm`: sample clients, configure their tasks,
  local update, aggregate, server step) run on :data:`SERVER_ENGINES`: ``simulator`` (clients in this
  process, or side by side in worker processes) and ``flower`` (Flower's simulation engine or a
  deployment).  Each is a transport of the one round (:class:`hetfl.rounds.Round`).
* **Graph algorithms** (:class:`hetfl.decentralized.protocol.GraphAlgorithm`: one model per node,
  exchanges along a graph, no server) run on :data:`GRAPH_ENGINES`: ``simulator`` (every node in this
  process) and ``torchrun`` (one OS process per node, or per group of nodes).

:func:`loop_for` picks the registry (and the evaluator) by the protocol the algorithm implements;
:func:`engine_for` then builds the engine named by ``engine.name`` as ``factory(algorithm, federation, ctx,
device, cfg)`` from the typed :class:`~hetfl.config.RunConfig`.  An engine offers ``run_round(state, rnd)
-> (state, report)`` and ``close()``.  Optional engines (Flower) import their heavy dependency when chosen.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hetfl.algorithms.base import Algorithm, Context
from hetfl.config import RunConfig
from hetfl.data.federation import Federation
from hetfl.decentralized.engine import InProcessEngine, NodeEvaluator
from hetfl.decentralized.protocol import GraphAlgorithm
from hetfl.decentralized.torchrun import TorchrunEngine
from hetfl.engines.simulator import Simulator
from hetfl.engines.workers import ParallelSimulator, resolve_workers
from hetfl.errors import ConfigError, HetflError
from hetfl.evaluation import Evaluator
from hetfl.registry import Registry

SERVER_ENGINES: Registry = Registry("server engine")
GRAPH_ENGINES: Registry = Registry("graph engine")


@SERVER_ENGINES.register("simulator")
def simulator(algorithm: Algorithm, federation: Federation, ctx: Context, device: torch.device,
              cfg: RunConfig) -> Any:
    """Clients of a round run in this process one after another, or side by side in worker processes
    (``engine.workers``; see docs/performance.md)."""
    eng = cfg.engine
    n, why = resolve_workers(eng.workers, eng.threads_per_worker, algorithm, ctx, torch.device(device))
    if n <= 1:
        return Simulator(algorithm, federation, ctx, device, batched=eng.batched)
    # with batched = true, each worker trains whole chunks of same-shape clients as one batched model
    return ParallelSimulator(algorithm, federation, ctx, device, workers=n, threads_per_worker=eng.threads_per_worker,
                             timeout_s=eng.worker_timeout_s, batched=eng.batched,
                             note=f"{n} worker processes x {eng.threads_per_worker} thread(s) ({why})")


@SERVER_ENGINES.register("flower")
def flower(algorithm: Algorithm, federation: Federation, ctx: Context, device: torch.device, cfg: RunConfig) -> Any:
    """Flower's simulation engine (Ray), or the SuperNodes of a deployment inside a hetfl ServerApp."""
    try:
        import flwr  # noqa: F401  (optional dependency: Flower)
    except ImportError:
        raise HetflError("engine 'flower' needs Flower: pip install 'hetfl[flower]'") from None
    from hetfl.flower import make_engine  # imports Flower, so only when chosen

    return make_engine(algorithm, federation, ctx, device, cfg)


@GRAPH_ENGINES.register("simulator")
def graph_simulator(algorithm: GraphAlgorithm, federation: Federation, ctx: Context, device: torch.device,
                    cfg: RunConfig) -> Any:
    """Every node of the graph in this process, one after another."""
    if cfg.engine.workers not in ("auto", 0, 1):
        raise ConfigError(f"engine.workers={cfg.engine.workers}: graph algorithms run their nodes in this process "
                          f"on engine 'simulator' (workers=1 or \"auto\"); for one process per node use engine "
                          f"'torchrun'")
    return InProcessEngine(algorithm, federation, ctx, device, cfg)


@GRAPH_ENGINES.register("torchrun")
def torchrun(algorithm: GraphAlgorithm, federation: Federation, ctx: Context, device: torch.device,
             cfg: RunConfig) -> Any:
    """One OS process per node (torch.distributed, gloo), or under torchrun."""
    return TorchrunEngine(algorithm, federation, ctx, device, cfg)


@dataclass(frozen=True)
class Loop:
    """What the runner needs for one protocol: its engines and how a state is evaluated."""

    protocol: str
    engines: Registry
    evaluator: type


#: protocol class -> its loop, most specific first (a graph algorithm is never a server algorithm)
LOOPS: tuple[tuple[type, Loop], ...] = (
    (GraphAlgorithm, Loop("graph", GRAPH_ENGINES, NodeEvaluator)),  # one model per node: evaluated per node
    (Algorithm, Loop("server", SERVER_ENGINES, Evaluator)),
)


def loop_for(algorithm: Any) -> Loop:
    """The loop of the protocol ``algorithm`` implements."""
    for cls, loop in LOOPS:
        if isinstance(algorithm, cls):
            return loop
    raise HetflError(f"{type(algorithm).__name__} implements neither the server protocol "
                     f"(hetfl.algorithms.base.Algorithm) nor the graph protocol (GraphAlgorithm)")


def engine_names() -> list[str]:
    return sorted(set(SERVER_ENGINES.names()) | set(GRAPH_ENGINES.names()))


def check_engine(name: str) -> None:
    """An unknown engine name fails here, naming the field and the known engines."""
    if name not in engine_names():
        raise ConfigError(f"engine.name: unknown engine {name!r}; choose one of: {', '.join(engine_names())}")


def engine_for(name: str, algorithm: Any) -> Callable[..., Any]:
    """The factory of engine ``name`` for ``algorithm``'s protocol; a ConfigError if that engine does not
    carry this protocol (naming the engines that do)."""
    check_engine(name)
    loop = loop_for(algorithm)
    if name not in loop.engines:
        raise ConfigError(f"engine {name!r} does not run {loop.protocol} algorithms like "
                          f"{type(algorithm).__name__}; engines for {loop.protocol} algorithms: "
                          f"{', '.join(loop.engines.names())}")
    return loop.engines.get(name)


__all__ = ["GRAPH_ENGINES", "LOOPS", "Loop", "SERVER_ENGINES", "check_engine", "engine_for", "engine_names",
           "loop_for"]
