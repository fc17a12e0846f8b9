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

:class:`FamilyAlgorithm` is the base of the algorithms built on families (FedDF, FedGen): the ``families``
field, one initial model per family, a task per client on its family's model, a result placed whole on its
family's model (reduced by :mod:`hetfl.aggregation`), every family as an evaluation target and their last
accuracies in summary.json.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from hetfl.aggregation import Placement, WeightedMean, footprint_of, whole
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
from hetfl.data.base import DataInfo
from hetfl.errors import ConfigError
from hetfl.models import MODELS, ModelRef, model_params

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
    """A streaming (weighted) average of whole weight dicts: :class:`~hetfl.aggregation.WeightedMean` of one
    model, with the count of additions and their samples.  One addition returns the weights unchanged."""

    def __init__(self) -> None:
        self.mean = WeightedMean()
        self.samples = 0

    @property
    def count(self) -> int:
        return self.mean.clients

    def add(self, weights: Weights, weight: float, samples: int = 0) -> None:
        if weight <= 0:
            return
        self.mean.add(whole(weights, weight=weight))
        self.samples += samples

    def value(self) -> Weights:
        return self.mean.result().get("global", {})

    @property
    def nbytes(self) -> int:
        return self.mean.nbytes


def last_family_accuracies(rows: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The ``test_accuracy.<family>`` entries of the last evaluated metrics row (for summary.json)."""
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    return {k: v for k, v in evals[-1].items() if k.startswith("test_accuracy.")} if evals else {}


@dataclass(frozen=True)
class FamilyAlgorithm(Algorithm):
    """Base of algorithms whose clients train one of several architecture families, chosen by capability.

    ``families``: see the module docstring; ``weighted``: average a family's updates by samples (else
    uniformly).  The first family is evaluated as ``"global"``, every other one under its key.
    """

    families: str = ""

    def __post_init__(self) -> None:
        super().__post_init__()
        parse_families(self.families)

    def check_fields(self, checks: Iterable[tuple[bool, str, str]]) -> None:
        """Raise a ConfigError for the first ``(ok, field, message)`` with ``ok`` false, naming the value."""
        for ok, name, msg in checks:
            if not ok:
                raise ConfigError(f"algorithm.{name} {msg}, got {getattr(self, name)!r}")

    def family_list(self, ctx: Context) -> tuple[Family, ...]:
        return resolve_families(self.families, ctx.model)

    def model_refs(self, ctx: Context) -> list[ModelRef]:
        return [f.ref for f in self.family_list(ctx)]

    def initial_models(self, ctx: Context) -> dict[str, Weights]:
        """Every family's initial weights, built in order from the run's round-0 seed."""
        torch.manual_seed(round_seed(ctx.seed, 0))
        return {f.key: weights_of(f.ref.build(ctx.info)) for f in self.family_list(ctx)}

    def family_tasks(self, state: ServerState, rnd: int, clients: Sequence[int], ctx: Context,
                     extra: Callable[[int], dict[str, Any]] | None = None) -> list[ClientTask]:
        """One task per client: its family's current model, the round's local config and ``extra(client)``."""
        train = self.round_train_config(ctx, rnd)
        fams = self.family_list(ctx)
        idx = family_index(ctx, rnd, len(fams))
        tasks = []
        for c in clients:
            c = int(c)
            f = fams[idx[c]]
            tasks.append(ClientTask(c, f.ref, state.models[f.key], train, round_seed(ctx.seed, rnd, c),
                                    extra(c) if extra is not None else {}))
        return tasks

    def placer(self, state: ServerState, rnd: int, ctx: Context) -> Callable[[ClientResult], Placement]:
        """A result lands whole on its client's family model (the family index made once for the round)."""
        fams = self.family_list(ctx)
        idx = family_index(ctx, rnd, len(fams))
        return lambda res: whole(res.weights, model=fams[idx[res.client_id]].key, weight=self.weight_of(res))

    def footprints(self, state: ServerState, rnd: int, ctx: Context
                   ) -> Callable[[int], list[tuple[float, Placement]]]:
        fams = self.family_list(ctx)
        idx = family_index(ctx, rnd, len(fams))
        prints = {f.key: footprint_of(state.models[f.key], model=f.key, signature=f.key) for f in fams}
        return lambda client: [(1.0, prints[fams[idx[int(client)]].key])]

    def deployed_footprints(self, state: ServerState, ctx: Context) -> dict[str, Placement]:
        fams = self.family_list(ctx)
        if len(fams) == 1:
            return {}
        return {f.key: footprint_of(state.models[f.key], model=f.key, signature=f.key) for f in fams}

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        fams = self.family_list(ctx)
        out = {"global": EvalTarget(fams[0].ref, state.models[fams[0].key])}
        for f in fams[1:]:
            out[f.key] = EvalTarget(f.ref, state.models[f.key])
        return out

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        return last_family_accuracies(rows)
