"""Per-layer widths and a frozen prefix: any registered model, sliced group by group.

A width level (:func:`hetfl.hetero.submodel_ref`) scales every channel group of a model by one factor.  Some
methods need a network whose groups have *different* widths, some of whose layers are frozen: successive layer
training (:mod:`hetfl.algorithms.slt`) keeps the layers it has trained at full width, freezes them, and runs the
layers after them narrow.  This module gives that network from the same parts, with no per-model code:

* :func:`layer_steps`: the model's *layers* in forward order, read from its ``torch.fx`` graph and width spec.
  A layer starts at every Linear / Conv whose output channels are sliced (a hidden layer; the classifier is
  not one); every other module with parameters (a norm, the classifier) joins the layer before it.
* the registered model ``layerwise``: the model ``base`` built at ``width``, then every sliced dimension cut to
  the prefix of ``sizes`` channels of its group (groups not named stay whole), and the modules in ``frozen``
  with ``requires_grad = False`` (training skips them: no gradients, no optimizer state, no stored
  activations before the first trainable layer).  Its state-dict keys are the base model's, so its weights are
  the width extraction (:func:`hetfl.hetero.extract.extract`) of the base model's with the prefix selection of
  ``sizes``, and its result lands back through the same placement.

Layers the resizing does not know (recurrent layers, attention modules) are refused with the layer's name.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.fx
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.hetero import spec_for
from hetfl.hetero.depth import decode_params, encode_params
from hetfl.hetero.extract import extract
from hetfl.hetero.policy import Prefix
from hetfl.hetero.spec import FIXED
from hetfl.models.ref import ModelRef
from hetfl.models.registry import MODELS, build_model, check_width


@dataclass(frozen=True)
class Layers:
    """A model's layers in forward order: the modules of each (its Linear/Conv first) and its output group."""

    modules: tuple[tuple[str, ...], ...]
    groups: tuple[int, ...]

    def __len__(self) -> int:
        return len(self.groups)


def base_ref(ref: ModelRef) -> ModelRef:
    """The plain model a ``layerwise`` ref slices (``ref`` itself if it is not one)."""
    if ref.name != "layerwise":
        return ref
    p = dict(ref.params)
    return ModelRef(str(p.get("base", "mlp")), ref.width, decode_params(str(p.get("base_params", ""))))


@lru_cache(maxsize=32)
def layer_steps(ref: ModelRef, info: DataInfo) -> Layers:
    """The layers of model ``ref`` (see the module docstring)."""
    spec = spec_for(ref, info)
    with torch.random.fork_rng(devices=[]):
        net = ref.build(info)
    try:
        gm = torch.fx.symbolic_trace(net)
    except Exception as exc:  # noqa: BLE001 - spec_for traced it already; kept for a clear message
        raise ConfigError(f"layerwise: cannot trace {type(net).__name__} ({exc})") from None
    hidden = set(spec.hidden_outputs)
    modules: list[list[str]] = []
    groups: list[int] = []
    before: list[str] = []  # parameterised modules ahead of the first layer: they join it
    seen: set[str] = set()
    for node in gm.graph.nodes:
        if node.op != "call_module" or str(node.target) in seen:
            continue
        name = str(node.target)
        seen.add(name)
        if not any(True for _ in gm.get_submodule(name).parameters(recurse=False)):
            continue
        if name in hidden:
            modules.append([name])
            groups.append(spec.params[f"{name}.weight"][0].group)
        elif modules:
            modules[-1].append(name)
        else:
            before.append(name)
    if not modules:
        raise ConfigError(f"layerwise: model {ref.name!r} has no hidden Linear/Conv layer whose width could change")
    modules[0][:0] = before
    produced = set(groups)
    for g in spec.groups:
        if g != FIXED and g not in produced:
            raise ConfigError(f"layerwise: model {ref.name!r} has a channel group ({spec.groups[g].members[0]}) that "
                              f"no Linear/Conv layer produces (an embedding or recurrent layer?); per-layer widths "
                              f"need plain Linear/Conv/norm layers")
    return Layers(tuple(tuple(m) for m in modules), tuple(groups))


def layerwise_ref(base: ModelRef, sizes: dict[int, int], frozen: tuple[str, ...] = ()) -> ModelRef:
    """The ``layerwise`` ref of ``base`` with ``sizes`` channels per group (others whole) and ``frozen`` modules."""
    return ModelRef("layerwise", base.width, (("base", base.name), ("base_params", encode_params(base.params)),
                                              ("sizes", json.dumps({str(g): int(n) for g, n in sorted(sizes.items())})),
                                              ("frozen", ",".join(frozen))))


def _resize(name: str, m: nn.Module) -> None:
    """Set the size attributes of ``m`` from its (sliced) tensors."""
    w = getattr(m, "weight", None)
    if isinstance(m, nn.Linear):
        m.out_features, m.in_features = w.shape
    elif isinstance(m, nn.modules.conv._ConvNd) and not isinstance(m, nn.modules.conv._ConvTransposeNd):
        depthwise = m.groups > 1 and m.groups == m.in_channels == m.out_channels
        m.out_channels = w.shape[0]
        m.in_channels = w.shape[1] * (w.shape[0] if depthwise else m.groups)
        if depthwise:
            m.groups = w.shape[0]
    elif isinstance(m, nn.modules.batchnorm._NormBase):
        m.num_features = (w if w is not None else m.running_mean).shape[0]
    elif isinstance(m, nn.GroupNorm):
        m.num_channels = w.shape[0]
    elif isinstance(m, nn.LayerNorm):
        m.normalized_shape = (w.shape[0],)
    elif isinstance(m, nn.Embedding):
        m.embedding_dim = w.shape[1]
    else:
        raise ConfigError(f"layerwise: cannot resize layer {name!r} of type {type(m).__name__} (per-layer widths "
                          f"support Linear, Conv, BatchNorm, GroupNorm, LayerNorm and Embedding layers)")


@MODELS.register("layerwise")
def layerwise(info: DataInfo, *, width: float = 1.0, base: str = "mlp", base_params: str = "", sizes: str = "",
              frozen: str = "") -> nn.Module:
    """Model ``base`` with per-group channel counts ``sizes`` (JSON ``{group: channels}``) and the comma-separated
    modules ``frozen`` not trained (successive layer training's networks)."""
    width = check_width(width)
    if base == "layerwise":
        raise ConfigError("model.base of 'layerwise' cannot be layerwise")
    ref = ModelRef(base, width, decode_params(base_params))
    net = build_model(base, info, width=width, **dict(ref.params))
    spec = spec_for(ref, info)
    try:
        want = {int(g): int(n) for g, n in json.loads(sizes).items()} if sizes else {}
    except (ValueError, TypeError, AttributeError):
        raise ConfigError(f"model.sizes of 'layerwise' must be JSON like {{\"1\": 16}}, got {sizes!r}") from None
    for g, n in want.items():
        if g not in spec.groups or g == FIXED or not 1 <= n <= spec.groups[g].size:
            raise ConfigError(f"model.sizes of 'layerwise': group {g} with {n} channels does not fit {base!r} "
                              f"(groups: {sorted(k for k in spec.groups if k != FIXED)})")
    state = net.state_dict()
    small = extract(state, spec, Prefix().select(spec.groups, want, rnd=0, client=0, seed=0))
    for key, value in small.items():
        if value.shape == state[key].shape:
            continue
        path, _, attr = key.rpartition(".")
        owner = net.get_submodule(path) if path else net
        if attr in owner._parameters:
            owner._parameters[attr] = nn.Parameter(value.clone(), requires_grad=owner._parameters[attr].requires_grad)
        else:
            owner._buffers[attr] = value.clone()
    resized = {k.rpartition(".")[0] for k in small if small[k].shape != state[k].shape}
    for path in sorted(resized):
        _resize(path, net.get_submodule(path))
    names = dict(net.named_modules())
    for path in (p for p in frozen.split(",") if p):
        if path not in names:
            raise ConfigError(f"model.frozen of 'layerwise': {base!r} has no module {path!r}")
        for p in names[path].parameters():
            p.requires_grad_(False)
    return net


def frozen_keys(ref: ModelRef, info: DataInfo) -> tuple[str, ...]:
    """State-dict keys (parameters and buffers) of the frozen modules of a ``layerwise`` ref."""
    frozen = [p for p in str(dict(ref.params).get("frozen", "")).split(",") if p]
    if not frozen:
        return ()
    keys = spec_for(base_ref(ref), info).shapes
    return tuple(k for k in keys if any(k.startswith(p + ".") for p in frozen))


__all__ = ["Layers", "base_ref", "frozen_keys", "layer_steps", "layerwise", "layerwise_ref"]
