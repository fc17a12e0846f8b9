"""A small pre-activation ResNet (He et al. 2016, "Identity Mappings") for small images."""

import torch
import torch.nn.functional as F
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.models.registry import (
    MODELS,
    check_choice,
    check_positive,
    check_width,
    image_shape,
    norm2d,
    parse_sizes,
    scaled,
)

# Blocks per stage for each depth.  HeteroFL's code calls [1, 1, 1, 2] "resnet18" (9.6M parameters on
# CIFAR10 at rate 1, the figure in its tables); get it with blocks="1,1,1,2".
_BLOCKS_PER_STAGE = {10: 1, 18: 2}


class PreActBlock(nn.Module):
    """norm-ReLU-conv3x3, norm-ReLU-conv3x3, plus the input (through a 1x1 conv when the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str, track_stats: bool, gn_groups: int):
        super().__init__()
        self.norm1 = norm2d(norm, cin, track_stats=track_stats, gn_groups=gn_groups)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.norm2 = norm2d(norm, cout, track_stats=track_stats, gn_groups=gn_groups)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.norm1(x))
        skip = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.norm2(out)))
        return out + skip


class PreActResNet(nn.Module):
    def __init__(
        self,
        in_shape: tuple[int, int, int],
        adapter: nn.Module | None,
        stages: list[int],
        blocks_per_stage: list[int],
        num_classes: int,
        norm: str,
        track_stats: bool,
        gn_groups: int,
    ):
        super().__init__()
        self.reshape = adapter if adapter is not None else nn.Identity()
        self.stem = nn.Conv2d(in_shape[0], stages[0], 3, stride=1, padding=1, bias=False)
        blocks: list[nn.Module] = []
        cin = stages[0]
        for s, cout in enumerate(stages):
            for b in range(blocks_per_stage[s]):
                stride = 2 if s > 0 and b == 0 else 1
                blocks.append(PreActBlock(cin, cout, stride, norm, track_stats, gn_groups))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.norm = norm2d(norm, cin, track_stats=track_stats, gn_groups=gn_groups)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.blocks(self.stem(self.reshape(x)))
        out = self.pool(F.relu(self.norm(out)))
        return self.fc(torch.flatten(out, 1))


@MODELS.register("resnet")
def resnet(
    info: DataInfo,
    *,
    width: float = 1.0,
    depth: int = 18,
    base_channels: int = 64,
    norm: str = "bn",
    bn_track_stats: bool = True,
    gn_groups: int = 1,
    blocks: str = "",
) -> nn.Module:
    """Pre-activation ResNet-18/10 for small images (stride-1 3x3 stem), stages 64-128-256-512 x width."""
    width = check_width(width)
    in_shape, adapter = image_shape("resnet", info)
    if blocks:
        per_stage = list(parse_sizes("resnet", "blocks", blocks))
        if len(per_stage) != 4:
            raise ConfigError(f"model.blocks of 'resnet' needs 4 block counts like '1,1,1,2', got {blocks!r}")
    elif depth in _BLOCKS_PER_STAGE:
        per_stage = [_BLOCKS_PER_STAGE[depth]] * 4
    else:
        raise ConfigError(f"model.depth of 'resnet' must be one of 10, 18, got {depth!r}")
    check_positive("resnet", "base_channels", base_channels)
    check_choice("resnet", "norm", norm, ("bn", "gn", "none"))
    check_positive("resnet", "gn_groups", gn_groups)
    stages = [scaled(base_channels * m, width) for m in (1, 2, 4, 8)]
    return PreActResNet(
        in_shape, adapter, stages, per_stage, info.num_classes, norm, bn_track_stats, gn_groups
    )
