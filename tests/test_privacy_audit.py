"""The canary audit (hetfl.privacy.audit): its statistics, and the three checks of issue 37 on the round step
itself (no noise: a large epsilon; noise secretly divided by 10: flagged; the configured noise: below the
accountant).  The mechanism runs canaries alone (small vectors) so the tests stay fast; the noise is
reproducible here so that each test is one fixed draw."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import norm

from hetfl.privacy.plan import PrivacyPlan

pytest.importorskip("dp_accounting")

from hetfl.privacy.audit import (  # noqa: E402
    audit_mechanism,
    audit_run,
    gaussian_epsilon,
    one_run_lower_bound,
    two_gaussian_delta,
)

CANARIES, DIM = 1000, 10_000


def _plan(z: float, cls: type = PrivacyPlan, q: float = 1.0) -> PrivacyPlan:
    return cls(noise_multiplier=z, clip=1.0, delta=1e-5, sampling_rate=q, eligible=(), rounds=1,
               reproducible_noise=True)


class SecretlyWeak(PrivacyPlan):
    """A broken mechanism: the accountant is told z, the noise is z / 10."""

    @property
    def update_noise(self) -> float:
        return super().update_noise / 10.0


def test_no_noise_reports_a_large_epsilon():
    r = audit_mechanism(_plan(0.0), CANARIES, DIM, rounds=1)
    assert r["epsilon_accountant"] == math.inf
    assert r["epsilon_lower_bound"] > 3.0  # every confident guess right
    assert r["epsilon_estimate"] > 20.0


def test_noise_secretly_divided_by_ten_is_flagged():
    r = audit_mechanism(_plan(3.0, SecretlyWeak), CANARIES, DIM, rounds=1)
    assert r["epsilon_lower_bound"] > r["epsilon_accountant"]  # a 95 % lower bound above the claim: caught
    assert r["epsilon_estimate"] > 3 * r["epsilon_accountant"]


@pytest.mark.parametrize("q, rounds", [(1.0, 1), (0.5, 3)])
def test_configured_noise_stays_below_the_accountant(q, rounds):
    r = audit_mechanism(_plan(3.0, q=q), CANARIES, DIM, rounds=rounds)
    assert 0.0 <= r["epsilon_lower_bound"] < r["epsilon_accountant"] <= r["epsilon_rdp"]


# ---------------------------------------------------------------------------------------------- statistics
def test_one_run_bound_without_delta_has_its_closed_form():
    """r guesses, all right, delta = 0: p(eps) = sigmoid(eps)^r, so the bound solves sigmoid(eps)^r = level."""
    scores = np.r_[np.arange(100, 0, -1), -np.arange(1, 101)].astype(float)
    inserted = np.r_[np.ones(100, bool), np.zeros(100, bool)]
    r = one_run_lower_bound(scores, inserted, delta=0.0, significance=0.05)
    level = 0.05 / 14  # 7 guess counts (2, 4, 10, 20, 40, 100, 200) x (one-sided, two-sided)
    q = level ** (1.0 / r["guesses"])
    assert r["correct"] == r["guesses"] == 200
    assert r["epsilon_lower_bound"] == pytest.approx(math.log(q / (1 - q)), rel=1e-6)
    assert one_run_lower_bound(scores, ~inserted, delta=1e-5)["epsilon_lower_bound"] == 0.0  # scores say nothing


def test_two_gaussians_of_equal_variance_are_the_gaussian_mechanism():
    """N(mu, 1) against N(0, 1): delta(eps) = Phi(mu/2 - eps/mu) - e^eps Phi(-mu/2 - eps/mu)."""
    mu = 1.3
    eps = gaussian_epsilon(mu, 1.0, 0.0, 1.0, 1e-5)
    exact = norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu)
    assert exact == pytest.approx(1e-5, rel=1e-3)
    assert two_gaussian_delta(eps, mu, 1.0, 0.0, 1.0) == pytest.approx(1e-5, rel=1e-3)


# ---------------------------------------------------------------------------------------------- in a run
def test_canaries_in_a_heterofl_run_live_on_their_slices(tmp_path, digits_cfg, monkeypatch):
    """In a real run the canaries go through the round step like clients: clipped to exactly C, the outer-ring
    canaries on coordinates only the widest clients hold."""
    from hetfl.privacy import audit, mechanism

    seen = []
    original = mechanism.clip_update

    def spy(delta, clip):
        out = original(delta, clip)
        seen.append(math.sqrt(sum(float((v ** 2).sum()) for v in out[0].values())))
        return out

    monkeypatch.setattr(mechanism, "clip_update", spy)
    made = {}
    kinds = audit.canary_kinds

    def keep(dp, state, flat):
        made["kinds"] = kinds(dp, state, flat)
        return made["kinds"]

    monkeypatch.setattr(audit, "canary_kinds", keep)
    cfg = digits_cfg("rounds=2", 'algorithm={name="heterofl", clients_per_round=3}', 'fleet.source="tiers"',
                     'fleet.mix="a-b"', "privacy.clip=0.5", "privacy.noise_multiplier=1.0")
    r = audit_run(cfg, tmp_path / "r", canaries=90)
    supports, names, _hosts = made["kinds"]
    assert names == ["full w1", "ring w1-w0.5", "inner w0.5"]
    full, ring, inner = supports
    assert bool((ring & inner).sum() == 0) and bool((ring | inner).eq(full).all())  # a-b: ring + half = all
    assert r["canary_participations"] > 0 and set(r["kinds"]) == set(names)
    assert sum(n == pytest.approx(0.5) for n in seen) >= r["canary_participations"]  # canaries: exactly C
    assert r["epsilon_accountant"] == pytest.approx(r["epsilon_pld"]) and r["epsilon_pld"] < r["epsilon_rdp"]
    assert torch.isfinite(torch.tensor(r["epsilon_estimate"]))
