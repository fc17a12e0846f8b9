"""ScaleFL (Ilhan, Su, Liu, CVPR 2023): every level scales width and depth at once, exits distil from the deepest.

A composition of the depth mechanism (:class:`~hetfl.algorithms.depthfl.MultiExitFL`: width x depth
levels, per-element averaging unweighted by sample count, as ScaleFL's ``average_weights``) and ScaleFL's
local loss.  For the local exits ``j = 1..L`` (``L`` the deepest the client holds):

* the deepest exit's loss is CE; every earlier exit's is CE + gamma * T^2 * KL(softmax(z_L / T) || softmax(z_j / T));
* exit j's loss is weighted by j, and the sum divided by L (L + 1) / 2;
* the KL term applies only after ``kd_start`` of the rounds (25 %).

As in the authors' code (not as in textbook KD) the teacher logits z_L are *not* detached, so the KL
gradient also reaches the deepest exit, and the KL is averaged over batch x classes (``reduction="mean"``),
i.e. 1/classes of the per-sample KL.  Defaults: T = 3; gamma = 0.05, the value the README passes (the code's
own default is 0, which switches distillation off); levels = the code's defaults, widths
0.7/0.7/0.75/1 with 1/2/3/4 of 4 exits.  Channel selection is the prefix (HeteroFL's), not ScaleFL's
gradient-traceback ranking, which was not read.
"""

from __future__ import annotations

from dataclasses import dataclass

from hetfl.algorithms.depthfl import MultiExitFL
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.errors import ConfigError
from hetfl.hetero.losses import DepthWeightedKD, LossRule


@ALGORITHMS.register("scalefl")
@dataclass(frozen=True)
class ScaleFL(MultiExitFL):
    """ScaleFL: width x depth levels, exits weighted by depth, distillation from the deepest local exit."""

    levels: str = "1x1,0.75x0.75,0.7x0.5,0.7x0.25"
    kd_gamma: float = 0.05  # weight of the KL term (0: off)
    temperature: float = 3.0
    kd_start: float = 0.25  # fraction of the rounds after which the KL term applies

    def __post_init__(self) -> None:
        if self.kd_gamma < 0 or self.temperature <= 0 or not 0 <= self.kd_start <= 1:
            raise ConfigError("algorithm.kd_gamma must be >= 0, algorithm.temperature > 0 and algorithm.kd_start "
                              "in [0, 1]")
        super().__post_init__()

    def default_loss(self) -> LossRule:
        """ScaleFL's own rule from its fields (hetfl.hetero.losses.DepthWeightedKD)."""
        return DepthWeightedKD(gamma=self.kd_gamma, temperature=self.temperature, start=self.kd_start)
