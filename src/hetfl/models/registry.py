"""The model registry and the few helpers every model family shares.

A model entry is a factory ``fn(info, *, width=1.0, **own_params) -> nn.Module``.  Its own parameters
are keyword-only, annotated with ``int``, ``float``, ``bool`` or ``str`` and have defaults, so the
config layer can check a user's values against the signature.  A factory builds an ordinary module
whose hidden channel counts are ``scaled(C, width)``: exactly the counts a prefix slice at rate
``width`` of the full model keeps.  Models hold no heterogeneity code; slicing is derived elsewhere.

The model modules do not use ``from __future__ import annotations``, so ``inspect.signature`` of a
factory shows real types (``int``, not ``"int"``).
"""

import inspect
import math
import numbers
from collections.abc import Callable
from typing import Any

from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.registry import Registry

ModelFactory = Callable[..., nn.Module]

MODELS: Registry[ModelFactory] = Registry("model")

_SIMPLE_TYPES = (int, float, bool, str)

#: A factory sets this attribute (True) on a module whose training is faster with ``channels_last``
#: weights on the CPU; ``train.memory_format = "auto"`` then trains it so (hetfl.train).
PREFERS_CHANNELS_LAST = "hetfl_prefers_channels_last"


def scaled(channels: int, width: float) -> int:
    """Channels kept at ``width``: ``max(1, ceil(width * channels))`` (HeteroFL's prefix size)."""
    # Round away float noise first: 0.07 * 100 is 7.000000000000001 in IEEE doubles, whose ceil would keep 8
    # channels, not 7 (0.3 * 10, by contrast, is exactly 3.0).
    return max(1, math.ceil(round(width * channels, 9)))


def check_width(width: float) -> float:
    """Return ``width`` as a float if it lies in (0, 1]; raise :class:`ConfigError` otherwise."""
    if isinstance(width, bool) or not isinstance(width, numbers.Real) or not 0.0 < width <= 1.0:
        raise ConfigError(f"model.width must be in (0, 1], got {width!r}")
    return float(width)


def check_choice(model: str, field: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        choices = ", ".join(repr(a) for a in allowed)
        raise ConfigError(f"model.{field} of {model!r} must be one of {choices}, got {value!r}")
    return value


def check_positive(model: str, field: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"model.{field} of {model!r} must be a positive integer, got {value!r}")
    return value


def parse_sizes(model: str, field: str, text: str) -> tuple[int, ...]:
    """Parse a comma-separated list of positive ints such as ``"200,200"`` (empty string: none)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        sizes = ()
        parts = ["bad"]
    if len(sizes) != len(parts) or any(s < 1 for s in sizes):
        raise ConfigError(
            f"model.{field} of {model!r} must be comma-separated positive integers like '200,200', "
            f"got {text!r}"
        )
    return sizes


def image_shape(model: str, info: DataInfo) -> tuple[tuple[int, int, int], nn.Module | None]:
    """The (C, H, W) a conv model sees, and a module reshaping the data's rows into it (or None).

    Images ``(C, H, W)`` pass unchanged; ``(H, W)`` becomes ``(1, H, W)``; flat features ``(d,)``
    become a one-row image ``(1, 1, d)``.  Token datasets are refused.
    """
    if info.vocab_size is not None:
        raise ConfigError(
            f"model {model!r} needs image or feature inputs, but this is a token (text) dataset "
            f"(vocab_size={info.vocab_size}); use 'lstm' or 'transformer'"
        )
    shape = tuple(int(s) for s in info.input_shape)
    if not 1 <= len(shape) <= 3 or any(s < 1 for s in shape):
        raise ConfigError(
            f"model {model!r} takes inputs shaped (C, H, W), (H, W) or (d,), got {info.input_shape}"
        )
    if len(shape) == 3:
        return (shape[0], shape[1], shape[2]), None
    if len(shape) == 2:  # rows (n, H, W) -> (n, 1, H, W)
        return (1, shape[0], shape[1]), nn.Unflatten(1, (1, shape[0]))
    return (1, 1, shape[0]), nn.Unflatten(1, (1, 1, shape[0]))  # rows (n, d) -> (n, 1, 1, d)


def token_shape(model: str, info: DataInfo) -> tuple[int, int]:
    """``(seq_len, vocab_size)`` of a token dataset; other datasets are refused."""
    if info.vocab_size is None:
        raise ConfigError(
            f"model {model!r} needs a token dataset (e.g. shakespeare) with integer ids, but this "
            f"dataset has float inputs of shape {tuple(info.input_shape)}; use 'mlp', 'cnn', "
            f"'heterofl_conv' or 'resnet'"
        )
    if len(info.input_shape) != 1 or info.input_shape[0] < 1:
        raise ConfigError(f"model {model!r} takes token inputs shaped (seq_len,), got {info.input_shape}")
    return int(info.input_shape[0]), int(info.vocab_size)


def norm2d(kind: str, channels: int, *, track_stats: bool = True, gn_groups: int = 1) -> nn.Module:
    """A 2-d normalisation layer: ``"bn"``, ``"gn"`` (gcd(gn_groups, channels) groups) or ``"none"``."""
    if kind == "bn":
        return nn.BatchNorm2d(channels, track_running_stats=track_stats)
    if kind == "gn":
        return nn.GroupNorm(math.gcd(gn_groups, channels), channels)
    return nn.Identity()


def count_parameters(model: nn.Module) -> int:
    """Number of parameter elements (shared parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def model_params(name: str) -> dict[str, inspect.Parameter]:
    """The user-settable parameters of model ``name`` (everything but ``info``), by name."""
    factory = MODELS.get(name, "model.name")
    sig = inspect.signature(factory, eval_str=True)
    return {k: p for k, p in sig.parameters.items() if p.kind is inspect.Parameter.KEYWORD_ONLY}


def _check_type(name: str, field: str, value: Any, annotation: Any) -> None:
    if annotation not in _SIMPLE_TYPES:
        return
    if annotation is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    elif annotation is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, annotation)
    if not ok:
        raise ConfigError(
            f"model.{field} of {name!r} must be of type {annotation.__name__}, "
            f"got {value!r} ({type(value).__name__})"
        )


def build_model(name: str, info: DataInfo, *, width: float = 1.0, **params: Any) -> nn.Module:
    """Build model ``name`` for ``info`` at ``width``; unknown or mistyped params raise ConfigError."""
    width = check_width(width)
    allowed = model_params(name)
    for key, value in params.items():
        if key not in allowed or key == "width":
            known = ", ".join(k for k in allowed if k != "width") or "none"
            raise ConfigError(f"model {name!r} has no parameter {key!r}; its parameters: {known}")
        _check_type(name, key, value, allowed[key].annotation)
    return MODELS.get(name, "model.name")(info, width=width, **params)
