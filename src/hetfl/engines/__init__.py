"""Engines carry an algorithm's rounds to clients and back.

An engine is built as ``factory(algorithm, federation, ctx, device, cfg)`` and offers
``run_round(state, rnd) -> (state, RoundReport)`` and ``close()``.  ``simulator`` (in-process) is the
default; optional engines (Flower) register a factory that imports their heavy dependency lazily.
"""

from __future__ import annotations

from typing import Any

from hetfl.registry import Registry

ENGINES: Registry = Registry("engine")


@ENGINES.register("simulator")
def simulator(algorithm: Any, federation: Any, ctx: Any, device: Any, cfg: Any) -> Any:
    """Clients of a round run in this process one after another, or side by side in worker processes
    (``workers``; see hetfl.engines.workers)."""
    import torch

    setting = getattr(cfg, "workers", 1) if cfg is not None else 1
    threads = getattr(cfg, "threads_per_worker", 1) if cfg is not None else 1
    if getattr(algorithm, "decentralized", False):  # no server: every node of the graph in this process
        from hetfl.decentralized.engine import InProcessEngine

        if setting not in ("auto", 0, 1):
            from hetfl.errors import ConfigError

            raise ConfigError(f"workers={setting}: decentralized algorithms run their nodes in this process on "
                              f"engine 'simulator' (workers=1 or \"auto\"); for one process per node use "
                              f"engine 'torchrun'")
        return InProcessEngine(algorithm, federation, ctx, device, cfg)
    from hetfl.engines.simulator import Simulator
    from hetfl.engines.workers import ParallelSimulator, resolve_workers

    n, why = resolve_workers(setting, threads, algorithm, ctx, torch.device(device))
    if n <= 1:
        return Simulator(algorithm, federation, ctx, device, batched=getattr(cfg, "batched", False))
    # with batched = true, each worker trains whole chunks of same-shape clients as one batched model
    return ParallelSimulator(algorithm, federation, ctx, device, workers=n, threads_per_worker=threads,
                             timeout_s=getattr(cfg, "worker_timeout_s", 0.0), batched=getattr(cfg, "batched", False),
                             note=f"{n} worker processes x {threads} thread(s) ({why})")


@ENGINES.register("flower")
def flower(algorithm: Any, federation: Any, ctx: Any, device: Any, cfg: Any) -> Any:
    """Flower's simulation engine (Ray), or the SuperNodes of a deployment inside a hetfl ServerApp."""
    if getattr(algorithm, "decentralized", False):
        from hetfl.errors import ConfigError

        raise ConfigError("engine 'flower' needs a server algorithm; decentralized algorithms run on engine "
                          "'simulator' (in-process) or 'torchrun'")
    try:
        import flwr  # noqa: F401
    except ImportError:
        from hetfl.errors import HetflError

        raise HetflError("engine 'flower' needs Flower: pip install 'hetfl[flower]'") from None
    from hetfl.flower import make_engine

    return make_engine(algorithm, federation, ctx, device, cfg)


@ENGINES.register("torchrun")
def torchrun(algorithm: Any, federation: Any, ctx: Any, device: Any, cfg: Any) -> Any:
    """Decentralized algorithms with one OS process per node (torch.distributed, gloo), or under torchrun."""
    from hetfl.decentralized.torchrun import TorchrunEngine

    return TorchrunEngine(algorithm, federation, ctx, device, cfg)
