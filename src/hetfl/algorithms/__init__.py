"""Algorithms: transport-agnostic objects with explicit state (see :mod:`hetfl.algorithms.base`)."""

from hetfl.algorithms import (  # noqa: F401  (registers the algorithms)
    depthfl,
    exclusive,
    fedavg,
    feddf,
    fedgen,
    fedproto,
    fedtgp,
    fiarse,
    heterofl,
    inclusivefl,
    nefl,
    scalefl,
    slt,
)
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context, EvalTarget, ServerState, Weights
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.models import ModelRef

__all__ = ["ALGORITHMS", "Algorithm", "ClientResult", "ClientTask", "Context", "EvalTarget", "ModelRef",
           "ServerState", "Weights"]
