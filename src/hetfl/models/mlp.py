"""Fully connected network: FedAvg's "2NN" (McMahan et al. 2017) by default."""

from collections import OrderedDict

from torch import nn

from hetfl.data.base import DataInfo
from hetfl.models.registry import MODELS, check_width, image_shape, parse_sizes, scaled


@MODELS.register("mlp")
def mlp(info: DataInfo, *, width: float = 1.0, hidden: str = "200,200") -> nn.Module:
    """Fully connected net (FedAvg's 2NN: 200-200 ReLU); hidden sizes scale with width."""
    width = check_width(width)
    sizes = [scaled(h, width) for h in parse_sizes("mlp", "hidden", hidden)]
    c, h, w = image_shape("mlp", info)[0]
    layers: list[tuple[str, nn.Module]] = [("flatten", nn.Flatten())]
    fan_in = c * h * w
    for i, size in enumerate(sizes, start=1):
        layers += [(f"fc{i}", nn.Linear(fan_in, size)), (f"relu{i}", nn.ReLU())]
        fan_in = size
    layers.append(("out", nn.Linear(fan_in, info.num_classes)))
    return nn.Sequential(OrderedDict(layers))
