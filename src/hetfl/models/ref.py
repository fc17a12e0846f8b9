"""A reference to a network: a registered model name, its width and its own parameters."""

from dataclasses import dataclass
from typing import Any

from torch import nn

from hetfl.data.base import DataInfo
from hetfl.models.registry import build_model

Params = tuple[tuple[str, Any], ...]


@dataclass(frozen=True)
class ModelRef:
    """Which network a client trains: a registered model name, its width and its own params."""

    name: str
    width: float = 1.0
    params: Params = ()

    def build(self, info: DataInfo) -> nn.Module:
        return build_model(self.name, info, width=self.width, **dict(self.params))

    def __str__(self) -> str:
        extra = "".join(f",{k}={v}" for k, v in self.params)
        return f"{self.name}@{self.width:g}{extra}"
