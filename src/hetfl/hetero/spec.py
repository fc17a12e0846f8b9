"""The width spec: which parameter dimensions of a model must be sliced with the same channel indices.

It is derived from an ordinary ``nn.Module`` — no heterogeneity code in the model — by tracing it with
``torch.fx``, propagating shapes on an example batch, and following every tensor's *feature dimension*
through the graph:

* a Linear / Conv / Embedding / LSTM starts a new channel group at its output; the dimension of its
  weight that reads the input joins the input's group;
* norms (BatchNorm, GroupNorm, LayerNorm) take the group of their input;
* element-wise ops and broadcasts (residual additions, attention products) tie the groups of their
  operands into one (union-find);
* reshapes are followed by shape arithmetic: a conv feature map flattened into a Linear makes each
  channel a run of ``H*W`` consecutive inputs (``inner``); an LSTM's weight rows are four stacked
  copies of the hidden group (``repeat``); a split of the last dimension into ``(heads, head_dim)``
  makes the group choosable only in whole heads (``block``);
* whatever reaches the model's input or output is *fixed* (never sliced): input channels, class
  logits, vocabulary rows.

The spec is then checked against the model built at a smaller width by the model registry: every
sliced dimension must have exactly the size its group implies, every other dimension must be
unchanged.  A layer the rules cannot handle raises :class:`WidthSpecError` naming it.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from hetfl.errors import ConfigError

FIXED = 0  # group id of dimensions that are never sliced


class WidthSpecError(ConfigError):
    """The width spec cannot be derived for (or does not fit) a model."""


@dataclass(frozen=True)
class DimSlice:
    """How one parameter dimension is laid out over a channel group.

    The dimension holds ``repeat`` stacked copies of the group, and every channel of the group spans
    ``inner`` consecutive entries: size = repeat * channels * inner.
    """

    group: int
    repeat: int = 1
    inner: int = 1


@dataclass(frozen=True)
class Group:
    id: int
    size: int  # channels in the traced (global) model
    block: int = 1  # channels are chosen in whole blocks of this size (attention heads)
    members: tuple[str, ...] = ()  # "param[dim]" entries, for messages

    @property
    def units(self) -> int:
        return self.size // self.block


@dataclass(frozen=True)
class WidthSpec:
    groups: dict[int, Group]
    params: dict[str, dict[int, DimSlice]]  # state-dict key -> sliced dims
    shapes: dict[str, tuple[int, ...]]  # global shapes of every state-dict entry
    hidden_outputs: tuple[str, ...]  # Linear/Conv modules whose output channels are sliced
    sliced_fanin: tuple[str, ...]  # Linear/Conv modules whose input channels are sliced
    output_rows: dict[str, int] = field(default_factory=dict)  # key -> dim indexing classes (output layer)
    # hidden Linear/Conv modules whose output is the input of a normalisation layer (HeteroFL's Scaler places)
    normalised: tuple[str, ...] = ()
    has_norms: bool = False  # the model has a BatchNorm / GroupNorm / LayerNorm layer

    def sliced_keys(self) -> list[str]:
        return [k for k, dims in self.params.items() if dims]

    def group_sizes_of(self, model: nn.Module, where: str = "") -> dict[int, int]:
        """Channels of every group in ``model`` (a smaller build of the same architecture).

        Checks every state-dict entry against the spec; raises WidthSpecError naming the first
        entry that does not fit.
        """
        state = model.state_dict()
        label = f" {where}" if where else ""
        missing = set(self.shapes) ^ set(state)
        if missing:
            raise WidthSpecError(f"model{label} has different state-dict entries than the traced model: "
                                 f"{', '.join(sorted(missing)[:5])}")
        sizes: dict[int, int] = {}
        for key, full_shape in self.shapes.items():
            shape = tuple(state[key].shape)
            dims = self.params.get(key, {})
            if len(shape) != len(full_shape):
                raise WidthSpecError(
                    f"{key}{label}: rank {len(shape)} differs from the traced model's {len(full_shape)}")
            for d, (n_full, n) in enumerate(zip(full_shape, shape)):
                ds = dims.get(d)
                if ds is None:
                    if n != n_full:
                        raise WidthSpecError(
                            f"{key}{label}: dimension {d} has size {n} but the width spec says it is never sliced "
                            f"(size {n_full} in the full model); the tracer could not see how this layer scales")
                    continue
                g = self.groups[ds.group]
                if n % (ds.repeat * ds.inner):
                    raise WidthSpecError(f"{key}{label}: dimension {d} has size {n}, not a multiple of "
                                         f"repeat {ds.repeat} x inner {ds.inner}")
                channels = n // (ds.repeat * ds.inner)
                if channels % g.block or channels < 1:
                    raise WidthSpecError(f"{key}{label}: {channels} channels is not a whole number of blocks of "
                                         f"{g.block} (attention heads?) in group {g.id}")
                if sizes.setdefault(ds.group, channels) != channels:
                    raise WidthSpecError(
                        f"{key}{label}: dimension {d} implies {channels} channels for group {g.id} but another "
                        f"member ({g.members[0] if g.members else '?'}) implies {sizes[ds.group]}")
        return sizes

    def describe(self) -> str:
        lines = []
        for g in sorted(self.groups.values(), key=lambda g: g.id):
            if g.id == FIXED:
                continue
            block = f", block {g.block}" if g.block > 1 else ""
            lines.append(f"group {g.id}: {g.size} channels{block}: {', '.join(g.members)}")
        return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# union-find over channel groups
# --------------------------------------------------------------------------------------------------


class _Groups:
    def __init__(self) -> None:
        self.parent: list[int] = [FIXED]
        self.size: list[int] = [0]
        self.block: list[int] = [1]

    def new(self, size: int) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.block.append(1)
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int, where: str) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra == FIXED or rb == FIXED:
            keep, drop = FIXED, (rb if ra == FIXED else ra)
        else:
            if self.size[ra] != self.size[rb]:
                raise WidthSpecError(f"{where}: ties channel groups of sizes {self.size[ra]} and {self.size[rb]}")
            keep, drop = min(ra, rb), max(ra, rb)
            self.block[keep] = math.lcm(self.block[keep], self.block[drop])
        self.parent[drop] = keep
        return keep

    def set_block(self, g: int, block: int) -> None:
        r = self.find(g)
        if r != FIXED:
            self.block[r] = math.lcm(self.block[r], block)


@dataclass(frozen=True)
class _Feat:
    """The feature dimension of a traced tensor: its group and layout."""

    group: int
    dim: int  # non-negative index into the tensor's shape
    repeat: int = 1
    inner: int = 1
    blocks: bool = False  # the dimension counts blocks (heads), not channels


# --------------------------------------------------------------------------------------------------
# the tracer
# --------------------------------------------------------------------------------------------------

Rule = Callable[["_Tracer", str, nn.Module, "_Feat | None", tuple[int, ...]], "_Feat | tuple | None"]
RULES: dict[type, Rule] = {}


def register_rule(module_type: type) -> Callable[[Rule], Rule]:
    """Teach the tracer a module type with parameters: ``rule(tracer, name, module, feat, out_shape)``."""

    def deco(fn: Rule) -> Rule:
        RULES[module_type] = fn
        return fn

    return deco


_NORMS = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm)
_PARAMETRIC = (nn.Linear, nn.modules.conv._ConvNd)

_PARAMLESS_OK = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.Dropout, nn.Identity, nn.MaxPool1d, nn.MaxPool2d,
                 nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.Flatten, nn.Unflatten,
                 nn.LeakyReLU, nn.ELU, nn.SiLU, nn.Softmax, nn.LogSoftmax, nn.Dropout2d)


class _Tracer:
    def __init__(self, model: nn.Module, example: torch.Tensor) -> None:
        self.model = model
        self.groups = _Groups()
        self.dims: dict[str, dict[int, tuple[int, int, int]]] = {}  # key -> dim -> (group, repeat, inner)
        self.hidden_outputs: list[tuple[str, int]] = []
        self.output_candidates: list[tuple[str, int]] = []  # (module name, out group) of Linear/Conv
        self.fanin: list[tuple[str, int]] = []  # (module name, input group) of Linear/Conv
        self.normalised: list[str] = []  # Linear/Conv modules whose output a norm layer reads directly
        self.has_norms = False
        try:
            self.gm = torch.fx.symbolic_trace(model)
        except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
            raise WidthSpecError(
                f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); width slicing "
                f"needs a traceable forward (no data-dependent Python control flow)") from None
        was_training = model.training
        model.eval()
        with torch.no_grad():
            ShapeProp(self.gm).propagate(example)
        model.train(was_training)
        self.modules = dict(self.gm.named_modules())

    # ------------------------------------------------------------------ helpers
    def bind(self, module_name: str, pname: str, dim: int, group: int, repeat: int = 1, inner: int = 1) -> None:
        key = f"{module_name}.{pname}" if module_name else pname
        self.dims.setdefault(key, {})[dim] = (group, repeat, inner)

    def bind_in(self, name: str, pname: str, dim: int, feat: _Feat | None, width: int) -> None:
        """Bind the input-reading dimension of a parameter to the incoming feature."""
        if feat is None or self.groups.find(feat.group) == FIXED:
            return  # untracked input: the dimension stays fixed (checked later against smaller builds)
        if feat.blocks:
            raise WidthSpecError(f"layer {name!r} reads a per-head tensor directly; merge the heads first")
        g = self.groups.find(feat.group)
        size = self.groups.size[g] if g != FIXED else None
        if size is not None and feat.repeat * size * feat.inner != width:
            raise WidthSpecError(f"layer {name!r}: input width {width} does not match the incoming feature "
                                 f"({feat.repeat} x {size} channels x {feat.inner})")
        self.bind(name, pname, dim, feat.group, feat.repeat, feat.inner)

    @staticmethod
    def shape(node: Any) -> tuple[int, ...] | None:
        meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, torch.fx.Node) else None
        if meta is None or not hasattr(meta, "shape"):
            return None
        return tuple(meta.shape)

    # ------------------------------------------------------------------ walk
    def run(self) -> None:
        feats: dict[torch.fx.Node, Any] = {}
        for node in self.gm.graph.nodes:
            where = f"node {node.name!r} ({node.op} {node.target})"
            if node.op == "placeholder":
                meta = node.meta.get("tensor_meta")
                is_float = meta is not None and meta.dtype.is_floating_point
                feats[node] = _Feat(FIXED, 1) if is_float and len(meta.shape) >= 2 else None
            elif node.op == "get_attr":
                feats[node] = None
            elif node.op == "call_module":
                module = self.modules[node.target]
                arg = node.args[0] if node.args else None
                feat = feats.get(arg) if isinstance(arg, torch.fx.Node) else None
                if isinstance(module, _NORMS):
                    self.has_norms = True
                    if isinstance(arg, torch.fx.Node) and arg.op == "call_module" and \
                            isinstance(self.modules[arg.target], _PARAMETRIC):
                        self.normalised.append(str(arg.target))
                feats[node] = self.call_module(node.target, module, feat, self.shape(node), self.shape(arg), where)
            elif node.op in ("call_function", "call_method"):
                feats[node] = self.call_op(node, feats, where)
            elif node.op == "output":
                for f in _flatten_feats(node.args, feats):
                    self.groups.union(f.group, FIXED, where)

    def call_module(self, name: str, module: nn.Module, feat: _Feat | None, out_shape: tuple[int, ...] | None,
                    in_shape: tuple[int, ...] | None, where: str) -> Any:
        for klass in type(module).__mro__:
            if klass in RULES:
                return RULES[klass](self, name, module, feat, out_shape or ())
        if any(True for _ in module.parameters(recurse=False)):
            raise WidthSpecError(
                f"width spec: cannot slice layer {name!r} of type {type(module).__name__}; supported layers: "
                f"{', '.join(sorted(k.__name__ for k in RULES))}. Teach it with hetfl.hetero.spec.register_rule")
        return self.follow_shape(feat, in_shape, out_shape, where)

    def call_op(self, node: torch.fx.Node, feats: dict, where: str) -> Any:
        target = node.target
        out_shape = self.shape(node)
        tensor_args = [a for a in _iter_nodes(node.args, node.kwargs) if feats.get(a) is not None]
        if target is operator.getitem:
            src = node.args[0]
            if isinstance(feats.get(src), tuple):  # e.g. the (output, (h, c)) of an LSTM
                tup = feats[src]
                idx = node.args[1]
                return tup[idx] if isinstance(idx, int) and idx < len(tup) else None
            return self.getitem(feats.get(src), self.shape(src), node.args[1], out_shape, where)
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        if name in ("size", "dim", "numel") or out_shape is None:
            return None
        if name in ("transpose", "swapaxes") or (name == "permute") or name == "movedim":
            return self.permute(node, feats.get(node.args[0]), self.shape(node.args[0]), name, where)
        if name in ("flatten", "reshape", "view", "unflatten", "squeeze", "unsqueeze", "contiguous"):
            src = node.args[0]
            return self.follow_shape(feats.get(src), self.shape(src), out_shape, where)
        return self.broadcast(tensor_args, feats, out_shape, where)

    # ------------------------------------------------------------------ shape rules
    def broadcast(self, args: list[torch.fx.Node], feats: dict, out_shape: tuple[int, ...], where: str) -> Any:
        """Element-wise / broadcasting ops: tie the groups of all operands that keep their feature dim."""
        result: _Feat | None = None
        for a in args:
            f = feats[a]
            if not isinstance(f, _Feat):
                continue
            in_shape = self.shape(a)
            if in_shape is None:
                continue
            cand = None
            d_right = f.dim + len(out_shape) - len(in_shape)
            if 0 <= d_right < len(out_shape) and out_shape[d_right] == in_shape[f.dim]:
                cand = d_right
            elif f.dim < len(out_shape) and out_shape[f.dim] == in_shape[f.dim]:
                cand = f.dim  # a reduction over trailing dims (e.g. global average pooling)
            if cand is None:
                continue
            here = _Feat(f.group, cand, f.repeat, f.inner, f.blocks)
            if result is None:
                result = here
            else:
                if (result.dim, result.repeat, result.inner, result.blocks) != (cand, f.repeat, f.inner, f.blocks):
                    raise WidthSpecError(f"{where}: combines tensors whose channels are laid out differently")
                self.groups.union(result.group, f.group, where)
        return result

    def permute(self, node: torch.fx.Node, feat: Any, in_shape: tuple[int, ...] | None, name: str,
                where: str) -> Any:
        if not isinstance(feat, _Feat) or in_shape is None:
            return None
        n = len(in_shape)
        args = list(node.args[1:])
        if name in ("transpose", "swapaxes"):
            a, b = (int(x) % n for x in args[:2])
            order = list(range(n))
            order[a], order[b] = order[b], order[a]
        elif name == "permute":
            dims = args[0] if len(args) == 1 and isinstance(args[0], (tuple, list)) else args
            order = [int(x) % n for x in dims]
        else:
            raise WidthSpecError(f"{where}: movedim is not supported by the width tracer")
        return _Feat(feat.group, order.index(feat.dim), feat.repeat, feat.inner, feat.blocks)

    def getitem(self, feat: Any, in_shape: tuple[int, ...] | None, index: Any, out_shape: tuple[int, ...] | None,
                where: str) -> Any:
        if not isinstance(feat, _Feat) or in_shape is None:
            return None
        items = index if isinstance(index, tuple) else (index,)
        removed = 0
        for d_in, item in enumerate(items):
            if item is Ellipsis or item is None or isinstance(item, torch.fx.Node):
                raise WidthSpecError(f"{where}: indexing with {item!r} is not supported by the width tracer")
            if d_in == feat.dim:
                if not (isinstance(item, slice) and item == slice(None)):
                    raise WidthSpecError(f"{where}: indexes into the channel dimension")
            elif d_in < feat.dim and isinstance(item, int):
                removed += 1
        return _Feat(feat.group, feat.dim - removed, feat.repeat, feat.inner, feat.blocks)

    def follow_shape(self, feat: Any, in_shape: tuple[int, ...] | None, out_shape: tuple[int, ...] | None,
                     where: str) -> Any:
        """Follow the feature dim through a reshape (flatten, unflatten, view, pooling keeps dims)."""
        if not isinstance(feat, _Feat) or in_shape is None or out_shape is None:
            return None
        if in_shape == out_shape or (len(in_shape) == len(out_shape) and in_shape[feat.dim] == out_shape[feat.dim]):
            return feat  # shape kept (activation, pooling, dropout) or only other dims changed
        d = feat.dim
        before = math.prod(in_shape[:d])
        size = in_shape[d]
        prefix = [math.prod(out_shape[:e]) for e in range(len(out_shape) + 1)]
        fixed = self.groups.find(feat.group) == FIXED
        starts = [e for e in range(len(out_shape)) if prefix[e] == before]
        for e in starts:
            if out_shape[e] == size:
                return _Feat(feat.group, e, feat.repeat, feat.inner, feat.blocks)
            if out_shape[e] > size and out_shape[e] % size == 0:
                k = out_shape[e] // size  # merged with the following dims
                if feat.blocks and feat.inner == 1 and k == self.groups.block[self.groups.find(feat.group)]:
                    return _Feat(feat.group, e, feat.repeat, 1, False)
                if not feat.blocks:
                    return _Feat(feat.group, e, feat.repeat, feat.inner * k, False)
            if out_shape[e] < size and e + 1 < len(out_shape) and out_shape[e] * out_shape[e + 1] == size:
                if feat.repeat == 1 and feat.inner == 1 and not feat.blocks:
                    self.groups.set_block(feat.group, out_shape[e + 1])  # (blocks, block): attention heads
                    return _Feat(feat.group, e, 1, 1, True)
                if feat.repeat == 1 and feat.inner == out_shape[e + 1]:
                    return _Feat(feat.group, e, 1, 1, feat.blocks)  # unflatten back to channels
        if not starts:
            for e in range(len(out_shape)):
                if prefix[e] < before and prefix[e + 1] == before * size and before % prefix[e] == 0:
                    k = before // prefix[e]  # merged with the preceding dims
                    return _Feat(feat.group, e, feat.repeat * k, feat.inner, feat.blocks)
        if fixed:
            return None  # an input reshaped in a way we do not follow: it is never sliced anyway
        raise WidthSpecError(f"{where}: cannot follow the channel dimension through a reshape "
                             f"{tuple(in_shape)} -> {tuple(out_shape)}")


def _iter_nodes(*objs: Any):
    for obj in objs:
        if isinstance(obj, torch.fx.Node):
            yield obj
        elif isinstance(obj, (tuple, list)):
            yield from _iter_nodes(*obj)
        elif isinstance(obj, dict):
            yield from _iter_nodes(*obj.values())


def _flatten_feats(obj: Any, feats: dict):
    for n in _iter_nodes(obj):
        f = feats.get(n)
        if isinstance(f, _Feat):
            yield f
        elif isinstance(f, tuple):
            yield from (x for x in f if isinstance(x, _Feat))


# --------------------------------------------------------------------------------------------------
# rules for layers with parameters
# --------------------------------------------------------------------------------------------------


@register_rule(nn.Linear)
def _linear(t: _Tracer, name: str, m: nn.Linear, feat: _Feat | None, out_shape: tuple[int, ...]) -> _Feat:
    if feat is not None and t.groups.find(feat.group) == FIXED:
        feat = None  # reads the model input: never sliced
    if feat is not None and out_shape and feat.dim != len(out_shape) - 1:
        raise WidthSpecError(f"layer {name!r}: Linear applied to a tensor whose channels are not the last dim")
    t.bind_in(name, "weight", 1, feat, m.in_features)
    t.fanin.append((name, feat.group if feat is not None else FIXED))
    g = t.groups.new(m.out_features)
    t.bind(name, "weight", 0, g)
    if m.bias is not None:
        t.bind(name, "bias", 0, g)
    t.output_candidates.append((name, g))
    return _Feat(g, max(len(out_shape) - 1, 1))


@register_rule(nn.modules.conv._ConvNd)
def _conv(t: _Tracer, name: str, m: nn.modules.conv._ConvNd, feat: _Feat | None, out_shape: tuple[int, ...]) -> _Feat:
    if feat is not None and feat.dim != 1:
        raise WidthSpecError(f"layer {name!r}: convolution input channels must be dim 1")
    if isinstance(m, nn.modules.conv._ConvTransposeNd):
        raise WidthSpecError(f"layer {name!r}: transposed convolutions are not supported by the width tracer")
    if m.groups == 1:
        t.bind_in(name, "weight", 1, feat, m.in_channels)
        if feat is not None:
            t.fanin.append((name, feat.group))
        g = t.groups.new(m.out_channels)
        t.bind(name, "weight", 0, g)
    elif m.groups == m.in_channels == m.out_channels and feat is not None:
        g = feat.group  # depthwise: one filter per channel
        t.bind(name, "weight", 0, g)
    else:
        raise WidthSpecError(f"layer {name!r}: grouped convolution (groups={m.groups}) is not supported")
    if m.bias is not None:
        t.bind(name, "bias", 0, g)
    t.output_candidates.append((name, g))
    return _Feat(g, 1)


def _norm_params(t: _Tracer, name: str, m: nn.Module, feat: _Feat | None, keys: tuple[str, ...]) -> _Feat | None:
    if feat is None:
        return None
    if feat.repeat != 1 or feat.inner != 1 or feat.blocks:
        raise WidthSpecError(f"layer {name!r}: normalises a tensor whose channels are not laid out plainly")
    for key in keys:
        if getattr(m, key, None) is not None:
            t.bind(name, key, 0, feat.group)
    return feat


@register_rule(nn.modules.batchnorm._NormBase)
def _batchnorm(t: _Tracer, name: str, m: nn.Module, feat: _Feat | None, out_shape: tuple[int, ...]) -> Any:
    return _norm_params(t, name, m, feat, ("weight", "bias", "running_mean", "running_var"))


@register_rule(nn.GroupNorm)
def _groupnorm(t: _Tracer, name: str, m: nn.GroupNorm, feat: _Feat | None, out_shape: tuple[int, ...]) -> Any:
    if m.num_groups != 1 and feat is not None:
        t.groups.set_block(feat.group, m.num_channels // m.num_groups)
    return _norm_params(t, name, m, feat, ("weight", "bias"))


@register_rule(nn.LayerNorm)
def _layernorm(t: _Tracer, name: str, m: nn.LayerNorm, feat: _Feat | None, out_shape: tuple[int, ...]) -> Any:
    if len(m.normalized_shape) != 1:
        raise WidthSpecError(f"layer {name!r}: LayerNorm over more than the last dimension is not supported")
    if feat is not None and out_shape and feat.dim != len(out_shape) - 1:
        raise WidthSpecError(f"layer {name!r}: LayerNorm over a dimension that is not the channel dimension")
    return _norm_params(t, name, m, feat, ("weight", "bias"))


@register_rule(nn.Embedding)
def _embedding(t: _Tracer, name: str, m: nn.Embedding, feat: _Feat | None, out_shape: tuple[int, ...]) -> _Feat:
    g = t.groups.new(m.embedding_dim)
    t.bind(name, "weight", 1, g)
    return _Feat(g, len(out_shape) - 1)


@register_rule(nn.RNNBase)
def _rnn(t: _Tracer, name: str, m: nn.RNNBase, feat: _Feat | None, out_shape: tuple[int, ...]) -> tuple:
    if m.bidirectional or getattr(m, "proj_size", 0):
        raise WidthSpecError(f"layer {name!r}: bidirectional or projected RNNs are not supported")
    gates = {"LSTM": 4, "GRU": 3}.get(m.mode, 1)
    prev = feat
    for layer in range(m.num_layers):
        h = t.groups.new(m.hidden_size)
        if layer == 0:
            t.bind_in(name, f"weight_ih_l{layer}", 1, prev, m.input_size)
        else:
            t.bind(name, f"weight_ih_l{layer}", 1, prev.group)
        t.bind(name, f"weight_ih_l{layer}", 0, h, repeat=gates)
        t.bind(name, f"weight_hh_l{layer}", 0, h, repeat=gates)
        t.bind(name, f"weight_hh_l{layer}", 1, h)
        if m.bias:
            t.bind(name, f"bias_ih_l{layer}", 0, h, repeat=gates)
            t.bind(name, f"bias_hh_l{layer}", 0, h, repeat=gates)
        prev = _Feat(h, 2)
    out = _Feat(prev.group, 2)
    return (out, None)


# --------------------------------------------------------------------------------------------------
# entry point
# --------------------------------------------------------------------------------------------------


def derive_spec(model: nn.Module, example: torch.Tensor) -> WidthSpec:
    """Trace ``model`` on ``example`` (a small batch) and return its width spec."""
    tracer = _Tracer(model, example)
    tracer.run()
    gs = tracer.groups
    state = model.state_dict()
    members: dict[int, list[str]] = {}
    params: dict[str, dict[int, DimSlice]] = {k: {} for k in state}
    for key, dims in tracer.dims.items():
        if key not in state:
            continue
        for dim, (g, repeat, inner) in dims.items():
            root = gs.find(g)
            if root == FIXED:
                continue
            params[key][dim] = DimSlice(root, repeat, inner)
            members.setdefault(root, []).append(f"{key}[{dim}]")
    groups = {FIXED: Group(FIXED, 0)}
    for root, mem in members.items():
        size, block = gs.size[root], gs.block[root]
        if size % block:
            raise WidthSpecError(f"group of {mem[0]}: {size} channels is not a multiple of its block {block}")
        groups[root] = Group(root, size, block, tuple(mem))
    hidden = tuple(name for name, g in tracer.output_candidates if gs.find(g) != FIXED)
    fanin = tuple(name for name, g in tracer.fanin if gs.find(g) != FIXED)
    output_rows = {}
    for name, g in tracer.output_candidates:
        if gs.find(g) == FIXED:
            for p in ("weight", "bias"):
                key = f"{name}.{p}"
                if key in state:
                    output_rows[key] = 0
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    normalised = tuple(name for name in hidden if name in tracer.normalised)
    return WidthSpec(groups, params, shapes, hidden, fanin, output_rows, normalised, tracer.has_norms)
