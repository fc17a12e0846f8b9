"""Weights packed in one flat buffer: a dict of tensors that are views of one storage, side by side.

A model's weights are a handful of tensors; per-tensor work (a copy, a clone, a reduction) costs a few
microseconds of Python and dispatch per tensor and call, which a small model pays many times per
client.  When every tensor of a weights dict is a contiguous view of the *same* storage with the same
dtype, laid out close together (gaps of :data:`MAX_GAP` elements per tensor at most, in all, e.g.
alignment padding), the whole dict is also one flat 1-D tensor, its :func:`span`, and elementwise work can be done
on the span in one call.  Results are element for element those of the per-tensor loop: the gaps are
computed on and then ignored.
"""

from __future__ import annotations

import weakref

import torch

Weights = dict[str, torch.Tensor]
Offsets = tuple[tuple[str, int, tuple[int, ...]], ...]  # (key, offset in the span, shape), in dict order

#: Elements allowed between the tensors of a span (alignment padding), per tensor; more and the dict is
#: not packed.
MAX_GAP = 64


#: Spans of dicts made by :func:`views`, by ``id`` of their first tensor (an entry leaves with that
#: tensor): (keys, weak references to every tensor, flat, offsets).  A dict whose keys and tensors are
#: still those gets its span without inspecting every tensor's storage again (~10 us per tensor and call).
_KNOWN: dict[int, tuple] = {}


def span(weights: Weights) -> tuple[torch.Tensor, Offsets] | None:
    """``(flat, offsets)`` if ``weights`` is packed (see the module docstring), else ``None``.

    ``flat`` is a 1-D view covering every tensor (and the gaps between them); ``offsets`` says where
    each key lies in it, and identifies the layout: two packed dicts with equal offsets can be
    combined elementwise through their spans.
    """
    if not weights:
        return None
    known = _KNOWN.get(id(next(iter(weights.values()))))
    if known is not None:
        keys, refs, flat, offsets = known
        if len(weights) == len(refs) and all(r() is t for r, t in zip(refs, weights.values())) \
                and tuple(weights) == keys:
            return flat, offsets
    first = next(iter(weights.values()))
    dtype = first.dtype
    try:
        ptr = first.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # a tensor without storage (e.g. a functional wrapper)
        return None
    lo, hi, numel = None, 0, 0
    starts = []
    for t in weights.values():
        if t.dtype != dtype or t.device != first.device or not t.is_contiguous() \
                or t.untyped_storage().data_ptr() != ptr:
            return None
        o = t.storage_offset()
        starts.append(o)
        lo = o if lo is None else min(lo, o)
        hi = max(hi, o + t.numel())
        numel += t.numel()
    assert lo is not None
    if hi - lo > numel + MAX_GAP * len(weights):
        return None
    flat = first.detach().as_strided((hi - lo,), (1,), lo)
    offsets = tuple((k, o - lo, tuple(t.shape)) for (k, t), o in zip(weights.items(), starts))
    return flat, offsets


def views(flat: torch.Tensor, offsets: Offsets) -> Weights:
    """The weights dict of ``offsets`` over ``flat`` (a span, or a tensor laid out like one)."""
    out = {}
    lo, hi = None, 0
    for key, off, shape in offsets:
        n = 1
        for s in shape:
            n *= s
        out[key] = flat[off:off + n].view(shape)
        lo = off if lo is None else min(lo, off)
        hi = max(hi, off + n)
    if out and lo == 0 and hi == flat.numel() and flat.dim() == 1 and flat.is_contiguous():
        tensors = list(out.values())  # exactly what span() would find: remember it while the first tensor lives
        key = id(tensors[0])
        refs = (weakref.ref(tensors[0], lambda _, key=key: _KNOWN.pop(key, None)),
                *(weakref.ref(t) for t in tensors[1:]))
        _KNOWN[key] = (tuple(out), refs, flat, offsets)
    return out


def clone(weights: Weights) -> Weights:
    """A detached copy of ``weights``: one copy of the span when packed (and packed again), else per tensor."""
    packed = span(weights)
    if packed is None:
        return {k: v.detach().clone() for k, v in weights.items()}
    flat, offsets = packed
    return views(flat.clone(), offsets)


def empty_like(weights: Weights, device: torch.device | str | None = None) -> Weights:
    """An uninitialised packed dict with the keys, shapes and dtype of ``weights`` (one buffer, no gaps), on
    ``device`` (default: theirs); ``weights`` of mixed dtypes or devices get one tensor per key instead."""
    values = list(weights.values())
    if not values or any(v.dtype != values[0].dtype or v.device != values[0].device for v in values):
        return {k: torch.empty(v.shape, dtype=v.dtype, device=device or v.device) for k, v in weights.items()}
    offsets, pos = [], 0
    for k, v in weights.items():
        offsets.append((k, pos, tuple(v.shape)))
        pos += v.numel()
    return views(torch.empty(pos, dtype=values[0].dtype, device=device or values[0].device), tuple(offsets))
