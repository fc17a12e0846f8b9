"""Epsilon of a DP-FedAvg run, from Google's ``dp-accounting`` (the optional extra ``hetfl[privacy]``).

One round of :mod:`hetfl.privacy.mechanism` is one Poisson-subsampled Gaussian mechanism: every client
joins with probability ``q``; the sum of the clipped updates (L2 sensitivity ``clip`` under adding or
removing one client) gets Gaussian noise of std ``z * clip``.  ``t`` rounds are its ``t``-fold
composition: dp-accounting's ``SelfComposedDpEvent(PoissonSampledDpEvent(q, GaussianDpEvent(z)), t)``
under the add-or-remove-one neighbouring relation (for a sum it is the zero-out relation the run uses:
a zeroed client adds nothing, exactly like an absent one), turned into epsilon at the run's delta by the
PLD accountant (the runs' default: the tight figure) or the RDP accountant (a looser upper bound that
costs microseconds, which every round's metrics row carries).

Epsilon is a pure function of ``(q, z, rounds done, delta)``: nothing is stored, so a resumed run
reports exactly what an uninterrupted one does.  Every round counts, including rounds in which no
client reported (the noise is released all the same).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from functools import lru_cache
from typing import Any

from hetfl.errors import ConfigError

EXTRA_HINT = "pip install 'hetfl[privacy]' (or: pip install dp-accounting)"


def require_dp_accounting() -> Any:
    """The ``dp_accounting`` module, or a ConfigError naming the extra that installs it."""
    try:
        import dp_accounting
    except ImportError:
        raise ConfigError(f"[privacy] accounts epsilon with Google's dp-accounting library, which is not installed: "
                          f"{EXTRA_HINT}") from None
    return dp_accounting


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """dp-accounting logs a warning for every fractional RDP order whose series does not converge (it then
    skips that order, which only loosens the bound); keep those out of the run's console."""
    log = logging.getLogger("absl")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def round_event(q: float, z: float) -> Any:
    """One round as a dp-accounting event: the Poisson-subsampled Gaussian."""
    dpa = require_dp_accounting()
    return dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))


def library_epsilon(q: float, z: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon after ``rounds`` rounds straight from dp-accounting (one composed event, no shortcut)."""
    if rounds <= 0 or q <= 0.0:
        return 0.0
    if z <= 0.0:
        return math.inf
    dpa = require_dp_accounting()
    acc = dpa.rdp.RdpAccountant() if accountant == "rdp" else dpa.pld.PLDAccountant()
    with _quiet():
        acc.compose(dpa.SelfComposedDpEvent(round_event(q, z), rounds))
        return float(acc.get_epsilon(delta))


@lru_cache(maxsize=64)
def _rdp_one_round(q: float, z: float) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """(orders, RDP of one round) from dp-accounting's RDP accountant, or None if it does not expose them."""
    dpa = require_dp_accounting()
    acc = dpa.rdp.RdpAccountant()
    with _quiet():
        acc.compose(round_event(q, z))
    orders, rdp = getattr(acc, "_orders", None), getattr(acc, "_rdp", None)
    if orders is None or rdp is None:
        return None
    return tuple(float(a) for a in orders), tuple(float(r) for r in rdp)


@lru_cache(maxsize=4096)
def epsilon(q: float, z: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon after ``rounds`` rounds; equal to :func:`library_epsilon` (tests/test_privacy.py checks it).

    RDP composes linearly, so for the RDP accountant the one-round RDP curve is computed once per
    ``(q, z)`` and scaled by the number of rounds before dp-accounting's own conversion to epsilon
    (``rdp_privacy_accountant.compute_epsilon``); that makes a per-round epsilon cost microseconds.
    """
    if rounds <= 0 or q <= 0.0:
        return 0.0
    if z <= 0.0:
        return math.inf
    if accountant == "rdp":
        one = _rdp_one_round(q, z)
        if one is not None:
            from dp_accounting.rdp.rdp_privacy_accountant import compute_epsilon

            orders, rdp = one
            with _quiet():
                return float(compute_epsilon(orders, [rounds * r for r in rdp], delta)[0])
    return library_epsilon(q, z, rounds, delta, accountant)


def noise_for_epsilon(target: float, q: float, rounds: int, delta: float, accountant: str = "rdp",
                      max_noise: float = 50.0, tolerance: float = 1e-3) -> float:
    """The smallest noise multiplier (to relative ``tolerance``, rounded up) whose epsilon after ``rounds``
    rounds is at most ``target``; a ConfigError with the best reachable epsilon if even ``max_noise``
    does not get there."""
    best = epsilon(q, max_noise, rounds, delta, accountant)
    if best > target:
        raise ConfigError(
            f"privacy.target_epsilon={target:g} cannot be reached in {rounds} rounds at sampling rate q={q:.4g} "
            f"and delta={delta:g} with any noise_multiplier <= privacy.max_noise_multiplier={max_noise:g}: the best "
            f"reachable epsilon is {best:.4g}. Raise the target, run fewer rounds, sample fewer clients per round "
            f"or raise privacy.max_noise_multiplier")
    if accountant == "rdp":
        return _bisect(lambda z: epsilon(q, z, rounds, delta, "rdp"), target, 0.0, max_noise, tolerance)
    # PLD: RDP overstates epsilon, so RDP's z is an upper end; bisect in a short bracket on a 10x coarser
    # loss grid (pessimistic, so never below the fine figure; 10x faster), then check with the library's own
    hi = noise_for_epsilon(target, q, rounds, delta, "rdp", max_noise, tolerance)
    coarse = lambda z: _pld_epsilon(q, z, rounds, delta, 1e-3)  # noqa: E731
    lo = 0.85 * hi  # PLD's z is 6-10 % below RDP's at the usual settings
    while lo > 1e-3 and coarse(lo) <= target:
        hi, lo = lo, 0.85 * lo
    z = _bisect(coarse, target, lo, hi, tolerance)
    while z < hi and epsilon(q, z, rounds, delta, accountant) > target:  # not seen; kept for safety
        z = min(hi, z * (1.0 + tolerance))
    return z


def _bisect(eps_of: Any, target: float, lo: float, hi: float, tolerance: float) -> float:
    """The upper end of a bisection for the smallest z with ``eps_of(z) <= target`` (``eps_of(hi)`` is)."""
    while hi - lo > tolerance * hi:
        mid = 0.5 * (lo + hi)
        if eps_of(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


@lru_cache(maxsize=256)
def _pld_epsilon(q: float, z: float, rounds: int, delta: float, interval: float) -> float:
    dpa = require_dp_accounting()
    acc = dpa.pld.PLDAccountant(value_discretization_interval=interval)
    acc.compose(dpa.SelfComposedDpEvent(round_event(q, z), rounds))
    return float(acc.get_epsilon(delta))


__all__ = ["EXTRA_HINT", "epsilon", "library_epsilon", "noise_for_epsilon", "require_dp_accounting", "round_event"]
