"""Train-time augmentation of image minibatches (``train.augment``), seeded per client task.

``crop_flip`` is the standard CIFAR recipe: pad each image by 4 pixels with zeros (in the normalised
space: the training mean), take a random 32x32 crop, and flip it horizontally with probability 1/2.
The random numbers come from a generator seeded with the client task's seed, which the round derives
from ``(seed, round, client)``: every engine and a resumed run draw the same crops for the same task,
and the batch order (a separate generator) is the same with augmentation on or off.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hetfl.errors import ConfigError

__all__ = ["AUGMENTATIONS", "check_augment", "crop_flip", "make_augment"]

Augment = Callable[[torch.Tensor], torch.Tensor]
#: a constant mixed into the task seed, so the augmentation stream differs from the batch-order stream
_STREAM = 0x6175_676D


def crop_flip(x: torch.Tensor, gen: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crops of the zero-padded images (same size as ``x``) and random horizontal flips."""
    n, _, h, w = x.shape
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    flip = torch.rand(n, generator=gen) < 0.5
    rows = dy[:, None] + torch.arange(h)
    cols = dx[:, None] + torch.arange(w)
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    dev = x.device
    padded = F.pad(x, (pad, pad, pad, pad))
    batch = torch.arange(n, device=dev)[:, None, None, None]
    chan = torch.arange(x.shape[1], device=dev)[None, :, None, None]
    return padded[batch, chan, rows.to(dev)[:, None, :, None], cols.to(dev)[:, None, None, :]]


AUGMENTATIONS: dict[str, Callable[[torch.Tensor, torch.Generator], torch.Tensor]] = {"crop_flip": crop_flip}


def make_augment(name: str, seed: int) -> Augment | None:
    """The augmentation ``name`` bound to a generator seeded from the task ``seed``; ``None`` for "none"."""
    if name == "none":
        return None
    fn = AUGMENTATIONS[name]
    gen = torch.Generator().manual_seed((int(seed) ^ _STREAM) & 0x7FFF_FFFF_FFFF_FFFF)
    return lambda x: fn(x, gen)


def check_augment(name: str, input_shape: tuple[int, ...]) -> None:
    """Raise :class:`ConfigError` unless ``name`` is known and fits inputs of ``input_shape``."""
    if name != "none" and name not in AUGMENTATIONS:
        raise ConfigError(f"train.augment must be 'none' or one of {', '.join(map(repr, AUGMENTATIONS))}, "
                          f"got {name!r}")
    if name != "none" and len(input_shape) != 3:
        raise ConfigError(f"train.augment = {name!r} needs image inputs (channels, height, width); this "
                          f"dataset's inputs are shaped {tuple(input_shape)}")
