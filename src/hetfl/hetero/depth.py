"""Depth as well as width: blocks derived from the model, exit heads, depth-cut submodels.

A model's *blocks* are found from its ``torch.fx`` graph and its module tree, with no per-model code:

* a *cut point* is a node after which only its own value is still needed (nothing computed before it
  is read after it): the places where a network can be cut into a prefix and a rest;
* a *unit* is the module a parameterised node belongs to, read from the module path: containers
  (``nn.Sequential``, ``nn.ModuleList``, ``nn.ModuleDict`` and the root) are looked through, the first
  module below them is the unit (``blocks.3`` of a ResNet, ``layers.1`` of a Transformer, ``fc1`` of a
  plain ``nn.Sequential`` MLP);
* a new block starts at a unit that is *composite* (has parameterised children: a residual block, a
  Transformer layer) or, in a model without composite units, at a layer that starts a new channel group
  (Linear, Conv, Embedding, RNN), provided a cut point separates it from what came before.  Norms,
  activations and pools join the block before them.  The model's last unit (its classifier) never starts
  a block: the last block carries the head.  In a model with composite units, layers before the first
  of them (a stem, embeddings) join the first block, layers after the last one (a final norm, the head)
  join the last block.

A model with ``K`` blocks cut at depth ``d`` (a fraction, like width) keeps the first
``scaled(K, d) = max(1, ceil(d * K))`` blocks.  An *exit head* is attached after a kept block by one rule:
average over every dimension but the batch and the channel dimension (the dimension whose size changes
with the model's width; for a 2-D tensor the features), then one Linear layer to the classes.  At full
depth the model's own head is the deepest exit, so the depth-1 model with no extra exit is the original
network, bit for bit.

:func:`multi_exit_model` builds the cut network with its exits as an ``fx.GraphModule`` whose state-dict
keys are the original model's (``fc1.weight``) plus ``exits.<k>.fc.*`` for the exit after block ``k``.  A
depth-cut model's weights are therefore a subset of the keys of the full multi-exit model, and its width
spec is the full model's (``hetero.spec_for`` of the full multi-exit model): width extraction and the
overlap average of :mod:`hetfl.hetero.extract` work unchanged on depth-cut models, tensors a client does
not hold are simply absent from its update (so they keep their value unless someone else trains them),
and each exit is averaged over the clients that hold it.

A multi-layer ``nn.LSTM`` is one module, hence one unit: written with one LSTM module per layer, a model
gets one block per layer.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.hetero import example_input
from hetfl.models.registry import build_model
from hetfl.registry import Registry, build_entry

_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)
_GROUP_STARTERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.RNNBase)
OUTPUTS = ("all", "last", "ensemble")
EXITS_PREFIX = "exits"


class DepthError(ConfigError):
    """The blocks of a model cannot be derived, or a depth setting does not fit it."""


@dataclass(frozen=True)
class BlockPlan:
    """The blocks of a model: the node ending each block (the cut) and the units in it."""

    cuts: tuple[str, ...]  # fx node name after which block k (1-based: index k-1) ends; the last is the output
    units: tuple[tuple[str, ...], ...]  # module paths of the units of every block
    channel_dims: tuple[int, ...]  # channel dimension of the tensor at every cut (all but the last block)
    channels: tuple[int, ...]  # size of that dimension at width 1 (informative)
    ndims: tuple[int, ...]  # rank of the tensor at every cut

    @property
    def num_blocks(self) -> int:
        return len(self.units)

    def kept(self, depth: float, rule: str = "ceil") -> int:
        """Blocks kept at depth fraction ``depth`` under the depth ``rule`` (default ``max(1, ceil(depth * K))``,
        as width counts channels)."""
        return kept_blocks(self.num_blocks, depth, rule)

    def describe(self) -> str:
        return "\n".join(f"block {k + 1}: {', '.join(u)}" for k, u in enumerate(self.units))


#: Depth rules: how many of a model's ``K`` blocks a level of depth fraction ``d`` keeps (the first ones, with an
#: exit after the last).  A new rule is one registered dataclass with ``count(K, d)``; ``algorithm.depth_rule``.
DEPTH_RULES: Registry = Registry("depth rule")


@DEPTH_RULES.register("ceil")
@dataclass(frozen=True)
class CeilBlocks:
    """``max(1, ceil(d K))``: a level never keeps less than its share (the default, as width counts channels)."""

    def count(self, num_blocks: int, depth: float) -> int:
        return max(1, math.ceil(round(depth * num_blocks, 9)))


@DEPTH_RULES.register("round")
@dataclass(frozen=True)
class RoundBlocks:
    """``max(1, round-half-up(d K))``: the nearest block count (a 0.5-depth level of a 3-block model keeps 2)."""

    def count(self, num_blocks: int, depth: float) -> int:
        return max(1, math.floor(round(depth * num_blocks, 9) + 0.5))


@lru_cache(maxsize=32)
def depth_rule(text: str, where: str = "algorithm.depth_rule") -> CeilBlocks | RoundBlocks:
    """The depth rule named in ``text`` (``"ceil"``, ``"round"``, ...)."""
    return build_entry(DEPTH_RULES, text, where)


def kept_blocks(num_blocks: int, depth: float, rule: str = "ceil") -> int:
    if not 0 < depth <= 1:
        raise DepthError(f"depth must be in (0, 1], got {depth}")
    return min(num_blocks, depth_rule(rule).count(num_blocks, depth))


def _trace(model: nn.Module, example: torch.Tensor) -> torch.fx.GraphModule:
    try:
        gm = torch.fx.symbolic_trace(model)
    except Exception as exc:  # noqa: BLE001 - any tracing failure is reported the same way
        raise DepthError(f"cannot trace {type(model).__name__} with torch.fx ({type(exc).__name__}: {exc}); "
                         f"depth cuts need a traceable forward") from None
    was = model.training
    model.eval()
    with torch.no_grad():
        ShapeProp(gm).propagate(example)
    model.train(was)
    return gm


def _unit_of(root: nn.Module, target: str) -> str:
    mod, path = root, []
    for part in target.split("."):
        if mod is not root and not isinstance(mod, _CONTAINERS):
            break
        path.append(part)
        mod = getattr(mod, part)
    return ".".join(path)


def _has_params(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _composite(m: nn.Module) -> bool:
    return any(_has_params(c) for c in m.children())


def _is_reshape(gm: torch.fx.GraphModule, node: torch.fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(str(node.target)), nn.Flatten | nn.Unflatten)
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    return name in ("flatten", "reshape", "view")


def _shape(node: torch.fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def derive_blocks(model: nn.Module, example: torch.Tensor, narrow: nn.Module | None = None) -> BlockPlan:
    """The blocks of ``model`` (see the module docstring); ``narrow``, the same model built at a smaller
    width, tells which dimension of each cut tensor holds the channels."""
    gm = _trace(model, example)
    nodes = [n for n in gm.graph.nodes if n.op != "output"]
    pos = {n: i for i, n in enumerate(nodes)}
    last_use = [max((pos.get(u, len(nodes)) for u in n.users), default=i) for i, n in enumerate(nodes)]
    is_cut, live = [], -1
    for i in range(len(nodes)):
        is_cut.append(live <= i)  # every value made before node i is dead after it
        live = max(live, last_use[i])
    # units in graph order with the span of their nodes
    unit_nodes: dict[str, list[int]] = {}
    for i, n in enumerate(nodes):
        if n.op in ("call_module", "get_attr"):
            target = str(n.target)
            owner = target if n.op == "call_module" else target.rsplit(".", 1)[0]
            try:
                mod = model.get_submodule(owner) if owner else model
            except AttributeError:
                continue
            if n.op == "call_module" and not _has_params(mod):
                continue
            unit_nodes.setdefault(_unit_of(model, target), []).append(i)
    if not unit_nodes:
        raise DepthError(f"{type(model).__name__} has no layers with parameters to cut into blocks")
    order = sorted(unit_nodes, key=lambda u: unit_nodes[u][0])
    kinds = {}
    for u in order:
        m = model.get_submodule(u)  # the traced copy flattens containers into plain modules
        kinds[u] = "composite" if _composite(m) else ("weight" if isinstance(m, _GROUP_STARTERS) else "other")
    has_composite = any(k == "composite" for k in kinds.values())
    first_comp = next((u for u in order if kinds[u] == "composite"), None)
    blocks: list[list[str]] = [[order[0]]]
    cuts: list[int] = []
    for prev, u in zip(order, order[1:]):
        starts = kinds[u] == "composite" and u != first_comp if has_composite else kinds[u] == "weight"
        if u == order[-1] and not (has_composite and kinds[u] == "composite"):
            starts = False  # the classifier head stays with the last block
        if starts:
            lo, hi = max(unit_nodes[prev]), unit_nodes[u][0]
            cands = [i for i in range(lo, hi) if is_cut[i]]
            plain = [i for i in cands if not _is_reshape(gm, nodes[i])]  # pool before a flatten, not after
            if cands:
                cuts.append((plain or cands)[-1])
                blocks.append([u])
                continue
        blocks[-1].append(u)
    cut_nodes = [nodes[i] for i in cuts]
    dims, chans, ndims = [], [], []
    narrow_shapes = {}
    if narrow is not None:
        ngm = _trace(narrow, example)
        narrow_shapes = {n.name: _shape(n) for n in ngm.graph.nodes}
    for n in cut_nodes:
        shape = _shape(n)
        if shape is None or len(shape) < 2:
            raise DepthError(f"cannot attach an exit after node {n.name!r}: its output is not a (batch, ...) tensor")
        small = narrow_shapes.get(n.name)
        differ = [d for d in range(1, len(shape)) if small is not None and len(small) == len(shape)
                  and small[d] != shape[d]]
        d = differ[0] if len(differ) == 1 else (len(shape) - 1 if len(shape) == 3 else 1)
        dims.append(d)
        chans.append(int(shape[d]))
        ndims.append(len(shape))
    return BlockPlan(tuple(n.name for n in cut_nodes) + ("output",), tuple(tuple(b) for b in blocks),
                     tuple(dims), tuple(chans), tuple(ndims))


class ExitHead(nn.Module):
    """An early exit: pool every dimension but batch and channels, then a Linear layer to the classes.

    A ``(batch, positions, channels)`` tensor (channels last: a token model's LSTM or Transformer states) is
    read at its last position, as the token models' own heads read it (next-token prediction: only the last
    state has seen the whole window; a mean over positions gave a 1-layer LSTM exit 16 % where the model's
    narrowest width reached 35 %, docs/study-architectures.md).  Anything else (``(batch, channels, ...)``:
    conv feature maps) is averaged over the remaining dimensions.
    """

    def __init__(self, channels: int, num_classes: int, channel_dim: int, ndim: int) -> None:
        super().__init__()
        self.last_position = ndim == 3 and channel_dim == 2
        self.pool_dims = () if self.last_position else tuple(d for d in range(1, ndim) if d != channel_dim)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.last_position:
            x = x[:, -1]
        elif self.pool_dims:
            x = x.mean(dim=self.pool_dims)
        return self.fc(x)


def exit_key(block: int) -> str:
    return f"{EXITS_PREFIX}.{block}"


def parse_fractions(text: str, where: str) -> tuple[float, ...]:
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        out = tuple(float(p) for p in parts)
    except ValueError:
        raise DepthError(f"{where} must be comma-separated fractions in (0, 1] like '0.25,0.5', got {text!r}") from None
    if any(not 0 < f <= 1 for f in out):
        raise DepthError(f"{where} must be comma-separated fractions in (0, 1] like '0.25,0.5', got {text!r}")
    return out


def build_multi_exit(base: nn.Module, plan: BlockPlan, info: DataInfo, example: torch.Tensor, *, depth: float,
                     exits: Sequence[float], output: str, blocks: str = "ceil") -> torch.fx.GraphModule:
    """``base`` cut after ``plan.kept(depth)`` blocks, with an exit after every block an ``exits`` fraction
    keeps (up to the cut) and after the cut itself.  ``output``: ``"all"`` stacks the exits' logits
    (shallow first, shape ``(exits, batch, classes)``), ``"last"`` gives the deepest exit's, ``"ensemble"``
    the mean of the exits' logits (DepthFL's global prediction)."""
    if output not in OUTPUTS:
        raise DepthError(f"multi_exit output must be one of {', '.join(OUTPUTS)}, got {output!r}")
    K = plan.num_blocks
    keep = plan.kept(depth, blocks)
    exit_blocks = sorted({kept_blocks(K, f, blocks) for f in exits if kept_blocks(K, f, blocks) < keep} | {keep})
    gm = _trace(base, example)  # the cut tensors' sizes at this width (eval mode: no statistics move)
    ends = {name: k + 1 for k, name in enumerate(plan.cuts[:-1])}
    graph = torch.fx.Graph()
    env: dict[torch.fx.Node, torch.fx.Node] = {}
    root: dict[str, nn.Module] = {}
    logits: list[torch.fx.Node] = []
    for n in gm.graph.nodes:
        if n.op == "output":
            if keep == K:
                out = n.args[0]
                if not isinstance(out, torch.fx.Node):
                    raise DepthError("the model's forward must return one logits tensor to be cut in depth")
                logits.append(env[out])
            break
        env[n] = graph.node_copy(n, lambda a: env[a])
        if n.op in ("call_module", "get_attr"):
            target = str(n.target)
            root[target] = gm.get_submodule(target) if n.op == "call_module" else _attr(gm, target)
        block = ends.get(n.name)
        if block is not None and block in exit_blocks:
            k = plan.cuts.index(n.name)
            shape = _shape(n)
            head = ExitHead(int(shape[plan.channel_dims[k]]), info.num_classes, plan.channel_dims[k], plan.ndims[k])
            root[exit_key(block)] = head
            logits.append(graph.call_module(exit_key(block), (env[n],)))
            if block == keep:
                break
    if output == "last":
        result = logits[-1]
    else:
        stacked = graph.call_function(torch.stack, (tuple(logits),))
        result = stacked if output == "all" else graph.call_method("mean", (stacked, 0))
    graph.output(result)
    model = torch.fx.GraphModule(root, graph, class_name="MultiExit")
    for attr, value in vars(base).items():  # model markers such as PREFERS_CHANNELS_LAST
        if attr.startswith("hetfl_"):
            setattr(model, attr, value)
    return model


def _attr(gm: nn.Module, target: str):
    owner, _, name = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, name)


@lru_cache(maxsize=64)
def plan_for(base: str, base_params: str, info: DataInfo) -> BlockPlan:
    """The block plan of registered model ``base`` with params ``base_params`` (JSON pairs), cached."""
    params = dict(decode_params(base_params))
    with torch.random.fork_rng(devices=[]):  # deriving the plan must not move the global generator
        full = build_model(base, info, width=1.0, **params)
        narrow = build_model(base, info, width=0.5, **params)
    return derive_blocks(full, example_input(info), narrow)


def encode_params(params: Sequence[tuple[str, object]]) -> str:
    return json.dumps([[k, v] for k, v in params])


def decode_params(text: str) -> tuple[tuple[str, object], ...]:
    if not text:
        return ()
    try:
        return tuple((str(k), v) for k, v in json.loads(text))
    except (ValueError, TypeError):
        raise DepthError(f"multi_exit base_params must be JSON pairs like [[\"hidden\", \"200,200\"]], "
                         f"got {text!r}") from None


__all__ = ["BlockPlan", "DepthError", "ExitHead", "build_multi_exit", "decode_params", "derive_blocks",
           "encode_params", "exit_key", "kept_blocks", "DEPTH_RULES", "depth_rule", "parse_fractions", "plan_for"]
