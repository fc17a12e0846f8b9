"""Width-sliced submodels, in parts that one algorithm composes.

* :mod:`~hetfl.hetero.spec` derives from a model which parameter dimensions slice together;
  :func:`spec_for` caches it and :func:`group_sizes` gives every group's channels at a smaller width.
* :mod:`~hetfl.hetero.policy`: the *index policy*, which channels a client of a given width keeps
  (``prefix``, ``rolling``, ``random``; :data:`~hetfl.hetero.policy.INDEX_POLICIES`).
* :mod:`~hetfl.hetero.sampling`: the *width schedule*, which width a client trains in a round (``max``,
  ``uniform``, ``mixture``, ``coverage``, ``adaptive``; :data:`~hetfl.hetero.sampling.WIDTH_SCHEDULES`).
* :mod:`~hetfl.hetero.ordered`: FjORD's ordered dropout, a nested width drawn per minibatch.
* :mod:`~hetfl.hetero.scaler`: HeteroFL's Scaler.
* :mod:`~hetfl.hetero.extract`: extract a submodel, average overlapping updates.

:func:`prefix_submodel` is the one way to get "the prefix submodel of width r" of a model's weights.
"""

from __future__ import annotations

from dataclasses import replace
from functools import lru_cache

import torch

from hetfl.data.base import DataInfo
from hetfl.hetero.extract import Weights, extract
from hetfl.hetero.policy import Prefix, Selection
from hetfl.hetero.spec import WidthSpec, WidthSpecError, derive_spec
from hetfl.models import ModelRef


def example_input(info: DataInfo, batch: int = 3) -> torch.Tensor:
    """A small deterministic batch of the dataset's input kind (token ids or floats)."""
    if info.vocab_size is not None:
        return torch.zeros((batch, *info.input_shape), dtype=torch.long)
    return torch.linspace(0, 1, batch * int(torch.tensor(info.input_shape).prod())).reshape(batch, *info.input_shape)


@lru_cache(maxsize=64)
def spec_for(ref: ModelRef, info: DataInfo) -> WidthSpec:
    return derive_spec(ref.build(info), example_input(info))


@lru_cache(maxsize=256)
def group_sizes(ref: ModelRef, info: DataInfo, rate: float) -> dict[int, int]:
    """Channels per group of ``ref`` built at ``rate`` times its width (as the model registry scales)."""
    if not 0 < rate <= 1:
        raise WidthSpecError(f"width rate must be in (0, 1], got {rate}")
    spec = spec_for(ref, info)
    small = replace(ref, width=ref.width * rate).build(info)
    return spec.group_sizes_of(small, where=f"({ref.name} at rate {rate:g})")


def submodel_ref(ref: ModelRef, rate: float) -> ModelRef:
    """The ModelRef a client of this rate builds: the same model at ``rate`` times the global width."""
    return ref if rate == 1.0 else replace(ref, width=ref.width * rate)


@lru_cache(maxsize=256)
def prefix_selection(ref: ModelRef, info: DataInfo, rate: float) -> Selection:
    """The channels the prefix submodel of ``rate`` keeps: the first ones of every group (nested widths)."""
    return Prefix().select(spec_for(ref, info).groups, group_sizes(ref, info, rate), rnd=0, client=0, seed=0)


def prefix_submodel(ref: ModelRef, info: DataInfo, weights: Weights, rate: float) -> tuple[ModelRef, Weights]:
    """The prefix submodel of width ``rate`` (relative to ``ref``): the ModelRef to build and its tensors,
    sliced from ``weights`` (``ref``'s state dict, or its live parameters: slicing keeps autograd)."""
    return submodel_ref(ref, rate), extract(weights, spec_for(ref, info), prefix_selection(ref, info, rate))


__all__ = ["WidthSpec", "WidthSpecError", "derive_spec", "example_input", "group_sizes", "prefix_selection",
           "prefix_submodel", "spec_for", "submodel_ref"]
