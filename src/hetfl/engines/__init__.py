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
    from hetfl.engines.simulator import Simulator

    return Simulator(algorithm, federation, ctx, device)
