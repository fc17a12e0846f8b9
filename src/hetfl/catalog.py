"""Every registry in one place (importing this module registers all built-in entries)."""

from __future__ import annotations

from hetfl.algorithms import ALGORITHMS
from hetfl.data.datasets import DATASETS
from hetfl.data.partition import PARTITIONERS
from hetfl.decentralized import TOPOLOGIES
from hetfl.decentralized import protocol as _decentralized  # noqa: F401  (registers dkd, dpsgd, isolated)
from hetfl.engines import ENGINES
from hetfl.hetero.sampling import WIDTH_POLICIES
from hetfl.models import MODELS
from hetfl.registry import Registry

REGISTRIES: dict[str, Registry] = {
    "datasets": DATASETS,
    "partitioners": PARTITIONERS,
    "models": MODELS,
    "algorithms": ALGORITHMS,
    "engines": ENGINES,
    "topologies": TOPOLOGIES,
    "width policies": WIDTH_POLICIES,
}

__all__ = ["ALGORITHMS", "DATASETS", "ENGINES", "MODELS", "PARTITIONERS", "REGISTRIES"]


def entry_keys(section: str, name: str) -> set[str] | None:
    """The keys the registry entry ``name`` declares in config section ``section`` (None: no such entry)."""
    from hetfl.config import declared_params

    registry, skip = {
        "data": (DATASETS, ("data_dir", "seed")),
        "data.partition": (PARTITIONERS, ()),
        "model": (MODELS, ("width",)),
        "algorithm": (ALGORITHMS, ()),
    }[section]
    if name not in registry:
        return None
    return set(declared_params(registry.get(name), skip))
