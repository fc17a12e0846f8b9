"""Reduce a round's placed client results: the one weighted mean, and the coordinate-wise robust rules.

Every server algorithm's aggregate ends here (:meth:`hetfl.algorithms.base.Algorithm.aggregate`):

* :class:`WeightedMean` streams: per server tensor it keeps a float64 running sum and a count (a scalar
  while every client covered the tensor whole, per element once some client covered part of it), so a
  round's memory does not grow with its clients.  An element nobody covered keeps its old value.  A
  tensor covered whole by everyone takes FedAvg's arithmetic (``sum w_k x_k / sum w_k`` in float64), so a
  width or depth method whose clients all train the full model equals FedAvg bit for bit.
* :class:`CoordinateRobust` holds every placed result (``n`` x the model's memory) and reduces each element
  over the clients that cover it (``"median"``, ``"trimmed_mean"``; :mod:`hetfl.robust`), unweighted.

Results packed in one buffer (:mod:`hetfl.packed`; worker processes hand them back so) and covering every
tensor whole are added through the whole buffer, a few of them (:data:`BLOCK_RESULTS`) at a time and block
by block (:data:`BLOCK_ELEMENTS`), so the float64 running sum stays in cache: per element the additions happen
in the same order, and each ``w * x`` is exact in float64 (float32 or narrower values, integer ``w``), so
packed and unpacked results give bit-identical means.

A round may also hand :class:`WeightedMean` the float64 weighted sums of blocks of consecutive results
(:mod:`hetfl.aggregation.blocks`, summed where the clients trained): :meth:`WeightedMean.add_sum` adds them
in block order.  Only reducers with ``accepts_sums`` take them; the robust ones and the private sum need
every result on its own.

Differential privacy (:mod:`hetfl.privacy.mechanism`) is a third reducer over the same placements.
"""

from __future__ import annotations

from typing import Protocol

import torch

from hetfl.aggregation.blocks import BlockSum
from hetfl.aggregation.placement import Piece, Placement
from hetfl.packed import span as packed_span
from hetfl.packed import views as packed_views
from hetfl.robust import check_method, robust_reduce

Weights = dict[str, torch.Tensor]
F64 = torch.float64

#: Packed results added together, block by block (bounded by BLOCK_BYTES of buffered results).
BLOCK_RESULTS = 8
BLOCK_BYTES = 64 << 20
#: Elements per block: the block's float64 sum and its slice of each result stay in a core's L2 cache.
BLOCK_ELEMENTS = 32768

_NARROW = (torch.float32, torch.float16, torch.bfloat16)


class Reducer(Protocol):
    """What a round's aggregation feeds: placed results in, new server models out."""

    #: whether the algorithm may also read the raw results (side channels such as FedDF's teachers)
    private: bool
    #: whether it takes block sums of whole results (:meth:`WeightedMean.add_sum`) in place of the results
    accepts_sums: bool
    clients: int

    def add(self, placement: Placement) -> None: ...

    def result(self) -> dict[str, Weights]: ...


def _exact_products(values: Weights, w: float) -> bool:
    """Whether ``w * x`` is exact in float64 for every element (float32 or narrower, integer ``w`` < 2**29)."""
    first = next(iter(values.values()), None)
    return first is not None and first.dtype in _NARROW and float(w).is_integer() and w < 2**29


def _add_blocked(flat_sum: torch.Tensor, pending: list[tuple[torch.Tensor, float]]) -> None:
    """``flat_sum += w * x`` for every ``(x, w)`` in ``pending``, in order, one block of elements at a time."""
    for i in range(0, flat_sum.numel(), BLOCK_ELEMENTS):
        acc = flat_sum[i:i + BLOCK_ELEMENTS]
        for x, w in pending:
            acc.add_(x[i:i + BLOCK_ELEMENTS], alpha=w)  # float32 promoted to float64 inside the kernel
    pending.clear()


def _cast(avg: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return avg.to(dtype) if dtype.is_floating_point else avg.round().to(dtype)


class _ModelMean:
    """The running sums and counts of one server model."""

    def __init__(self, reference: Weights | None) -> None:
        self.reference = reference
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, float | torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.flat_sum: torch.Tensor | None = None  # when the first result was packed: ``sums`` are views of it
        self.flat_layout = None
        self.pending: list[tuple[torch.Tensor, float]] = []
        self.block = 1
        self.single: Weights | None = None  # the values of the only (whole) result so far
        self.n = 0

    def add(self, p: Placement) -> None:
        w = float(p.weight)
        values = {k: piece.value for k, piece in p.pieces.items()}
        self.single = values if self.n == 0 and p.whole else None
        self.n += 1
        packed = packed_span(values) if p.whole and _exact_products(values, w) else None
        if packed is not None and not self.sums:
            self.flat_sum = packed[0].to(F64) * w
            self.flat_layout = packed[1]
            self.sums = packed_views(self.flat_sum, self.flat_layout)
            self.counts = dict.fromkeys(self.sums, w)
            self.dtypes = {k: self._dtype(k, v) for k, v in values.items()}
            self.block = max(1, min(BLOCK_RESULTS, BLOCK_BYTES // max(1, self.flat_sum.numel() * 4)))
            return
        if (packed is not None and self.flat_sum is not None and packed[1] == self.flat_layout
                and not any(torch.is_tensor(c) for c in self.counts.values())):
            self.pending.append((packed[0], w))
            for k in self.counts:
                self.counts[k] += w
            if len(self.pending) >= self.block:
                _add_blocked(self.flat_sum, self.pending)
            return
        self.flush()
        for key, piece in p.pieces.items():
            self._add_piece(key, piece, w)

    def add_sum(self, s: BlockSum) -> None:
        """Add a block's weighted sum of whole results (:mod:`hetfl.aggregation.blocks`); every result of the
        round comes so (block sums are not mixed with single results)."""
        if self.n and (self.flat_sum is None or self.flat_layout != s.offsets or self.pending):
            raise ValueError("internal error: a block sum after single results, or of another layout")
        self.single = None
        self.n += s.n
        if self.flat_sum is None:
            self.flat_sum = s.flat.clone()
            self.flat_layout = s.offsets
            self.sums = packed_views(self.flat_sum, s.offsets)
            self.counts = dict.fromkeys(self.sums, s.weight)
            self.dtypes = {k: self.reference[k].dtype if self.reference is not None and k in self.reference else d
                           for k, d in s.dtypes.items()}
            return
        self.flat_sum.add_(s.flat)
        for k in self.counts:
            self.counts[k] += s.weight

    def flush(self) -> None:
        if self.pending:
            _add_blocked(self.flat_sum, self.pending)

    def _dtype(self, key: str, value: torch.Tensor) -> torch.dtype:
        return self.reference[key].dtype if self.reference is not None and key in self.reference else value.dtype

    def _add_piece(self, key: str, piece: Piece, w: float) -> None:
        ref = self.reference.get(key) if self.reference is not None else None
        v = piece.value.detach()
        device = ref.device if ref is not None else v.device
        self.dtypes.setdefault(key, self._dtype(key, v))
        count = self.counts.get(key)
        if piece.whole and not torch.is_tensor(count):
            v64 = v.to(device=device, dtype=F64)
            if key not in self.sums:
                self.sums[key] = v64 * w
                self.counts[key] = w
            else:
                self.sums[key].add_(v64, alpha=w)
                self.counts[key] = count + w
            return
        if ref is None:
            raise ValueError(f"placing a part of {key!r} needs the server's reference weights")
        self._to_elementwise(key, ref)
        wt = torch.full(v.shape, w, dtype=F64, device=device)
        if piece.mask is not None:
            wt = wt * piece.mask.to(device=device, dtype=F64)
        if piece.share is not None:
            wt = wt * piece.share.to(device=device, dtype=F64)
        v64 = v.to(device=device, dtype=F64)
        if piece.index is None:
            self.sums[key].add_(v64 * wt)
            self.counts[key].add_(wt)
        else:
            idx = piece.index.to(device)
            self.sums[key].view(-1).index_add_(0, idx, (v64 * wt).reshape(-1))
            self.counts[key].view(-1).index_add_(0, idx, wt.reshape(-1))

    def _to_elementwise(self, key: str, ref: torch.Tensor) -> None:
        count = self.counts.get(key)
        if torch.is_tensor(count):
            return
        if key in self.sums:  # switch a scalar-counted running sum to element-wise counting
            self.counts[key] = torch.full(ref.shape, float(count), dtype=F64, device=ref.device)
        else:
            self.sums[key] = torch.zeros(ref.shape, dtype=F64, device=ref.device)
            self.counts[key] = torch.zeros(ref.shape, dtype=F64, device=ref.device)

    def result(self) -> Weights:
        self.flush()
        if self.n == 1 and self.single is not None and self.reference is None:
            return dict(self.single)
        keys = list(self.reference) if self.reference is not None else list(self.sums)
        out = {}
        for key in keys:
            s = self.sums.get(key)
            ref = self.reference.get(key) if self.reference is not None else None
            if s is None:
                out[key] = ref
                continue
            if self.n == 1 and self.single is not None:
                out[key] = self.single[key]
                continue
            c = self.counts[key]
            if torch.is_tensor(c):
                avg = torch.where(c > 0, s / c.clamp_min(1e-300), ref.to(F64))
            else:
                avg = s / c
            out[key] = _cast(avg, self.dtypes[key])
        return out

    @property
    def nbytes(self) -> int:
        tensors = [self.flat_sum] if self.flat_sum is not None else list(self.sums.values())
        tensors += [c for c in self.counts.values() if torch.is_tensor(c)]
        return sum(t.numel() * t.element_size() for t in tensors)


class WeightedMean:
    """The streaming weighted mean of placed results, per server model (see the module docstring).

    ``references``: the server's current models (``ServerState.models``); an element no client covered
    keeps its value.  ``None``: every result covers whole tensors, and the mean holds the keys they hold.
    """

    private = False
    accepts_sums = True

    def __init__(self, references: dict[str, Weights] | None = None) -> None:
        self.references = references
        self.models: dict[str, _ModelMean] = {}
        self.clients = 0

    def add(self, placement: Placement) -> None:
        if placement.weight <= 0:
            return
        mean = self.models.get(placement.model)
        if mean is None:
            ref = self.references.get(placement.model) if self.references is not None else None
            mean = self.models[placement.model] = _ModelMean(ref)
        mean.add(placement)
        self.clients += 1

    def add_sum(self, model: str, s: BlockSum) -> None:
        """Add a block's float64 weighted sum of whole results for ``model`` (:mod:`hetfl.aggregation.blocks`),
        in block order; ``s.n`` results count as clients."""
        if s.n == 0:
            return
        mean = self.models.get(model)
        if mean is None:
            ref = self.references.get(model) if self.references is not None else None
            mean = self.models[model] = _ModelMean(ref)
        mean.add_sum(s)
        self.clients += s.n

    def result(self) -> dict[str, Weights]:
        """The new weights of every model that received a result (the others are absent)."""
        return {key: m.result() for key, m in self.models.items()}

    def counts(self) -> dict[str, int]:
        return {key: m.n for key, m in self.models.items()}

    @property
    def nbytes(self) -> int:
        return sum(m.nbytes for m in self.models.values())


class CoordinateRobust:
    """Coordinate-wise median or trimmed mean over the clients covering each element (unweighted).

    Holds every placed result until :meth:`result`; reduces one tensor at a time.  A piece's ``share``
    (HeteroFL's classifier rows) is not used: every covering client's value counts once.
    """

    private = False
    accepts_sums = False  # a median needs every result

    def __init__(self, references: dict[str, Weights], method: str, trim: float = 0.1) -> None:
        check_method(method, trim)
        self.references = references
        self.method = method
        self.trim = trim
        self.held: dict[str, list[Placement]] = {}
        self.clients = 0

    def add(self, placement: Placement) -> None:
        if placement.weight <= 0:
            return
        self.held.setdefault(placement.model, []).append(placement)
        self.clients += 1

    def result(self) -> dict[str, Weights]:
        return {key: self._reduce(self.references[key], held) for key, held in self.held.items()}

    def _reduce(self, ref_model: Weights, held: list[Placement]) -> Weights:
        out = {}
        for key, ref in ref_model.items():
            pieces = [p.pieces[key] for p in held if key in p.pieces]
            if not pieces:
                out[key] = ref
                continue
            if all(pc.index is None and pc.mask is None for pc in pieces):
                values = torch.stack([pc.value.detach().to(ref.device) for pc in pieces])
                reduced, covered = robust_reduce(values, None, self.method, self.trim)
            else:
                values = torch.stack([pc.scatter(pc.value.detach(), ref) for pc in pieces])
                masks = torch.stack([pc.coverage(ref) for pc in pieces])
                reduced, covered = robust_reduce(values, masks, self.method, self.trim)
            out[key] = torch.where(covered, reduced.to(ref.dtype), ref)
        return out


def make_reducer(references: dict[str, Weights], method: str = "mean",
                 trim: float = 0.1) -> WeightedMean | CoordinateRobust:
    """The reducer of ``method``: ``"mean"`` (streaming) or one of :data:`hetfl.robust.METHODS`."""
    if method == "mean":
        return WeightedMean(references)
    return CoordinateRobust(references, method, trim)


__all__ = ["BLOCK_BYTES", "BLOCK_ELEMENTS", "BLOCK_RESULTS", "CoordinateRobust", "Reducer", "WeightedMean",
           "make_reducer"]
