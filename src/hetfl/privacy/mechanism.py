"""The private round step: Poisson sampling, per-client clipping, Gaussian noise on the sum, fixed denominators.

:class:`PrivateRound` replaces two calls of :class:`hetfl.rounds.Round` when ``[privacy]`` is active:

* ``sample(rnd)`` instead of ``algorithm.sample_clients``: every eligible client joins independently
  with probability ``q`` (drawn from OS entropy like the noise: see :func:`noise_generator`);
* ``aggregate(state, rnd, tasks, results)`` instead of ``algorithm.aggregate``: each accepted
  client's update ``delta_k = result - task weights`` (over the tensors the server releases, on the
  client's own slice of the global model) is scaled to L2 norm at most ``C``; the server sums the
  clipped updates element by element, adds ``N(0, (z C)^2)`` to every element some client can hold,
  and divides element ``j`` by its *expected* number of contributors ``E[n_j] = q * N_j`` (``N_j``:
  the eligible clients whose submodel this round contains ``j``, weighted by the probability of their
  width draw).  The result (old weights + that mean update) goes to the algorithm's own ``server_step``
  (FedAvg's server learning rate and momentum are post-processing).

Every contribution is bounded by ``C`` in L2 norm whatever the overlap pattern, so the per-round release
is the Gaussian mechanism on a sum of sensitivity ``C``; denominators and the noise never depend on who
took part.  docs/privacy.md has the derivation and what is not covered.

Two adapters place a client's update in the global coordinates: :class:`DenseUpdates` (FedAvg: every
client trains the whole model) and :class:`SlicedUpdates` (HeteroFL, FedRolex, Federated Dropout, FjORD:
the client's channels, recomputed from the algorithm's pure index and width policies).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch

from hetfl.algorithms.heterofl import HeteroFL, _bn_stat_keys
from hetfl.hetero import group_sizes, spec_for
from hetfl.hetero.extract import extract, scatter_full
from hetfl.hetero.policy import Prefix
from hetfl.privacy.noise import NOISE_STREAM, POISSON_STREAM, noise_generator, round_generator
from hetfl.privacy.plan import PrivacyPlan

Weights = dict[str, torch.Tensor]

#: ServerState.buffers key of the adaptive clipping norm (checkpointed with the state).
CLIP_BUFFER = "privacy_clip"


def clip_update(delta: Weights, clip: float | None) -> tuple[Weights, float, bool]:
    """``delta`` scaled to L2 norm at most ``clip`` (over all its tensors, in float64).

    Returns (clipped update, norm before clipping, whether it was scaled).  ``clip=None``: unchanged.
    """
    sq = sum(float(torch.sum(v.to(torch.float64) ** 2)) for v in delta.values())
    norm = sq ** 0.5
    if clip is None or norm <= clip:
        return {k: v.to(torch.float64) for k, v in delta.items()}, norm, False
    scale = clip / norm
    return {k: v.to(torch.float64) * scale for k, v in delta.items()}, norm, True


class DenseUpdates:
    """FedAvg: every client's update covers every released tensor; E[n_j] = q * |eligible|."""

    def __init__(self, algorithm: Any, ctx: Any, plan: PrivacyPlan) -> None:
        self.plan = plan

    def released(self, glob: Weights) -> list[str]:
        return [k for k, v in glob.items() if v.is_floating_point()]

    def delta(self, task: Any, res: Any, keys: Sequence[str]) -> Weights:
        return {k: res.weights[k].detach().to(torch.float64) - task.weights[k].detach().to(torch.float64)
                for k in keys}

    def place(self, sums: Weights, delta: Weights, res: Any, state: Any, rnd: int) -> None:
        for k, v in delta.items():
            sums[k].add_(v.to(sums[k].device))

    def expected(self, state: Any, rnd: int, keys: Sequence[str]) -> dict[str, torch.Tensor | float]:
        n = self.plan.sampling_rate * len(self.plan.eligible)
        return {k: n for k in keys}

    def noise_levels(self, std: dict[str, torch.Tensor | float]) -> dict[str, float]:
        vals = [float(v) for v in std.values()]
        return {"privacy.noise_std": float(np.sqrt(np.mean(np.square(vals)))) if vals else 0.0}


class SlicedUpdates:
    """The width family: a client's update covers its channels (its index policy, at the width it trained).

    Uses the algorithm's pure functions ``width_plan``, ``_rates`` and ``selection`` (as its own
    ``aggregate`` does), so the server recomputes every client's slice and every client's possible slices.
    """

    def __init__(self, algorithm: Any, ctx: Any, plan: PrivacyPlan) -> None:
        self.algo = algorithm
        self.ctx = ctx
        self.plan = plan
        self.spec = spec_for(ctx.model, ctx.info)
        self._cache: tuple[Any, dict[str, torch.Tensor]] | None = None
        self._dists: tuple[Any, Any] | None = None

    def released(self, glob: Weights) -> list[str]:
        skip = _bn_stat_keys(glob) if self.algo.static_bn else frozenset()  # static BN: statistics never leave
        return [k for k, v in glob.items() if v.is_floating_point() and k not in skip]

    def _rate_dist(self, state: Any, rnd: int) -> Any:
        """``f(client) -> {rate: probability}``: the width each eligible client trains this round, as a law;
        and ``g(client) -> rate``: the width it was assigned.  Built once per round (the width plan)."""
        key = (rnd, id(state))
        if self._dists is not None and self._dists[0] == key:
            return self._dists[1]
        algo, ctx = self.algo, self.ctx
        wplan = algo.widths.plan(state.buffers, ctx, rnd)
        rates = algo.widths.fleet_widths(ctx, rnd) if ctx.fleet is not None else None

        def dist(c: int) -> dict[float, float]:
            if wplan is None:
                return {float(rates[c]) if rates is not None else 1.0: 1.0}
            if not wplan.schedule.randomized:
                return {wplan.rate(c): 1.0}
            row = wplan.probs[int(wplan.inputs.tiers[c])]
            return {float(wplan.inputs.levels[j]): float(p) for j, p in enumerate(row) if p > 0}

        def trained(c: int) -> float:  # the width this client was assigned (its draw), as aggregate() recomputes
            if wplan is not None:
                return wplan.rate(c)
            return float(rates[c]) if rates is not None else 1.0

        self._dists = (key, (dist, trained))
        return dist, trained

    def delta(self, task: Any, res: Any, keys: Sequence[str]) -> Weights:
        return {k: res.weights[k].detach().to(torch.float64) - task.weights[k].detach().to(torch.float64)
                for k in keys if k in res.weights}

    def place(self, sums: Weights, delta: Weights, res: Any, state: Any, rnd: int) -> None:
        _, trained = self._rate_dist(state, rnd)
        sel = self.algo.selection(self.ctx, rnd, res.client_id, trained(res.client_id))
        for k, (full, _mask) in scatter_full(sums, self.spec, delta, sel).items():
            sums[k].add_(full)

    def expected(self, state: Any, rnd: int, keys: Sequence[str]) -> dict[str, torch.Tensor | float]:
        """``E[n_j] = q * sum over eligible clients of P(the client's slice this round holds j)``."""

        glob = {k: state.models["global"][k] for k in keys}
        dist, _ = self._rate_dist(state, rnd)
        weight: dict[bytes, float] = {}
        chosen: dict[bytes, Any] = {}
        for c in self.plan.eligible:
            for rate, p in dist(c).items():
                sel = self.algo.selection(self.ctx, rnd, c, rate)
                key = b"|".join(str(g).encode() + b":" + sel[g].numpy().tobytes() for g in sorted(sel))
                weight[key] = weight.get(key, 0.0) + p
                chosen.setdefault(key, sel)
        signature = tuple(sorted(weight.items()))
        if self._cache is not None and self._cache[0] == signature:
            return dict(self._cache[1])
        counts = {k: torch.zeros(v.shape, dtype=torch.float64, device=v.device) for k, v in glob.items()}
        for key, w in weight.items():
            sel = chosen[key]
            for k, (_full, mask) in scatter_full(glob, self.spec, extract(glob, self.spec, sel), sel).items():
                counts[k].add_(mask.to(torch.float64), alpha=w)
        out = {k: v * self.plan.sampling_rate for k, v in counts.items()}
        self._cache = (signature, out)
        return dict(out)

    def noise_levels(self, std: dict[str, torch.Tensor | float]) -> dict[str, float]:
        """RMS noise std over the elements of the prefix submodel of every fleet width (what a device of that
        width deploys), ``privacy.noise_std.w<width>``: the utility cost of DP per width."""

        levels = self.ctx.fleet.levels if self.ctx.fleet is not None else (1.0,)
        full = {k: v if torch.is_tensor(v) else torch.tensor(float(v)) for k, v in std.items()}
        out = {}
        for rate in levels:
            sel = Prefix().select(self.spec.groups, group_sizes(self.ctx.model, self.ctx.info, rate), rnd=0,
                                  client=0, seed=0)
            sub = extract({k: v for k, v in full.items() if v.dim() > 0}, self.spec, sel)
            vals = torch.cat([v.reshape(-1) for v in sub.values()]) if sub else torch.zeros(1, dtype=torch.float64)
            out[f"privacy.noise_std.w{rate:g}"] = float(torch.sqrt(torch.mean(vals.to(torch.float64) ** 2)))
        return out


def make_adapter(algorithm: Any, ctx: Any, plan: PrivacyPlan) -> DenseUpdates | SlicedUpdates:

    cls = SlicedUpdates if isinstance(algorithm, HeteroFL) else DenseUpdates
    return cls(algorithm, ctx, plan)


class PrivateRound:
    """The ``[privacy]`` part of a round, for :class:`hetfl.rounds.Round` (see the module docstring)."""

    def __init__(self, algorithm: Any, ctx: Any, plan: PrivacyPlan) -> None:
        self.algorithm = algorithm
        self.ctx = ctx
        self.plan = plan
        self.adapter = make_adapter(algorithm, ctx, plan)
        self.eligible = np.asarray(plan.eligible, dtype=np.int64)
        self.last: dict[str, Any] = {}
        self.next_clip: float | None = None
        self.within_noised: float | None = None  # adaptive clipping: the noised fraction within C (released)
        # the seed of the round's private draws: None = OS entropy; the run seed only under reproducible_noise
        self.noise_seed: int | None = ctx.seed if plan.reproducible_noise else None

    def clip_of(self, state: Any) -> float | None:
        """This round's clipping norm: the plan's, or under adaptive clipping the one carried in the state."""
        if self.plan.adaptive_clip:
            return float(state.buffers.get(CLIP_BUFFER, self.plan.clip))
        return self.plan.clip

    def finish(self, state: Any) -> Any:
        """The state after the algorithm's server step, carrying the next round's clipping norm (adaptive)."""
        if not self.plan.adaptive_clip or self.next_clip is None:
            return state
        return type(state)(state.round, state.models, {**state.buffers, CLIP_BUFFER: self.next_clip})

    # ---------------------------------------------------------------- sampling
    def sample(self, rnd: int) -> np.ndarray:
        """Poisson sampling: each eligible client joins with probability q, independently (sorted ids).  The
        draw is private (OS entropy): who took part must stay unknown for the amplification by sampling that
        the accountant counts on, so it is no function of the seed either (unless reproducible_noise)."""
        rng = round_generator(self.noise_seed, rnd, POISSON_STREAM)
        return self.eligible[rng.random(len(self.eligible)) < self.plan.sampling_rate]

    # ---------------------------------------------------------------- aggregation
    def aggregate(self, state: Any, rnd: int, tasks: Sequence[Any], results: Iterable[Any]) -> Weights:
        """The private mean update applied to the global weights (the algorithm's ``server_step`` input)."""
        glob = state.models["global"]
        keys = self.adapter.released(glob)
        by_client = {int(t.client_id): t for t in tasks}
        sums = {k: torch.zeros(glob[k].shape, dtype=torch.float64, device=glob[k].device) for k in keys}
        clipped = reported = 0
        clip_now = self.clip_of(state)
        for res in results:
            task = by_client[int(res.client_id)]
            delta, _norm, was_clipped = clip_update(self.adapter.delta(task, res, keys), clip_now)
            self.adapter.place(sums, delta, res, state, rnd)
            reported += 1
            clipped += int(was_clipped)
        expected = self.adapter.expected(state, rnd, keys)
        z, c = self.plan.update_noise, clip_now
        gen = noise_generator(self.noise_seed, rnd) if z > 0 else None
        out = dict(glob)
        std: dict[str, torch.Tensor | float] = {}
        for k in keys:
            n = expected[k]
            total = sums[k]
            if gen is not None:  # N(0, (zC)^2) on the sum, drawn on the CPU so every device gets the same numbers
                total = total + torch.randn(total.shape, generator=gen, dtype=torch.float64).to(total.device) * (z * c)
            old = glob[k].to(torch.float64)
            if torch.is_tensor(n):
                held = n > 0
                new = torch.where(held, old + total / n.clamp_min(1e-300), old)
                std[k] = torch.where(held, (z * (c or 0.0)) / n.clamp_min(1e-300), torch.zeros_like(n))
            else:
                new = old + total / n
                std[k] = z * (c or 0.0) / n
            out[k] = new.to(glob[k].dtype)
        # the raw clipped fraction is released only without noise (no guarantee anyway): with clients_reported
        # and next_clip it would give back the count noise exactly.  Private runs release its noised version
        self.last = {} if z > 0 else {"privacy.clipped": round(clipped / reported, 6) if reported else 0.0}
        if self.plan.adaptive_clip:
            self.next_clip = self._next_clip(clip_now, reported - clipped, reported, rnd)
            self.last.update({"privacy.clip": clip_now, "privacy.next_clip": self.next_clip})
            if z > 0:
                self.last["privacy.within_noised"] = self.within_noised
        if z > 0:
            self.last.update({k: round(v, 8) for k, v in self.adapter.noise_levels(std).items()})
        return out

    def _next_clip(self, clip: float, within: int, reported: int, rnd: int) -> float:
        """Andrew et al.'s geometric update from the noised fraction of updates within the norm: the sum of
        ``b_k - 1/2`` (sensitivity 1/2) gets N(0, sigma_b^2) and is divided by the expected cohort q |E|."""
        p = self.plan
        noise = 0.0
        if p.noise_multiplier > 0:
            gen = round_generator(self.noise_seed, rnd, [NOISE_STREAM, 1])
            noise = float(gen.normal(0.0, p.count_noise))
        expected = p.sampling_rate * len(p.eligible)
        frac = (within - 0.5 * reported + noise) / expected + 0.5
        self.within_noised = float(frac)  # the released (noised) fraction within the norm
        return float(clip * np.exp(-p.clip_lr * (frac - p.target_quantile)))

    def metrics(self, rnd: int) -> dict[str, Any]:
        """The round's ``privacy.*`` columns: ``privacy.epsilon_rdp`` (the RDP upper bound after this round: cheap,
        every round), ``privacy.epsilon`` (the run's accountant, PLD by default: about half a second, so under
        PLD only in the run's last round; summary.json has it for the rounds done), the clipping norms and
        noised fraction (adaptive), the noise std per width; ``privacy.clipped`` only in runs without noise."""
        out = {"privacy.epsilon_rdp": self.plan.epsilon(rnd, "rdp")}
        if self.plan.accountant == "rdp" or rnd == self.plan.rounds:
            out["privacy.epsilon"] = self.plan.epsilon(rnd)
        return {**out, **self.last}


__all__ = ["DenseUpdates", "PrivateRound", "SlicedUpdates", "clip_update", "make_adapter", "noise_generator",
           "round_generator"]
