"""Shared-memory weight buffers between the parent and its worker processes (:mod:`hetfl.engines.pool`).

A *layout* is the keys, shapes and dtypes of a task's weights (one per submodel shape).  A shared file
holds one buffer pair for a layout: the task's weights *in* and the result *out* (a chunk of ``k`` clients
trained batched gets ``k`` copies of the layout out, client after client, so each client's result is one
packed span, :mod:`hetfl.packed`).  Both processes map the file with ``torch.from_file(shared=True)`` and
get tensor views of every entry; the file is unlinked as soon as both have mapped it.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile

import torch

_ALIGN = 64
Layout = tuple[tuple[str, tuple[int, ...], torch.dtype], ...]
Views = dict[str, torch.Tensor]


def layout_of(weights: dict[str, torch.Tensor]) -> Layout:
    return tuple((k, tuple(v.shape), v.dtype) for k, v in weights.items())


def _shm_dir() -> str:
    return "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else tempfile.gettempdir()


def _offsets(layout: Layout) -> tuple[list[int], int]:
    offs, pos = [], 0
    for _, shape, dtype in layout:
        offs.append(pos)
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        pos += (nbytes + _ALIGN - 1) // _ALIGN * _ALIGN
    return offs, max(pos, _ALIGN)



def _views(buf: torch.Tensor, base: int, layout: Layout) -> Views:
    offs, _ = _offsets(layout)
    views = {}
    for (key, shape, dtype), off in zip(layout, offs):
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        views[key] = buf[base + off:base + off + nbytes].view(dtype).view(shape)
    return views


def group_layout(layout: Layout, k: int) -> Layout:
    """The result buffer of a chunk of ``k`` clients: ``k`` copies of ``layout``, client after client, so
    that each client's weights are packed (one span, :mod:`hetfl.packed`)."""
    return tuple((f"{c}/{key}", shape, dtype) for c in range(k) for key, shape, dtype in layout)


def client_views(out: Views, layout: Layout, c: int) -> Views:
    """Client ``c``'s weights in the result buffer of a chunk (:func:`group_layout`)."""
    return {key: out[f"{c}/{key}"] for key, _, _ in layout}


def map_views(path: str, layout: Layout, out_layout: Layout | None = None) -> tuple[Views, Views]:
    """Map the shared file at ``path``: views of the task's weights (in, ``layout``) and of the
    result's (out, ``out_layout``; by default the same layout)."""
    out_layout = layout if out_layout is None else out_layout
    total_in, total_out = _offsets(layout)[1], _offsets(out_layout)[1]
    buf = torch.from_file(path, shared=True, size=total_in + total_out, dtype=torch.uint8)
    return _views(buf, 0, layout), _views(buf, total_in, out_layout)


def create_shared(layout: Layout, out_layout: Layout | None = None) -> tuple[str, Views, Views]:
    """A new shared file for ``layout`` in and ``out_layout`` out (a name to hand to the worker), mapped."""
    out_layout = layout if out_layout is None else out_layout
    fd, path = tempfile.mkstemp(prefix="hetfl-w-", dir=_shm_dir())
    try:
        os.ftruncate(fd, _offsets(layout)[1] + _offsets(out_layout)[1])
    finally:
        os.close(fd)
    return (path, *map_views(path, layout, out_layout))


def unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
