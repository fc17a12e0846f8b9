"""Element-level submodels by importance (FIARSE): magnitude masks, thresholds, the TCB-GD gradient.

A client of capacity ``r`` (a fraction of the maskable parameters) trains the elements of the global
model whose magnitude reaches a threshold ``tau``: the ``r`` share of largest ``|theta|``.  Maskable are
the weights and biases of Linear and Conv layers and the rows of embeddings; norms and other tensors are
always kept whole (FIARSE excludes BatchNorm).  ``tau`` is derived from the current global weights each
round (``"global"``: one top-k over all maskable elements, FIARSE's default code path; ``"tensor"``: a top-k
per tensor, close to its layer-wise variant); capacity 1 means no threshold at all, the dense model.

In training the forward pass uses ``theta * 1[|theta| >= tau]`` recomputed from the *current* weights at
every step with the round's fixed ``tau``, so an entry that shrinks below it drops out.  The gradient is
the threshold-aware rule of FIARSE's code (TCB-GD): the mask's surrogate derivative with respect to
``|theta|`` is ``2 tau / (|theta| + tau)^2``, so a kept entry receives ``g * (1 + 2 tau |theta| / (|theta| + tau)^2)``
(between 1 and 1.5) and a masked entry 0.  We took this from the code reading recorded in the design
notes; the paper's own formula was not checked against it.

What a masked submodel saves: its *parameters and bytes* (kept values plus a one-bit-per-element mask,
when sent sparse) -- and not its *FLOPs* on dense hardware: the client holds and multiplies full-size
tensors with zeros in them, so compute and activation memory are those of the dense model.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from hetfl.aggregation import Piece, Placement

Weights = dict[str, torch.Tensor]
MASKABLE = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding)
THRESHOLDS = ("global", "tensor")


def maskable_keys(model: nn.Module) -> tuple[str, ...]:
    """Parameter names whose elements an importance mask may drop (Linear/Conv weights and biases, embeddings)."""
    out = []
    for name, m in model.named_modules():
        if isinstance(m, MASKABLE):
            for p, value in m.named_parameters(recurse=False):
                if value is not None:
                    out.append(f"{name}.{p}" if name else p)
    return tuple(out)


def _kth_largest(values: torch.Tensor, k: int) -> float:
    k = min(max(k, 1), values.numel())
    return float(torch.topk(values, k, sorted=False).values.min())


def thresholds(weights: Weights, keys: Iterable[str], capacity: float, mode: str = "global") -> dict[str, float]:
    """``tau`` per maskable tensor for ``capacity`` (fraction of the maskable elements kept); empty at capacity 1."""
    keys = list(keys)
    if capacity >= 1.0 or not keys:
        return {}
    if mode == "global":
        flat = torch.cat([weights[k].detach().abs().reshape(-1).float() for k in keys])
        tau = _kth_largest(flat, int(capacity * flat.numel()))
        return dict.fromkeys(keys, tau)
    if mode == "tensor":
        return {k: _kth_largest(weights[k].detach().abs().reshape(-1).float(), int(capacity * weights[k].numel()))
                for k in keys}
    raise ValueError(f"threshold mode must be one of {', '.join(THRESHOLDS)}, got {mode!r}")


def masks(weights: Weights, taus: dict[str, float]) -> dict[str, torch.Tensor]:
    """The kept elements: ``|theta| >= tau`` for every thresholded tensor."""
    return {k: weights[k].abs() >= tau for k, tau in taus.items()}


def masked_weights(weights: Weights, taus: dict[str, float]) -> Weights:
    """The submodel as dense tensors: dropped elements set to 0 (what a client of that capacity evaluates)."""
    m = masks(weights, taus)
    return {k: (v * m[k].to(v.dtype) if k in m else v) for k, v in weights.items()}


class TCBMask(torch.autograd.Function):
    """``theta * 1[|theta| >= tau]`` forward; FIARSE's threshold-controlled biased gradient backward."""

    @staticmethod
    def forward(ctx, theta: torch.Tensor, tau: float) -> torch.Tensor:  # noqa: ANN001
        keep = theta.abs() >= tau
        ctx.save_for_backward(theta, keep)
        ctx.tau = tau
        return theta * keep.to(theta.dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        theta, keep = ctx.saved_tensors
        a, tau = theta.abs(), ctx.tau
        factor = 1.0 + 2.0 * tau * a / (a + tau) ** 2
        return grad * factor * keep.to(grad.dtype), None


class MaskedForward:
    """A ``forward(model, x)`` for :func:`hetfl.train.local_sgd`: the model run with TCB-masked parameters."""

    def __init__(self, taus: dict[str, float]) -> None:
        self.taus = taus

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        params = dict(model.named_parameters())
        masked = {k: TCBMask.apply(params[k], tau) for k, tau in self.taus.items()}
        return torch.func.functional_call(model, masked, (x,))


def place_masked(weights: Weights, kept: dict[str, torch.Tensor], weight: float = 1.0, public: bool = True,
                 model: str = "global") -> Placement:
    """A client's (full-shape) weights placed on the elements its masks keep (:mod:`hetfl.aggregation`).

    Tensors without a mask are placed whole, as FedAvg's are, so clients that all hold everything reduce to
    FedAvg's average bit for bit.  ``public``: the masks follow from the global model and the capacity (a
    footprint); else they depend on the client's training (FIARSE's "nonzero" count) and are a data-dependent
    ``share``, which differential privacy does not use.
    """
    pieces = {}
    for key, value in weights.items():
        m = kept.get(key)
        if m is None:
            pieces[key] = Piece(value)
        elif public:
            pieces[key] = Piece(value, mask=m)
        else:
            pieces[key] = Piece(value, share=m)
    return Placement(pieces, model, weight)


def mask_footprint(reference: Weights, kept: dict[str, torch.Tensor], signature, model: str = "global") -> Placement:
    """The footprint of a client whose masks keep ``kept`` (floating tensors without a mask: whole)."""
    return Placement({k: Piece(mask=kept.get(k)) for k, v in reference.items() if v.is_floating_point()}, model,
                     1.0, signature)


def sparse_bytes(weights: Weights, taus: dict[str, float]) -> tuple[int, int]:
    """(kept parameter elements, bytes to send them sparse: kept values + a 1-bit mask per maskable element,
    plus every unmasked tensor whole)."""
    m = masks(weights, taus)
    kept = nbytes = 0
    for k, v in weights.items():
        if k in m:
            n = int(m[k].sum())
            kept += n
            nbytes += n * v.element_size() + math.ceil(v.numel() / 8)
        else:
            kept += v.numel() if v.is_floating_point() else 0
            nbytes += v.numel() * v.element_size()
    return kept, nbytes


__all__ = ["MaskedForward", "TCBMask", "mask_footprint", "masked_weights", "maskable_keys", "masks", "place_masked",
           "sparse_bytes",
           "thresholds"]
