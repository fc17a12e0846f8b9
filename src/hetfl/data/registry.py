"""The dataset registry (kept apart so that every source module can register its loaders without cycles)."""

from __future__ import annotations

from collections.abc import Callable

from hetfl.data.base import Dataset
from hetfl.registry import Registry

DATASETS: Registry[Callable[..., Dataset]] = Registry("dataset")
