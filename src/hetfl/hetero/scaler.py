"""HeteroFL's Scaler: in training, a narrow client's activations are divided by its rate.

HeteroFL places the Scaler between a sliced parametric layer and the normalisation after it, y = φ(norm(
Scaler(xW + b))), at every such layer (the first conv included) and never on the output layer; in
evaluation it is the identity.  :func:`scaler_layers` derives those places from the width spec, so a new
model needs no Scaler code; :func:`scaler_absorbed` says whether a model's norms absorb the train-only factor
at evaluation (the ``scaler = "auto"`` rule).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from hetfl.hetero.spec import WidthSpec


def scaler_layers(spec: WidthSpec) -> tuple[str, ...]:
    """The layers whose training output the Scaler divides by the rate.

    In a model with normalisation layers: the hidden Linear/Conv layers that a norm reads directly.  A
    model without norms has no such place; there the Scaler acts where the norm would be, after every
    hidden Linear/Conv (HeteroFL's configuration without norms).  Never the output layer.  (A norm that
    reads a residual sum, as in a pre-activation ResNet's blocks or a transformer, is left alone: a norm
    cancels a constant factor on its input in training anyway.)
    """
    return spec.normalised if spec.has_norms else spec.hidden_outputs


class Scaler:
    """The Scaler as forward hooks: in training mode, the outputs of ``module_names`` are divided by ``rate``."""

    def __init__(self, model: nn.Module, module_names: Sequence[str], rate: float) -> None:
        self.handles = []
        if rate == 1.0:
            return
        modules = dict(model.named_modules())
        scale = 1.0 / rate

        def hook(mod: nn.Module, inp: object, out: torch.Tensor) -> torch.Tensor:
            return out * scale if mod.training else out

        for name in module_names:
            self.handles.append(modules[name].register_forward_hook(hook))

    def __enter__(self) -> Scaler:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def scaler_absorbed(model: nn.Module, static_bn: bool) -> bool:
    """Whether the model's norms absorb the Scaler's train-only factor at evaluation.

    The Scaler divides activations by the rate in training only.  HeteroFL's models follow every scaled
    layer with static BatchNorm, whose statistics are recomputed at evaluation from unscaled activations,
    so evaluation sees correctly normalised features.  That holds when the model has BatchNorm layers and
    each of them either keeps no running statistics (batch statistics at evaluation too) or has them
    recomputed at evaluation (``static_bn``).  Without such norms (an MLP, FedAvg's CNN) the biases are
    not scaled with the weights, so a narrow submodel evaluated without the factor is mis-scaled (on MNIST
    with the 200-200 MLP the 1/16 submodel evaluated at chance with the Scaler, ~90 % without).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return bool(norms) and all(static_bn or not m.track_running_stats for m in norms)
