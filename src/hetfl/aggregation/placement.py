"""Where one client's result lands in the server's models: a :class:`Placement` of :class:`Piece` s.

An algorithm's aggregation does one thing of its own: it says, for every tensor a client sent back, which
elements of which server model it covers (the whole tensor, a slice given by flat positions, or the
elements of a mask) and with what weight.  Reducing the placed results (weighted mean, coordinate-wise
median or trimmed mean) and privatising them (clipping, noise, fixed denominators) are written once, in
:mod:`hetfl.aggregation.reducers` and :mod:`hetfl.privacy.mechanism`, for every algorithm.

A *footprint* is a placement without values: which elements a client *would* hold.  Differential privacy
needs them for clients that did not report (the expected number of contributors of every element).
"""

from __future__ import annotations

from collections.abc import Hashable
from dataclasses import dataclass, field

import torch

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Piece:
    """One client tensor placed in a server tensor.

    ``value``: the client's tensor (``None`` in a footprint).  ``index``: the flat positions in the server
    tensor of ``value``'s elements, in ``value``'s row-major order (``None``: ``value`` has the server
    tensor's shape and covers it whole).  ``mask``: which of ``value``'s elements the client holds (bool,
    ``value``'s shape; public: it follows from the global model and the client's level, never from its data).
    ``share``: a per-element weight factor that depends on the client's data (HeteroFL's classifier rule:
    only the rows of labels the client holds); reducers use it, differential privacy must not (its
    denominators may not depend on who holds which label) and ignores it.
    """

    value: torch.Tensor | None = None
    index: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    share: torch.Tensor | None = None
    shape: tuple[int, ...] | None = None  # the placed shape when ``value`` is None (a footprint of a slice)

    @property
    def whole(self) -> bool:
        """Covers every element of its server tensor with the same weight."""
        return self.index is None and self.mask is None and self.share is None

    def coverage(self, reference: torch.Tensor) -> torch.Tensor:
        """Bool tensor of the server tensor's shape: the elements this piece holds (its public footprint)."""
        if self.mask is not None:
            held = self.mask.to(device=reference.device, dtype=torch.bool)
        else:
            held = torch.ones(self._shape(reference), dtype=torch.bool, device=reference.device)
        if self.index is None:
            return held.reshape(reference.shape).clone()
        out = torch.zeros(reference.shape, dtype=torch.bool, device=reference.device)
        out.view(-1)[self.index.to(reference.device)] = held.reshape(-1)
        return out

    def gather(self, reference: torch.Tensor) -> torch.Tensor:
        """The server tensor's values at this piece's elements, in ``value``'s shape."""
        if self.index is None:
            return reference
        return reference.reshape(-1)[self.index.to(reference.device)].view(self._shape(reference))

    def scatter(self, values: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """``values`` (this piece's shape) placed in a zero tensor of the server tensor's shape."""
        if self.index is None:
            return values.reshape(reference.shape)
        out = torch.zeros(reference.shape, dtype=values.dtype, device=reference.device)
        out.view(-1)[self.index.to(reference.device)] = values.to(reference.device).reshape(-1)
        return out

    def _shape(self, reference: torch.Tensor) -> tuple[int, ...]:
        if self.value is not None:
            return tuple(self.value.shape)
        if self.shape is not None:
            return self.shape
        if self.index is None:
            return tuple(reference.shape)
        return (int(self.index.numel()),)


@dataclass
class Placement:
    """One client's result in server coordinates: pieces of one server model, and the client's weight.

    ``model``: the key of ``ServerState.models`` the pieces land in ("global", or an architecture family's
    key).  ``weight``: the client's weight in a mean (its sample count, or 1 for an unweighted average).
    ``signature``: in a footprint, a hashable name of the elements it covers (equal signatures, equal
    coverage), so expected coverage is computed once per distinct footprint.
    """

    pieces: dict[str, Piece]
    model: str = "global"
    weight: float = 1.0
    signature: Hashable = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def whole(self) -> bool:
        return all(p.whole for p in self.pieces.values())


def whole(weights: Weights, model: str = "global", weight: float = 1.0, signature: Hashable = "whole",
          keys=None) -> Placement:
    """Every tensor of ``weights`` (or only ``keys``) covering its server tensor whole."""
    keys = weights.keys() if keys is None else keys
    return Placement({k: Piece(weights[k]) for k in keys}, model, weight, signature)


def footprint_of(reference: Weights, keys=None, model: str = "global", signature: Hashable = "whole") -> Placement:
    """The footprint of a client that holds ``keys`` (default: every floating tensor) of ``reference`` whole."""
    keys = [k for k, v in reference.items() if v.is_floating_point()] if keys is None else keys
    return Placement({k: Piece() for k in keys}, model, 1.0, signature)


def level_key(key: str, label: str) -> str:
    """The server key of ``key``'s copy that belongs to the level ``label`` alone (``"bn1.weight@w0.5d0.5"``)."""
    return f"{key}@{label}"


def level_view(weights: Weights, owned: frozenset[str], label: str) -> Weights:
    """``weights`` as the level ``label`` sees them: every key in ``owned`` read from that level's own copy, under
    its plain name (so width specs and model state dicts apply unchanged); the other keys shared."""
    if not owned:
        return weights
    return {**{k: v for k, v in weights.items() if "@" not in k},
            **{k: weights[level_key(k, label)] for k in owned if level_key(k, label) in weights}}


def owned_by_level(placement: Placement, owned: frozenset[str], label: str) -> Placement:
    """Per-level pieces: the pieces of keys in ``owned`` land in the level's own copies (``level_key``), so they are
    averaged only over clients of that level; the other pieces are shared as placed."""
    if not owned or not owned & placement.pieces.keys():
        return placement
    pieces = {(level_key(k, label) if k in owned else k): p for k, p in placement.pieces.items()}
    signature = None if placement.signature is None else (placement.signature, label)
    return Placement(pieces, placement.model, placement.weight, signature, placement.extra)


__all__ = ["Piece", "Placement", "footprint_of", "level_key", "level_view", "owned_by_level", "whole"]
