"""Plain convolutional nets: FedAvg's MNIST CNN and HeteroFL's 4-block conv net."""

from collections import OrderedDict

from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.models.registry import (
    MODELS,
    PREFERS_CHANNELS_LAST,
    check_choice,
    check_positive,
    check_width,
    image_shape,
    norm2d,
    parse_sizes,
    scaled,
)


def _pool2(h: int, w: int) -> tuple[nn.Module, int, int]:
    """A 2x2 max-pool that leaves a dimension of size 1 alone; returns it and the output size."""
    kh, kw = (2 if h >= 2 else 1), (2 if w >= 2 else 1)
    if kh == kw == 1:
        return nn.Identity(), h, w
    return nn.MaxPool2d((kh, kw)), h // kh, w // kw


def _with_adapter(adapter: nn.Module | None, layers: list[tuple[str, nn.Module]]) -> nn.Sequential:
    if adapter is not None:
        layers.insert(0, ("reshape", adapter))
    return nn.Sequential(OrderedDict(layers))


@MODELS.register("cnn")
def cnn(info: DataInfo, *, width: float = 1.0, conv1: int = 32, conv2: int = 64, fc: int = 512) -> nn.Module:
    """FedAvg's MNIST CNN: two 5x5 conv (32, 64) + 2x2 max-pool, fc 512; channels scale with width."""
    width = check_width(width)
    (c, h, w), adapter = image_shape("cnn", info)
    c1 = scaled(check_positive("cnn", "conv1", conv1), width)
    c2 = scaled(check_positive("cnn", "conv2", conv2), width)
    f1 = scaled(check_positive("cnn", "fc", fc), width)
    pool1, h, w = _pool2(h, w)
    pool2, h, w = _pool2(h, w)
    net = _with_adapter(
        adapter,
        [
            ("conv1", nn.Conv2d(c, c1, 5, padding=2)),
            ("relu1", nn.ReLU()),
            ("pool1", pool1),
            ("conv2", nn.Conv2d(c1, c2, 5, padding=2)),
            ("relu2", nn.ReLU()),
            ("pool2", pool2),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c2 * h * w, f1)),
            ("relu3", nn.ReLU()),
            ("fc2", nn.Linear(f1, info.num_classes)),
        ],
    )
    # its 5x5 convolutions train 1.25-1.4x faster in channels_last on the CPU (oneDNN; hetfl.train)
    setattr(net, PREFERS_CHANNELS_LAST, True)
    return net


@MODELS.register("simple_cnn")
def simple_cnn(info: DataInfo, *, width: float = 1.0, conv1: int = 32, conv2: int = 64, fc: int = 128) -> nn.Module:
    """pfl-research's benchmark CNN: two unpadded 3x3 conv (32, 64), one 2x2 max-pool, dropout 0.25, fc 128,
    dropout 0.5; Glorot-uniform weights.  1.63 M parameters on 32x32x3 (its CIFAR-10 benchmark model)."""
    width = check_width(width)
    (c, h, w), adapter = image_shape("simple_cnn", info)
    c1 = scaled(check_positive("simple_cnn", "conv1", conv1), width)
    c2 = scaled(check_positive("simple_cnn", "conv2", conv2), width)
    f1 = scaled(check_positive("simple_cnn", "fc", fc), width)
    k1 = (min(3, h), min(3, w))  # a dimension narrower than the kernel (feature rows) is not convolved
    h, w = h - k1[0] + 1, w - k1[1] + 1
    k2 = (min(3, h), min(3, w))
    h, w = h - k2[0] + 1, w - k2[1] + 1
    pool, h, w = _pool2(h, w)
    net = _with_adapter(
        adapter,
        [
            ("conv1", nn.Conv2d(c, c1, k1)),
            ("relu1", nn.ReLU()),
            ("conv2", nn.Conv2d(c1, c2, k2)),
            ("relu2", nn.ReLU()),
            ("pool", pool),
            ("drop1", nn.Dropout(0.25)),
            ("flatten", nn.Flatten()),
            ("fc1", nn.Linear(c2 * h * w, f1)),
            ("relu3", nn.ReLU()),
            ("drop2", nn.Dropout(0.5)),
            ("fc2", nn.Linear(f1, info.num_classes)),
        ],
    )
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
    return net


@MODELS.register("heterofl_conv")
def heterofl_conv(
    info: DataInfo,
    *,
    width: float = 1.0,
    hidden: str = "64,128,256,512",
    norm: str = "bn",
    bn_track_stats: bool = True,
    gn_groups: int = 1,
) -> nn.Module:
    """HeteroFL's conv net: 3x3 conv-norm-ReLU blocks 64-128-256-512, max-pools, global pool, linear."""
    width = check_width(width)
    (c, h, w), adapter = image_shape("heterofl_conv", info)
    check_choice("heterofl_conv", "norm", norm, ("bn", "gn", "none"))
    check_positive("heterofl_conv", "gn_groups", gn_groups)
    sizes = [scaled(s, width) for s in parse_sizes("heterofl_conv", "hidden", hidden)]
    if not sizes:
        raise ConfigError("model.hidden of 'heterofl_conv' needs at least one size, e.g. '64,128,256,512'")
    layers: list[tuple[str, nn.Module]] = []
    fan_in = c
    for i, size in enumerate(sizes, start=1):
        layers += [
            (f"conv{i}", nn.Conv2d(fan_in, size, 3, padding=1)),
            (f"norm{i}", norm2d(norm, size, track_stats=bn_track_stats, gn_groups=gn_groups)),
            (f"relu{i}", nn.ReLU()),
        ]
        if i < len(sizes):
            pool, h, w = _pool2(h, w)
            layers.append((f"pool{i}", pool))
        fan_in = size
    layers += [
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("fc", nn.Linear(fan_in, info.num_classes)),
    ]
    return _with_adapter(adapter, layers)
