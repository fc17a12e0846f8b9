"""The one width mechanism: a spec derived from the model, index policies, extract / scatter-aggregate.

:func:`spec_for` derives (and caches) the width spec of a registered model; :func:`group_sizes`
gives the channels of every group in the same model built at a smaller width, checked against the
spec.  See :mod:`hetfl.hetero.spec`, :mod:`hetfl.hetero.policy`, :mod:`hetfl.hetero.extract`.
"""

from __future__ import annotations

from functools import lru_cache
from typing import TYPE_CHECKING

import torch

from hetfl.data.base import DataInfo
from hetfl.hetero.spec import WidthSpec, WidthSpecError, derive_spec

if TYPE_CHECKING:
    from hetfl.algorithms.base import ModelRef


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
    small = _scaled_ref(ref, rate).build(info)
    return spec.group_sizes_of(small, where=f"({ref.name} at rate {rate:g})")


def _scaled_ref(ref: ModelRef, rate: float) -> ModelRef:
    from dataclasses import replace

    return replace(ref, width=ref.width * rate)


def submodel_ref(ref: ModelRef, rate: float) -> ModelRef:
    """The ModelRef a client of this rate builds: the same model at ``rate`` times the global width."""
    return ref if rate == 1.0 else _scaled_ref(ref, rate)


__all__ = ["WidthSpec", "WidthSpecError", "derive_spec", "example_input", "group_sizes", "spec_for", "submodel_ref"]
