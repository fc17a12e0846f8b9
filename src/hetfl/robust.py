"""Robust, coordinate-wise reducers over client updates that may cover only part of a tensor.

A width-sliced client (HeteroFL, FjORD, FedRolex) updates only a slice of each global tensor, so an
element of the global model is covered by some clients and not others.  :func:`robust_reduce` takes
the stacked client values scattered into the global shape plus a coverage mask, and reduces every
element over the clients that cover it:

* ``"median"``: the coordinate-wise median (the mean of the two middle values for an even count);
* ``"trimmed_mean"``: drop ``floor(trim × k)`` of the smallest and of the largest of the ``k``
  covering values, average the rest (``trim`` in [0, 0.5); ``trim = 0`` is the plain mean).

Both are unweighted (a client's sample count gives it no extra say, which is the point).  Elements
covered by no client are returned in ``covered`` as ``False`` so the caller keeps the old value there.

Memory: unlike the streaming mean (one running sum), a robust reducer needs every client's value of
a tensor at once: stacking ``n`` clients costs ``n ×`` the tensor's size (plus a sorted copy and a
float64 copy of one tensor while reducing); :func:`robust_average` reduces one tensor at a time, so
the peak is ``n ×`` the model (the held results) ``+ ~3 n ×`` its largest tensor.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch

from hetfl.errors import ConfigError

METHODS = ("median", "trimmed_mean")

__all__ = ["METHODS", "check_method", "robust_average", "robust_reduce"]


def check_method(method: str, trim: float, where: str = "algorithm") -> None:
    """Config check of ``{where}.aggregator`` (``"mean"`` or one of :data:`METHODS`) and ``{where}.trim``;
    raises :class:`~hetfl.errors.ConfigError` naming the field, the value and what is allowed."""

    if method not in ("mean", *METHODS):
        raise ConfigError(f"{where}.aggregator must be one of 'mean', {', '.join(map(repr, METHODS))}, got {method!r}")
    if isinstance(trim, bool) or not 0.0 <= trim < 0.5:
        raise ConfigError(f"{where}.trim must be in [0, 0.5) (the share cut from each end), got {trim!r}")


def robust_reduce(values: torch.Tensor, mask: torch.Tensor | None = None, method: str = "median",
                  trim: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """Reduce ``values`` of shape ``(n, *shape)`` over its first dimension, element by element.

    ``mask`` (bool, same shape as ``values``, or broadcastable to it, or ``None`` = all covered) marks
    which client covers which element; uncovered values are ignored whatever they hold.  Returns
    ``(reduced, covered)``: ``reduced`` has shape ``shape`` and the dtype of ``values`` (integers are
    rounded), ``covered`` is a bool tensor of shape ``shape``, ``False`` where no client covers the
    element (``reduced`` holds 0 there: keep the old value).
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if not 0.0 <= trim < 0.5:
        raise ValueError(f"trim must be in [0, 0.5), got {trim!r}")
    if values.dim() < 1 or values.shape[0] < 1:
        raise ValueError("values must have a leading client dimension of size >= 1")
    n = values.shape[0]
    vals = values.detach().to(torch.float64)
    if mask is None:
        m = torch.ones_like(vals, dtype=torch.bool)
    else:
        m = torch.broadcast_to(mask.to(device=vals.device, dtype=torch.bool), vals.shape)
    k = m.sum(dim=0)  # covering clients per element
    covered = k > 0
    # uncovered entries sort to the end; the first k sorted entries are the covering values
    ordered = torch.sort(torch.where(m, vals, torch.full_like(vals, float("inf"))), dim=0).values
    if method == "median":
        lo = ((k - 1).clamp(min=0) // 2).unsqueeze(0)
        hi = (k // 2).clamp(max=n - 1).unsqueeze(0)
        out = (ordered.gather(0, lo) + ordered.gather(0, hi)).squeeze(0) / 2
    else:
        cut = torch.floor(k.to(torch.float64) * trim).to(torch.long)
        pos = torch.arange(n, device=vals.device).view(-1, *([1] * (vals.dim() - 1)))
        keep = (pos >= cut) & (pos < k - cut)
        total = torch.where(keep, ordered, torch.zeros_like(ordered)).sum(dim=0)
        out = total / (k - 2 * cut).clamp(min=1)
    out = torch.where(covered, out, torch.zeros_like(out))
    if values.dtype.is_floating_point:
        return out.to(values.dtype), covered
    return out.round().to(values.dtype), covered


def robust_average(updates: Iterable[Mapping[str, torch.Tensor]], method: str = "median",
                   trim: float = 0.1) -> dict[str, torch.Tensor]:
    """Coordinate-wise robust aggregate of full-shape client weights (every client covers everything).

    Returns ``{}`` when there are no updates.  Holds every update (see the module's memory note).
    """
    held = list(updates)
    if not held:
        return {}
    out = {}
    for key in held[0]:
        stacked = torch.stack([u[key].detach() for u in held])
        out[key], _ = robust_reduce(stacked, None, method, trim)
        del stacked
    return out
