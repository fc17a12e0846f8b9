"""The ``[privacy]`` section: client-level DP-FedAvg (McMahan et al., 2018) for mean-aggregating algorithms.

A leaf module (imports only :mod:`hetfl.errors`), wired into :class:`hetfl.config.RunConfig` like
``[faults]``.  Checks that need the federation or the algorithm (delta against the number of clients,
the algorithm's support, a reachable target epsilon) are in :mod:`hetfl.privacy.plan`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from hetfl.errors import ConfigError

SAMPLING = ("poisson",)
ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: clip every client's update, add Gaussian noise to their sum, account with dp-accounting.

    * ``clip``: L2 bound C on each client's update (result minus the weights it was sent), over the
      tensors the server releases; unset = no clipping (then ``noise_multiplier`` must be 0).
    * ``noise_multiplier``: z; the sum of clipped updates gets N(0, (z C)^2) per element.
    * ``target_epsilon``: instead of ``noise_multiplier``: the smallest z (up to ``max_noise_multiplier``)
      whose epsilon after ``rounds`` rounds at ``delta`` is at most this, found before round 1.
    * ``delta``: the delta of the reported epsilon; must be below 1 / number of clients.
    * ``sampling``: ``"poisson"``: every round each client joins independently with probability
      q = (the algorithm's clients per round) / (clients), which is what the accountant analyses.
    * ``accountant``: ``"rdp"`` (Renyi DP of the sampled Gaussian; fast) or ``"pld"`` (privacy loss
      distributions; tighter, slower), both from dp-accounting.
    * ``adaptive_clip`` (Andrew et al., 2021): ``clip`` is the initial C; every round C follows the
      ``target_quantile`` of the update norms, ``C <- C exp(-clip_lr (b - target_quantile))`` with ``b`` the
      noised fraction of updates within C.  The fraction's noise (std ``count_noise``, default the expected
      cohort / 20) and the update's noise share the budget: together they are one Gaussian release of
      multiplier ``noise_multiplier``, so epsilon is unchanged.

    A section asking for nothing (z = 0, no clip, no target) is inactive: the run is the non-private one.
    """

    noise_multiplier: float = 0.0
    clip: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_noise_multiplier: float = 50.0
    sampling: str = "poisson"
    accountant: str = "rdp"
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"privacy.{field} must be {allowed}, got {getattr(self, field)!r}")

        need(self.noise_multiplier >= 0.0, "noise_multiplier", ">= 0 (0 = no noise)")
        need(self.clip is None or (self.clip > 0.0 and math.isfinite(self.clip)), "clip",
             "> 0 (the L2 bound on one client's update; leave it unset for no clipping)")
        need(self.target_epsilon is None or self.target_epsilon > 0.0, "target_epsilon", "> 0")
        need(0.0 < self.delta < 1.0, "delta", "in (0, 1) and below 1 / number of clients")
        need(self.max_noise_multiplier > 0.0, "max_noise_multiplier", "> 0")
        need(self.sampling in SAMPLING, "sampling", f"one of {', '.join(map(repr, SAMPLING))}")
        need(self.accountant in ACCOUNTANTS, "accountant", f"one of {', '.join(map(repr, ACCOUNTANTS))}")
        need(0.0 < self.target_quantile < 1.0, "target_quantile", "in (0, 1)")
        need(self.clip_lr > 0.0, "clip_lr", "> 0")
        need(self.count_noise is None or self.count_noise > 0.0, "count_noise", "> 0 (std of the noise on the count)")
        if self.adaptive_clip and self.clip is None:
            raise ConfigError("privacy.adaptive_clip needs privacy.clip: the initial clipping norm")
        if self.target_epsilon is not None and self.noise_multiplier > 0.0:
            raise ConfigError("privacy.target_epsilon and privacy.noise_multiplier are alternatives: give one "
                              "(the noise multiplier is derived from the target before round 1)")
        if (self.noise_multiplier > 0.0 or self.target_epsilon is not None) and self.clip is None:
            raise ConfigError("privacy.noise_multiplier / privacy.target_epsilon need privacy.clip: the noise is "
                              "noise_multiplier x clip, calibrated to one client's clipped update")

    @property
    def active(self) -> bool:
        """Whether the section changes the round at all (clipping, noise or a target)."""
        return self.clip is not None or self.noise_multiplier > 0.0 or self.target_epsilon is not None
