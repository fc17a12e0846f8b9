"""What a model costs to train: parameters, forward FLOPs and activation memory per sample.

:func:`model_cost` runs one example batch through a model with forward hooks and counts, per sample:

* ``forward_flops``: 2 × the multiply-accumulates (MACs) of the layers that dominate compute:
  ``nn.Linear`` (``out.numel() × in_features``), convolutions (``out.numel() × in_channels/groups ×
  kernel`` ; transposed: ``in.numel() × out_channels/groups × kernel``), recurrent layers (``nn.LSTM``
  4 gates, ``nn.GRU`` 3, ``nn.RNN`` 1: ``gates × hidden × (input + hidden)`` per step, layer and
  direction, plus the projection of ``proj_size``), ``nn.MultiheadAttention`` (the q/k/v/out projections
  and both attention products), and attention written with ``F.scaled_dot_product_attention``,
  ``torch.matmul`` / ``@`` or ``torch.bmm`` outside those layers (``L × S × (E_qk + E_v)`` per head and
  sample; the full product is counted even for causal attention, as PyTorch's math path computes it).
  ``nn.Embedding`` is a lookup: 0.  Biases, normalisation, activations and pooling are not counted
  (they are a few percent of the MACs of the layers above).
* ``activation_bytes``: the summed sizes of every leaf module's outputs, as float32 (4 bytes an
  element), i.e. what backpropagation keeps alive for one sample, give or take in-place activations.
* ``params``: the number of parameter elements.

:func:`train_cost` turns that into the cost of a local update: ``3 × forward`` FLOPs per trained
sample (forward + backward ≈ 3 forward passes, the rule FedScale and most FL simulators use) and a
peak memory of weights + gradients (+ momentum buffer) in float32 plus one batch of activations.

Callers should cache :func:`model_cost` per :class:`~hetfl.models.ModelRef` (it runs a
forward pass; :class:`CostCache` does); it is deterministic and does not depend on the weights' values.

Per round, every server engine (simulator, Flower) keeps a :class:`TierLedger` from its
:class:`Accountant`: what each selected client costs (:class:`ClientCost`: the trained model's
parameters, the local update's FLOPs and peak memory, the bytes sent and returned), summed per capability
tier into the round's metrics.jsonl row (:data:`TIER_FIELDS`, keys ``tier.<label>.<field>``).  Because the
engines do it from the tasks and results, every server algorithm gets it without code of its own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

if TYPE_CHECKING:
    from hetfl.algorithms.base import ClientTask, Context
    from hetfl.config import TrainConfig
    from hetfl.data.base import DataInfo
    from hetfl.models import ModelRef

__all__ = ["TIER_FIELDS", "Accountant", "ClientCost", "CostCache", "ModelCost", "TierLedger", "TrainCost",
           "client_cost", "example_input", "model_cost", "planned_samples", "tier_label", "tier_totals",
           "train_cost", "training_memory"]


@dataclass(frozen=True)
class ModelCost:
    """Static cost of one model: parameter count, forward FLOPs and activation bytes per sample."""

    params: int
    forward_flops: int
    activation_bytes: int
    #: parameter elements that train (``requires_grad``); None: all of them
    trainable_params: int | None = None
    #: FLOPs of the backward pass per sample; None: 2 x forward (every layer computes input and weight gradients)
    backward_flops: int | None = None


@dataclass(frozen=True)
class TrainCost:
    """Cost of one local update: total FLOPs and the peak training memory in bytes."""

    flops: int
    peak_memory_bytes: int


def train_cost(cost: ModelCost, samples: int, batch_size: int, *, momentum: bool) -> TrainCost:
    """FLOPs and peak memory of training on ``samples`` samples in batches of ``batch_size``.

    ``flops = 3 × forward_flops × samples``; ``peak_memory_bytes = params × 4 × (2 + momentum)
    + activation_bytes × batch_size`` (float32 weights, gradients and, with momentum, the SGD buffer,
    plus the activations of one batch).  A model with frozen parameters (:func:`model_cost` of a model with
    ``requires_grad = False`` somewhere): gradients and the SGD buffer only for the trainable parameters,
    ``(forward + backward) × samples`` FLOPs with the backward of the trainable part only.
    """
    if samples < 0 or batch_size < 1:
        raise ValueError(f"samples must be >= 0 and batch_size >= 1, got {samples} and {batch_size}")
    trainable = cost.params if cost.trainable_params is None else cost.trainable_params
    backward = 2 * cost.forward_flops if cost.backward_flops is None else cost.backward_flops
    return TrainCost(
        flops=(cost.forward_flops + backward) * int(samples),
        peak_memory_bytes=(cost.params + trainable * (1 + int(bool(momentum)))) * 4
        + cost.activation_bytes * int(batch_size),
    )


# --------------------------------------------------------------------------------------------------
# counting
# --------------------------------------------------------------------------------------------------


def _tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, nn.utils.rnn.PackedSequence):
        yield obj.data
    elif isinstance(obj, (tuple, list)):
        for item in obj:
            yield from _tensors(item)
    elif isinstance(obj, dict):
        for item in obj.values():
            yield from _tensors(item)


def _first_tensor(obj: Any) -> torch.Tensor | None:
    return next(_tensors(obj), None)


def _conv_macs(m: nn.modules.conv._ConvNd, inputs: tuple[Any, ...], output: Any) -> int:
    kernel = math.prod(m.kernel_size)
    if m.transposed:
        x = _first_tensor(inputs)
        return 0 if x is None else x.numel() * (m.out_channels // m.groups) * kernel
    out = _first_tensor(output)
    return 0 if out is None else out.numel() * (m.in_channels // m.groups) * kernel


def _rnn_macs(m: nn.RNNBase, inputs: tuple[Any, ...]) -> int:
    x = inputs[0] if inputs else None
    if isinstance(x, nn.utils.rnn.PackedSequence):
        steps = int(x.data.shape[0])  # total (sample, time) pairs
    elif isinstance(x, torch.Tensor):
        steps = int(x.shape[0]) if x.dim() == 2 else int(x.shape[0] * x.shape[1])  # unbatched or batched
    else:
        return 0
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    hidden = m.hidden_size
    proj = getattr(m, "proj_size", 0) or 0
    h_out = proj or hidden
    directions = 2 if m.bidirectional else 1
    macs = 0
    for layer in range(m.num_layers):
        fan_in = m.input_size if layer == 0 else h_out * directions
        per_step = gates * hidden * (fan_in + h_out) + (hidden * proj if proj else 0)
        macs += per_step * directions
    return macs * steps


def _mha_macs(m: nn.MultiheadAttention, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    args = list(inputs) + [kwargs.get(k) for k in ("query", "key", "value")][len(inputs):]
    q, k = args[0], args[1] if len(args) > 1 else args[0]
    if not isinstance(q, torch.Tensor) or not isinstance(k, torch.Tensor):
        return 0
    if q.dim() == 2:  # unbatched (L, E)
        batch, lq, ls = 1, q.shape[0], k.shape[0]
    elif m.batch_first:
        batch, lq, ls = q.shape[0], q.shape[1], k.shape[1]
    else:
        batch, lq, ls = q.shape[1], q.shape[0], k.shape[0]
    e = m.embed_dim
    proj = lq * e * e + ls * e * m.kdim + ls * e * m.vdim + lq * e * e  # q, k, v, out projections
    attn = 2 * lq * ls * e  # scores and the weighted sum of values, over all heads
    return int(batch * (proj + attn))


class _FunctionCounter(TorchFunctionMode):
    """Counts attention products written as functions (SDPA, matmul, bmm) outside counted modules."""

    MATMULS = (torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm)

    def __init__(self) -> None:
        super().__init__()
        self.macs = 0
        self.suppress = 0  # > 0 inside a module whose hook already counts everything it does

    def __torch_function__(self, func, types, args=(), kwargs=None):  # noqa: ANN001
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if self.suppress:
            return out
        if func is F.scaled_dot_product_attention:
            q, k, v = (list(args) + [kwargs.get(n) for n in ("query", "key", "value")][len(args):])[:3]
            if all(isinstance(t, torch.Tensor) for t in (q, k, v)):
                batch = math.prod(q.shape[:-2])
                self.macs += batch * q.shape[-2] * k.shape[-2] * (q.shape[-1] + v.shape[-1])
        elif func in self.MATMULS and len(args) >= 2 and isinstance(args[0], torch.Tensor) \
                and isinstance(out, torch.Tensor):
            self.macs += out.numel() * args[0].shape[-1]
        return out


def model_cost(model: nn.Module, example: torch.Tensor) -> ModelCost:
    """Count ``model``'s parameters, forward FLOPs and activation bytes per sample on ``example``.

    ``example`` is a batch of inputs as the model receives them (``(B, ...)``, normally ``B = 1``: one
    sample of the training data), on the model's device.  The model runs once in eval mode without
    gradients; its training flag is restored afterwards and its weights are untouched.

    A model with frozen parameters (``requires_grad = False``, e.g. successive layer training's frozen
    prefix) runs with autograd on instead, to see what backpropagation would keep: activations are the outputs
    that require a gradient plus the inputs of trainable layers that do not (the last frozen output), the
    backward FLOPs are 2 × the forward FLOPs of the layers whose output requires a gradient, and
    ``trainable_params`` counts the trainable elements.
    """
    if not isinstance(example, torch.Tensor) or example.dim() < 1 or example.shape[0] < 1:
        raise ValueError("example must be a tensor holding a batch of at least one sample")
    batch = int(example.shape[0])
    macs = 0
    act_elems = 0
    frozen = any(not p.requires_grad for p in model.parameters())
    grad_macs = 0  # frozen: MACs of the layers whose output requires a gradient
    counter = _FunctionCounter()
    handles = []

    def leaf(m: nn.Module) -> bool:
        return next(m.children(), None) is None

    def pre_hook(m: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        counter.suppress += 1

    def hook(m: nn.Module, inputs: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        nonlocal macs, act_elems, grad_macs
        before = macs
        if isinstance(m, nn.Linear):
            out = _first_tensor(output)
            macs += 0 if out is None else out.numel() * m.in_features
        elif isinstance(m, nn.modules.conv._ConvNd):
            macs += _conv_macs(m, inputs, output)
        elif isinstance(m, nn.RNNBase):
            macs += _rnn_macs(m, inputs)
        elif isinstance(m, nn.MultiheadAttention):
            macs += _mha_macs(m, inputs, kwargs)
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)):
            counter.suppress -= 1
        if frozen:
            out = [t for t in _tensors(output) if t.requires_grad]
            if out:
                grad_macs += macs - before
            if leaf(m) or isinstance(m, nn.MultiheadAttention):
                act_elems += sum(t.numel() for t in out)
                if any(p.requires_grad for p in m.parameters(recurse=False)):  # the trainable layer keeps its input
                    act_elems += sum(t.numel() for t in _tensors(inputs) if not t.requires_grad and t is not example)
        elif leaf(m) or isinstance(m, nn.MultiheadAttention):
            act_elems += sum(t.numel() for t in _tensors(output))

    counted = (nn.Linear, nn.modules.conv._ConvNd, nn.RNNBase, nn.MultiheadAttention)
    for m in model.modules():
        if isinstance(m, counted):
            handles.append(m.register_forward_pre_hook(pre_hook, with_kwargs=True))
        if isinstance(m, counted) or leaf(m):
            handles.append(m.register_forward_hook(hook, with_kwargs=True))
    modes = {m: m.training for m in model.modules()}
    try:
        model.eval()
        with torch.set_grad_enabled(frozen), counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
        for m, training in modes.items():
            m.training = training
    macs += counter.macs
    params = sum(p.numel() for p in model.parameters())
    if not frozen:
        return ModelCost(params=int(params), forward_flops=int(2 * macs // batch),
                         activation_bytes=int(4 * act_elems // batch))
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelCost(params=int(params), forward_flops=int(2 * macs // batch),
                     activation_bytes=int(4 * act_elems // batch), trainable_params=int(trainable),
                     backward_flops=int(2 * 2 * (grad_macs + counter.macs) // batch))


# --------------------------------------------------------------------------------------------------
# per client and round, summed per tier
# --------------------------------------------------------------------------------------------------


def planned_samples(n: int, train: TrainConfig) -> int:
    """Samples one local update processes on ``n`` local samples (exactly what ``local_sgd`` does)."""
    if n <= 0:
        return 0
    if train.steps > 0:
        per_pass = math.ceil(n / train.batch_size)
        full, rest = divmod(train.steps, per_pass)
        return full * n + rest * train.batch_size
    return train.epochs * n


def example_input(info: DataInfo) -> torch.Tensor:
    """One all-zero sample as models receive it: float32 features, or int64 token ids for text."""
    if info.vocab_size is not None:
        return torch.zeros((1, *info.input_shape), dtype=torch.long)
    return torch.zeros((1, *info.input_shape), dtype=torch.float32)


class CostCache:
    """:func:`model_cost` per :class:`~hetfl.models.ModelRef`, computed once on a fresh CPU copy."""

    def __init__(self, info: DataInfo, example: torch.Tensor) -> None:
        self.info = info
        self.example = example[:1].detach().cpu()
        self._costs: dict[ModelRef, ModelCost] = {}

    def __call__(self, ref: ModelRef) -> ModelCost:
        cost = self._costs.get(ref)
        if cost is None:
            with torch.random.fork_rng(devices=[]):  # building a model must not move the global RNG
                cost = model_cost(ref.build(self.info), self.example)
            self._costs[ref] = cost
        return cost

    def for_tasks(self, tasks: Sequence[ClientTask]) -> dict[ModelRef, ModelCost]:
        return {t.model: self(t.model) for t in tasks}


def _nbytes(weights: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


def tier_label(width: float) -> str:
    """The label of a capability tier in metrics keys: its fleet width, as in ``test_accuracy.w0.5``."""
    return f"w{width:g}"


#: The per-tier fields of a metrics.jsonl row, ``tier.<label>.<field>``: clients that trained (returned an
#: update, valid or not), the parameters of the models they trained, the FLOPs of their local updates
#: (:func:`train_cost`, 3 × forward × planned samples), bytes they returned, bytes sent to every selected
#: client (dropouts and stragglers included, as the row's ``bytes_down``), and the largest peak training
#: memory among the tier's trained clients (a maximum, not a sum).
TIER_FIELDS = ("clients", "params_trained", "flops", "bytes_up", "bytes_down", "peak_mem_bytes")


@dataclass(frozen=True)
class ClientCost:
    """What one selected client's local update costs in a round."""

    client_id: int
    tier: int
    params: int  # parameter elements of the model it trains
    samples: int  # samples its local update processes (:func:`planned_samples`)
    flops: int
    peak_memory_bytes: int
    bytes_down: int  # the task's weights
    bytes_up: int  # a result has the task's shapes and dtypes


def client_cost(task: ClientTask, ctx: Context, model: ModelCost, tier: int = 0) -> ClientCost:
    """The cost of ``task`` for its client, given the :class:`ModelCost` of ``task.model``."""
    samples = planned_samples(int(ctx.client_sizes[task.client_id]), task.train)
    train = train_cost(model, samples, task.train.batch_size, momentum=task.train.momentum > 0)
    from hetfl.algorithms.base import returned  # a result carries the task's weights less its frozen keys

    return ClientCost(int(task.client_id), int(tier), model.params, samples, train.flops, train.peak_memory_bytes,
                      _nbytes(task.weights), _nbytes(returned(task)))


class TierLedger:
    """One round's costs summed per capability tier (index into the fleet's levels, 0 = widest)."""

    def __init__(self, labels: Sequence[str]) -> None:
        self.labels = tuple(labels)
        self.totals = [dict.fromkeys(TIER_FIELDS, 0) for _ in self.labels]

    def sent(self, cost: ClientCost) -> None:
        """The task went out to the client (counted whether or not it comes back)."""
        self.totals[cost.tier]["bytes_down"] += cost.bytes_down

    def trained(self, cost: ClientCost) -> None:
        """The client trained and returned its update."""
        t = self.totals[cost.tier]
        t["clients"] += 1
        t["params_trained"] += cost.params
        t["flops"] += cost.flops
        t["bytes_up"] += cost.bytes_up
        t["peak_mem_bytes"] = max(t["peak_mem_bytes"], cost.peak_memory_bytes)

    def metrics(self) -> dict[str, int]:
        return {f"tier.{label}.{k}": int(v) for label, t in zip(self.labels, self.totals) for k, v in t.items()}


class Accountant:
    """Per-client costs of a run's rounds; an engine opens one :class:`TierLedger` per round."""

    def __init__(self, ctx: Context, example: torch.Tensor | None = None, costs: CostCache | None = None) -> None:
        self.ctx = ctx
        self.costs = costs if costs is not None else CostCache(
            ctx.info, example if example is not None else example_input(ctx.info))
        fleet = ctx.fleet
        self.tiers = fleet.tiers() if fleet is not None else None
        self.labels = tuple(tier_label(w) for w in (fleet.levels if fleet is not None else (1.0,)))

    def ledger(self) -> TierLedger:
        return TierLedger(self.labels)

    def tier(self, client_id: int) -> int:
        return 0 if self.tiers is None else int(self.tiers[client_id])

    def cost(self, task: ClientTask) -> ClientCost:
        return client_cost(task, self.ctx, self.costs(task.model), self.tier(task.client_id))


def evaluated_models(targets: dict[str, Any], info: DataInfo, last: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Per evaluated model (``eval_targets`` label): its forward FLOPs per sample and parameters (the module's,
    dense: a FIARSE mask zeroes elements but multiplies them all), beside its last test accuracy and tier
    accuracy: the cost of every per-tier accuracy, for one table across width, depth and capacity methods."""
    costs = CostCache(info, example_input(info))
    out: dict[str, dict[str, Any]] = {}
    for label, target in targets.items():
        if getattr(target, "personal", None) is not None:  # one model per client (FedProto): no tier's model
            continue
        cost = costs(target.model)
        suffix = "" if label == "global" else f".{label}"
        out[label] = {"forward_flops": cost.forward_flops, "params": cost.params,
                      "test_accuracy": last.get(f"test_accuracy{suffix}"), "tier_acc": last.get(f"tier_acc.{label}")}
    return out


def tier_totals(rows: Sequence[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """Run totals of the per-tier fields of metrics.jsonl rows (``peak_mem_bytes``: the run's maximum)."""
    out: dict[str, dict[str, int]] = {}
    for row in rows:
        for key, value in row.items():
            if not key.startswith("tier.") or value is None:
                continue
            label, field = key[len("tier."):].rsplit(".", 1)
            if field not in TIER_FIELDS:
                continue
            t = out.setdefault(label, dict.fromkeys(TIER_FIELDS, 0))
            t[field] = max(t[field], int(value)) if field == "peak_mem_bytes" else t[field] + int(value)
    return out


def training_memory(ref: ModelRef, info: DataInfo, batch_size: int, *, momentum: bool) -> int:
    """Peak training memory in bytes of model ``ref`` on batches of ``batch_size`` (:func:`train_cost`'s
    figure: weights, gradients and SGD buffer of the trainable part, one batch of activations); cached."""
    return _training_memory(ref, info, int(batch_size), bool(momentum))


@lru_cache(maxsize=4096)
def _training_memory(ref: ModelRef, info: DataInfo, batch_size: int, momentum: bool) -> int:
    with torch.random.fork_rng(devices=[]):  # building a model must not move the global RNG
        model = ref.build(info)
    return train_cost(model_cost(model, example_input(info)), 0, batch_size, momentum=momentum).peak_memory_bytes
