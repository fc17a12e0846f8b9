"""Successive layer training (SLT; Pfeiffer, Khalili, Henkel, NeurIPS 2023): the full model under a memory budget.

The model's layers (:func:`hetfl.hetero.layerwise.layer_steps`: its hidden Linear/Conv layers in forward order,
norms and the classifier joining the layer before) are trained in *stages* ``(s, b)``: the layers before ``b``
are full width, all later layers run at width ``s`` (their channel groups cut to the prefix of ``scaled(C, s)``
channels; a group a full-width layer produces stays full).  Of the full-width layers only the last ``depth``
train; those before are frozen: not trained, no gradients, no optimizer state, no stored activations, and not
uploaded (``ClientTask.extra["frozen"]``, so ``bytes_up`` and the per-tier costs count what really travels).
Stage ``(s0, 0)`` is the small model (everything at width ``s0``, nothing frozen), the last stage has ``s = 1``.

**Budget and schedule.** Every fleet tier has a training-memory budget (``budget``, :mod:`hetfl.hetero.budgets`):
``"width"`` (SLT's) the training memory of the whole model at the tier's fleet width, ``"device(share=...)"`` that
share of the RAM of the tier's smallest device. Memory is :func:`hetfl.accounting.training_memory` (float32
weights, the trainable part's gradients and SGD buffer, one batch of the activations backpropagation keeps). From
the weakest tier's budget the stages are derived as SLT's tables are: for ``b = 0, 1, ...`` the largest ``s`` (in
steps of 0.001) whose stage with ``depth = 1`` fits; a boundary where none fits is skipped; the table ends at the
first ``s = 1``.
``stages = "0.25x0,0.5x2,1x3"`` (``WIDTHxLAYERS``) gives the table instead.  The small-model stage takes
``int(s0 * rounds)`` rounds, the others share the rest in proportion to their trainable parameters (largest
remainder); ``stage_rounds = "10,5,5"`` gives the counts instead.  Every tier follows the one table; a stronger
tier trains the largest ``depth`` (full-width layers before ``b``) that fits its own budget.

The server averages every element over the clients that uploaded it (unweighted by default, as SLT); elements
nobody trained keep their value (:class:`~hetfl.algorithms.submodel.SubmodelFL`'s placement).  Evaluated: the full
model (``global``) and the current stage's network (``stage``).  See docs/submodels.md for where this follows
or differs from the paper and its code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from torch import nn

from hetfl.accounting import tier_label, training_memory
from hetfl.algorithms.base import (
    FROZEN,
    ClientResult,
    ClientTask,
    Context,
    EvalTarget,
    ServerState,
    Weights,
    round_seed,
    weights_of,
)
from hetfl.algorithms.heterofl import _bn_stat_keys
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.algorithms.submodel import SubmodelFL
from hetfl.data.base import Split
from hetfl.errors import ConfigError
from hetfl.hetero import spec_for
from hetfl.hetero.budgets import DeviceBudget, WidthBudget
from hetfl.hetero.budgets import memory_budget as budget_rule
from hetfl.hetero.extract import extract
from hetfl.hetero.layerwise import Layers, frozen_keys, layer_steps, layerwise_ref
from hetfl.hetero.policy import IndexPolicy, Prefix, Selection
from hetfl.hetero.spec import FIXED
from hetfl.models import ModelRef, scaled
from hetfl.train import local_sgd

Level = tuple[float, int, int]  # (width s of the layers from b on, boundary b, trained full-width layers depth)
PLAN = "slt"  # buffers key: the stage table, rounds, depths and memories (tensors: checkpoints load them as such)


def parse_stages(text: str) -> tuple[tuple[float, int], ...]:
    """``"0.25x0,1x3"`` -> ((0.25, 0), (1.0, 3))."""
    out = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        try:
            w, b = part.lower().split("x")
            stage = (float(w), int(b))
        except ValueError:
            raise ConfigError(f"algorithm.stages: cannot read {part!r} in {text!r}; write WIDTHxLAYERS pairs, e.g. "
                              f"'0.25x0,0.5x2,1x3' (width in (0, 1], full-width layers >= 0)") from None
        if not (0 < stage[0] <= 1 and stage[1] >= 0):
            raise ConfigError(f"algorithm.stages: {part!r} in {text!r} needs a width in (0, 1] and layers >= 0")
        out.append(stage)
    return tuple(out)


def fit_width(memory: Callable[[float], int], budget: float, resolution: int = 1000) -> float | None:
    """The largest ``s`` in ``{k / resolution}`` with ``memory(s) <= budget`` (memory grows with ``s``), or None."""
    if memory(1.0) <= budget:
        return 1.0
    if memory(1 / resolution) > budget:
        return None
    lo, hi = 1, resolution
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if memory(mid / resolution) <= budget else (lo, mid)
    return lo / resolution


def derive_stages(memory: Callable[[float, int, int], int], num_layers: int, budget: float
                  ) -> tuple[tuple[float, int], ...]:
    """SLT's table for ``budget``: the small model, then per boundary the widest head that fits (depth 1)."""
    s0 = fit_width(lambda s: memory(s, 0, 0), budget)
    if s0 is None:
        raise ConfigError(f"algorithm.budget: {budget:.0f} bytes do not fit even the model at width 0.001")
    stages = [(s0, 0)]
    for b in range(1, num_layers + 1):
        if stages[-1][0] == 1.0:
            break
        s = fit_width(lambda s, b=b: memory(s, b, 1), budget)
        if s is not None:
            stages.append((s, b))
    if stages[-1][0] != 1.0:
        raise ConfigError(f"algorithm.budget: {budget:.0f} bytes do not fit training the last layer at full width "
                          f"({memory(1.0, num_layers, 1)} bytes): SLT cannot reach the full model")
    return tuple(stages)


def allocate_rounds(stages: Sequence[tuple[float, int]], trainable: Sequence[int], rounds: int) -> list[int]:
    """Rounds per stage: a small-model first stage ``(s0, 0)`` takes ``int(s0 * rounds)``, the others share the
    rest in proportion to ``trainable`` (largest remainder, earlier stages first on ties); the last stage gets at
    least one round if any is left."""
    if len(stages) == 1:
        return [rounds]
    first = int(stages[0][0] * rounds) if stages[0][1] == 0 else 0
    share = np.asarray(trainable[1:] if stages[0][1] == 0 else trainable, dtype=np.float64)
    rest = rounds - first
    exact = rest * share / share.sum()
    counts = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - counts), kind="stable")[: rest - counts.sum()]:
        counts[i] += 1
    if counts[-1] == 0 and rest > 0:  # the full-width stage always runs: one round from the longest
        counts[int(np.argmax(counts))] -= 1
        counts[-1] = 1
    return ([first] if stages[0][1] == 0 else []) + [int(c) for c in counts]


def stage_of(rounds: Sequence[int], rnd: int) -> int:
    """The stage index of round ``rnd`` (1-based) under ``rounds`` per stage (past the end: the last stage)."""
    ends = np.cumsum(rounds)
    return int(min(np.searchsorted(ends, rnd, side="left"), len(rounds) - 1))


@ALGORITHMS.register("slt")
@dataclass(frozen=True)
class SLT(SubmodelFL):
    """SLT: the full model trained stage by stage under a memory budget (trained layers full width then frozen,
    the later ones narrow); see the module docstring."""

    stages: str = ""  # "WIDTHxLAYERS,..." (e.g. "0.25x0,0.5x2,1x3"); "" = derived from the weakest tier's budget
    stage_rounds: str = ""  # rounds per stage, e.g. "10,5,5" (sum = the run's rounds); "" = SLT's rule
    budget: str = "width"  # a tier's memory budget (hetfl.hetero.budgets): "width", "device(share=0.001)"
    static_bn: bool = True  # BatchNorm statistics are not averaged; recomputed at evaluation (as HeteroFL)
    eval_stage: bool = True  # also evaluate the current stage's network ("stage")

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_stages(self.stages)
        self._rounds_text()
        self.memory_budget  # noqa: B018  (a bad budget: ConfigError naming the field)

    def _rounds_text(self) -> tuple[int, ...]:
        try:
            out = tuple(int(p) for p in self.stage_rounds.split(",") if p.strip())
        except ValueError:
            out = (-1,)
        if any(r < 0 for r in out):
            raise ConfigError(f"algorithm.stage_rounds must be comma-separated round counts >= 0 like '10,5,5', "
                              f"got {self.stage_rounds!r}")
        return out

    @cached_property
    def memory_budget(self) -> WidthBudget | DeviceBudget:
        """The memory budget rule (:mod:`hetfl.hetero.budgets`)."""
        return budget_rule(self.budget)

    # ------------------------------------------------------------------ levels
    def layers(self, ctx: Context) -> Layers:
        return layer_steps(ctx.model, ctx.info)

    def sizes(self, ctx: Context, level: Level) -> dict[int, int]:
        """Channels per group at ``level``: full for the groups the layers before ``b`` produce, else ``scaled``."""
        spec = spec_for(ctx.model, ctx.info)
        full = set(self.layers(ctx).groups[: int(level[1])])
        return {g: (grp.size if g in full else scaled(grp.units, level[0]) * grp.block)
                for g, grp in spec.groups.items() if g != FIXED}

    def frozen_modules(self, ctx: Context, level: Level) -> tuple[str, ...]:
        return tuple(m for layer in self.layers(ctx).modules[: max(0, int(level[1]) - int(level[2]))] for m in layer)

    def level_ref(self, ctx: Context, level: Level) -> ModelRef:
        spec = spec_for(ctx.model, ctx.info)
        sizes = {g: n for g, n in self.sizes(ctx, level).items() if n < spec.groups[g].size}
        frozen = self.frozen_modules(ctx, level)
        return ctx.model if not sizes and not frozen else layerwise_ref(ctx.model, sizes, frozen)

    def level_width(self, level: Level) -> float:
        return float(level[0])

    def level_selection(self, ctx: Context, level: Level, rnd: int = 0, client: int = 0,
                        policy: IndexPolicy | None = None) -> Selection:
        spec = spec_for(ctx.model, ctx.info)
        return (policy or self.channels).select(spec.groups, self.sizes(ctx, level), rnd=rnd, client=client,
                                                seed=ctx.seed)

    def level_keys(self, ctx: Context, level: Level, glob: Weights) -> list[str]:
        frozen = set(frozen_keys(self.level_ref(ctx, level), ctx.info))
        return [k for k in super().level_keys(ctx, level, glob) if k not in frozen]

    def skip_keys(self, glob: Weights) -> frozenset[str]:
        return _bn_stat_keys(glob) if self.static_bn else frozenset()

    def memory(self, ctx: Context, level: Level) -> int:
        t = ctx.train
        return training_memory(self.level_ref(ctx, level), ctx.info, t.batch_size, momentum=t.momentum > 0)

    # ------------------------------------------------------------------ the plan, made once
    def budgets(self, ctx: Context) -> list[float]:
        """Training-memory budget in bytes of every fleet tier (strongest first)."""
        return self.memory_budget.tiers(ctx)

    def make_plan(self, ctx: Context) -> dict[str, torch.Tensor]:
        layers = self.layers(ctx)
        budgets = self.budgets(ctx)
        if self.stages:
            stages = parse_stages(self.stages)
            for s, b in stages:
                if b > len(layers):
                    names = ", ".join(m[0] for m in layers.modules)
                    raise ConfigError(f"algorithm.stages: {s:g}x{b} asks for {b} full-width layers, but model "
                                      f"{ctx.model.name!r} has {len(layers)}: {names}")
        else:
            stages = derive_stages(lambda s, b, d: self.memory(ctx, (s, b, d)), len(layers), min(budgets))
        given = self._rounds_text()
        if given:
            if len(given) != len(stages) or sum(given) != ctx.rounds:
                raise ConfigError(f"algorithm.stage_rounds {self.stage_rounds!r} must give one count per stage "
                                  f"({len(stages)}: {', '.join(f'{s:g}x{b}' for s, b in stages)}) summing to the "
                                  f"run's rounds ({ctx.rounds})")
            rounds = list(given)
        else:
            with torch.random.fork_rng(devices=[]):
                trainable = [sum(p.numel() for p in self.level_ref(ctx, (s, b, min(b, 1))).build(ctx.info).parameters()
                                 if p.requires_grad) for s, b in stages]
            rounds = allocate_rounds(stages, trainable, ctx.rounds)
        depth, memory = [], []
        for s, b in stages:
            row = []
            for budget in budgets:  # the deepest full-width training that fits this tier (at least 1 layer)
                fits = [d for d in range(1, b + 1) if self.memory(ctx, (s, b, d)) <= budget]
                row.append(max(fits) if fits else min(b, 1))
            depth.append(row)
            memory.append([self.memory(ctx, (s, b, d)) for d in row])
        return {"stages": torch.tensor([[s, b] for s, b in stages], dtype=torch.float64),
                "rounds": torch.tensor(rounds, dtype=torch.int64),
                "depth": torch.tensor(depth, dtype=torch.int64),
                "memory": torch.tensor(memory, dtype=torch.int64),
                "budget": torch.tensor(budgets, dtype=torch.float64)}

    def level_of(self, plan: dict[str, torch.Tensor], rnd: int, tier: int) -> Level:
        i = stage_of(plan["rounds"].tolist(), rnd)
        s, b = plan["stages"][i].tolist()
        return (float(s), int(b), int(plan["depth"][i, tier]))

    def plan_law(self, state: ServerState, ctx: Context, rnd: int):
        plan = state.buffers[PLAN]
        tiers = ctx.fleet.tiers() if ctx.fleet is not None else np.zeros(ctx.num_clients, dtype=np.int64)

        def of(client: int) -> Level:
            return self.level_of(plan, rnd, int(tiers[client]))

        return of, lambda client: {of(client): 1.0}

    # ------------------------------------------------------------------ server
    def init_state(self, ctx: Context) -> ServerState:
        self.layers(ctx)  # fail early (clear error) if the model's layers cannot take per-layer widths
        plan = self.make_plan(ctx)
        torch.manual_seed(round_seed(ctx.seed, 0))  # the same initial model as FedAvg
        glob = weights_of(ctx.model.build(ctx.info))
        return ServerState(round=0, models={"global": glob}, buffers={PLAN: plan})

    def model_refs(self, ctx: Context) -> list[ModelRef]:
        plan = self.make_plan(ctx)
        refs = {self.level_of(plan, r, t) for r in range(1, ctx.rounds + 1) for t in range(plan["depth"].shape[1])}
        return [ctx.model, *sorted({self.level_ref(ctx, lv) for lv in refs} - {ctx.model}, key=str)]

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int], ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        glob = state.models["global"]
        spec = spec_for(ctx.model, ctx.info)
        plan = self.level_plan(state, ctx, rnd)
        tasks = []
        for c in clients:
            level = plan.of(int(c))
            ref = self.level_ref(ctx, level)
            frozen = frozen_keys(ref, ctx.info)
            tasks.append(ClientTask(int(c), ref, extract(glob, spec, self.level_selection(ctx, level, rnd, int(c))),
                                    train, round_seed(ctx.seed, rnd, int(c)), {FROZEN: list(frozen)} if frozen else {}))
        return tasks

    def server_step(self, state: ServerState, update: Weights, ctx: Context) -> ServerState:
        models = {**state.models, "global": update} if update else state.models
        rnd = state.round + 1
        plan = state.buffers[PLAN]
        i = stage_of(plan["rounds"].tolist(), rnd)
        s, b = plan["stages"][i].tolist()
        metrics: dict[str, Any] = {"slt.stage": i, "slt.width": s, "slt.layers": int(b)}
        labels = [tier_label(w) for w in (ctx.fleet.levels if ctx.fleet is not None else (1.0,))]
        for t, label in enumerate(labels):
            metrics[f"slt.depth.{label}"] = int(plan["depth"][i, t])
            metrics[f"slt.memory_bytes.{label}"] = int(plan["memory"][i, t])
            metrics[f"slt.budget_bytes.{label}"] = int(plan["budget"][t])
        return ServerState(rnd, models, {**state.buffers, "metrics": metrics})

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        glob = state.models["global"]
        calibrate = self.static_bn and bool(_bn_stat_keys(glob))
        targets = {"global": EvalTarget(ctx.model, glob, calibrate_bn=calibrate)}
        if self.eval_stage:
            s, b, _ = self.level_of(state.buffers[PLAN], max(state.round, 1), 0)
            ref = self.level_ref(ctx, (s, b, b))  # the stage's network, nothing frozen
            if ref != ctx.model:
                sel = self.level_selection(ctx, (s, b, b), policy=Prefix())
                targets["stage"] = EvalTarget(ref, extract(glob, spec_for(ctx.model, ctx.info), sel),
                                              calibrate_bn=calibrate)
        return targets

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """The stages as run: (stage, width, full-width layers, first round)."""
        out, last = [], None
        for row in rows:
            key = (row.get("slt.stage"), row.get("slt.width"), row.get("slt.layers"))
            if key[0] is not None and key != last:
                out.append([*key, row.get("round")])
                last = key
        return {"slt_stages": out} if out else {}

    # ------------------------------------------------------------------ client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        stats = local_sgd(model, data, task.train, seed=task.seed, device=device)
        frozen = set(task.extra.get(FROZEN, ()))  # received, not trained, not sent back
        weights = {k: v for k, v in weights_of(model).items() if k not in frozen}
        return ClientResult(task.client_id, len(data), weights, {"train_loss": stats.loss, "steps": stats.steps})


__all__ = ["SLT", "allocate_rounds", "derive_stages", "fit_width", "parse_stages", "stage_of"]
