"""Memory budgets: how many bytes of training memory each fleet tier may use.

A fleet's tiers are widths, i.e. compute budgets (:mod:`hetfl.fleet`).  A method whose constraint is *memory*
(successive layer training, :mod:`hetfl.algorithms.slt`) reads a budget in bytes per tier from one of these
registered rules (``algorithm.budget``, e.g. ``"width"`` or ``"device(share=0.002)"``), and compares it with
:func:`hetfl.accounting.training_memory` of what a client would train: float32 weights, the trainable part's
gradients and SGD buffer, one batch of the activations backpropagation keeps.  A new rule is one frozen
dataclass with ``tiers(ctx) -> [bytes per tier, strongest first]`` registered in :data:`MEMORY_BUDGETS`.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from hetfl.accounting import training_memory
from hetfl.errors import ConfigError
from hetfl.hetero import submodel_ref
from hetfl.registry import Registry, build_entry

MEMORY_BUDGETS: Registry = Registry("memory budget")


@MEMORY_BUDGETS.register("width")
@dataclass(frozen=True)
class WidthBudget:
    """A tier may use the training memory of the whole model at the tier's fleet width (SLT's definition), at the
    run's batch size and momentum."""

    def tiers(self, ctx: Any) -> list[float]:
        widths = ctx.fleet.levels if ctx.fleet is not None else (1.0,)
        t = ctx.train
        return [float(training_memory(submodel_ref(ctx.model, w), ctx.info, t.batch_size, momentum=t.momentum > 0))
                for w in widths]


@MEMORY_BUDGETS.register("device")
@dataclass(frozen=True)
class DeviceBudget:
    """A tier may use ``share`` of the RAM (``memory_gb``) of its smallest device (the ``phones`` fleet has real
    RAM; the ``tiers`` fleet gives every device 4 GB)."""

    share: float = 0.001

    def __post_init__(self) -> None:
        if not 0 < self.share <= 1:
            raise ConfigError(f"share must be in (0, 1], got {self.share}")

    def tiers(self, ctx: Any) -> list[float]:
        fleet = ctx.fleet
        if fleet is None:
            raise ConfigError('a "device" memory budget needs a [fleet] (its devices\' memory_gb)')
        tiers = fleet.tiers()
        return [self.share * float(np.min(fleet.memory_gb[tiers == t], initial=np.inf)) * 2**30
                for t in range(len(fleet.levels))]


@lru_cache(maxsize=32)
def memory_budget(text: str, where: str = "algorithm.budget") -> WidthBudget | DeviceBudget:
    """The memory budget rule named in ``text`` (``"width"``, ``"device(share=0.002)"``, ...)."""
    return build_entry(MEMORY_BUDGETS, text, where)


__all__ = ["MEMORY_BUDGETS", "DeviceBudget", "WidthBudget", "memory_budget"]
