"""Width-sliced submodels: HeteroFL, FedRolex, Federated Dropout and FjORD as one algorithm.

Every client trains a real smaller network — the registered model built at ``rate`` times the global
width — whose weights are the channels its index policy selects from the global model.  The server
averages every global element over the clients that trained it.  The methods differ only in the
index policy (``prefix``, ``rolling``, ``random``) and in whether a client also trains narrower
nested widths per minibatch (FjORD's ordered dropout).

HeteroFL's options, with its defaults: static BN (running statistics are not aggregated; they are
recomputed for evaluation in one pass over client data at each evaluated width), the Scaler (hidden
Linear/Conv outputs divided by the rate during training; ``"auto"``: only where BatchNorm statistics
recomputed at evaluation absorb the train/eval scale difference, see :func:`scaler_absorbed`), masked
cross-entropy (logits of labels absent on the client set to 0, as HeteroFL's code does) and the
classifier rule (an output row is averaged only over clients that hold its label), unweighted element
averaging.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetfl.algorithms.base import (
    Algorithm,
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
from hetfl.data.base import DataInfo, Split
from hetfl.data.server import ServerDataSpec
from hetfl.errors import ConfigError
from hetfl.hetero import group_sizes, spec_for, submodel_ref
from hetfl.hetero.extract import OverlapAverage, extract, param_indices, scatter_full
from hetfl.hetero.policy import POLICIES, Prefix, Selection, make_policy
from hetfl.hetero.sampling import WidthPlan, WidthPolicy, level_label, make_width_policy, plan_round
from hetfl.models import ModelRef
from hetfl.robust import check_method, robust_reduce
from hetfl.train import local_sgd

BN_STATS = ("running_mean", "running_var", "num_batches_tracked")


def _bn_stat_keys(weights: Weights) -> frozenset[str]:
    return frozenset(k for k in weights if k.rsplit(".", 1)[-1] in BN_STATS)


def masked_cross_entropy(mask: torch.Tensor):
    """Cross-entropy with the logits of classes absent on the client set to 0 (HeteroFL's rule)."""

    def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits.masked_fill(~mask, 0.0), y)

    return loss


class Scaler:
    """HeteroFL's Scaler as forward hooks: in training mode, the outputs of ``module_names`` are divided
    by ``rate`` (see :func:`scaler_layers` for which layers)."""

    def __init__(self, model: nn.Module, module_names: Sequence[str], rate: float) -> None:
        self.handles = []
        if rate == 1.0:
            return
        modules = dict(model.named_modules())
        scale = 1.0 / rate

        def hook(mod: nn.Module, inp: object, out: torch.Tensor) -> torch.Tensor:
            return out * scale if mod.training else out

        for name in module_names:
            self.handles.append(modules[name].register_forward_hook(hook))

    def __enter__(self) -> Scaler:
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self.handles:
            h.remove()


def scaler_layers(spec) -> tuple[str, ...]:
    """The layers whose training output the Scaler divides by the rate, as HeteroFL places it.

    HeteroFL puts the Scaler between a sliced parametric layer and the normalisation after it (every such
    conv, the first one included) and never on the output layer.  In a model with normalisation layers
    these are the hidden Linear/Conv layers read directly by a norm.  A model without norms has no such
    place; there the Scaler acts where the norm would be, after every hidden Linear/Conv (HeteroFL's
    configuration without norms), still never on the output layer.
    """
    return spec.normalised if spec.has_norms else spec.hidden_outputs


def scaler_absorbed(model: nn.Module, static_bn: bool) -> bool:
    """Whether the model's norms absorb the Scaler's train-only factor at evaluation.

    The Scaler divides activations by the rate in training only.  HeteroFL's models follow every scaled
    layer with static BatchNorm, whose statistics are recomputed at evaluation from unscaled activations,
    so evaluation sees correctly normalised features.  That holds when the model has BatchNorm layers and
    each of them either keeps no running statistics (batch statistics at evaluation too) or has them
    recomputed at evaluation (``static_bn``).  Without such norms (an MLP, FedAvg's CNN) the biases are
    not scaled with the weights, so a narrow submodel evaluated without the factor is mis-scaled (on MNIST
    with the 200-200 MLP the 1/16 submodel evaluated at chance with the Scaler, ~90 % without).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    return bool(norms) and all(static_bn or not m.track_running_stats for m in norms)


@ALGORITHMS.register("heterofl")
@dataclass(frozen=True)
class HeteroFL(Algorithm):
    """HeteroFL: every client trains the prefix submodel of its width; overlaps are averaged."""

    policy: str = "prefix"
    stride: int = 1
    weighted: bool = False
    static_bn: bool = True
    scaler: bool | Literal["auto"] = "auto"  # "auto": on iff scaler_absorbed(model, static_bn); true / false force it
    masked_ce: bool = True
    classifier_rule: bool = True
    ordered: bool = False  # FjORD: also train nested narrower widths, one drawn per minibatch
    self_distill: bool = False  # FjORD + KD: the client's widest width teaches the sampled narrower one
    aggregator: str = "mean"  # or "median" / "trimmed_mean": coordinate-wise over the clients covering an element
    trim: float = 0.1
    eval_widths: bool = True
    # which width a client trains this round (hetfl.hetero.sampling): max, uniform, mixture, coverage, adaptive
    width_policy: str = "max"
    width_q: float = 0.5  # mixture: probability of training a smaller width than the maximum
    width_target: str = "equal"  # coverage: target share of training samples per width
    width_val_size: int = 500  # adaptive: held-out server validation samples
    width_ema: float = 0.5  # adaptive: weight of the newest validation loss in its moving average

    def __post_init__(self) -> None:
        super().__post_init__()
        self.width_sampler()  # unknown policy or bad parameters: ConfigError naming the field
        if self.policy not in POLICIES:
            raise ConfigError(f"algorithm.policy must be one of {', '.join(POLICIES.names())}, got {self.policy!r}")
        make_policy(self.policy, self.stride)
        if self.ordered and self.policy != "prefix":
            raise ConfigError("algorithm.ordered (FjORD) needs nested submodels: algorithm.policy must be 'prefix'")
        check_method(self.aggregator, self.trim)
        if not (isinstance(self.scaler, bool) or self.scaler == "auto"):
            raise ConfigError(f'algorithm.scaler must be true, false or "auto", got {self.scaler!r}')
        if self.self_distill and not self.ordered:
            raise ConfigError("algorithm.self_distill needs algorithm.ordered = true (FjORD's per-minibatch widths)")

    # ------------------------------------------------------------------ helpers
    def _rates(self, ctx: Context, rnd: int) -> np.ndarray:
        if ctx.fleet is None:
            return np.ones(ctx.num_clients)
        return ctx.fleet.widths(rnd, ctx.seed)

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

    def width_sampler(self) -> WidthPolicy:
        return make_width_policy(self.width_policy, q=self.width_q, target=self.width_target,
                                 val_size=self.width_val_size, ema=self.width_ema)

    def width_plan(self, state: ServerState, ctx: Context, rnd: int) -> WidthPlan | None:
        """The round's width draws (None: every client trains its fleet width, the ``max`` policy)."""
        if self.width_policy == "max" or ctx.fleet is None:
            return None
        t = ctx.train
        samples = np.full(ctx.num_clients, float(t.steps * t.batch_size)) if t.steps > 0 else \
            np.asarray(ctx.client_sizes, dtype=np.float64) * t.epochs
        return plan_round(self.width_sampler(), levels=ctx.fleet.levels, max_width=self._rates(ctx, rnd),
                          fixed_max_width=ctx.fleet.max_width, samples=samples, buffers=state.buffers,
                          seed=ctx.seed, rnd=rnd)

    def client_rates(self, state: ServerState, ctx: Context, rnd: int, clients: Sequence[int]) -> list[float]:
        """The width each client trains in round ``rnd``: a pure function of (seed, round, client, state)."""
        plan = self.width_plan(state, ctx, rnd)
        if plan is None:
            rates = self._rates(ctx, rnd)
            return [float(rates[int(c)]) for c in clients]
        return [plan.rate(int(c)) for c in clients]

    def selection(self, ctx: Context, rnd: int, client: int, rate: float) -> Selection:
        spec = spec_for(ctx.model, ctx.info)
        sizes = group_sizes(ctx.model, ctx.info, rate)
        return make_policy(self.policy, self.stride).select(spec.groups, sizes, rnd=rnd, client=client,
                                                             seed=ctx.seed)

    # ------------------------------------------------------------------ server
    def init_state(self, ctx: Context) -> ServerState:
        spec_for(ctx.model, ctx.info)  # fail early (clear error) if the model cannot be sliced
        self._warn_forced_scaler(ctx)
        if ctx.fleet is not None:
            for rate in ctx.fleet.levels:
                group_sizes(ctx.model, ctx.info, rate)
        torch.manual_seed(round_seed(ctx.seed, 0))  # the same initial model as FedAvg
        glob = weights_of(ctx.model.build(ctx.info))
        buffers: dict[str, object] = {}
        losses = self._validation_losses(glob, ctx)
        if losses is not None:  # the adaptive width policy starts from the initial model's losses
            buffers["width_loss"] = torch.as_tensor(losses, dtype=torch.float64)
        return ServerState(round=0, models={"global": glob}, buffers=buffers)

    def server_data_spec(self) -> ServerDataSpec | None:
        """The adaptive width policy's labeled validation split (held out before partitioning)."""
        if not self.width_sampler().needs_validation:
            return None
        return ServerDataSpec(source="noise", size=1, val_size=self.width_val_size, where="algorithm.width_val")

    def _validation_losses(self, glob: Weights, ctx: Context) -> np.ndarray | None:
        """Cross-entropy of the prefix submodel at every fleet level on the server's validation split
        (BatchNorm in training mode under static BN: the global running statistics are not averaged)."""
        if not self.width_sampler().needs_validation or ctx.server_data is None or ctx.server_data.val is None:
            return None
        val = ctx.server_data.val
        levels = ctx.fleet.levels if ctx.fleet is not None else (1.0,)
        spec = spec_for(ctx.model, ctx.info)
        batch_stats = self.static_bn and bool(_bn_stat_keys(glob))
        out = []
        with torch.no_grad():
            for rate in levels:
                sel = Prefix().select(spec.groups, group_sizes(ctx.model, ctx.info, rate), rnd=0, client=0, seed=0)
                model = submodel_ref(ctx.model, rate).build(ctx.info).to(val.x.device)
                model.load_state_dict(extract(glob, spec, sel))
                model.train(batch_stats)
                losses = [F.cross_entropy(model(val.x[i:i + 1000]), val.y[i:i + 1000], reduction="sum")
                          for i in range(0, len(val), 1000)]
                out.append(float(torch.stack(losses).sum()) / len(val))
        return np.asarray(out)

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int], ctx: Context) -> list[ClientTask]:
        train = self.round_train_config(ctx, rnd)
        glob = state.models["global"]
        spec = spec_for(ctx.model, ctx.info)
        tasks = []
        for c, rate in zip(clients, self.client_rates(state, ctx, rnd, clients)):
            sel = self.selection(ctx, rnd, int(c), rate)
            extra: dict[str, object] = {"rate": rate, "info": info_to_plain(ctx.info)}
            if self.ordered:
                levels = ctx.fleet.levels if ctx.fleet is not None else (1.0,)
                extra["widths"] = [w / rate for w in levels if w <= rate + 1e-12]  # relative to this submodel
            tasks.append(ClientTask(int(c), submodel_ref(ctx.model, rate), extract(glob, spec, sel), train,
                                    round_seed(ctx.seed, rnd, int(c)), extra))
        return tasks

    def aggregate(self, state: ServerState, rnd: int, results: Iterable[ClientResult], ctx: Context) -> Weights:
        glob = state.models["global"]
        spec = spec_for(ctx.model, ctx.info)
        skip = _bn_stat_keys(glob) if self.static_bn else frozenset()
        plan = self.width_plan(state, ctx, rnd)
        rates = self._rates(ctx, rnd) if ctx.fleet is not None else None

        def selected() -> Iterator[tuple[ClientResult, Selection]]:
            for res in results:
                # the server recomputes the width it assigned (pure in seed, round, client and state)
                if plan is not None:
                    rate = plan.rate(res.client_id)
                else:
                    rate = float(rates[res.client_id]) if rates is not None else float(res.extra.get("rate", 1.0))
                yield res, self.selection(ctx, rnd, res.client_id, rate)

        if self.aggregator != "mean":
            return self._robust(glob, spec, skip, selected())
        acc = OverlapAverage(glob, spec, skip)
        for res, sel in selected():
            mask = res.extra.get("labels") if self.classifier_rule else None
            acc.add(res.weights, sel, float(res.num_samples) if self.weighted else 1.0, mask)
        return acc.result() if acc.clients else {}

    def _robust(self, glob: Weights, spec, skip: frozenset[str], pairs: Iterable[tuple[ClientResult, Selection]]
                ) -> Weights:
        """Median / trimmed mean per element over the clients whose submodel covers it (n x model memory)."""
        placed = [scatter_full(glob, spec, res.weights, sel) for res, sel in pairs]
        if not placed:
            return {}
        out = {}
        for key, ref in glob.items():
            if key in skip:
                out[key] = ref
                continue
            values = torch.stack([p[key][0] for p in placed])
            masks = torch.stack([p[key][1] for p in placed])
            reduced, covered = robust_reduce(values, masks, self.aggregator, self.trim)
            out[key] = torch.where(covered, reduced.to(ref.dtype), ref)
        return out

    def server_step(self, state: ServerState, update: Weights, ctx: Context) -> ServerState:
        models = {**state.models, "global": update} if update else state.models
        plan = self.width_plan(state, ctx, state.round + 1)
        if plan is None:
            return ServerState(state.round + 1, models, state.buffers)
        buffers = dict(state.buffers)
        metrics = plan.metrics()
        losses = self._validation_losses(models["global"], ctx) if update else None
        if losses is not None:
            old = buffers.get("width_loss")
            ema = self.width_sampler().update(None if old is None else old.numpy(), losses)
            buffers["width_loss"] = torch.as_tensor(ema, dtype=torch.float64)
            metrics.update({f"width_val_loss.{level_label(w)}": round(float(v), 6)
                            for w, v in zip(ctx.fleet.levels, losses)})
        buffers["metrics"] = metrics
        return ServerState(state.round + 1, models, buffers)

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        glob = state.models["global"]
        has_bn = bool(_bn_stat_keys(glob))
        calibrate = self.static_bn and has_bn
        fleet = ctx.fleet
        tiers = fleet.tiers() if fleet is not None else np.zeros(ctx.num_clients, dtype=np.int64)
        levels = fleet.levels if fleet is not None else (1.0,)
        targets = {"global": EvalTarget(ctx.model, glob, calibrate_bn=calibrate,
                                        clients=np.flatnonzero(tiers == 0) if len(levels) > 1 else None)}
        if not self.eval_widths:
            return targets
        spec = spec_for(ctx.model, ctx.info)
        for t, rate in enumerate(levels):
            if rate == 1.0:
                continue
            sizes = group_sizes(ctx.model, ctx.info, rate)
            sel = Prefix().select(spec.groups, sizes, rnd=0, client=0, seed=0)
            targets[f"w{rate:g}"] = EvalTarget(submodel_ref(ctx.model, rate), extract(glob, spec, sel),
                                               calibrate_bn=calibrate, clients=np.flatnonzero(tiers == t))
        return targets

    # ------------------------------------------------------------------ client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        rate = float(task.extra.get("rate", 1.0))
        num_classes = None
        labels = None
        loss_fn = None
        if self.masked_ce or self.classifier_rule:
            num_classes = self._num_classes(model, data)
            labels = torch.zeros(num_classes, dtype=torch.bool, device=data.y.device)
            labels[data.y] = True
            if self.masked_ce:
                loss_fn = masked_cross_entropy(labels)
        forward = self._ordered_forward(task, model) if self.ordered else None
        if forward is not None and self.self_distill:
            loss_fn = forward.distillation_loss(loss_fn or F.cross_entropy)
        hidden = self._hidden_modules(task) if self.uses_scaler(model) else ()
        with Scaler(model, hidden, rate):
            kwargs = {"forward": forward} if forward is not None else {}
            stats = local_sgd(model, data, task.train, seed=task.seed, device=device, loss_fn=loss_fn, **kwargs)
        extra: dict[str, object] = {"rate": rate}
        if self.classifier_rule and labels is not None:
            extra["labels"] = labels.cpu()
        return ClientResult(task.client_id, len(data), weights_of(model),
                            {"train_loss": stats.loss, "steps": stats.steps}, extra)

    @staticmethod
    def _num_classes(model: nn.Module, data: Split) -> int:
        with torch.no_grad():
            model.eval()
            return int(model(data.x[:1]).shape[-1])

    @staticmethod
    def _hidden_modules(task: ClientTask) -> tuple[str, ...]:
        return scaler_layers(spec_for(task.model, info_from_plain(task.extra["info"])))

    def _ordered_forward(self, task: ClientTask, model: nn.Module):
        widths = tuple(sorted(float(w) for w in task.extra.get("widths", [1.0])))
        if widths == (1.0,):
            return None
        return OrderedDropout(model, task.model, info_from_plain(task.extra["info"]), widths, task.seed)


def info_to_plain(info: DataInfo) -> dict[str, object]:
    return {"input_shape": list(info.input_shape), "num_classes": info.num_classes, "vocab_size": info.vocab_size}


def info_from_plain(d: dict) -> DataInfo:
    return DataInfo(tuple(int(x) for x in d["input_shape"]), int(d["num_classes"]),
                    None if d.get("vocab_size") is None else int(d["vocab_size"]))


class OrderedDropout:
    """FjORD's forward: each minibatch runs a nested prefix width drawn uniformly from ``widths``."""

    def __init__(self, model: nn.Module, ref: ModelRef, info: DataInfo, widths: tuple[float, ...], seed: int) -> None:
        self.model = model
        self.ref = ref
        self.widths = widths
        self.rng = np.random.default_rng([seed, 0x6F64])
        self.info = info
        self.spec = spec_for(ref, self.info)
        self.subs: dict[float, nn.Module] = {}
        self.teacher: torch.Tensor | None = None
        self.keep_teacher = False

    def distillation_loss(self, hard_loss):
        """FjORD's self-distillation (as its reference code): CE of the full-width logits against the labels
        plus CE of the sampled width's logits against the detached full-width softmax."""
        self.keep_teacher = True

        def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if self.teacher is None:  # the full width was drawn: plain loss
                return hard_loss(logits, y)
            teacher, self.teacher = self.teacher, None
            soft = torch.softmax(teacher.detach(), dim=-1)
            return hard_loss(teacher, y) + torch.sum(-soft * torch.log_softmax(logits, dim=-1), dim=-1).mean()

        return loss

    def _sub(self, p: float) -> nn.Module:
        if p not in self.subs:
            self.subs[p] = submodel_ref(self.ref, p).build(self.info).to(next(self.model.parameters()).device)
        return self.subs[p]

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = float(self.widths[self.rng.integers(len(self.widths))])
        if p == 1.0:
            return model(x)
        if self.keep_teacher:
            self.teacher = model(x)
        sizes = group_sizes(self.ref, self.info, p)
        sel = Prefix().select(self.spec.groups, sizes, rnd=0, client=0, seed=0)
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        sliced = {}
        for key, t in tensors.items():
            for d, idx in param_indices(self.spec, key, sel).items():
                t = t.index_select(d, idx.to(t.device))
            sliced[key] = t
        sub = self._sub(p)
        sub.train(model.training)
        return torch.func.functional_call(sub, sliced, (x,))


@ALGORITHMS.register("fedrolex")
@dataclass(frozen=True)
class FedRolex(HeteroFL):
    """FedRolex: rolling windows over the channels, one channel per round by default."""

    policy: str = "rolling"


@ALGORITHMS.register("feddropout")
@dataclass(frozen=True)
class FederatedDropout(HeteroFL):
    """Federated Dropout: a random channel subset per client and round (no static BN: it diverges there)."""

    policy: str = "random"
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
