"""Engines carry an algorithm's rounds to clients and back.

An engine is built as ``factory(algorithm, federation, ctx, device, cfg)`` from the typed
:class:`~hetfl.config.RunConfig` and offers ``run_round(state, rnd) -> (state, RoundReport)`` and
``close()``.  Server engines are transports of the one round (:class:`hetfl.rounds.Round`): in process,
worker processes, Flower.  ``simulator`` (in-process) is the default; optional engines (Flower) import
their heavy dependency when chosen.
"""

from __future__ import annotations

from typing import Any

import torch

from hetfl.algorithms.base import Algorithm, Context
from hetfl.config import RunConfig
from hetfl.data.federation import Federation
from hetfl.decentralized.engine import InProcessEngine
from hetfl.decentralized.torchrun import TorchrunEngine
from hetfl.engines.simulator import Simulator
from hetfl.engines.workers import ParallelSimulator, resolve_workers
from hetfl.errors import ConfigError, HetflError
from hetfl.registry import Registry

ENGINES: Registry = Registry("engine")


@ENGINES.register("simulator")
def simulator(algorithm: Algorithm, federation: Federation, ctx: Context, device: torch.device,
              cfg: RunConfig) -> Any:
    """Clients of a round run in this process one after another, or side by side in worker processes
    (``workers``; see docs/performance.md)."""
    if algorithm.decentralized:  # no server: every node of the graph in this process
        if cfg.workers not in ("auto", 0, 1):
            raise ConfigError(f"workers={cfg.workers}: decentralized algorithms run their nodes in this process on "
                              f"engine 'simulator' (workers=1 or \"auto\"); for one process per node use "
                              f"engine 'torchrun'")
        return InProcessEngine(algorithm, federation, ctx, device, cfg)
    n, why = resolve_workers(cfg.workers, cfg.threads_per_worker, algorithm, ctx, torch.device(device))
    if n <= 1:
        return Simulator(algorithm, federation, ctx, device, batched=cfg.batched)
    # with batched = true, each worker trains whole chunks of same-shape clients as one batched model
    return ParallelSimulator(algorithm, federation, ctx, device, workers=n, threads_per_worker=cfg.threads_per_worker,
                             timeout_s=cfg.worker_timeout_s, batched=cfg.batched,
                             note=f"{n} worker processes x {cfg.threads_per_worker} thread(s) ({why})")


@ENGINES.register("flower")
def flower(algorithm: Algorithm, federation: Federation, ctx: Context, device: torch.device, cfg: RunConfig) -> Any:
    """Flower's simulation engine (Ray), or the SuperNodes of a deployment inside a hetfl ServerApp."""
    try:
        import flwr  # noqa: F401  (optional dependency: Flower)
    except ImportError:
        raise HetflError("engine 'flower' needs Flower: pip install 'hetfl[flower]'") from None
    if algorithm.decentralized:
        raise ConfigError("engine 'flower' needs a server algorithm; decentralized algorithms run on engine "
                          "'simulator' (in-process) or 'torchrun'")
    from hetfl.flower import make_engine  # imports Flower, so only when chosen

    return make_engine(algorithm, federation, ctx, device, cfg)


@ENGINES.register("torchrun")
def torchrun(algorithm: Algorithm, federation: Federation, ctx: Context, device: torch.device, cfg: RunConfig) -> Any:
    """Decentralized algorithms with one OS process per node (torch.distributed, gloo), or under torchrun."""
    return TorchrunEngine(algorithm, federation, ctx, device, cfg)
