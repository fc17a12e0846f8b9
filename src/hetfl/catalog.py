"""Every registry in one place (importing this module registers all built-in entries)."""

from __future__ import annotations

from hetfl.algorithms import ALGORITHMS
from hetfl.data.datasets import DATASETS
from hetfl.data.partition import PARTITIONERS
from hetfl.decentralized import TOPOLOGIES
from hetfl.decentralized import protocol as _decentralized  # noqa: F401  (registers dkd, dpsgd, isolated)
from hetfl.engines import GRAPH_ENGINES, SERVER_ENGINES
from hetfl.hetero.budgets import MEMORY_BUDGETS
from hetfl.hetero.depth import DEPTH_RULES
from hetfl.hetero.losses import LOSS_RULES
from hetfl.hetero.policy import INDEX_POLICIES
from hetfl.hetero.sampling import WIDTH_SCHEDULES
from hetfl.models import MODELS
from hetfl.registry import Registry

REGISTRIES: dict[str, Registry] = {
    "datasets": DATASETS,
    "partitioners": PARTITIONERS,
    "models": MODELS,
    "algorithms": ALGORITHMS,
    "engines (server algorithms)": SERVER_ENGINES,
    "engines (graph algorithms)": GRAPH_ENGINES,
    "topologies": TOPOLOGIES,
    "index policies": INDEX_POLICIES,
    "width schedules": WIDTH_SCHEDULES,
    "loss rules": LOSS_RULES,
    "depth rules": DEPTH_RULES,
    "memory budgets": MEMORY_BUDGETS,
}

__all__ = ["ALGORITHMS", "DATASETS", "DEPTH_RULES", "GRAPH_ENGINES", "INDEX_POLICIES", "LOSS_RULES", "MEMORY_BUDGETS",
           "MODELS", "PARTITIONERS", "REGISTRIES", "SERVER_ENGINES", "TOPOLOGIES", "WIDTH_SCHEDULES"]
