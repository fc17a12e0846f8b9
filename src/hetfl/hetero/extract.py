"""Extract a submodel's weights from the global weights, and average overlapping updates back.

Both are vectorised index operations driven by the width spec: no per-model code, no Python loops
over elements.  Aggregation averages every global element over the clients whose submodel contains
it (optionally weighted, optionally restricting classifier rows to clients that hold the class);
elements nobody trained keep their value.  Dense (fully covered) tensors take the same arithmetic
as FedAvg's average, so a round where everyone trains the full model equals FedAvg bit for bit.
"""

from __future__ import annotations

import torch

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


class OverlapAverage:
    """Running per-element weighted sums and counts over partially overlapping submodel updates."""

    def __init__(self, reference: Weights, spec: WidthSpec, skip: frozenset[str] = frozenset()) -> None:
        self.reference = reference
        self.spec = spec
        self.skip = skip
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.scalar_counts: dict[str, float] = {}
        self.clients = 0

    def add(self, sub: Weights, selection: Selection, weight: float = 1.0,
            class_mask: torch.Tensor | None = None) -> None:
        """Add one client's submodel weights (extracted with ``selection``) with ``weight``.

        ``class_mask`` (bool per class) restricts the classifier rows the client contributes to.
        """
        self.clients += 1
        for key, value in sub.items():
            if key in self.skip:
                continue
            ref = self.reference[key]
            v = value.detach().to(device=ref.device, dtype=torch.float64)
            rows = self.spec.output_rows.get(key) if class_mask is not None else None
            dense = _is_identity(self.spec, key, selection)
            if dense and rows is None and key not in self.counts:  # else: counted element-wise already
                if key not in self.sums:
                    self.sums[key] = v * weight
                    self.scalar_counts[key] = weight
                else:
                    self.sums[key].add_(v, alpha=weight)
                    self.scalar_counts[key] += weight
                continue
            self._to_elementwise(key)
            w = torch.full_like(v, weight)
            if rows is not None:
                mask = class_mask.to(device=ref.device, dtype=torch.float64)
                shape = [1] * v.dim()
                shape[rows] = -1
                w = w * mask.view(shape)
            if dense:
                self.sums[key].add_(v * w)
                self.counts[key].add_(w)
                continue
            flat = _flat_index(tuple(ref.shape), param_indices(self.spec, key, selection), ref.device)
            self.sums[key].view(-1).index_add_(0, flat, (v * w).reshape(-1))
            self.counts[key].view(-1).index_add_(0, flat, w.reshape(-1))

    def _to_elementwise(self, key: str) -> None:
        if key in self.counts:
            return
        ref = self.reference[key]
        if key in self.sums:  # switch a dense running sum to element-wise counting
            self.counts[key] = torch.full(ref.shape, self.scalar_counts.pop(key), dtype=torch.float64,
                                          device=ref.device)
        else:
            self.sums[key] = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
            self.counts[key] = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)

    def result(self) -> Weights:
        """The averaged global weights; untouched elements (and skipped keys) keep the reference value."""
        out = {}
        for key, ref in self.reference.items():
            s = self.sums.get(key)
            if s is None:
                out[key] = ref
                continue
            if key in self.counts:
                c = self.counts[key]
                avg = torch.where(c > 0, s / c.clamp_min(1e-300), ref.to(torch.float64))
            else:
                avg = s / self.scalar_counts[key]
            out[key] = avg.to(ref.dtype) if ref.is_floating_point() else avg.round().to(ref.dtype)
        return out
