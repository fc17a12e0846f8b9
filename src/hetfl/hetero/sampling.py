"""Width schedules: *which width* a client trains in a round (index policies choose *which channels*).

A client of maximum width ``m`` (its fleet level this round, ``fleet.widths(rnd, seed)``) may train any
fleet level ``w <= m``.  A width schedule gives, for every capability tier ``t`` (the clients whose
maximum is ``levels[t]``, levels widest first), a distribution ``pi[t]`` over the levels ``j >= t``; each
sampled client then draws its width from its tier's row with its own random stream
``(seed, round, client)``.  Everything is a pure function of (seed, round, client, fleet, client sizes,
server state), so the server recomputes any client's width when its update comes back.

Rules (the ``[algorithm] width_schedule`` values, a name with its parameters in parentheses, e.g.
``"mixture(q=0.25)"``; :func:`width_schedule`):

* ``max`` (HeteroFL): every client trains its largest affordable width, always.  No randomness: the
  width is exactly ``fleet.widths(rnd, seed)[client]``, so runs equal HeteroFL before width policies.
* ``uniform`` (FjORD's distribution, drawn once per round): a client of tier ``t`` trains each level
  ``j >= t`` with probability ``1 / (L - t)``.  FjORD draws per *minibatch* inside the client's maximum
  model (``ordered = true``, algorithm ``fjord``); here the draw is per *round*, so the client downloads,
  trains and uploads only the drawn submodel (compute and bytes shrink with the width) and the policies
  differ only in how often each width is trained.  Per-round and per-minibatch uniform give every width
  the same expected share of steps; per-minibatch draws always ship the client's maximum model, and its
  outer channels see only the steps that drew the widest width.
* ``mixture`` (parameter ``q``): with probability ``1 - q`` the client trains its maximum, with
  probability ``q`` a smaller level drawn uniformly among the levels below its maximum (the smallest
  tier always trains its maximum).  ``q = 0`` is ``max``; ``q = (L - 1) / L`` is ``uniform`` for the
  strongest tier.
* ``coverage`` (parameter ``target``): chooses the tier distributions so that the *expected
  training samples per round at each exact width* match target shares (``"equal"``: the same for every
  level; ``"deploy"``: the share of clients whose maximum is that level; or explicit shares, widest
  first, e.g. ``"coverage(target=0.4,0.3,0.2,0.1)"``).  A client's samples per round are its data size times
  ``train.epochs`` (or ``train.steps * batch_size``); clients are sampled uniformly, so expectations are
  population sums.  The allocation fills widths from the widest: a width takes its share of the samples
  still unallocated, first from its own tier and then from the closest stronger tiers (so strong clients
  step down only as far as needed); a width that cannot get its share (too few capable clients, e.g. the
  full width when 5 % of phones afford it) gets everything its capable tiers have left, and its shortfall
  is spread over the narrower widths in proportion to their targets.
* ``adaptive`` (parameters ``val_size``, ``ema``): ``coverage`` whose target is learned online.
  After every round the server evaluates the new global model at every level on a held-out labeled
  validation split (``val_size`` samples drawn from the training set before partitioning, so no
  client holds them) and keeps an exponential moving average ``l_j`` of each width's validation loss
  (weight ``ema`` on the newest value) in ``ServerState.buffers``.  The next round's target share of
  width ``j`` is ``d_j * l_j`` normalised, where ``d_j`` is the share of clients that deploy width ``j``:
  widths that many devices run and that are still far from good get more training; as a width's loss
  falls, its share (and the probability ``q`` that stronger clients train it) falls with it.

Every non-``max`` schedule reports per round ``width_q`` (the expected fraction of the round's training
samples trained below the client's maximum width) and ``width_share.w<level>`` (expected share of the
round's training samples at each exact width); ``adaptive`` also reports ``width_val_loss.w<level>``.

A new schedule is one frozen dataclass (its fields are its parameters) registered in
:data:`WIDTH_SCHEDULES`; one that sets ``needs_validation`` gets the per-width validation losses in
``inputs.buffers["width_loss"]`` (see :mod:`hetfl.hetero.widths`, which runs a schedule in a round).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from hetfl.errors import ConfigError
from hetfl.registry import Registry, build_entry

WIDTH_SCHEDULES: Registry = Registry("width schedule")

_STREAM = 0x7769_6474  # "widt": the width draw's random stream, independent of every other stream


def level_label(rate: float) -> str:
    return f"w{rate:g}"


@dataclass(frozen=True)
class RoundInputs:
    """What a width schedule sees in one round (all population-level, independent of who is sampled)."""

    levels: np.ndarray  # fleet levels, widest first
    tiers: np.ndarray  # per client: index into levels of its maximum width this round
    samples: np.ndarray  # per client: training samples it processes in a round at any width
    deploy: np.ndarray  # per level: share of clients whose (fixed) maximum is that level
    buffers: dict[str, Any]

    @property
    def tier_samples(self) -> np.ndarray:
        return np.bincount(self.tiers, weights=self.samples, minlength=len(self.levels)).astype(np.float64)


@dataclass(frozen=True)
class WidthSchedule:
    """Base: ``tier_probs`` gives row ``t`` = the distribution over levels of a client of tier ``t``.

    ``needs_validation``: the server keeps a moving average of every width's validation loss (weight ``ema``
    on the newest) on ``val_size`` held-out samples, passed in ``RoundInputs.buffers["width_loss"]``.
    """

    randomized: ClassVar[bool] = True
    needs_validation: ClassVar[bool] = False

    def tier_probs(self, inp: RoundInputs) -> np.ndarray:
        raise NotImplementedError


def _checked(p: np.ndarray) -> np.ndarray:
    """Rows must be distributions over the levels j >= t (never wider than the tier affords)."""
    if not np.allclose(p.sum(axis=1), 1.0) or np.any(np.tril(p, -1) > 1e-12) or np.any(p < 0):
        raise ValueError(f"a width schedule returned invalid tier distributions:\n{p}")
    return p


@WIDTH_SCHEDULES.register("max")
@dataclass(frozen=True)
class MaxWidth(WidthSchedule):
    """HeteroFL: always the largest affordable width."""

    randomized: ClassVar[bool] = False

    def tier_probs(self, inp: RoundInputs) -> np.ndarray:
        return np.eye(len(inp.levels))


@WIDTH_SCHEDULES.register("uniform")
@dataclass(frozen=True)
class UniformWidth(WidthSchedule):
    """FjORD's distribution, drawn per round: uniform over the levels <= the client's maximum."""

    def tier_probs(self, inp: RoundInputs) -> np.ndarray:
        L = len(inp.levels)
        p = np.triu(np.ones((L, L)))
        return p / p.sum(axis=1, keepdims=True)


@WIDTH_SCHEDULES.register("mixture")
@dataclass(frozen=True)
class MixtureWidth(WidthSchedule):
    """Maximum width with probability 1-q, else a smaller level drawn uniformly; default mixture(q=0.5)."""

    q: float = 0.5

    def __post_init__(self) -> None:
        if not 0.0 <= self.q <= 1.0:
            raise ConfigError(f"q must be in [0, 1], got {self.q}")

    def tier_probs(self, inp: RoundInputs) -> np.ndarray:
        L = len(inp.levels)
        p = np.zeros((L, L))
        for t in range(L):
            below = L - 1 - t
            if below == 0:
                p[t, t] = 1.0
                continue
            p[t, t] = 1.0 - self.q
            p[t, t + 1:] = self.q / below
        return p


def parse_target(target: str, levels: np.ndarray, deploy: np.ndarray) -> np.ndarray:
    """Target shares per level (widest first) from ``"equal"``, ``"deploy"`` or ``"0.4,0.3,..."``."""
    L = len(levels)
    text = target.strip().lower()
    if text == "equal":
        return np.full(L, 1.0 / L)
    if text == "deploy":
        return np.asarray(deploy, dtype=np.float64) / max(float(np.sum(deploy)), 1e-300)
    shares = parse_shares(target)
    if len(shares) != L:
        raise ConfigError(f"algorithm.width_schedule: coverage target has {len(shares)} shares but the fleet "
                          f"has {L} levels ({', '.join(f'{w:g}' for w in levels)}); give one share per level, "
                          f"widest first")
    return shares / shares.sum()


def parse_shares(target: str) -> np.ndarray:
    try:
        shares = np.array([float(s) for s in target.split(",") if s.strip()], dtype=np.float64)
    except ValueError:
        raise ConfigError(f"target must be 'equal', 'deploy' or comma-separated shares per level, widest "
                          f"first (e.g. 'coverage(target=0.4,0.3,0.2,0.1)'), got {target!r}") from None
    if len(shares) == 0 or np.any(shares < 0) or not np.isfinite(shares).all() or shares.sum() <= 0:
        raise ConfigError(f"target shares must be >= 0 with a positive sum, got {target!r}")
    return shares


def allocate(tier_samples: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Tier distributions (L x L, row t over levels j >= t) whose expected samples per exact width match
    ``target`` shares as closely as the tiers allow (see the ``coverage`` rule in the module docstring)."""
    supply = np.asarray(tier_samples, dtype=np.float64).copy()
    target = np.asarray(target, dtype=np.float64)
    L = len(supply)
    alloc = np.zeros((L, L))
    for j in range(L):
        rest_target = target[j:].sum()
        if rest_target <= 0:
            break  # no narrower width wants more: the samples left train at their tier's maximum
        demand = supply.sum() * (target[j] / rest_target)  # the last width with a target takes all that is left
        for t in range(j, -1, -1):  # own tier first, then the closest stronger tiers
            take = min(supply[t], demand)
            alloc[t, j] += take
            supply[t] -= take
            demand -= take
            if demand <= 0:
                break
    alloc[np.arange(L), np.arange(L)] += supply
    probs = np.zeros((L, L))
    totals = alloc.sum(axis=1)
    for t in range(L):
        if totals[t] > 0:
            probs[t] = alloc[t] / totals[t]
        else:
            probs[t, t] = 1.0  # an empty tier: irrelevant, keep it at its maximum
    return probs


@WIDTH_SCHEDULES.register("coverage")
@dataclass(frozen=True)
class CoverageWidth(WidthSchedule):
    """Expected training samples per exact width match target shares; default coverage(target=equal)."""

    target: str = "equal"

    def __post_init__(self) -> None:
        if self.target.strip().lower() not in ("equal", "deploy"):
            parse_shares(self.target)

    def tier_probs(self, inp: RoundInputs) -> np.ndarray:
        return allocate(inp.tier_samples, parse_target(self.target, inp.levels, inp.deploy))


@WIDTH_SCHEDULES.register("adaptive")
@dataclass(frozen=True)
class AdaptiveWidth(WidthSchedule):
    """Coverage, target = deployment share x validation loss (EMA); default adaptive(val_size=500; ema=0.5)."""

    needs_validation: ClassVar[bool] = True
    val_size: int = 500
    ema: float = 0.5

    def __post_init__(self) -> None:
        if self.val_size < 1:
            raise ConfigError(f"val_size must be >= 1 (the server's validation samples), got {self.val_size}")
        if not 0.0 < self.ema <= 1.0:
            raise ConfigError(f"ema must be in (0, 1], got {self.ema}")

    def target(self, inp: RoundInputs) -> np.ndarray:
        loss = inp.buffers.get("width_loss")
        loss = np.ones(len(inp.levels)) if loss is None else np.asarray(loss, dtype=np.float64)
        raw = np.asarray(inp.deploy, dtype=np.float64) * np.maximum(loss, 1e-12)
        return raw / raw.sum() if raw.sum() > 0 else np.full(len(raw), 1.0 / len(raw))

    def tier_probs(self, inp: RoundInputs) -> np.ndarray:
        return allocate(inp.tier_samples, self.target(inp))

    def update(self, old: np.ndarray | None, new: np.ndarray) -> np.ndarray:
        """The EMA of the per-width validation loss after one more observation."""
        new = np.asarray(new, dtype=np.float64)
        return new if old is None else (1.0 - self.ema) * np.asarray(old, dtype=np.float64) + self.ema * new


def make_width_schedule(name: str, **params: Any) -> WidthSchedule:
    """Build a registered schedule by name with its parameters."""
    return WIDTH_SCHEDULES.get(name, "algorithm.width_schedule")(**params)


def width_schedule(text: str, where: str = "algorithm.width_schedule") -> WidthSchedule:
    """The schedule a config string names, e.g. ``"max"`` or ``"mixture(q=0.25)"``."""
    return build_entry(WIDTH_SCHEDULES, text, where)


def draw_level(probs: np.ndarray, seed: int, rnd: int, client: int) -> int:
    """Index of the level a client draws from its distribution ``probs``: its own stream (seed, round, client)."""
    u = np.random.default_rng([seed, rnd, client + 1, _STREAM]).random()
    cdf = np.cumsum(probs)
    j = int(np.searchsorted(cdf / cdf[-1], u, side="right"))
    return min(j, int(np.flatnonzero(probs > 0)[-1]))


@dataclass(frozen=True)
class WidthPlan:
    """One round's widths: the schedule's tier distributions, and every client's draw on demand."""

    schedule: WidthSchedule
    inputs: RoundInputs
    max_width: np.ndarray  # per client, this round
    probs: np.ndarray  # tier x level
    seed: int
    rnd: int

    def rate(self, client: int) -> float:
        if not self.schedule.randomized:
            return float(self.max_width[client])
        t = int(self.inputs.tiers[client])
        return float(self.inputs.levels[draw_level(self.probs[t], self.seed, self.rnd, client)])

    def expected_shares(self) -> np.ndarray:
        """Expected share of the round's training samples at each exact level (uniform client sampling)."""
        s = self.inputs.tier_samples
        total = s.sum()
        return (s[:, None] * self.probs).sum(axis=0) / total if total > 0 else np.zeros(len(s))

    def expected_q(self) -> float:
        """Expected fraction of the round's training samples trained below the client's maximum width."""
        s = self.inputs.tier_samples
        total = s.sum()
        return float((s * (1.0 - np.diag(self.probs))).sum() / total) if total > 0 else 0.0

    def metrics(self) -> dict[str, float]:
        out = {"width_q": round(self.expected_q(), 6)}
        for w, share in zip(self.inputs.levels, self.expected_shares()):
            out[f"width_share.{level_label(float(w))}"] = round(float(share), 6)
        return out


def plan_round(schedule: WidthSchedule, *, levels: tuple[float, ...], max_width: np.ndarray,
               fixed_max_width: np.ndarray, samples: np.ndarray, buffers: dict[str, Any], seed: int,
               rnd: int) -> WidthPlan:
    """The round's :class:`WidthPlan` from the fleet's levels, this round's and the fixed maximum widths
    (deployment shares come from the fixed ones) and every client's samples per round."""
    lv = np.asarray(levels, dtype=np.float64)
    tiers = np.argmin(np.abs(lv[None, :] - np.asarray(max_width, dtype=np.float64)[:, None]), axis=1)
    fixed = np.argmin(np.abs(lv[None, :] - np.asarray(fixed_max_width, dtype=np.float64)[:, None]), axis=1)
    deploy = np.bincount(fixed, minlength=len(lv)) / max(len(fixed), 1)
    inp = RoundInputs(lv, tiers, np.asarray(samples, dtype=np.float64), deploy, buffers)
    probs = schedule.tier_probs(inp)
    return WidthPlan(schedule, inp, np.asarray(max_width), _checked(probs), seed, rnd)


__all__ = [
    "WIDTH_SCHEDULES",
    "AdaptiveWidth",
    "CoverageWidth",
    "MaxWidth",
    "MixtureWidth",
    "RoundInputs",
    "UniformWidth",
    "WidthPlan",
    "WidthSchedule",
    "allocate",
    "draw_level",
    "level_label",
    "make_width_schedule",
    "plan_round",
    "width_schedule",
]
