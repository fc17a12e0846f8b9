"""Loss rules of the submodel methods: what a client minimises over its exits' logits.

Config: ``[algorithm] loss``, a registered name with its parameters, e.g. ``"exits"``,
``"mutual_kd(weight=1.0; rampup=300)"``.  The depth methods (:mod:`hetfl.algorithms.depthfl`) train a model
with an exit after every level's cut; the client's forward pass stacks the exits' logits, shallow first, as
``z`` of shape ``(exits, batch, classes)`` (one exit for a client that holds one).  A rule is a frozen
dataclass (its fields are its parameters) registered in :data:`LOSS_RULES`:

* :meth:`LossRule.weight` is the server's part: the distillation weight of round ``rnd`` (a ramp, a start
  round), shipped to the clients in their task;
* :meth:`LossRule.loss` is the client's part: ``loss(z, y)`` at that weight, with the labels the client holds
  (a bool per class) for rules that mask absent labels.

Registered: ``exits`` (cross-entropy of every exit, summed; ``masked = true`` sets the logits of labels
absent on the client to 0 first, HeteroFL's masked CE), ``mutual_kd`` (DepthFL: exits' CE plus mutual
distillation among the exits, its weight ramped up), ``depth_weighted_kd`` (ScaleFL: exits weighted by
depth, each distilled from the deepest).  A new rule is one dataclass and its registration here; every depth
method takes it through ``algorithm.loss``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from hetfl.errors import ConfigError
from hetfl.registry import Registry, build_entry

LOSS_RULES: Registry = Registry("loss rule")

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def masked_cross_entropy(mask: torch.Tensor) -> Loss:
    """Cross-entropy with the logits of classes absent on the client set to 0 (HeteroFL's rule)."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.masked_fill(~mask, 0.0), y)

    return loss


def mutual_kl(z: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """DepthFL's mutual distillation: for every exit i, the mean over the other exits j of
    KL(softmax(z_j / T) detached || softmax(z_i / T)) (summed over classes, averaged over the batch), times
    T^2, summed over i."""
    n = z.shape[0]
    logp = F.log_softmax(z / temperature, dim=-1)
    p = logp.detach().exp()
    total = z.new_zeros(())
    for i in range(n):
        for j in range(n):
            if i != j:
                total = total + F.kl_div(logp[i], p[j], reduction="batchmean") / (n - 1)
    return total * temperature**2


@dataclass(frozen=True)
class LossRule:
    """Base: the cross-entropy of every exit, summed (optionally with absent labels masked)."""

    masked: bool = False

    def weight(self, rnd: int, rounds: int) -> float:
        """The distillation weight clients use in round ``rnd`` (1-based) of ``rounds``; 0: none."""
        return 0.0

    def exit_ce(self, labels: torch.Tensor | None) -> Loss:
        ce = masked_cross_entropy(labels) if self.masked and labels is not None else F.cross_entropy

        def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            total = ce(z[0], y)
            for i in range(1, z.shape[0]):
                total = total + ce(z[i], y)
            return total

        return loss

    def loss(self, weight: float, labels: torch.Tensor | None = None) -> Loss:
        return self.exit_ce(labels)


@LOSS_RULES.register("exits")
@dataclass(frozen=True)
class ExitsCE(LossRule):
    """Every exit's cross-entropy, summed (InclusiveFL's one classifier is the one-exit case)."""


@LOSS_RULES.register("mutual_kd")
@dataclass(frozen=True)
class MutualKD(LossRule):
    """DepthFL: exits' CE + ``w(t)`` x mutual distillation, ``w(t) = weight exp(-5 (1 - min(t, R) / R)^2)``,
    t from 0, R = ``rampup`` rounds (0: the full weight at once); ``rampup_share`` > 0 scales the ramp to the
    run instead: R = that share of the run's rounds (DepthFL's 300 of its 1 000 rounds is 0.3), so a short run
    does not spend every round at a weight near 0."""

    weight_max: float = 1.0
    rampup: int = 300
    temperature: float = 1.0
    rampup_share: float = 0.0

    def __post_init__(self) -> None:
        if self.weight_max < 0 or self.rampup < 0 or self.temperature <= 0 or not 0 <= self.rampup_share <= 1:
            raise ConfigError("mutual_kd needs weight_max >= 0, rampup >= 0, temperature > 0 and rampup_share in "
                              "[0, 1]")

    def weight(self, rnd: int, rounds: int) -> float:
        ramp = max(1, round(self.rampup_share * rounds)) if self.rampup_share > 0 and rounds > 0 else self.rampup
        if self.weight_max == 0 or ramp == 0:
            return self.weight_max
        t = min(rnd - 1, ramp) / ramp
        return self.weight_max * math.exp(-5.0 * (1.0 - t) ** 2)

    def loss(self, weight: float, labels: torch.Tensor | None = None) -> Loss:
        ce = self.exit_ce(labels)
        if weight == 0:
            return ce
        temperature = self.temperature

        def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if z.shape[0] < 2:
                return ce(z, y)
            return ce(z, y) + weight * mutual_kl(z, temperature)

        return loss


@LOSS_RULES.register("depth_weighted_kd")
@dataclass(frozen=True)
class DepthWeightedKD(LossRule):
    """ScaleFL: exit j of L weighted by j (the sum divided by L (L + 1) / 2); every earlier exit adds
    ``gamma T^2 KL(softmax(z_L / T) || softmax(z_j / T))`` (teacher not detached, KL averaged over batch x
    classes, as ScaleFL's code) after ``start`` of the rounds."""

    gamma: float = 0.05
    temperature: float = 3.0
    start: float = 0.25

    def __post_init__(self) -> None:
        if self.gamma < 0 or self.temperature <= 0 or not 0 <= self.start <= 1:
            raise ConfigError("depth_weighted_kd needs gamma >= 0, temperature > 0 and start in [0, 1]")

    def weight(self, rnd: int, rounds: int) -> float:
        return self.gamma if rnd > self.start * rounds else 0.0

    def loss(self, weight: float, labels: torch.Tensor | None = None) -> Loss:
        gamma, temp = float(weight), self.temperature
        ce = masked_cross_entropy(labels) if self.masked and labels is not None else F.cross_entropy

        def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            n = z.shape[0]
            total = ce(z[n - 1], y) * float(n)
            for j in range(n - 1):
                term = ce(z[j], y)
                if gamma > 0:
                    teacher = F.log_softmax(z[n - 1] / temp, dim=-1)  # not detached, as in ScaleFL's code
                    kl = (teacher.exp() * (teacher - F.log_softmax(z[j] / temp, dim=-1))).mean()
                    term = term + gamma * temp**2 * kl
                total = total + term * float(j + 1)
            return total / (n * (n + 1) / 2)

        return loss


def loss_rule(text: str, where: str = "algorithm.loss") -> LossRule:
    """The loss rule named in ``text`` (``"exits"``, ``"mutual_kd(weight_max=0.5)"``, ...)."""
    return build_entry(LOSS_RULES, text, where)


__all__ = ["LOSS_RULES", "DepthWeightedKD", "ExitsCE", "LossRule", "MutualKD", "loss_rule", "masked_cross_entropy",
           "mutual_kl"]
