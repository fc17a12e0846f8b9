"""Empirical privacy audits of the ``[privacy]`` mechanism with canary clients.

A *canary* is a client whose update is ``C`` times a random unit vector ``u`` on its own slice of the model
(sent at ten times ``C`` so that clipping sets its norm to exactly ``C``).  Each canary is *inserted* with
probability 1/2, independently; an inserted canary then joins every round with the sampling rate ``q``
(Poisson, like a real client); a canary that is not inserted contributes zero, which is exactly the
zero-out neighbour the accountant's epsilon is about.  Canaries go through the same code as real clients
(:class:`~hetfl.privacy.mechanism.PrivateRound`: ``clip_update``, the noise, the fixed denominators).  After
the run each canary is scored by the cosine between the model change (last model minus first, over the
canary's own coordinates) and its ``u``: inserted canaries should score higher.

From the scores:

* :func:`one_run_lower_bound`: a lower bound on epsilon with confidence ``1 - significance`` (Steinke,
  Nasr and Jagielski, NeurIPS 2023, "Privacy auditing with one (1) training run"): guess "in" for the
  highest and "out" for the lowest scores, abstain on the rest; under (eps, delta)-DP the number of
  correct guesses is dominated by a binomial with success probability e^eps / (1 + e^eps) (plus a delta
  term), so many correct guesses reject small eps.  Several guess counts are tried, with a Bonferroni
  correction so the confidence holds for the maximum.
* :func:`gaussian_estimate`: the one-shot estimate of Andrew et al. (ICLR 2024, "One-shot empirical
  privacy estimation for federated learning"): fit a Gaussian to the inserted canaries' scores and one to
  the others' (the null), and report the epsilon at ``delta`` of the mechanism that outputs one or the
  other (the two-Gaussian privacy profile, here integrated numerically).  An estimate, not a bound.

We follow both papers' statistics; the code is ours.  We differ from Andrew et al. in using the
not-inserted half of the canaries as the null (they use the cosine law N(0, 1/d) or unseen canaries) and
in scoring the final model only (the "final model" threat model; their "all iterates" statistic, the
maximum over rounds, is not implemented).  :func:`audit_mechanism` runs canaries alone through the round
step (fast, for tests); :class:`CanaryRound` puts them into a real training run (benchmarks/privacy_audit.py).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hetfl.aggregation import Piece, Placement, footprint_of, whole
from hetfl.privacy.mechanism import PrivateRound, expected_counts, round_generator
from hetfl.privacy.plan import PrivacyPlan

#: Third word of the seeds of a round's canary participation draw ("cana").
CANARY_STREAM = 0x63616E61
#: A canary's update is sent at this multiple of C: clipping then sets its norm to exactly C.
OVERSHOOT = 10.0


# ---------------------------------------------------------------------------------------------- statistics
def _binom_sf(k: np.ndarray, n: int, p: float) -> np.ndarray:
    """P[Bin(n, p) >= k] for an array of k."""
    from scipy.stats import binom

    return binom.sf(np.asarray(k) - 1, n, p)


def one_run_p_value(eps: float, guesses: int, correct: int, canaries: int, delta: float) -> float:
    """The p-value of "the mechanism is (eps, delta)-DP" after ``correct`` right guesses out of ``guesses``
    among ``canaries`` (Steinke et al. 2023, Theorem 3.1 with its delta term)."""
    q = 1.0 / (1.0 + math.exp(-eps))
    beta = float(_binom_sf(np.array([correct]), guesses, q)[0])
    if delta <= 0.0 or correct <= 0:
        return min(1.0, beta)
    i = np.arange(1, correct + 1)
    alpha = float(np.max((_binom_sf(correct - i, guesses, q) - beta) / i))
    return min(1.0, beta + 2.0 * canaries * delta * alpha)


def _epsilon_from_counts(guesses: int, correct: int, canaries: int, delta: float, significance: float) -> float:
    """The largest eps whose p-value is at most ``significance`` (0 if even eps = 0 is not rejected)."""
    if guesses == 0 or one_run_p_value(0.0, guesses, correct, canaries, delta) > significance:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(hi, guesses, correct, canaries, delta) <= significance and hi < 100.0:
        lo, hi = hi, 2.0 * hi
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if one_run_p_value(mid, guesses, correct, canaries, delta) <= significance:
            lo = mid
        else:
            hi = mid
    return lo


def one_run_lower_bound(scores: Sequence[float], inserted: Sequence[bool], delta: float,
                        significance: float = 0.05) -> dict[str, Any]:
    """Steinke et al.'s one-run lower bound on epsilon, with confidence ``1 - significance``.

    For each guess count ``k`` in a fixed grid, two guessers: one-sided (the ``k`` highest scores "in") and
    two-sided (the ``k/2`` highest "in", the ``k/2`` lowest "out"); each is tested at ``significance /
    (number of guessers)`` (Bonferroni), so the reported maximum holds at ``1 - significance``.
    """
    s = np.asarray(scores, dtype=np.float64)
    ins = np.asarray(inserted, dtype=bool)
    m = len(s)
    order = np.argsort(-s, kind="stable")  # highest first
    ks = sorted({k for k in (m // 100, m // 50, m // 20, m // 10, m // 5, m // 2, m) if k >= 2})
    guessers = [(k, 0) for k in ks] + [(k // 2, k // 2) for k in ks if 2 * (k // 2) <= m]
    level = significance / max(len(guessers), 1)
    best = {"epsilon_lower_bound": 0.0, "confidence": 1.0 - significance, "guesses": 0, "correct": 0,
            "canaries": m}
    for k_in, k_out in guessers:
        correct = int(ins[order[:k_in]].sum()) + int((~ins[order[m - k_out:]]).sum() if k_out else 0)
        eps = _epsilon_from_counts(k_in + k_out, correct, m, delta, level)
        if eps > best["epsilon_lower_bound"]:
            best.update(epsilon_lower_bound=eps, guesses=k_in + k_out, correct=correct)
    return best


def two_gaussian_delta(eps: float, mu1: float, s1: float, mu0: float, s0: float) -> float:
    """The delta at ``eps`` of the mechanism that outputs N(mu1, s1^2) or N(mu0, s0^2): the larger of the two
    hockey-stick divergences, integrated on a fine grid (log densities, so no overflow)."""
    lo = min(mu1 - 12 * s1, mu0 - 12 * s0)
    hi = max(mu1 + 12 * s1, mu0 + 12 * s0)
    x = np.linspace(lo, hi, 200_001)
    dx = x[1] - x[0]
    lp = -0.5 * ((x - mu1) / s1) ** 2 - math.log(s1 * math.sqrt(2 * math.pi))
    lq = -0.5 * ((x - mu0) / s0) ** 2 - math.log(s0 * math.sqrt(2 * math.pi))
    out = 0.0
    for a, b in ((lp, lq), (lq, lp)):
        out = max(out, float(np.sum(np.exp(a) * np.clip(-np.expm1(eps + b - a), 0.0, None)) * dx))
    return out


def gaussian_epsilon(mu1: float, s1: float, mu0: float, s0: float, delta: float, cap: float = 1000.0) -> float:
    """The smallest eps with :func:`two_gaussian_delta` <= ``delta`` (``cap`` if none below it)."""
    if two_gaussian_delta(0.0, mu1, s1, mu0, s0) <= delta:
        return 0.0
    lo, hi = 0.0, 1.0
    while two_gaussian_delta(hi, mu1, s1, mu0, s0) > delta:
        lo, hi = hi, 2.0 * hi
        if hi > cap:
            return cap
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        if two_gaussian_delta(mid, mu1, s1, mu0, s0) > delta:
            lo = mid
        else:
            hi = mid
    return hi


def gaussian_estimate(scores: Sequence[float], inserted: Sequence[bool], delta: float) -> dict[str, Any]:
    """Andrew et al.'s one-shot estimate: Gaussians fitted to the inserted and the other canaries' scores,
    and the epsilon at ``delta`` that separates them."""
    s = np.asarray(scores, dtype=np.float64)
    ins = np.asarray(inserted, dtype=bool)
    a, b = s[ins], s[~ins]
    mu1, s1 = float(a.mean()), float(a.std(ddof=1))
    mu0, s0 = float(b.mean()), float(b.std(ddof=1))
    floor = 1e-12 + 1e-9 * max(abs(mu1), abs(mu0), s1, s0)  # no noise at all: keep the densities finite
    return {"epsilon_estimate": gaussian_epsilon(mu1, max(s1, floor), mu0, max(s0, floor), delta),
            "in_mean": mu1, "in_std": s1, "out_mean": mu0, "out_std": s0}


def audit_scores(scores: Sequence[float], inserted: Sequence[bool], delta: float,
                 significance: float = 0.05) -> dict[str, Any]:
    """Both statistics of one set of canary scores."""
    return {**one_run_lower_bound(scores, inserted, delta, significance), **gaussian_estimate(scores, inserted, delta)}


# ---------------------------------------------------------------------------------------------- canaries
class Flat:
    """Released tensors <-> one flat float64 vector (a fixed key order)."""

    def __init__(self, weights: dict[str, torch.Tensor], keys: Sequence[str]) -> None:
        self.keys = list(keys)
        self.shapes = {k: tuple(weights[k].shape) for k in self.keys}
        sizes = [int(np.prod(self.shapes[k], dtype=np.int64)) for k in self.keys]
        self.offsets = dict(zip(self.keys, np.cumsum([0, *sizes])[:-1].tolist(), strict=True))
        self.size = int(sum(sizes))

    def flat(self, weights: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([weights[k].detach().to(torch.float64).reshape(-1).cpu() for k in self.keys])

    def unflat(self, vec: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: vec[o:o + int(np.prod(self.shapes[k], dtype=np.int64))].reshape(self.shapes[k])
                for k, o in self.offsets.items()}


@dataclass
class Canaries:
    """``m`` canaries: whether each is inserted, the client id it is hosted on (its slice), its support (a
    flat mask over the released tensors, one per kind) and its direction (regenerated from ``seed``)."""

    seed: int
    inserted: np.ndarray  # bool, one per canary
    hosts: np.ndarray  # client id whose slice the canary trains (its width, its task)
    support: list[torch.Tensor]  # flat bool masks
    kind: np.ndarray  # index into support
    names: list[str]  # one name per support

    def direction(self, j: int) -> torch.Tensor:
        """Canary ``j``'s unit vector (flat, float64), zero outside its support."""
        gen = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, j]).generate_state(1)[0]))
        mask = self.support[int(self.kind[j])]
        u = torch.randn(mask.shape, generator=gen, dtype=torch.float64)
        u = torch.where(mask, u, torch.zeros_like(u))
        return u / u.norm()

    def scores(self, change: torch.Tensor) -> np.ndarray:
        """The cosine of ``change`` (flat) with every canary, over the canary's own support."""
        out = np.zeros(len(self.inserted))
        for kind, mask in enumerate(self.support):
            part = torch.where(mask, change, torch.zeros_like(change))
            norm = float(part.norm())
            ids = np.flatnonzero(self.kind == kind)
            for start in range(0, len(ids) if norm > 0 else 0, 256):  # one matrix-vector product per chunk
                chunk = ids[start:start + 256]
                out[chunk] = (torch.stack([self.direction(int(j)) for j in chunk]) @ part).numpy() / norm
        return out


def draw_canaries(m: int, supports: list[torch.Tensor], names: list[str], hosts_per_kind: list[Sequence[int]],
                  seed: int) -> Canaries:
    """``m`` canaries spread evenly over the kinds; each inserted with probability 1/2 and hosted on a
    client of its kind (drawn from ``hosts_per_kind``)."""
    rng = np.random.default_rng([seed, CANARY_STREAM])
    kind = np.arange(m) % len(supports)
    hosts = np.array([int(rng.choice(np.asarray(hosts_per_kind[k]))) for k in kind], dtype=np.int64)
    return Canaries(seed=seed, inserted=rng.random(m) < 0.5, hosts=hosts, support=supports, kind=kind, names=names)


# The audit uses the round step's own parts: the released tensors (the private reducer's expected counts), and
# every client's footprint (the algorithm's: which elements it covers this round), so canaries go wherever a real
# client of their host would, for any algorithm; CanaryRound.reducer adds them to a round's private sum.
def _released(dp: PrivateRound, state: Any) -> list[str]:
    return list(expected_counts(dp.algorithm, dp.ctx, state, 1, dp.plan).get("global", {}))


def _footprint(dp: PrivateRound, state: Any, host: int, rnd: int) -> Placement:
    """The host's footprint in round ``rnd`` (the first level of its law)."""
    return dp.algorithm.footprints(state, rnd, dp.ctx)(int(host))[0][1]


class CanaryRound(PrivateRound):
    """:class:`PrivateRound` with the inserted canaries added to every round's private sum, sampled with the same
    rate as real clients, each on its host's footprint; records the first model so that the run's model change
    can be scored."""

    def __init__(self, algorithm: Any, ctx: Any, plan: PrivacyPlan, canaries: Canaries, flat: Flat) -> None:
        super().__init__(algorithm, ctx, plan)
        self.canaries = canaries
        self.flat = flat
        self.initial: torch.Tensor | None = None
        self.joined = 0

    def reducer(self, state: Any, rnd: int) -> Any:
        red = super().reducer(state, rnd)
        glob = state.models["global"]
        if self.initial is None:
            self.initial = self.flat.flat(glob)
        cn = self.canaries
        rng = round_generator(self.noise_seed, rnd, CANARY_STREAM)
        inserted = np.flatnonzero(cn.inserted)
        joined = inserted[rng.random(len(inserted)) < self.plan.sampling_rate]
        self.joined += len(joined)
        clip = red.clip or 1.0
        fp = self.algorithm.footprints(state, rnd, self.ctx)
        for j in joined:
            f = fp(int(cn.hosts[j]))[0][1]
            u = self.flat.unflat(cn.direction(int(j)) * (OVERSHOOT * clip))
            pieces = {}
            for k, pc in f.pieces.items():
                if k in self.flat.offsets:
                    ref = glob[k]
                    value = pc.gather(ref).to(torch.float64) + pc.gather(u[k].to(ref.device))
                    pieces[k] = Piece(value, index=pc.index, mask=pc.mask)
            red.add(Placement(pieces, f.model, 1.0))
        return red


def footprint_mask(dp: PrivateRound, state: Any, flat: Flat, f: Placement) -> torch.Tensor:
    """The flat mask of the global coordinates a footprint covers."""
    glob = state.models["global"]
    return flat.flat({k: f.pieces[k].coverage(glob[k]) if k in f.pieces else torch.zeros_like(glob[k], dtype=torch.bool)
                      for k in flat.keys}) > 0


def canary_kinds(dp: PrivateRound, state: Any, flat: Flat) -> tuple[list[torch.Tensor], list[str], list[list[int]]]:
    """Where canaries live: a single-model algorithm (FedAvg): the whole model ("full").  Submodel methods (their
    deployed submodels, widest first): the widest clients' whole footprint ("full"), its outer ring, the
    coordinates that only the widest clients hold ("ring"), and the narrowest footprint, which every client holds
    ("inner"); hosted on eligible clients whose round-1 footprint is that submodel's."""
    eligible = list(dp.plan.eligible)
    deployed = dp.algorithm.deployed_footprints(state, dp.ctx)
    if len(deployed) < 1:
        return [torch.ones(flat.size, dtype=torch.bool)], ["full"], [eligible]
    masks = {label: footprint_mask(dp, state, flat, f) for label, f in deployed.items()}
    order = sorted(masks, key=lambda label: -int(masks[label].sum()))
    own: dict[Any, torch.Tensor] = {}
    hosts_of: dict[str, list[int]] = {label: [] for label in order}
    for c in eligible:
        f = _footprint(dp, state, c, 1)
        if f.signature not in own:
            own[f.signature] = footprint_mask(dp, state, flat, f)
        for label in order:
            if torch.equal(own[f.signature], masks[label]):
                hosts_of[label].append(int(c))
                break
    wide, narrow = order[0], order[-1]
    supports, names, hosts = [masks[wide]], [f"full {wide}"], [hosts_of[wide] or eligible]
    if len(order) > 1:
        supports += [masks[wide] & ~masks[order[1]], masks[narrow]]
        names += [f"ring {wide}-{order[1]}", f"inner {narrow}"]
        hosts += [hosts_of[wide] or eligible, hosts_of[narrow] or eligible]
    return supports, names, hosts


def audit_run(cfg: Any, out_dir: Any, canaries: int = 1000, canary_seed: int = 0,
              significance: float = 0.05) -> dict[str, Any]:
    """A real ``[privacy]`` training run (the in-process simulator) with ``canaries`` canary clients added by
    :class:`CanaryRound`; returns the run's summary, both statistics over all canaries and per kind, and
    the accountants' epsilon.  The canaries' own cost is not in the run's metrics (they are not clients of
    the federation: their updates are added to the round's results)."""
    from hetfl.engines import engine_for
    from hetfl.runner import run

    holder: dict[str, Any] = {}

    def factory(algorithm: Any, federation: Any, ctx: Any, device: Any, cfg_: Any) -> Any:
        engine = engine_for(cfg_.engine.name, algorithm)(algorithm, federation, ctx, device, cfg_)
        dp = engine.round.privacy
        state = algorithm.init_state(ctx)
        flat = Flat(state.models["global"], _released(dp, state))
        supports, names, hosts = canary_kinds(dp, state, flat)
        cn = draw_canaries(canaries, supports, names, hosts, canary_seed)
        engine.round.privacy = holder["round"] = CanaryRound(algorithm, ctx, ctx.privacy, cn, flat)
        return engine

    summary = run(cfg, out_dir, quiet=True, engine=factory)
    cr: CanaryRound = holder["round"]
    from pathlib import Path

    final = torch.load(Path(out_dir) / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
    scores = cr.canaries.scores(cr.flat.flat(final) - cr.initial)
    plan = cr.plan
    out = {**audit_scores(scores, cr.canaries.inserted, plan.delta, significance),
           "epsilon_accountant": plan.epsilon(cfg.rounds), "accountant": plan.accountant,
           "epsilon_rdp": plan.epsilon(cfg.rounds, "rdp"), "epsilon_pld": plan.epsilon(cfg.rounds, "pld"),
           "noise_multiplier": plan.noise_multiplier, "canary_participations": cr.joined,
           "test_accuracy": summary.get("test_accuracy"), "kinds": {}}
    for k, name in enumerate(cr.canaries.names):
        sel = cr.canaries.kind == k
        if len(cr.canaries.names) > 1 and sel.sum() >= 20:
            out["kinds"][name] = audit_scores(scores[sel], cr.canaries.inserted[sel], plan.delta, significance)
    return out


# ---------------------------------------------------------------------------------------------- mechanism alone
class _Ctx:
    fleet = None
    privacy = None

    def __init__(self, seed: int, n: int) -> None:
        self.seed = seed
        self.num_clients = n


@dataclass
class _State:
    """A server state for the mechanism alone (the round step reads ``models`` and ``buffers``)."""

    round: int
    models: dict[str, dict[str, torch.Tensor]]
    buffers: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Result:
    client_id: int
    num_samples: int
    weights: dict[str, torch.Tensor]


class _Dense:
    """The smallest server algorithm for the mechanism alone: every client covers the one tensor whole."""

    def footprints(self, state: Any, rnd: int, ctx: Any) -> Any:
        fp = footprint_of(state.models["global"])
        return lambda client: [(1.0, fp)]

    def deployed_footprints(self, state: Any, ctx: Any) -> dict[str, Placement]:
        return {}

    def aggregate(self, state: Any, rnd: int, results: Iterable[Any], ctx: Any, reducer: Any) -> Any:
        for res in results:
            reducer.add(whole(res.weights))
        return reducer.result()["global"]


def audit_mechanism(plan: PrivacyPlan, canaries: int, dim: int, rounds: int, seed: int = 0,
                    significance: float = 0.05) -> dict[str, Any]:
    """Canaries alone through the round step (dense updates, ``dim`` coordinates): ``canaries`` clients, each
    inserted with probability 1/2; the Poisson cohort of every round is drawn by the mechanism over all of them
    (a not-inserted canary that is drawn reports a zero update: the zero-out neighbour).  Returns both
    statistics next to the accountant's epsilon for these rounds."""
    eligible = tuple(range(canaries))
    plan = _with(plan, eligible=eligible, rounds=rounds)
    dp = PrivateRound(_Dense(), _Ctx(seed, canaries), plan)
    glob = {"w": torch.zeros(dim, dtype=torch.float64)}
    flat = Flat(glob, ["w"])
    cn = draw_canaries(canaries, [torch.ones(dim, dtype=torch.bool)], ["dense"], [eligible], seed)
    cn.hosts = np.arange(canaries)  # one client per canary
    start = glob["w"].clone()
    for rnd in range(1, rounds + 1):
        cohort = dp.sample(rnd)
        clip = dp.clip_of(_State(rnd - 1, {"global": glob})) or 1.0
        results = [_Result(int(c), 1, {"w": glob["w"] + cn.direction(int(c)) * (OVERSHOOT * clip)}
                           if cn.inserted[c] else {"w": glob["w"].clone()}) for c in cohort]
        glob = dp.aggregate(_State(rnd - 1, {"global": glob}), rnd, results)
    change = flat.flat(glob) - start
    return {**audit_scores(cn.scores(change), cn.inserted, plan.delta, significance),
            "epsilon_accountant": plan.epsilon(rounds), "epsilon_rdp": plan.epsilon(rounds, "rdp")}


def _with(plan: PrivacyPlan, **changes: Any) -> PrivacyPlan:
    import dataclasses

    return dataclasses.replace(plan, **changes)


__all__ = ["CANARY_STREAM", "CanaryRound", "Canaries", "Flat", "audit_mechanism", "audit_run", "audit_scores",
           "canary_kinds", "draw_canaries", "footprint_mask",
           "gaussian_epsilon", "gaussian_estimate", "one_run_lower_bound", "one_run_p_value",
           "two_gaussian_delta"]
