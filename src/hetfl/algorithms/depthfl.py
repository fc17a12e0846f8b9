"""Depth (and width x depth) submodels: the shared round, and DepthFL.

:class:`MultiExitFL` is the one round of every depth-heterogeneous method.  The global model is the
registered model seen as blocks with an exit after every block some level cuts at
(:mod:`hetfl.hetero.depth`, the ``multi_exit`` model).  A client of fleet tier ``t`` trains the level
``(width, depth)`` that ``levels`` gives that tier: its weights are the global weights of the first
``scaled(K, depth)`` blocks and its exits, sliced to ``width`` by the width spec
(:mod:`hetfl.hetero.extract`).  The server averages every element over the clients that hold it
(unweighted by default, as DepthFL, ScaleFL and InclusiveFL do); a block or exit nobody trained keeps its
value.  Methods differ only in the loss over the exits (:meth:`MultiExitFL.exit_loss`), in which exits a
client trains, in the global prediction, and (InclusiveFL) in a server-side rule.

``levels`` is a comma-separated list of ``WIDTHxDEPTH`` pairs, strongest first.  The fleet's tiers
(strongest first) take entries spread over the list: with ``T`` tiers and ``n`` entries, tier ``t``
takes entry ``round(t * (n - 1) / (T - 1))``, so the strongest tier gets the first entry and the
weakest the last (with more tiers than entries, neighbouring tiers share one); a one-tier fleet gets the
first.  Width-only, depth-only and nested width x depth
fleets are therefore configs (``"1x1,0.5x1"``, ``"1x1,1x0.5"``, ``"1x1,0.5x0.5"``), not code.

Two options of every depth method: ``per_level`` keeps the keys it names (``"norm"``: the normalisation layers)
as one copy per level, averaged over that level's clients only (NeFL's inconsistent parameters; the server holds
``key@<level label>``, :func:`hetfl.aggregation.owned_by_level`); ``dyn`` adds FedDyn's client regularizer with
explicit per-client state and its server correction (:mod:`hetfl.algorithms.feddyn`).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cached_property, lru_cache
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from hetfl.aggregation import level_key
from hetfl.algorithms.base import (
    ClientResult,
    ClientTask,
    Context,
    EvalTarget,
    ServerState,
    Weights,
    round_seed,
    weights_of,
)
from hetfl.algorithms.feddyn import (
    DYN,
    DynClients,
    DynUpdate,
    client_state_after,
    client_term,
    init_dyn,
    param_keys,
    server_correction,
)
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.algorithms.submodel import WINDOWS, SubmodelFL, keys_of
from hetfl.data.base import DataInfo, Split
from hetfl.errors import ConfigError
from hetfl.hetero import group_sizes, spec_for, submodel_ref
from hetfl.hetero.depth import depth_rule, encode_params, plan_for
from hetfl.hetero.extract import extract
from hetfl.hetero.losses import ExitsCE, LossRule, MutualKD, loss_rule, mutual_kl
from hetfl.hetero.multi_exit import multi_exit  # noqa: F401  (registers the multi_exit model these algorithms train)
from hetfl.hetero.policy import IndexPolicy, Prefix
from hetfl.hetero.sampling import width_schedule
from hetfl.hetero.widths import Widths
from hetfl.models import ModelRef
from hetfl.train import local_sgd

Level = tuple[float, float]  # (width, depth)


def parse_levels(text: str) -> tuple[Level, ...]:
    """``"1x1,0.5x0.75"`` -> ((1.0, 1.0), (0.5, 0.75))."""
    out = []
    for part in (p.strip() for p in str(text).split(",") if p.strip()):
        try:
            w, d = (float(x) for x in part.lower().split("x"))
        except ValueError:
            raise ConfigError(f"algorithm.levels: cannot read {part!r} in {text!r}; write WIDTHxDEPTH pairs, "
                              f"strongest first, e.g. '1x1,1x0.5' (fractions in (0, 1])") from None
        if not (0 < w <= 1 and 0 < d <= 1):
            raise ConfigError(f"algorithm.levels: {part!r} in {text!r} is outside (0, 1]")
        out.append((w, d))
    if not out:
        raise ConfigError("algorithm.levels is empty; write WIDTHxDEPTH pairs like '1x1,1x0.5'")
    return tuple(out)


def levels_for_tiers(levels: Sequence[Level], tiers: int) -> tuple[Level, ...]:
    """The level of every fleet tier (strongest first): entries spread over ``levels``."""
    n = len(levels)
    if tiers == 1:
        return (levels[0],)
    return tuple(levels[round(t * (n - 1) / (tiers - 1))] for t in range(tiers))


def level_label(level: Level) -> str:
    return f"w{level[0]:g}d{level[1]:g}"


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)


def per_level_entries(text: str) -> tuple[str, ...]:
    """``algorithm.per_level`` as its entries: ``"norm"`` or key patterns (``fnmatch``), comma-separated."""
    entries = tuple(e.strip() for e in str(text).split(",") if e.strip())
    for e in entries:
        if "@" in e:
            raise ConfigError(f"algorithm.per_level: {e!r} in {text!r} contains '@', which marks the per-level "
                              f"copies themselves; write \"norm\" or patterns of the model's keys, e.g. \"*.step\"")
    return entries


@lru_cache(maxsize=64)
def owned_keys(ref: ModelRef, info: DataInfo, text: str) -> frozenset[str]:
    """The floating state-dict keys of ``ref``'s model that ``algorithm.per_level`` names (``"norm"``: every
    tensor of a BatchNorm / GroupNorm / LayerNorm layer; otherwise an ``fnmatch`` pattern, which must match)."""
    with torch.random.fork_rng(devices=[]):
        model = ref.build(info)
    state = {k: v for k, v in model.state_dict().items() if v.is_floating_point()}
    out: set[str] = set()
    for entry in per_level_entries(text):
        if entry == "norm":
            for name, mod in model.named_modules():
                if isinstance(mod, _NORMS):
                    out |= {k for k in state if k.rsplit(".", 1)[0] == name}
            continue
        hits = {k for k in state if fnmatch.fnmatchcase(k, entry)}
        if not hits:
            raise ConfigError(f"algorithm.per_level: {entry!r} matches no floating tensor of the model (keys look "
                              f"like {', '.join(list(state)[:4])}, ...)")
        out |= hits
    return frozenset(out)


@lru_cache(maxsize=64)
def shapes_of(ref: ModelRef, info: DataInfo) -> dict[str, tuple[int, ...]]:
    """State-dict shapes of the model ``ref`` builds (cached; do not modify the returned dict)."""
    with torch.random.fork_rng(devices=[]):
        return {k: tuple(v.shape) for k, v in ref.build(info).state_dict().items()}


@dataclass(frozen=True)
class MultiExitFL(SubmodelFL):
    """Base of the depth-heterogeneous methods (not registered): see the module docstring.

    A level is a ``(width, depth)`` pair; the round's parts (level plan, index policy, placement, footprints)
    are :class:`~hetfl.algorithms.submodel.SubmodelFL`'s."""

    levels: str = "1x1,1x0.75,1x0.5,1x0.25"
    eval_levels: bool = True
    #: which fleet tier's level a client trains in a round: a width schedule (hetfl.hetero.sampling) over the
    #: tiers, e.g. "mixture(q=0.25)": a client of tier t may train the level of any weaker tier
    level_schedule: str = "max"
    #: the client's loss over its exits (hetfl.hetero.losses), e.g. "exits(masked=true)"; "" = the method's own
    loss: str = ""
    #: how many blocks a level's depth fraction keeps (hetfl.hetero.depth.DEPTH_RULES): "ceil", "round", ...
    depth_rule: str = "ceil"
    #: FedDyn's alpha (0: off): clients add -<theta, h_i> + alpha/2 ||theta - theta_g||^2 with their own state h_i,
    #: the server corrects the mean with its h (hetfl.algorithms.feddyn; DepthFL's Flower baseline: 0.1)
    dyn: float = 0.0
    #: keys kept as one copy per level and averaged over that level's clients only (NeFL's "inconsistent
    #: parameters"): comma-separated "norm" (every normalisation layer's tensors) or key patterns ("*.step");
    #: "" = none (every key shared)
    per_level: str = ""

    #: the global prediction: "ensemble" (mean of the exits' logits) or "last" (the deepest exit)
    global_output: ClassVar[str] = "last"
    #: which exits a client trains: "all" (every exit up to its depth) or "deepest" (one classifier)
    client_exits: ClassVar[str] = "all"

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_levels(self.levels)
        self.channels, self.loss_rule, depth_rule(self.depth_rule)  # noqa: B018  (unknown names or bad parameters: ConfigError naming the field)
        per_level_entries(self.per_level)
        if not self.dyn >= 0:
            raise ConfigError(f"algorithm.dyn (FedDyn's alpha) must be >= 0 (0: off), got {self.dyn}")
        if self.dyn > 0 and self.eval_window == "trained":
            raise ConfigError('algorithm.dyn (FedDyn) with algorithm.eval_window = "trained" is not supported '
                              '(both carry state beside the averaged weights); use eval_window = "prefix" or dyn = 0')
        if self.schedule.schedule.needs_validation:
            raise ConfigError(f"algorithm.level_schedule: {self.level_schedule!r} needs every width's validation "
                              f"loss, which the depth methods do not compute; use max, uniform, mixture(q=...) "
                              f"or coverage(target=...)")

    @property
    def private_refusal(self) -> str | None:  # type: ignore[override]
        """FedDyn's server step reads every client's own state and the per-element holder counts beside the
        reducer, which a private round does not allow."""
        if self.dyn > 0:
            return ("algorithm.dyn (FedDyn) keeps per-client state that the server side updates from each raw "
                    "result; set algorithm.dyn = 0 to run under [privacy]")
        return None

    @property
    def reads_beside_mean(self) -> bool:
        """Only FedDyn (``dyn``) reads results beside the mean (its side channel and server correction)."""
        return self.dyn > 0

    @cached_property
    def loss_rule(self) -> LossRule:
        """The client's loss over its exits: ``algorithm.loss``, or the method's own (:meth:`default_loss`)."""
        return loss_rule(self.loss) if self.loss else self.default_loss()

    def default_loss(self) -> LossRule:
        return ExitsCE()

    @property
    def schedule(self) -> Widths:
        """The level schedule, run over the fleet's tiers (their widths stand for the tiers' levels)."""
        return Widths(width_schedule(self.level_schedule, "algorithm.level_schedule"))

    # ------------------------------------------------------------------ levels and models
    def level_table(self, ctx: Context) -> tuple[Level, ...]:
        tiers = len(ctx.fleet.levels) if ctx.fleet is not None else 1
        return levels_for_tiers(parse_levels(self.levels), tiers)

    def tiers(self, ctx: Context, rnd: int) -> np.ndarray:
        """Every client's fleet tier in round ``rnd`` (dynamic fleets redraw it)."""
        if ctx.fleet is None:
            return np.zeros(ctx.num_clients, dtype=np.int64)
        return ctx.fleet.tiers_of(ctx.fleet.widths(rnd, ctx.seed))

    def exit_fractions(self, ctx: Context) -> tuple[float, ...]:
        """Depths an exit sits at: every level's depth below 1 (the full depth has the model's own head)."""
        return tuple(sorted({d for _, d in self.level_table(ctx) if d < 1}))

    def _ref(self, ctx: Context, depth: float, exits: Sequence[float], output: str) -> ModelRef:
        if ctx.model.name == "multi_exit":
            raise ConfigError("the depth algorithms build the multi_exit model themselves: set model.name to the "
                              "base model (mlp, cnn, resnet, transformer, ...)")
        params = (("base", ctx.model.name), ("base_params", encode_params(ctx.model.params)), ("depth", float(depth)),
                  ("exits", ",".join(f"{f:g}" for f in exits)), ("output", output))
        if self.depth_rule != "ceil":  # the default stays out of the ref: the same models as before the rule existed
            params += (("blocks", self.depth_rule),)
        return ModelRef("multi_exit", ctx.model.width, params)

    def global_ref(self, ctx: Context, output: str = "all") -> ModelRef:
        """The full-width, full-depth model with every exit (``output="all"``: the global weights' layout)."""
        return self._ref(ctx, 1.0, self.exit_fractions(ctx), output)

    def client_ref(self, ctx: Context, level: Level, output: str = "all") -> ModelRef:
        width, depth = level
        exits = [f for f in self.exit_fractions(ctx) if f < depth] if self.client_exits == "all" else []
        return submodel_ref(self._ref(ctx, depth, exits, output), width)

    def level_ref(self, ctx: Context, level: Level) -> ModelRef:
        return self.client_ref(ctx, level)

    def level_width(self, level: Level) -> float:
        return float(level[0])

    def level_tag(self, level: Level) -> str:
        return level_label(level)

    def owned_keys(self, ctx: Context) -> frozenset[str]:
        if not self.per_level:
            return frozenset()
        return owned_keys(self.global_ref(ctx), ctx.info, self.per_level)

    def plan_law(self, state: ServerState, ctx: Context, rnd: int):
        return self.level_of(ctx, rnd), self.level_law(ctx, rnd)

    def deployed_levels(self, ctx: Context) -> dict[str, Level]:
        return {level_label(lv): lv for lv in dict.fromkeys(self.level_table(ctx))}

    def submodel(self, glob: Weights, ctx: Context, ref: ModelRef, width: float, rnd: int = 0, client: int = 0,
                 policy: IndexPolicy | None = None) -> Weights:
        """The global weights ``ref`` holds: its blocks and exits, sliced to ``width``."""
        keys = keys_of(ref, ctx.info)
        return extract({k: glob[k] for k in keys}, spec_for(self.global_ref(ctx), ctx.info),
                       self.selection(ctx, width, rnd, client, policy))

    def level_of(self, ctx: Context, rnd: int) -> Callable[[int], Level]:
        """The level a client trains in round ``rnd``, as a function of its id (the round planned once): its
        tier's, or the level schedule's draw among the levels of its own and the weaker tiers (pure in
        (seed, round, client))."""
        table = self.level_table(ctx)
        widths = self.schedule
        if widths.fixed or ctx.fleet is None:
            tiers = self.tiers(ctx, rnd)
            return lambda client: table[int(tiers[int(client)])]
        rate = widths.rate_of({}, ctx, rnd)
        return lambda client: table[int(ctx.fleet.tiers_of(np.array([rate(int(client))]))[0])]

    def client_level(self, ctx: Context, rnd: int, client: int) -> Level:
        return self.level_of(ctx, rnd)(client)

    # ------------------------------------------------------------------ server
    def init_state(self, ctx: Context) -> ServerState:
        ref = self.global_ref(ctx)
        spec_for(ref, ctx.info)  # fail early if the model cannot be sliced
        self.check_windows(ctx)
        for w, _ in self.level_table(ctx):
            group_sizes(ref, ctx.info, w)
        torch.manual_seed(round_seed(ctx.seed, 0))  # the base model's weights are FedAvg's; exits come after
        glob = weights_of(ref.build(ctx.info))
        owned = self.owned_keys(ctx)
        if owned:  # one copy per level of every per-level key, each starting from the shared initial value
            tags = [self.level_tag(lv) for lv in dict.fromkeys(self.level_table(ctx))]
            glob = {**{k: v for k, v in glob.items() if k not in owned},
                    **{level_key(k, t): glob[k].clone() for k in sorted(owned) for t in tags}}
        if self.dyn == 0:
            return ServerState(round=0, models={"global": glob})
        if ctx.asynchronous is not None:
            raise ConfigError("algorithm.dyn (FedDyn) needs synchronous rounds: its server step reads every "
                              "client's state each round; drop [asynchronous] or set algorithm.dyn = 0")
        params = [k2 for k in param_keys(ref, ctx.info) for k2 in ([k] if k in glob else
                                                                  [x for x in glob if x.startswith(f"{k}@")])]
        return ServerState(round=0, models={"global": glob}, buffers={DYN: init_dyn(glob, tuple(params))})

    def model_refs(self, ctx: Context) -> list[ModelRef]:
        self.owned_keys(ctx)  # per_level naming nothing of the model: a ConfigError before any file is written
        # the runner checks (batch, classes) logits: the ensemble output runs every exit the model holds
        return [self.global_ref(ctx, "ensemble"),
                *(self.client_ref(ctx, lv, "ensemble") for lv in dict.fromkeys(self.level_table(ctx)))]

    def task_extra(self, state: ServerState, rnd: int, ctx: Context) -> dict[str, object]:
        """Values every client of round ``rnd`` needs: the loss rule's distillation weight."""
        return {"kd": self.loss_rule.weight(rnd, ctx.rounds)}

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int], ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        glob = state.models["global"]
        extra = self.task_extra(state, rnd, ctx)
        tasks = []
        plan = self.level_plan(state, ctx, rnd)
        for c in clients:
            level = plan.of(int(c))
            ref = self.client_ref(ctx, level)
            weights = self.submodel(self.view(glob, ctx, level), ctx, ref, level[0], rnd, int(c))
            task = ClientTask(int(c), ref, weights, train, round_seed(ctx.seed, rnd, int(c)),
                              {**extra, "level": list(level)})
            if self.dyn > 0:
                task.extra["dyn_h"] = self._client_h(state, ctx, ref, level, rnd, int(c), task.weights)
            tasks.append(task)
        return tasks

    def _client_h(self, state: ServerState, ctx: Context, ref: ModelRef, level: Level, rnd: int, client: int,
                  weights: Weights) -> Weights:
        """Client ``client``'s FedDyn state at its level's shapes (zero where it never trained)."""
        keys = param_keys(ref, ctx.info)
        held = state.buffers[DYN]["clients"].get(client)
        if held is None:
            return {k: torch.zeros_like(weights[k]) for k in keys}
        seen, owned, tag = self.view(state.models["global"], ctx, level), self.owned_keys(ctx), self.level_tag(level)
        full = {k: held.get(level_key(k, tag) if k in owned else k, torch.zeros_like(seen[k])) for k in keys}
        return extract(full, spec_for(self.global_ref(ctx), ctx.info), self.selection(ctx, level[0], rnd, client))

    def side_channel(self, state: ServerState, rnd: int, ctx: Context) -> DynClients | None:
        """FedDyn: the round's holder counts and the clients' new states (None when off)."""
        if self.dyn == 0:
            return None
        dyn = state.buffers[DYN]
        return DynClients(state.models["global"], tuple(dyn["h"]), dyn["clients"])

    def combine(self, state: ServerState, rnd: int, models: dict[str, Weights], side: DynClients | None,
                ctx: Context):
        mean = models.get("global", {})
        if side is None or not mean:
            return mean
        return server_correction(state.models["global"], mean, state.buffers[DYN], side, self.dyn, ctx.num_clients)

    def level_law(self, ctx: Context, rnd: int) -> Callable[[int], dict[Level, float]]:
        """The level any client trains in round ``rnd``, as a law ``{level: probability}``."""
        table = self.level_table(ctx)
        if self.schedule.fixed or ctx.fleet is None:
            tiers = self.tiers(ctx, rnd)
            return lambda client: {table[int(tiers[int(client)])]: 1.0}
        law = self.schedule.law({}, ctx, rnd)

        def level_law(client: int) -> dict[Level, float]:
            out: dict[Level, float] = {}
            for rate, p in law(client).items():
                level = table[int(ctx.fleet.tiers_of(np.array([rate]))[0])]
                out[level] = out.get(level, 0.0) + p
            return out

        return level_law

    def server_step(self, state: ServerState, update: Weights | DynUpdate, ctx: Context) -> ServerState:
        buffers = state.buffers
        if isinstance(update, DynUpdate):
            update, buffers = update.weights, {**state.buffers, DYN: update.state}
        update, windows = self.split_update(state, update)
        models = {**state.models, "global": update} if update else state.models
        return self.keep_windows(ServerState(state.round + 1, models, buffers), windows)

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        """``global``: the method's prediction (DepthFL: the mean of all exits' logits); ``w<W>d<D>``: every
        level's submodel through its deepest exit, and every exit of the full-width model (one label per
        distinct model: depth fractions that keep the same blocks are evaluated once)."""
        glob = state.models["global"]
        table = self.level_table(ctx)
        fixed_tiers = ctx.fleet.tiers() if ctx.fleet is not None else np.zeros(ctx.num_clients, dtype=np.int64)

        def clients_of(level: Level) -> np.ndarray | None:
            tiers = [t for t, lv in enumerate(table) if lv == level]
            return np.flatnonzero(np.isin(fixed_tiers, tiers)) if tiers and len(table) > 1 else None

        ref = self.global_ref(ctx, self.global_output)
        top = self.view(glob, ctx, table[0])  # per-level keys: the strongest level's copies for the full model
        targets = {"global": EvalTarget(ref, self.submodel(top, ctx, ref, 1.0, policy=Prefix()),
                                        clients=clients_of(table[0]))}
        if not self.eval_levels:
            return targets
        levels = dict.fromkeys([*table, *((1.0, f) for f in self.exit_fractions(ctx))])
        if self.global_output != "last":
            levels[(1.0, 1.0)] = None
        elif (1.0, 1.0) in levels:
            del levels[(1.0, 1.0)]
        plan = plan_for(ctx.model.name, encode_params(ctx.model.params), ctx.info)
        seen = {(1.0, plan.num_blocks)} if self.global_output == "last" else set()
        for level in sorted(levels, reverse=True):
            # two depth fractions that keep the same blocks: one model
            same = (level[0], plan.kept(level[1], self.depth_rule))
            if same in seen:
                continue
            seen.add(same)
            ref = self.client_ref(ctx, level, "last")
            own = self.view(glob, ctx, level) if level in table else top
            weights = self.submodel(own, ctx, ref, level[0], policy=Prefix())
            rec = state.buffers.get(WINDOWS, {}).get(f"{level[0]:g}") if self.tracks_windows else None
            if rec is not None and level[0] < 1.0:  # eval_window = "trained": the window it last trained
                targets[f"prefix_{level_label(level)}"] = EvalTarget(ref, weights)
                weights = self.submodel(own, ctx, ref, level[0], int(rec[0]), int(rec[1]))
            targets[level_label(level)] = EvalTarget(ref, weights, clients=clients_of(level))
        return targets

    # ------------------------------------------------------------------ client
    def exit_loss(self, task: ClientTask, labels: torch.Tensor | None = None):
        """``loss(logits, y)`` over the stacked exits' logits ``(exits, batch, classes)``: the loss rule at the
        task's distillation weight (``labels``: the classes the client holds, for masked rules)."""
        return self.loss_rule.loss(float(task.extra.get("kd", 0.0)), labels)

    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        labels = None
        if self.loss_rule.masked:
            with torch.no_grad():
                model.eval()
                labels = torch.zeros(int(model(data.x[:1]).shape[-1]), dtype=torch.bool, device=data.y.device)
            labels[data.y] = True
        terms, extra = (), {"level": task.extra.get("level")}
        if self.dyn > 0:
            h = {k: v.to(device) for k, v in task.extra["dyn_h"].items()}
            anchor = {k: p.detach().clone() for k, p in model.named_parameters() if k in h}
            terms = (client_term(model, anchor, h, self.dyn),)
        stats = local_sgd(model, data, task.train, seed=task.seed, device=device,
                          loss_fn=self.exit_loss(task, labels), loss_terms=terms)
        if self.dyn > 0:
            extra["dyn_h"] = client_state_after(model, anchor, h, self.dyn)
        return ClientResult(task.client_id, len(data), weights_of(model),
                            {"train_loss": stats.loss, "steps": stats.steps}, extra)


@ALGORITHMS.register("depthfl")
@dataclass(frozen=True)
class DepthFL(MultiExitFL):
    """DepthFL: depth-cut clients with an exit per level, mutual self-distillation among exits, ensemble of exits."""

    levels: str = "1x1,1x0.75,1x0.5,1x0.25"
    kd: float = 1.0  # weight of the mutual distillation (0: off, DepthFL's "FedAvg" variant)
    kd_rampup: int = 300  # rounds until the weight reaches kd: kd * exp(-5 (1 - min(t, R) / R)^2), t from 0
    temperature: float = 1.0
    #: > 0: the ramp is this share of the run's rounds instead of kd_rampup (DepthFL's 300 of 1 000 is 0.3), so a
    #: short run reaches the full weight too (100 rounds at kd_rampup = 300 average a weight of 0.039)
    kd_rampup_share: float = 0.0

    global_output: ClassVar[str] = "ensemble"

    def __post_init__(self) -> None:
        if self.kd < 0 or self.kd_rampup < 0 or self.temperature <= 0:
            raise ConfigError("algorithm.kd and algorithm.kd_rampup must be >= 0 and algorithm.temperature > 0")
        if not 0 <= self.kd_rampup_share <= 1:
            raise ConfigError(f"algorithm.kd_rampup_share must be in [0, 1] (0: kd_rampup rounds), "
                              f"got {self.kd_rampup_share!r}")
        super().__post_init__()

    def default_loss(self) -> LossRule:
        """DepthFL's own rule from its fields: mutual distillation at ``kd``, ramped over ``kd_rampup`` rounds
        (or ``kd_rampup_share`` of the run)."""
        return MutualKD(weight_max=self.kd, rampup=self.kd_rampup, temperature=self.temperature,
                        rampup_share=self.kd_rampup_share)

    def kd_weight(self, rnd: int, rounds: int = 0) -> float:
        return self.loss_rule.weight(rnd, rounds)


__all__ = ["DepthFL", "MultiExitFL", "level_label", "levels_for_tiers", "mutual_kl", "parse_levels"]
