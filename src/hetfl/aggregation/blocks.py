"""The float64 weighted sum of a block of consecutive results, pre-summed where the clients train.

For an algorithm whose aggregation is a plain weighted mean of whole results (every result placed whole on
``global`` with :meth:`~hetfl.algorithms.base.Algorithm.weight_of`, no side channel: the capability
:attr:`~hetfl.algorithms.base.Algorithm.block_sums`) reduced by a reducer that takes sums
(:attr:`~hetfl.aggregation.reducers.WeightedMean.accepts_sums`), the round cuts its tasks into blocks of
:data:`hetfl.rounds.BLOCK_TASKS` consecutive tasks.  :func:`hetfl.rounds.presum` runs a block: its clients
one after another, each result validated (the round's ``[faults]``) and, if valid, added to the block's
:class:`BlockSum` in task order; the round then adds the blocks' sums in block order
(:meth:`~hetfl.aggregation.reducers.WeightedMean.add_sum`) and books every client from its entry (id,
samples, metrics, why it was rejected) as it books a single result.

A worker process (:mod:`hetfl.engines.worker_process`) runs a whole block and sends one message with the
block's sum; the in-process engine (and any other transport) runs the same function on the results it gets,
so both add the same numbers in the same order and stay equal bit for bit.  The mean is then
``(S_1 + S_2 + ...) / W`` with ``S_b`` the block sums, not one running sum over every result: its last bits
differ from a per-result running sum once a round has more than one block.

Per element the arithmetic is :class:`~hetfl.aggregation.reducers.WeightedMean`'s: a result's values
widened to float64, multiplied by its weight (exact for float32 or narrower values and integer weights),
added in order.  This module imports nothing of hetfl's but :mod:`hetfl.packed`.
"""

from __future__ import annotations

import torch

from hetfl.packed import Offsets
from hetfl.packed import span as packed_span
from hetfl.packed import views as packed_views

Weights = dict[str, torch.Tensor]
F64 = torch.float64


def flat_offsets(weights: Weights) -> Offsets:
    """The offsets of ``weights``' tensors laid side by side without gaps, in dict order."""
    out, pos = [], 0
    for key, value in weights.items():
        out.append((key, pos, tuple(value.shape)))
        pos += value.numel()
    return tuple(out)


def numel_of(offsets: Offsets) -> int:
    if not offsets:
        return 0
    key, off, shape = offsets[-1]
    n = 1
    for s in shape:
        n *= s
    return off + n


class BlockSum:
    """The float64 weighted sum of a block's valid results: ``flat`` (the tensors of ``offsets`` side by
    side), ``weight`` (the sum of the weights) and ``n`` (results added; a weight <= 0 adds nothing, as in
    the mean).  ``into``: a float64 buffer of the right size to sum in (a worker's shared buffer)."""

    def __init__(self, offsets: Offsets, dtypes: dict[str, torch.dtype], into: torch.Tensor | None = None) -> None:
        self.offsets = offsets
        self.dtypes = dtypes
        self.flat = into if into is not None else torch.empty(numel_of(offsets), dtype=F64)
        self.weight = 0.0
        self.n = 0

    @classmethod
    def like(cls, weights: Weights, into: torch.Tensor | None = None) -> BlockSum:
        """An empty sum for results shaped like ``weights`` (a task's)."""
        return cls(flat_offsets(weights), {k: v.dtype for k, v in weights.items()}, into)

    def add(self, weights: Weights, w: float) -> None:
        """Add ``w * weights`` (a valid result: the task's keys, shapes and dtypes)."""
        w = float(w)
        if w <= 0:
            return
        first = self.n == 0
        whole = packed_span(weights)
        if whole is not None and whole[1] == self.offsets and whole[0].numel() == self.flat.numel():
            parts = [(self.flat, whole[0])]
        else:
            sums = packed_views(self.flat, self.offsets)
            parts = [(sums[k].view(-1), weights[k].detach().reshape(-1)) for k in sums]
        for acc, x in parts:
            if first:  # x widened exactly, then times w in float64: WeightedMean's first term
                acc.copy_(x)
                acc.mul_(w)
            else:
                acc.add_(x, alpha=w)
        self.weight += w
        self.n += 1

    def summary(self) -> tuple[Offsets, dict[str, torch.dtype], float, int]:
        """Everything but the values (a worker sends this; the values stay in shared memory)."""
        return self.offsets, self.dtypes, self.weight, self.n

    @classmethod
    def of(cls, flat: torch.Tensor, summary: tuple[Offsets, dict[str, torch.dtype], float, int]) -> BlockSum:
        offsets, dtypes, weight, n = summary
        out = cls(offsets, dtypes, flat)
        out.weight, out.n = weight, n
        return out

    def views(self) -> Weights:
        return packed_views(self.flat, self.offsets)


__all__ = ["BlockSum", "flat_offsets", "numel_of"]
