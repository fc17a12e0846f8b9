"""The width part of a submodel method: which width every client trains in a round, and the server state
a width schedule keeps (the per-width validation losses of ``adaptive``).

:class:`Widths` wraps one :class:`~hetfl.hetero.sampling.WidthSchedule` with what it needs from a run: the
fleet's levels and this round's affordable widths, every client's training samples per round, and, when
the schedule sets ``needs_validation``, a labeled validation split the server holds (drawn before
partitioning) on which it evaluates the prefix submodel of every level after each round.  Everything is a
pure function of (seed, round, client, server state), so the server recomputes any client's width when
its update comes back.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from hetfl.data.server import ServerDataSpec
from hetfl.hetero import prefix_submodel
from hetfl.hetero.extract import Weights
from hetfl.hetero.sampling import MaxWidth, WidthPlan, WidthSchedule, level_label, plan_round

#: ``ctx`` below is the run's :class:`hetfl.algorithms.base.Context` (its fleet, train config, seed, client
#: sizes); typed ``Context = Any`` here so that hetero imports nothing of the algorithms above it.
Context = Any

LOSS_KEY = "width_loss"  # ServerState.buffers: moving average of every level's validation loss


@dataclass(frozen=True)
class Widths:
    """Which width each client trains: its fleet width (``max``) or a draw of the width schedule."""

    schedule: WidthSchedule

    @property
    def fixed(self) -> bool:
        """Every client trains its fleet width (no draw, no server state)."""
        return isinstance(self.schedule, MaxWidth)

    def fleet_widths(self, ctx: Context, rnd: int) -> np.ndarray:
        """Every client's affordable width in round ``rnd`` (1 for all without a fleet)."""
        if ctx.fleet is None:
            return np.ones(ctx.num_clients)
        return ctx.fleet.widths(rnd, ctx.seed)

    def plan(self, buffers: dict[str, Any], ctx: Context, rnd: int) -> WidthPlan | None:
        """The round's width draws (None: every client trains its fleet width)."""
        if self.fixed or ctx.fleet is None:
            return None
        t = ctx.train
        samples = np.full(ctx.num_clients, float(t.steps * t.batch_size)) if t.steps > 0 else \
            np.asarray(ctx.client_sizes, dtype=np.float64) * t.epochs
        return plan_round(self.schedule, levels=ctx.fleet.levels, max_width=self.fleet_widths(ctx, rnd),
                          fixed_max_width=ctx.fleet.max_width, samples=samples, buffers=buffers,
                          seed=ctx.seed, rnd=rnd)

    def rate_of(self, buffers: dict[str, Any], ctx: Context, rnd: int) -> Callable[[int], float]:
        """The width a client trains in round ``rnd``, as a function of its id (the round planned once)."""
        plan = self.plan(buffers, ctx, rnd)
        if plan is not None:
            return plan.rate
        widths = self.fleet_widths(ctx, rnd)
        return lambda client: float(widths[int(client)])

    def law(self, buffers: dict[str, Any], ctx: Context, rnd: int) -> Callable[[int], dict[float, float]]:
        """The width a client trains in round ``rnd`` as a law ``{width: probability}`` (one width with
        probability 1 unless the schedule draws), for any client, sampled or not (the round planned once)."""
        plan = self.plan(buffers, ctx, rnd)
        if plan is None or not plan.schedule.randomized:
            rate = self.rate_of(buffers, ctx, rnd) if plan is None else plan.rate
            return lambda client: {float(rate(int(client))): 1.0}

        def law(client: int) -> dict[float, float]:
            row = plan.probs[int(plan.inputs.tiers[int(client)])]
            return {float(plan.inputs.levels[j]): float(p) for j, p in enumerate(row) if p > 0}

        return law

    def rates(self, buffers: dict[str, Any], ctx: Context, rnd: int, clients: Sequence[int]) -> list[float]:
        """The width each of ``clients`` trains in round ``rnd``."""
        rate = self.rate_of(buffers, ctx, rnd)
        return [rate(int(c)) for c in clients]

    # ------------------------------------------------------------------ server state
    def server_data_spec(self) -> ServerDataSpec | None:
        """The labeled validation split a schedule with ``needs_validation`` evaluates on."""
        if not self.schedule.needs_validation:
            return None
        val_size = getattr(self.schedule, "val_size", 500)
        return ServerDataSpec(source="noise", size=1, val_size=val_size, where="algorithm.width_schedule")

    def init_buffers(self, glob: Weights, ctx: Context, batch_stats: bool) -> dict[str, Any]:
        """The schedule's state before round 1 (the initial model's validation losses)."""
        losses = self.validation_losses(glob, ctx, batch_stats)
        return {} if losses is None else {LOSS_KEY: torch.as_tensor(losses, dtype=torch.float64)}

    def step(self, buffers: dict[str, Any], glob: Weights | None, ctx: Context, rnd: int,
             batch_stats: bool) -> dict[str, Any] | None:
        """The buffers after a round whose new global weights are ``glob`` (None: nothing was aggregated),
        with the round's width metrics under ``"metrics"``; None when the schedule keeps no state."""
        plan = self.plan(buffers, ctx, rnd)
        if plan is None:
            return None
        out = dict(buffers)
        metrics = plan.metrics()
        losses = self.validation_losses(glob, ctx, batch_stats) if glob is not None else None
        if losses is not None:
            old = out.get(LOSS_KEY)
            ema = self.schedule.update(None if old is None else old.numpy(), losses)
            out[LOSS_KEY] = torch.as_tensor(ema, dtype=torch.float64)
            metrics.update({f"width_val_loss.{level_label(w)}": round(float(v), 6)
                            for w, v in zip(ctx.fleet.levels, losses)})
        out["metrics"] = metrics
        return out

    def validation_losses(self, glob: Weights, ctx: Context, batch_stats: bool) -> np.ndarray | None:
        """Cross-entropy of the prefix submodel of every fleet level on the server's validation split
        (``batch_stats``: BatchNorm in training mode, as static BN keeps no averaged running statistics)."""
        if not self.schedule.needs_validation or ctx.server_data is None or ctx.server_data.val is None:
            return None
        val = ctx.server_data.val
        levels = ctx.fleet.levels if ctx.fleet is not None else (1.0,)
        out = []
        with torch.no_grad():
            for rate in levels:
                ref, weights = prefix_submodel(ctx.model, ctx.info, glob, rate)
                model = ref.build(ctx.info).to(val.x.device)
                model.load_state_dict(weights)
                model.train(batch_stats)
                losses = [F.cross_entropy(model(val.x[i:i + 1000]), val.y[i:i + 1000], reduction="sum")
                          for i in range(0, len(val), 1000)]
                out.append(float(torch.stack(losses).sum()) / len(val))
        return np.asarray(out)
