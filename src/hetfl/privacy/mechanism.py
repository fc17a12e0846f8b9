"""The private round step: Poisson sampling, per-client clipping, Gaussian noise on the sum, fixed denominators.

:class:`PrivateRound` takes two parts of :class:`hetfl.rounds.Round` when ``[privacy]`` is active:

* ``sample(rnd)`` instead of ``algorithm.sample_clients``: every eligible client joins independently
  with probability ``q`` (drawn from OS entropy like the noise: :mod:`hetfl.privacy.noise`);
* ``reducer(state, rnd)``: the reducer the algorithm's aggregation places its results into
  (:mod:`hetfl.aggregation`), a :class:`PrivateSum` instead of the plain mean.  Each accepted client's
  update (its values less the server's values at the coordinates its placement covers: its own slice,
  level, mask or family model) is scaled to L2 norm at most ``C``; the server sums the clipped updates
  element by element, adds ``N(0, (z C)^2)`` to every element some client can hold, and divides element
  ``j`` by its *expected* number of contributors ``E[n_j] = q * N_j`` (``N_j``: the eligible clients whose
  footprint this round holds ``j``, weighted by the probability of their level draw).  The result (old
  weights + that mean update) goes through the algorithm's own ``combine`` and ``server_step`` (server
  learning rates, momentum, FedDF's distillation of the noised family means: post-processing).

Every contribution is bounded by ``C`` in L2 norm whatever the overlap pattern, so the per-round release
is the Gaussian mechanism on a sum of sensitivity ``C``; denominators and the noise never depend on who
took part.  Nothing here knows an algorithm: placements and footprints come from the algorithm's own
``placer`` / ``footprints``.  docs/privacy.md has the derivation and what is not covered.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch

from hetfl.aggregation import Placement
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


def expected_counts(algorithm: Any, ctx: Any, state: Any, rnd: int, plan: PrivacyPlan,
                    cache: dict | None = None) -> dict[str, dict[str, torch.Tensor | float]]:
    """``E[n_j] = q * sum over eligible clients of P(the client's footprint this round holds j)``, per server model
    and released tensor (a float where every footprint holds the tensor whole).  Footprints come from the
    algorithm (:meth:`~hetfl.algorithms.base.Algorithm.footprints`); equal signatures are counted once."""
    fp = algorithm.footprints(state, rnd, ctx)
    weight: dict[tuple, float] = {}
    example: dict[tuple, Placement] = {}
    for c in plan.eligible:
        for p, f in fp(int(c)):
            if p <= 0:
                continue
            key = (f.model, f.signature)
            weight[key] = weight.get(key, 0.0) + p
            example.setdefault(key, f)
    signature = frozenset(weight.items())
    if cache is not None and cache.get("signature") == signature:
        return cache["counts"]
    scalar: dict[str, dict[str, float]] = {}
    tensor: dict[str, dict[str, torch.Tensor]] = {}
    for key, w in weight.items():
        f = example[key]
        ref_model = state.models[f.model]
        for name, piece in f.pieces.items():
            ref = ref_model[name]
            if not ref.is_floating_point():
                continue
            if piece.index is None and piece.mask is None:
                scalar.setdefault(f.model, {})[name] = scalar.get(f.model, {}).get(name, 0.0) + w
            else:
                t = tensor.setdefault(f.model, {}).get(name)
                if t is None:
                    t = tensor[f.model][name] = torch.zeros(ref.shape, dtype=torch.float64, device=ref.device)
                t.add_(piece.coverage(ref).to(torch.float64), alpha=w)
    q = plan.sampling_rate
    counts: dict[str, dict[str, torch.Tensor | float]] = {}
    for model in dict.fromkeys([*scalar, *tensor]):
        names = dict.fromkeys([*scalar.get(model, {}), *tensor.get(model, {})])
        ordered = [n for n in state.models[model] if n in names]  # the model's own order: the noise's draw order
        out: dict[str, torch.Tensor | float] = {}
        for name in ordered:
            s, t = scalar.get(model, {}).get(name), tensor.get(model, {}).get(name)
            if t is None:
                out[name] = q * s
            else:
                out[name] = (t + s if s is not None else t) * q
        counts[model] = out
    if cache is not None:
        cache.update(signature=signature, counts=counts)
    return counts


class PrivateSum:
    """The private reducer of one round (:mod:`hetfl.aggregation`): each placed result's update over its own
    coordinates (``value - the server's value there``), clipped to ``C`` in L2 norm as a whole, summed per
    element; at :meth:`result` noise ``N(0, (z C)^2)`` on every element some client could hold, and element
    ``j`` of the sum divided by its expected count ``E[n_j]`` (never by who reported).  A piece's ``share``
    (data-dependent weights such as HeteroFL's classifier rows) is not used."""

    private = True
    accepts_sums = False  # each update is clipped on its own

    def __init__(self, owner: PrivateRound, state: Any, rnd: int, counts: dict[str, dict[str, Any]],
                 clip: float | None) -> None:
        self.owner = owner
        self.state = state
        self.rnd = rnd
        self.counts = counts
        self.clip = clip
        self.sums = {model: {k: torch.zeros(state.models[model][k].shape, dtype=torch.float64,
                                            device=state.models[model][k].device) for k in keys}
                     for model, keys in counts.items()}
        self.clients = 0
        self.clipped = 0

    def add(self, placement: Placement) -> None:
        released = self.counts.get(placement.model, {})
        ref_model = self.state.models[placement.model]
        pieces, delta = {}, {}
        for name, piece in placement.pieces.items():
            if name not in released:
                continue
            ref = ref_model[name]
            d = piece.value.detach().to(device=ref.device, dtype=torch.float64) - piece.gather(ref).to(torch.float64)
            if piece.mask is not None:
                d = d * piece.mask.to(device=ref.device, dtype=torch.float64)
            pieces[name], delta[name] = piece, d
        clipped, _norm, was_clipped = clip_update(delta, self.clip)
        sums = self.sums[placement.model]
        for name, d in clipped.items():
            idx = pieces[name].index
            if idx is None:
                sums[name].add_(d.reshape(sums[name].shape))
            else:
                sums[name].view(-1).index_add_(0, idx.to(sums[name].device), d.reshape(-1))
        self.clients += 1
        self.clipped += int(was_clipped)

    def result(self) -> dict[str, Weights]:
        """Every released model: old weights + noised sum / expected count (released every round)."""
        owner, plan = self.owner, self.owner.plan
        z, c = plan.update_noise, self.clip
        gen = noise_generator(owner.noise_seed, self.rnd) if z > 0 else None
        out: dict[str, Weights] = {}
        std: dict[str, dict[str, torch.Tensor | float]] = {}
        for model, counts in self.counts.items():
            glob = self.state.models[model]
            new = dict(glob)
            std[model] = {}
            for k, n in counts.items():
                total = self.sums[model][k]
                if gen is not None:  # drawn on the CPU so every device gets the same numbers
                    noise = torch.randn(total.shape, generator=gen, dtype=torch.float64)
                    total = total + noise.to(total.device) * (z * c)
                old = glob[k].to(torch.float64)
                if torch.is_tensor(n):
                    held = n > 0
                    value = torch.where(held, old + total / n.clamp_min(1e-300), old)
                    std[model][k] = torch.where(held, (z * (c or 0.0)) / n.clamp_min(1e-300), torch.zeros_like(n))
                else:
                    value = old + total / n
                    std[model][k] = z * (c or 0.0) / n
                new[k] = value.to(glob[k].dtype)
            out[model] = new
        owner.released(self, std)
        return out


def noise_levels(algorithm: Any, ctx: Any, state: Any, std: dict[str, dict[str, torch.Tensor | float]]
                 ) -> dict[str, float]:
    """RMS noise std over the elements of every model a device deploys (``privacy.noise_std.<label>``, from the
    algorithm's deployed footprints), or over every released element (``privacy.noise_std``)."""

    def rms(values: list[torch.Tensor]) -> float:
        flat = torch.cat([v.reshape(-1).to(torch.float64) for v in values]) if values else torch.zeros(1)
        return float(torch.sqrt(torch.mean(flat ** 2)))

    def dense(model: str, k: str) -> torch.Tensor:
        v = std[model][k]
        ref = state.models[model][k]
        return v if torch.is_tensor(v) else torch.full(ref.shape, float(v), dtype=torch.float64, device=ref.device)

    deployed = algorithm.deployed_footprints(state, ctx)
    if not deployed:
        return {"privacy.noise_std": rms([dense(m, k) for m in std for k in std[m]])}
    out = {}
    for label, f in deployed.items():
        vals = []
        for k, piece in f.pieces.items():
            if k in std.get(f.model, {}):
                ref = state.models[f.model][k]
                vals.append(dense(f.model, k)[piece.coverage(ref)])
        out[f"privacy.noise_std.{label}"] = rms(vals)
    return out


class PrivateRound:
    """The ``[privacy]`` part of a round, for :class:`hetfl.rounds.Round` (see the module docstring)."""

    def __init__(self, algorithm: Any, ctx: Any, plan: PrivacyPlan) -> None:
        self.algorithm = algorithm
        self.ctx = ctx
        self.plan = plan
        self._counts: dict = {}  # expected counts, reused while the footprints' signature is unchanged
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
    def reducer(self, state: Any, rnd: int) -> PrivateSum:
        """The round's private reducer: the algorithm places its results into it as into any reducer."""
        counts = expected_counts(self.algorithm, self.ctx, state, rnd, self.plan, self._counts)
        return PrivateSum(self, state, rnd, counts, self.clip_of(state))

    def released(self, reducer: PrivateSum, std: dict[str, dict[str, torch.Tensor | float]]) -> None:
        """After a release: the round's metrics and (adaptive clipping) the next clipping norm."""
        reported, clipped, clip_now = reducer.clients, reducer.clipped, reducer.clip
        z = self.plan.update_noise
        # the raw clipped fraction is released only without noise (no guarantee anyway): with clients_reported
        # and next_clip it would give back the count noise exactly.  Private runs release its noised version
        self.last = {} if z > 0 else {"privacy.clipped": round(clipped / reported, 6) if reported else 0.0}
        if self.plan.adaptive_clip:
            self.next_clip = self._next_clip(clip_now, reported - clipped, reported, reducer.rnd)
            self.last.update({"privacy.clip": clip_now, "privacy.next_clip": self.next_clip})
            if z > 0:
                self.last["privacy.within_noised"] = self.within_noised
        if z > 0:
            levels = noise_levels(self.algorithm, self.ctx, reducer.state, std)
            self.last.update({k: round(v, 8) for k, v in levels.items()})

    def aggregate(self, state: Any, rnd: int, results: Iterable[Any]) -> Weights:
        """The private aggregate of ``results`` through the algorithm's placement (its new global weights)."""
        return self.algorithm.aggregate(state, rnd, results, self.ctx, reducer=self.reducer(state, rnd))

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


__all__ = ["PrivateRound", "PrivateSum", "clip_update", "expected_counts", "noise_generator", "noise_levels",
           "round_generator"]
