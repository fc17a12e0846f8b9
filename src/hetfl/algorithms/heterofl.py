"""Width-sliced submodels: HeteroFL, FedRolex, Federated Dropout and FjORD as one algorithm of hetero parts.

Every client trains a real smaller network — the registered model built at ``rate`` times the global
width — whose weights are the channels the *index policy* selects from the global model; the *width
schedule* decides which width a client trains in a round; FjORD's *ordered dropout* also trains nested
narrower widths per minibatch.  Those parts live in :mod:`hetfl.hetero` (``[algorithm] index_policy``,
``width_schedule``, ``ordered``, ``inplace_kd``); the server averages every global element over the clients that
trained it.

HeteroFL's options, with its defaults: static BN (running statistics are not aggregated; they are
recomputed for evaluation in one pass over client data at each evaluated width), the Scaler (the hidden
Linear/Conv layers a norm reads are divided by the rate during training, never the output layer; ``"auto"``:
only where BatchNorm statistics recomputed at evaluation absorb the train/eval scale difference, see
:mod:`hetfl.hetero.scaler`), masked cross-entropy (logits of labels absent on the client set to 0, as
HeteroFL's code does) and the classifier rule (an output row is averaged only over clients that hold its
label), unweighted element averaging.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

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
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.algorithms.submodel import SubmodelFL
from hetfl.data.base import DataInfo, Split
from hetfl.data.server import ServerDataSpec
from hetfl.errors import ConfigError
from hetfl.hetero import group_sizes, prefix_submodel, spec_for, submodel_ref
from hetfl.hetero.extract import extract
from hetfl.hetero.losses import masked_cross_entropy
from hetfl.hetero.ordered import InplaceDistill, inplace_loss, nested_widths, ordered_forward
from hetfl.hetero.policy import Prefix
from hetfl.hetero.sampling import width_schedule
from hetfl.hetero.scaler import Scaler, scaler_absorbed, scaler_layers
from hetfl.hetero.widths import Widths
from hetfl.models import ModelRef
from hetfl.train import local_sgd

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _bn_stat_keys(weights: Weights) -> frozenset[str]:
    return frozenset(k for k in weights if k.rsplit(".", 1)[-1] in BN_STATS)


@ALGORITHMS.register("heterofl")
@dataclass(frozen=True)
class HeteroFL(SubmodelFL):
    """HeteroFL: every client trains the prefix submodel of its width; overlaps are averaged.

    A level is a width; the round's parts (level plan, index policy, placement, footprints) are
    :class:`~hetfl.algorithms.submodel.SubmodelFL`'s."""

    width_schedule: str = "max"  # which width per client and round (hetfl.hetero.sampling), e.g. "mixture(q=0.25)"
    ordered: bool = False  # FjORD: also train nested narrower widths, one drawn per minibatch
    self_distill: bool = False  # FjORD + KD: the client's widest width teaches the sampled narrower one
    #: in-place distillation: weight of the narrower widths' soft-target loss (0: off); every minibatch trains
    #: the client's width on the labels and its nested narrower fleet widths on its detached softmax
    inplace_kd: float = 0.0
    #: narrower widths per minibatch under inplace_kd: 0 = all the client holds; k = the smallest + k - 1 drawn
    inplace_sample: int = 0
    static_bn: bool = True
    scaler: bool | Literal["auto"] = "auto"  # "auto": on iff scaler_absorbed(model, static_bn); true / false force it
    masked_ce: bool = True
    classifier_rule: bool = True
    eval_widths: bool = True

    # keys of earlier versions, refused by the config layer with these hints
    renamed_params: ClassVar[dict[str, str]] = {
        "policy": 'renamed to algorithm.index_policy (e.g. index_policy = "rolling")',
        "stride": 'now a parameter of the rolling index policy: index_policy = "rolling(stride=1)"',
        "width_policy": 'renamed to algorithm.width_schedule (e.g. width_schedule = "coverage")',
        "width_q": 'now a parameter of the mixture schedule: width_schedule = "mixture(q=0.5)"',
        "width_target": 'now a parameter of the coverage schedule: width_schedule = "coverage(target=equal)"',
        "width_val_size": 'now a parameter of the adaptive schedule: width_schedule = "adaptive(val_size=500)"',
        "width_ema": 'now a parameter of the adaptive schedule: width_schedule = "adaptive(ema=0.5)"',
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        self.channels, self.widths  # noqa: B018  (unknown names or bad parameters: ConfigError naming the field)
        if self.ordered and not isinstance(self.channels, Prefix):
            raise ConfigError("algorithm.ordered (FjORD) needs nested submodels: algorithm.index_policy must be "
                              "'prefix'")
        if not (isinstance(self.scaler, bool) or self.scaler == "auto"):
            raise ConfigError(f'algorithm.scaler must be true, false or "auto", got {self.scaler!r}')
        if self.self_distill and not self.ordered:
            raise ConfigError("algorithm.self_distill needs algorithm.ordered = true (FjORD's per-minibatch widths)")
        if not self.inplace_kd >= 0 or self.inplace_sample < 0:
            raise ConfigError(f"algorithm.inplace_kd must be >= 0 (0: off) and algorithm.inplace_sample >= 0 "
                              f"(0: every narrower width), got {self.inplace_kd} and {self.inplace_sample}")
        if self.inplace_kd > 0 and self.ordered:
            raise ConfigError("algorithm.inplace_kd trains the widest and narrower widths on every minibatch; it "
                              "replaces ordered dropout's one draw per minibatch: set algorithm.ordered = false "
                              "(FjORD's own distillation is algorithm.self_distill)")
        if self.inplace_kd > 0 and not isinstance(self.channels, Prefix):
            raise ConfigError("algorithm.inplace_kd needs nested submodels: algorithm.index_policy must be "
                              "'prefix'")

    # ------------------------------------------------------------------ the parts
    @cached_property
    def widths(self) -> Widths:
        """The width schedule: which width each client trains in a round."""
        return Widths(width_schedule(self.width_schedule))

    def level_ref(self, ctx: Context, level: float) -> ModelRef:
        return submodel_ref(ctx.model, level)

    def level_width(self, level: float) -> float:
        return float(level)

    def plan_law(self, state: ServerState, ctx: Context, rnd: int):
        return self.widths.rate_of(state.buffers, ctx, rnd), self.widths.law(state.buffers, ctx, rnd)

    def skip_keys(self, glob: Weights) -> frozenset[str]:
        return _bn_stat_keys(glob) if self.static_bn else frozenset()

    def class_mask(self, res: ClientResult) -> torch.Tensor | None:
        return res.extra.get("labels") if self.classifier_rule else None

    def deployed_levels(self, ctx: Context) -> dict[str, float]:
        """The prefix submodel of every fleet width (what a device of that width deploys)."""
        return {f"w{rate:g}": rate for rate in (ctx.fleet.levels if ctx.fleet is not None else (1.0,))}

    def client_rates(self, state: ServerState, ctx: Context, rnd: int, clients: Sequence[int]) -> list[float]:
        """The width each client trains in round ``rnd``: a pure function of (seed, round, client, state)."""
        plan = self.level_plan(state, ctx, rnd)
        return [plan.of(int(c)) for c in clients]

    def uses_scaler(self, model: nn.Module) -> bool:
        """The resolved ``scaler`` setting for ``model`` (``"auto"``: :func:`scaler_absorbed`)."""
        if isinstance(self.scaler, bool):
            return self.scaler
        return scaler_absorbed(model, self.static_bn)

    def _warn_forced_scaler(self, ctx: Context) -> None:
        if self.scaler is not True or ctx.fleet is None or min(ctx.fleet.levels) == 1.0:
            return
        with torch.random.fork_rng(devices=[]):  # building a model must not move the global RNG
            model = ctx.model.build(ctx.info)
        if not scaler_absorbed(model, self.static_bn):
            warnings.warn(
                f"algorithm.scaler = true on model {ctx.model.name!r}, which has no BatchNorm whose statistics "
                f"are recomputed at evaluation (static_bn = {str(self.static_bn).lower()}): the Scaler's "
                f"train-only factor 1/rate is not absorbed, so narrow submodels are mis-scaled at evaluation "
                f"(often near chance). Use scaler = \"auto\" (the default) or false",
                UserWarning, stacklevel=2)

    def _batch_stats(self, glob: Weights) -> bool:
        """Static BN: the server's BatchNorm runs on batch statistics (no averaged running statistics)."""
        return self.static_bn and bool(_bn_stat_keys(glob))

    # ------------------------------------------------------------------ server
    def init_state(self, ctx: Context) -> ServerState:
        spec_for(ctx.model, ctx.info)  # fail early (clear error) if the model cannot be sliced
        self._warn_forced_scaler(ctx)
        self.check_windows(ctx)
        if ctx.fleet is not None:
            for rate in ctx.fleet.levels:
                group_sizes(ctx.model, ctx.info, rate)
        torch.manual_seed(round_seed(ctx.seed, 0))  # the same initial model as FedAvg
        glob = weights_of(ctx.model.build(ctx.info))
        buffers = self.widths.init_buffers(glob, ctx, self._batch_stats(glob))
        return ServerState(round=0, models={"global": glob}, buffers=buffers)

    def server_data_spec(self) -> ServerDataSpec | None:
        return self.widths.server_data_spec()

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int], ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        glob = state.models["global"]
        spec = spec_for(ctx.model, ctx.info)
        levels = ctx.fleet.levels if ctx.fleet is not None else (1.0,)
        tasks = []
        for c, rate in zip(clients, self.client_rates(state, ctx, rnd, clients)):
            sel = self.selection(ctx, rate, rnd, int(c))
            extra: dict[str, object] = {"rate": rate, "info": info_to_plain(ctx.info)}
            if self.ordered or self.inplace_kd > 0:
                extra["widths"] = nested_widths(levels, rate)
            tasks.append(ClientTask(int(c), submodel_ref(ctx.model, rate), extract(glob, spec, sel), train,
                                    round_seed(ctx.seed, rnd, int(c)), extra))
        return tasks

    def server_step(self, state: ServerState, update: Weights, ctx: Context) -> ServerState:
        update, windows = self.split_update(state, update)
        models = {**state.models, "global": update} if update else state.models
        glob = models["global"]
        buffers = self.widths.step(state.buffers, glob if update else None, ctx, state.round + 1,
                                   self._batch_stats(glob))
        return self.keep_windows(ServerState(state.round + 1, models, state.buffers if buffers is None else buffers),
                                 windows)

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        glob = state.models["global"]
        calibrate = self._batch_stats(glob)
        fleet = ctx.fleet
        tiers = fleet.tiers() if fleet is not None else np.zeros(ctx.num_clients, dtype=np.int64)
        levels = fleet.levels if fleet is not None else (1.0,)
        targets = {"global": EvalTarget(ctx.model, glob, calibrate_bn=calibrate,
                                        clients=np.flatnonzero(tiers == 0) if len(levels) > 1 else None)}
        if not self.eval_widths:
            return targets
        for t, rate in enumerate(levels):
            if rate == 1.0:
                continue
            ref, weights = prefix_submodel(ctx.model, ctx.info, glob, rate)
            sel = self.eval_selection(state, ctx, rate)  # eval_window = "trained": the window it last trained
            if sel is not None:
                targets[f"prefix_w{rate:g}"] = EvalTarget(ref, weights, calibrate_bn=calibrate)
                weights = extract(glob, spec_for(ctx.model, ctx.info), sel)
            targets[f"w{rate:g}"] = EvalTarget(ref, weights, calibrate_bn=calibrate, clients=np.flatnonzero(tiers == t))
        return targets

    # ------------------------------------------------------------------ client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        rate = float(task.extra.get("rate", 1.0))
        info = info_from_plain(task.extra["info"]) if "info" in task.extra else None
        labels = None
        loss_fn = None
        if self.masked_ce or self.classifier_rule:
            labels = torch.zeros(self._num_classes(model, data), dtype=torch.bool, device=data.y.device)
            labels[data.y] = True
            if self.masked_ce:
                loss_fn = masked_cross_entropy(labels)
        forward = None
        if self.ordered:
            forward = ordered_forward(model, task.model, info, task.extra.get("widths", [1.0]), task.seed)
        if forward is not None and self.self_distill:
            loss_fn = forward.distillation_loss(loss_fn or F.cross_entropy)
        scaled = scaler_layers(spec_for(task.model, info)) if self.uses_scaler(model) else ()
        widths = task.extra.get("widths", [1.0])
        if self.inplace_kd > 0 and any(w < 1.0 for w in widths):
            forward = InplaceDistill(model, task.model, info, widths, task.seed, self.inplace_sample, scaled, rate)
            loss_fn = inplace_loss(loss_fn or F.cross_entropy, self.inplace_kd)
        with Scaler(model, scaled, rate):
            kwargs = {"forward": forward} if forward is not None else {}
            stats = local_sgd(model, data, task.train, seed=task.seed, device=device, loss_fn=loss_fn, **kwargs)
        extra: dict[str, object] = {}  # the server recomputes the width it assigned: the client reports none
        if self.classifier_rule and labels is not None:
            extra["labels"] = labels.cpu()
        return ClientResult(task.client_id, len(data), weights_of(model),
                            {"train_loss": stats.loss, "steps": stats.steps}, extra)

    @staticmethod
    def _num_classes(model: nn.Module, data: Split) -> int:
        with torch.no_grad():
            model.eval()
            return int(model(data.x[:1]).shape[-1])


def info_to_plain(info: DataInfo) -> dict[str, object]:
    return {"input_shape": list(info.input_shape), "num_classes": info.num_classes, "vocab_size": info.vocab_size}


def info_from_plain(d: dict) -> DataInfo:
    return DataInfo(tuple(int(x) for x in d["input_shape"]), int(d["num_classes"]),
                    None if d.get("vocab_size") is None else int(d["vocab_size"]))


@ALGORITHMS.register("fedrolex")
@dataclass(frozen=True)
class FedRolex(HeteroFL):
    """FedRolex: rolling windows over the channels, one channel per round by default."""

    index_policy: str = "rolling"


@ALGORITHMS.register("feddropout")
@dataclass(frozen=True)
class FederatedDropout(HeteroFL):
    """Federated Dropout: a random channel subset per client and round (no static BN: it diverges there)."""

    index_policy: str = "random"
    static_bn: bool = False


@ALGORITHMS.register("fjord")
@dataclass(frozen=True)
class FjORD(HeteroFL):
    """FjORD: ordered dropout, a nested width drawn uniformly per minibatch up to the client's maximum."""

    ordered: bool = True
    scaler: bool = False
    static_bn: bool = True
    masked_ce: bool = False
    classifier_rule: bool = False
    weighted: bool = True
