"""Datasets (in-memory tensors, offline sources) and partitioners."""

from hetfl.data.base import DataInfo, Dataset, Split

__all__ = ["DataInfo", "Dataset", "Split"]
