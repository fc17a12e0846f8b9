"""Resolve ``[privacy]`` against the run before round 1: who can honour it, q, delta, the noise.

:func:`plan_privacy` is called by the runner's ``prepare`` (so a bad combination fails before any file
is written) and returns a :class:`PrivacyPlan`, or None when the section asks for nothing.  The plan
is a pure value (it travels in :class:`~hetfl.algorithms.base.Context`), from which every round's
sampling, clipping, noise and epsilon follow.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetfl.errors import ConfigError
from hetfl.privacy.accountant import epsilon, noise_for_epsilon, require_dp_accounting
from hetfl.privacy.config import PrivacyConfig

REPRODUCIBLE_WARNING = ("hetfl: warning: privacy.reproducible_noise = true: the DP noise and client sampling are "
                        "derived from the run seed, so anyone who knows it can remove the noise; for tests and "
                        "studies only, never for a release")


@dataclass(frozen=True)
class PrivacyPlan:
    """The resolved ``[privacy]`` of one run."""

    noise_multiplier: float  # z (derived from target_epsilon when that was given)
    clip: float | None  # C (None: no clipping, only with z = 0)
    delta: float
    sampling_rate: float  # q: probability that an eligible client joins a round
    eligible: tuple[int, ...]  # the clients that may be sampled (all, or those FedAvg's min_width admits)
    rounds: int
    accountant: str = "pld"
    sampling: str = "poisson"
    target_epsilon: float | None = None
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float = 0.0  # sigma_b: std of the noise on the clipped-count sum (adaptive clipping)
    reproducible_noise: bool = False  # noise and Poisson draw from (seed, round) instead of the OS: tests only

    @property
    def update_noise(self) -> float:
        """z_update: the update's own noise multiplier.  With adaptive clipping the count query takes its share:
        z_update = (z^-2 - (2 sigma_b)^-2)^(-1/2), so the two releases together are one Gaussian of multiplier z
        (the count sums b_k - 1/2, of sensitivity 1/2)."""
        z = self.noise_multiplier
        if not self.adaptive_clip or z <= 0.0:
            return z
        return (z ** -2 - (2.0 * self.count_noise) ** -2) ** -0.5

    def epsilon(self, rounds_done: int, accountant: str | None = None) -> float:
        """Epsilon at ``delta`` after ``rounds_done`` rounds by ``accountant`` (default: the run's; inf without
        noise).  ``"rdp"`` costs microseconds; ``"pld"`` about half a second (it is recomposed every call)."""
        if self.noise_multiplier <= 0.0:
            return math.inf
        return epsilon(self.sampling_rate, self.noise_multiplier, int(rounds_done), self.delta,
                       accountant or self.accountant)

    def summary(self, rounds_done: int) -> dict[str, Any]:
        """The ``privacy`` entry of summary.json (epsilon null = no guarantee, i.e. infinite)."""
        out: dict[str, Any] = {
            "epsilon": self.epsilon(rounds_done),
            "accountant": self.accountant,  # made "epsilon" and, with a target, calibrated "noise_multiplier"
            "epsilon_rdp": self.epsilon(rounds_done, "rdp"),  # the RDP upper bound (every round's row carries it)
            "delta": self.delta,
            "noise_multiplier": self.noise_multiplier,
            "noise_multiplier_from": (f"target_epsilon, calibrated with {self.accountant}"
                                      if self.target_epsilon is not None else "config"),
            "clip": self.clip,
            "sampling": self.sampling,
            "sampling_rate": self.sampling_rate,
            "expected_clients_per_round": self.sampling_rate * len(self.eligible),
            "rounds_accounted": int(rounds_done),
            "unit": "client, zero-out (one client's updates replaced by zeros; the number of clients is public)",
            "noise_source": "seed (reproducible_noise: NOT private)" if self.reproducible_noise else "os entropy",
        }
        if self.reproducible_noise:
            out["reproducible_noise"] = True
        if self.target_epsilon is not None:
            out["target_epsilon"] = self.target_epsilon
        if self.adaptive_clip:
            out.update(adaptive_clip=True, target_quantile=self.target_quantile, clip_lr=self.clip_lr,
                       count_noise=self.count_noise, update_noise_multiplier=self.update_noise)
        return out


def eligible_clients(algorithm: Any, ctx: Any) -> np.ndarray:
    """The clients the algorithm may sample: FedAvg's ``min_width`` drops the clients that cannot afford it."""
    min_width = float(getattr(algorithm, "min_width", 0.0) or 0.0)
    if min_width > 0 and ctx.fleet is not None:
        return np.flatnonzero(ctx.fleet.max_width >= min_width - 1e-12)
    return np.arange(ctx.num_clients)


def check_algorithm(cfg: PrivacyConfig, algorithm_name: str, algorithm: Any, min_clients: int = 1) -> None:
    """A ConfigError if an active ``[privacy]`` cannot be honoured by the algorithm (checked before any data)."""
    if not cfg.active:
        return
    why = getattr(algorithm, "private_refusal", None)  # the algorithm's own reason, if it releases more than updates
    if why:
        raise ConfigError(f"[privacy] cannot be honoured by algorithm {algorithm_name!r}: {why}. Client-level DP "
                          f"covers every algorithm whose clients release only their model updates (see "
                          f"docs/privacy.md)")
    if getattr(algorithm, "aggregator", "mean") != "mean":
        raise ConfigError(f"[privacy] needs algorithm.aggregator = \"mean\" (the noise is calibrated to a sum of "
                          f"clipped updates), got {algorithm.aggregator!r}")
    if min_clients > 1:
        raise ConfigError(f"[privacy] needs faults.min_clients = 1, got {min_clients}: skipping a round because few "
                          f"clients reported depends on who took part, which the accountant does not model (under "
                          f"[privacy] the noisy aggregate is released every round)")


def plan_privacy(cfg: PrivacyConfig, algorithm: Any, algorithm_name: str, ctx: Any, rounds: int,
                 min_clients: int = 1) -> PrivacyPlan | None:
    """Check ``[privacy]`` against the algorithm and federation and resolve it (None: the section is inactive)."""
    if not cfg.active:
        return None
    check_algorithm(cfg, algorithm_name, algorithm, min_clients)
    n = ctx.num_clients
    if cfg.delta >= 1.0 / n:
        raise ConfigError(f"privacy.delta={cfg.delta:g} must be below 1 / number of clients = 1/{n} = {1.0 / n:.3g} "
                          f"(a delta that large allows releasing one client's data outright); the usual choice is "
                          f"well below, e.g. 1e-5")
    eligible = eligible_clients(algorithm, ctx)
    q = min(1.0, algorithm.clients_for(n) / max(len(eligible), 1))
    z = cfg.noise_multiplier
    if cfg.target_epsilon is not None or z > 0:
        require_dp_accounting()
        if cfg.target_epsilon is not None:
            z = noise_for_epsilon(cfg.target_epsilon, q, rounds, cfg.delta, cfg.accountant, cfg.max_noise_multiplier)
    sigma_b = cfg.count_noise if cfg.count_noise is not None else q * len(eligible) / 20.0
    if cfg.adaptive_clip and z > 0 and z >= 2.0 * sigma_b:
        raise ConfigError(f"privacy.adaptive_clip: the noise multiplier z={z:.4g} must be below 2 x count_noise = "
                          f"{2.0 * sigma_b:.4g} (the count query takes part of the budget: z_update = (z^-2 - "
                          f"(2 count_noise)^-2)^(-1/2)); raise privacy.count_noise or sample more clients per round")
    if cfg.reproducible_noise:  # every run says so, on one line
        print(REPRODUCIBLE_WARNING, file=sys.stderr, flush=True)
    return PrivacyPlan(noise_multiplier=z, clip=cfg.clip, delta=cfg.delta, sampling_rate=q,
                       eligible=tuple(int(c) for c in eligible), rounds=rounds, accountant=cfg.accountant,
                       sampling=cfg.sampling, target_epsilon=cfg.target_epsilon, adaptive_clip=cfg.adaptive_clip,
                       target_quantile=cfg.target_quantile, clip_lr=cfg.clip_lr, count_noise=sigma_b,
                       reproducible_noise=cfg.reproducible_noise)


def check_resume(saved: PrivacyConfig, saved_rounds: int, rounds: int) -> None:
    """A run whose noise was derived from ``target_epsilon`` over its rounds cannot be extended: the
    rounds already done were noised for the old count, so the target would no longer hold."""
    if saved.target_epsilon is not None and rounds != saved_rounds:
        raise ConfigError(f"this run derived its noise from privacy.target_epsilon={saved.target_epsilon:g} over "
                          f"rounds={saved_rounds}; resuming with rounds={rounds} would break that target. Resume with "
                          f"rounds={saved_rounds}, or start a new run")


__all__ = ["REPRODUCIBLE_WARNING", "PrivacyPlan", "check_algorithm", "check_resume", "eligible_clients",
           "plan_privacy"]
