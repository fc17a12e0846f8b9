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
    """In-process engine: clients of a round run one after another in this process (default)."""
    if getattr(algorithm, "decentralized", False):  # no server: every node of the graph in this process
        from hetfl.decentralized.engine import InProcessEngine

        return InProcessEngine(algorithm, federation, ctx, device, cfg)
    from hetfl.engines.simulator import Simulator

    return Simulator(algorithm, federation, ctx, device, batched=getattr(cfg, "batched", False))


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
