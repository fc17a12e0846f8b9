"""Plain ``nn.Module`` models with a width multiplier, looked up by name in :data:`MODELS`.

Registered: ``mlp``, ``cnn``, ``simple_cnn``, ``leaf_cnn``, ``heterofl_conv``, ``resnet`` (image or feature
inputs) and ``lstm``, ``transformer`` (token inputs); ``multi_exit`` (:mod:`hetfl.hetero.multi_exit`) wraps any
of them cut in depth, with early exits.  Build one with :func:`build_model`.
"""

from hetfl.models import cnn, leaf, lstm, mlp, resnet, transformer  # noqa: F401  (registers the families)
from hetfl.models.ref import ModelRef
from hetfl.models.registry import (
    MODELS,
    build_model,
    check_width,
    count_parameters,
    model_params,
    scaled,
)

__all__ = ["MODELS", "ModelRef", "build_model", "check_width", "count_parameters", "model_params", "scaled"]
