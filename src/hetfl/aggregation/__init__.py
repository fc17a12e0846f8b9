"""Aggregation as one part: algorithms place results, reducers reduce them (mean, median, trimmed mean).

:mod:`~hetfl.aggregation.placement` says where a client's result lands in the server's models;
:mod:`~hetfl.aggregation.reducers` reduces placed results.  Differential privacy
(:mod:`hetfl.privacy.mechanism`) is another reducer over the same placements.  This package imports
nothing of hetfl's but :mod:`hetfl.packed` and :mod:`hetfl.robust`.
"""

from hetfl.aggregation.placement import Piece, Placement, footprint_of, level_key, level_view, owned_by_level, whole
from hetfl.aggregation.reducers import CoordinateRobust, Reducer, WeightedMean, make_reducer

__all__ = ["CoordinateRobust", "Piece", "Placement", "Reducer", "WeightedMean", "footprint_of", "level_key",
           "level_view", "make_reducer", "owned_by_level", "whole"]
