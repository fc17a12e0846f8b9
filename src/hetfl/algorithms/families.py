"""Architecture families: clients of one run train *different architectures*, chosen by device capability.

``families = "cnn, cnn@0.5, mlp(hidden=64)"`` lists the families, largest first.  Each is a registered model
name, an optional ``@width`` and optional ``(key=value; key=value)`` model parameters (``;`` separates them,
so values such as ``hidden=64,32`` may contain commas).  A family written without parentheses whose name is
the ``[model]`` name takes the ``[model]`` section's parameters; any other family takes its model's defaults.
An empty string means one family: the ``[model]`` section (key ``"global"``).

Families are assigned to the fleet's capability tiers widest-first: a client whose tier (its index in
``ctx.fleet.levels``, 0 = widest; redrawn every round under dynamic assignment) is ``t`` trains family
``min(t, len(families) - 1)``.  With a uniform fleet every client gets the first family; the other families
then receive no client updates (a server may still distill into them).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from hetfl.algorithms.base import Context, ModelRef, Weights
from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

DEFAULT_KEY = "global"


@dataclass(frozen=True)
class Family:
    key: str  # the family as written (spaces removed), or "global" for the [model] section
    ref: ModelRef
    explicit_params: bool = False


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _value(text: str) -> object:
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _parse_one(token: str, where: str) -> Family:
    from hetfl.models import MODELS, model_params

    hint = "write e.g. 'cnn, cnn@0.5, mlp(hidden=64)'"
    body, params, explicit = token.replace(" ", ""), {}, False
    if "(" in body:
        if not body.endswith(")") or body.count("(") != 1 or body.count(")") != 1:
            raise ConfigError(f"{where}: cannot read family {token!r}; {hint}")
        body, inner = body[:-1].split("(", 1)
        explicit = True
        for item in filter(None, inner.split(";")):
            if "=" not in item:
                raise ConfigError(f"{where}: family {token!r}: expected key=value, got {item!r}; {hint}")
            k, v = item.split("=", 1)
            params[k] = v
    name, _, width_text = body.partition("@")
    if not name:
        raise ConfigError(f"{where}: empty family name in {token!r}; {hint}")
    if name not in MODELS:
        raise ConfigError(f"{where}: unknown model {name!r}; choose one of: {', '.join(MODELS.names())}")
    try:
        width = float(width_text) if width_text else 1.0
    except ValueError:
        raise ConfigError(f"{where}: family {token!r}: width {width_text!r} is not a number; {hint}") from None
    if not 0.0 < width <= 1.0:
        raise ConfigError(f"{where}: family {token!r}: width must be in (0, 1], got {width:g}")
    allowed = model_params(name)
    for k, text in params.items():
        if k not in allowed or k == "width":
            known = ", ".join(p for p in allowed if p != "width") or "none"
            raise ConfigError(f"{where}: family {token!r}: model {name!r} has no parameter {k!r}; its parameters: "
                              f"{known}")
        params[k] = text if allowed[k].annotation is str else _value(text)
    return Family(token.replace(" ", ""), ModelRef(name, width, tuple(sorted(params.items()))), explicit)


@lru_cache(maxsize=64)
def parse_families(text: str, where: str = "algorithm.families") -> tuple[Family, ...]:
    """Syntax and names of a families string (models registered, widths in range, parameters declared).

    ``""`` gives ``()``: the caller uses the ``[model]`` section.
    """
    if not text.strip():
        return ()
    fams = tuple(_parse_one(tok, where) for tok in _split_top(text))
    keys = [f.key for f in fams]
    dup = sorted({k for k in keys if keys.count(k) > 1})
    if dup:
        raise ConfigError(f"{where}: family {dup[0]!r} is listed twice in {text!r}")
    if DEFAULT_KEY in keys:
        raise ConfigError(f"{where}: {DEFAULT_KEY!r} is reserved")
    return fams


def resolve_families(text: str, default: ModelRef, where: str = "algorithm.families") -> tuple[Family, ...]:
    """The families with their final ModelRefs (``[model]`` params inherited where the rule says so)."""
    fams = parse_families(text, where)
    if not fams:
        return (Family(DEFAULT_KEY, default),)
    out = []
    for f in fams:
        if not f.explicit_params and f.ref.name == default.name:
            f = Family(f.key, ModelRef(f.ref.name, f.ref.width, default.params))
        out.append(f)
    return tuple(out)


def family_index(ctx: Context, rnd: int, num_families: int) -> np.ndarray:
    """Each client's family in round ``rnd``: its capability tier (0 = widest), capped at the last family."""
    if ctx.fleet is None or num_families <= 1:
        return np.zeros(ctx.num_clients, dtype=np.int64)
    widths = ctx.fleet.widths(rnd, ctx.seed)
    tiers = ctx.fleet.tiers_of(widths)
    return np.minimum(tiers, num_families - 1)


def build_detached(ref: ModelRef, info: DataInfo) -> torch.nn.Module:
    """Build a model without consuming the global torch RNG (server-side builds whose weights get replaced)."""
    with torch.random.fork_rng(devices=[]):
        return ref.build(info)


class RunningMean:
    """A streaming (weighted) average of weight dicts: float64 running sums, one model's memory.

    Integer entries (BatchNorm's ``num_batches_tracked``) are averaged and rounded.  One addition returns
    the weights unchanged.
    """

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}
        self.dtypes: dict[str, torch.dtype] = {}
        self.single: Weights | None = None
        self.total = 0.0
        self.count = 0
        self.samples = 0

    def add(self, weights: Weights, weight: float, samples: int = 0) -> None:
        if weight <= 0:
            return
        if self.count == 0:
            self.single = weights
            self.dtypes = {k: v.dtype for k, v in weights.items()}
            self.sums = {k: v.detach().to(torch.float64) * weight for k, v in weights.items()}
        else:
            self.single = None
            for k, v in weights.items():
                self.sums[k].add_(v.detach().to(torch.float64), alpha=weight)
        self.total += weight
        self.count += 1
        self.samples += samples

    def value(self) -> Weights:
        if self.count == 0:
            return {}
        if self.single is not None:
            return dict(self.single)
        out = {}
        for k, s in self.sums.items():
            avg = s / self.total
            dt = self.dtypes[k]
            out[k] = avg.to(dt) if dt.is_floating_point else avg.round().to(dt)
        return out

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.sums.values())
