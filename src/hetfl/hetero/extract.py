"""Extract a submodel's weights from the global weights, and average overlapping updates back.

Both are vectorised index operations driven by the width spec: no per-model code, no Python loops
over elements.  Aggregation averages every global element over the clients whose submodel contains
it (optionally weighted, optionally restricting classifier rows to clients that hold the class);
elements nobody trained keep their value.  Dense (fully covered) tensors take the same arithmetic
as FedAvg's average, so a round where everyone trains the full model equals FedAvg bit for bit.
"""

from __future__ import annotations

import torch

from hetfl.aggregation import Piece, Placement, WeightedMean
from hetfl.hetero.policy import Selection
from hetfl.hetero.spec import DimSlice, WidthSpec

Weights = dict[str, torch.Tensor]


def dim_index(ds: DimSlice, group_size: int, channels: torch.Tensor) -> torch.Tensor:
    """Positions along one parameter dimension for the selected channels of its group."""
    idx = channels
    if ds.inner > 1:
        idx = (channels[:, None] * ds.inner + torch.arange(ds.inner)[None, :]).reshape(-1)
    if ds.repeat > 1:
        full = group_size * ds.inner
        idx = (torch.arange(ds.repeat)[:, None] * full + idx[None, :]).reshape(-1)
    return idx


def _is_identity(spec: WidthSpec, key: str, selection: Selection) -> bool:
    for ds in spec.params.get(key, {}).values():
        sel = selection.get(ds.group)
        if sel is None:
            continue
        size = spec.groups[ds.group].size
        if len(sel) != size or not torch.equal(sel, torch.arange(size)):
            return False
    return True


def param_indices(spec: WidthSpec, key: str, selection: Selection) -> dict[int, torch.Tensor]:
    return {d: dim_index(ds, spec.groups[ds.group].size, selection[ds.group])
            for d, ds in spec.params.get(key, {}).items() if ds.group in selection}


def extract(weights: Weights, spec: WidthSpec, selection: Selection) -> Weights:
    """The submodel's state dict: every sliced dimension indexed by its group's selection."""
    out = {}
    for key, t in weights.items():
        if _is_identity(spec, key, selection):
            out[key] = t
            continue
        for d, idx in param_indices(spec, key, selection).items():
            t = t.index_select(d, idx.to(t.device))
        out[key] = t
    return out


def _flat_index(shape: tuple[int, ...], dims: dict[int, torch.Tensor], device: torch.device) -> torch.Tensor:
    """Flat positions in a tensor of ``shape`` of the sub-block given by per-dim indices."""
    flat = torch.zeros((), dtype=torch.long, device=device)
    stride = 1
    for d in range(len(shape) - 1, -1, -1):
        idx = dims.get(d)
        if idx is None:
            idx = torch.arange(shape[d], device=device)
        view = [1] * len(shape)
        view[d] = -1
        flat = flat + idx.to(device).view(view) * stride
        stride *= shape[d]
    return flat.reshape(-1)


def scatter_full(reference: Weights, spec: WidthSpec, sub: Weights, selection: Selection
                 ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A submodel's weights placed in the global shapes, with a coverage mask per tensor (for the
    robust reducers of :mod:`hetfl.robust`, which need every client's value of an element at once)."""
    out = {}
    for key, value in sub.items():
        ref = reference[key]
        full = torch.zeros(ref.shape, dtype=value.dtype, device=ref.device)
        mask = torch.zeros(ref.shape, dtype=torch.bool, device=ref.device)
        flat = _flat_index(tuple(ref.shape), param_indices(spec, key, selection), ref.device)
        full.view(-1)[flat] = value.detach().to(ref.device).reshape(-1)
        mask.view(-1)[flat] = True
        out[key] = (full, mask)
    return out


def place_slice(reference: Weights, spec: WidthSpec, sub: Weights, selection: Selection, weight: float = 1.0,
                class_mask: torch.Tensor | None = None, skip: frozenset[str] = frozenset(),
                model: str = "global") -> Placement:
    """A submodel's weights (extracted with ``selection``) placed in the global tensors (:mod:`hetfl.aggregation`).

    Tensors the selection leaves whole are placed whole, so a round where everyone trains the full model
    reduces exactly as FedAvg's.  ``class_mask`` (bool per class) restricts the classifier rows the client
    contributes to (a data-dependent ``share``); ``skip``: keys not placed (e.g. static BatchNorm statistics).
    """
    pieces = {}
    for key, value in sub.items():
        if key in skip:
            continue
        ref = reference[key]
        share = None
        rows = spec.output_rows.get(key) if class_mask is not None else None
        if rows is not None:
            shape = [1] * value.dim()
            shape[rows] = -1
            share = class_mask.to(device=ref.device, dtype=torch.float64).view(shape)
        if _is_identity(spec, key, selection):
            pieces[key] = Piece(value, share=share)
        else:
            pieces[key] = Piece(value, index=_flat_index(tuple(ref.shape), param_indices(spec, key, selection),
                                                         ref.device), share=share)
    return Placement(pieces, model, weight)


def slice_footprint(reference: Weights, spec: WidthSpec, selection: Selection, keys, signature,
                    model: str = "global") -> Placement:
    """The footprint (no values) of a client holding ``keys`` of ``reference`` sliced by ``selection``."""
    pieces = {}
    for key in keys:
        ref = reference[key]
        if _is_identity(spec, key, selection):
            pieces[key] = Piece()
            continue
        dims = param_indices(spec, key, selection)
        shape = tuple(len(dims[d]) if d in dims else ref.shape[d] for d in range(ref.dim()))
        pieces[key] = Piece(index=_flat_index(tuple(ref.shape), dims, ref.device), shape=shape)
    return Placement(pieces, model, 1.0, signature)


def selection_signature(selection: Selection) -> bytes:
    """A hashable name of a selection: equal names, equal channels."""
    return b"|".join(str(g).encode() + b":" + selection[g].numpy().tobytes() for g in sorted(selection))


class OverlapAverage:
    """The running per-element mean of sliced submodel updates: :func:`place_slice` into a
    :class:`~hetfl.aggregation.WeightedMean` (kept for scripts and tests that average slices directly)."""

    def __init__(self, reference: Weights, spec: WidthSpec, skip: frozenset[str] = frozenset()) -> None:
        self.reference = reference
        self.spec = spec
        self.skip = skip
        self.mean = WeightedMean({"global": reference})

    @property
    def clients(self) -> int:
        return self.mean.clients

    def add(self, sub: Weights, selection: Selection, weight: float = 1.0,
            class_mask: torch.Tensor | None = None) -> None:
        self.mean.add(place_slice(self.reference, self.spec, sub, selection, weight, class_mask, self.skip))

    def result(self) -> Weights:
        """The averaged global weights; untouched elements (and skipped keys) keep the reference value."""
        return self.mean.result().get("global", dict(self.reference))
