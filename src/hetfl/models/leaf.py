"""LEAF's FEMNIST CNN (Caldas et al. 2018): FedAvg's CNN layout with a 2048-unit dense layer.

Two 5x5 convolutions (32, 64 channels, "same" padding), each followed by ReLU and a 2x2 max-pool, a dense
layer of 2048 units and the classifier (62 classes on FEMNIST): 6.6M parameters at width 1.  It is
:func:`hetfl.models.cnn.cnn` with ``fc = 2048``; registered under its own name so that a FEMNIST config
says which published model it runs.
"""

from torch import nn

from hetfl.data.base import DataInfo
from hetfl.models.cnn import cnn
from hetfl.models.registry import MODELS


@MODELS.register("leaf_cnn")
def leaf_cnn(info: DataInfo, *, width: float = 1.0, conv1: int = 32, conv2: int = 64, fc: int = 2048) -> nn.Module:
    """LEAF's FEMNIST CNN: two 5x5 conv (32, 64) + 2x2 max-pool, fc 2048; channels scale with width."""
    return cnn(info, width=width, conv1=conv1, conv2=conv2, fc=fc)
