"""Every registry in one place (importing this module registers all built-in entries)."""

from __future__ import annotations

from hetfl.algorithms import ALGORITHMS
from hetfl.data.datasets import DATASETS
from hetfl.data.partition import PARTITIONERS
from hetfl.engines import ENGINES
from hetfl.models import MODELS
from hetfl.registry import Registry

REGISTRIES: dict[str, Registry] = {
    "datasets": DATASETS,
    "partitioners": PARTITIONERS,
    "models": MODELS,
    "algorithms": ALGORITHMS,
    "engines": ENGINES,
}

__all__ = ["ALGORITHMS", "DATASETS", "ENGINES", "MODELS", "PARTITIONERS", "REGISTRIES"]
