"""Decentralized heterogeneous learning: distillation into weaker neighbours, D-PSGD, isolated training.

No server holds a model.  Node ``i`` (one client of the federation) keeps its own model, chosen by its
capability: a width-slice of the ``[model]`` at its fleet level (``algorithm.families`` empty), or the
architecture family of its tier (``families = "cnn, mlp, mlp(hidden=32)"``, as FedDF's).  One round,
synchronous, on the round's graph (:mod:`hetfl.decentralized.topology`):

1. **local training**: every node trains its model on its own data (``local_sgd``, seed from
   ``(seed, round, node)``);
2. **distillation into weaker neighbours** (``kd_weight > 0``): for every edge whose two models differ,
   the weaker node sends its model to the stronger one, which trains it on *its own* data with
   ``(1 - alpha) * CE + alpha * T^2 * KL(teacher_T || student_T)`` towards its own model's outputs
   (``temperature`` T), and sends it back.  The weaker node merges what came back: the average of its own
   model (weight 1) and every returned version (weight ``kd_weight`` each).  A node below the largest
   model with no stronger neighbour this round gets nothing back: it trains locally and gossips
   (``no_stronger = "error"`` makes that a ConfigError instead); each round's count is in metrics.jsonl;
3. **gossip** (D-PSGD): every node averages with its gossip neighbours, with the graph's mixing weights
   (``w_ij`` for the neighbours it gossips with, the rest of its row on itself).  ``gossip = "tier"``:
   neighbours with the same model; ``"overlap"``: every neighbour whose model is a width-slice of the same
   architecture, averaging each element over the neighbours that hold it (HeteroFL's rule among
   neighbours); ``"none"``: no gossip.

Options (defaults: the round above): ``kd_return = "mean"`` (a teacher returns to each student the mean of the
distilled copies of its students with the same model: equal weak models mix through their common stronger
neighbour), ``teacher = "ensemble"`` (the KD target is the mean logits of the teacher and the models its
students sent), ``gossip = "wider"`` / ``"narrower"`` (one-way overlap gossip; ``narrower`` reuses the model
the narrower neighbour sent for distillation), ``gossip_weights = "subgraph"`` (Metropolis-Hastings weights on
the gossip subgraph), ``direction = "up"`` / ``"both"`` (distillation of the stronger model at the weaker node
on the weaker node's data, instead of / as well as the reverse: mutual distillation), ``prototypes = λ``
(neighbour prototype exchange, a decentralized FedProto: :mod:`hetfl.decentralized.prototypes`).  Overlap gossip
together with distillation (``gossip = "overlap"``, ``kd_weight > 0``) moves labels across tiers through the
shared slice of the weights as well as through outputs.

With one architecture (or ``kd_weight = 0``) step 2 does nothing and the round is exactly D-PSGD
(local step, then gossip).  Presets: ``dkd`` (distillation + gossip among equal models), ``dpsgd``
(no distillation, overlap gossip; ``models = "smallest"`` puts every node on the smallest model),
``isolated`` (local training only).

The graph protocol.  A :class:`GraphAlgorithm` is not a server algorithm (:class:`hetfl.algorithms.base.Algorithm`):
it has no ``configure_round`` / ``local_update`` / ``aggregate`` / ``server_step``; it says who each node
is (:meth:`GraphAlgorithm.layout`), plans a round on a graph (:meth:`GraphAlgorithm.plan`), and gives the
node-side steps (distil, merge, mix).  What the runner asks of every algorithm it also answers
(``init_state``, ``eval_targets``, ``model_refs``, ``clients_for``, ``server_data_spec``,
``round_metrics``, ``summarize``).  :class:`~hetfl.decentralized.host.NodeHost` runs a round for the nodes
one process hosts; a transport carries the models between hosts (in-process: nothing to carry; torchrun:
gloo point-to-point), so both graph engines execute the same arithmetic in the same order and give the
same models (:mod:`hetfl.engines` picks the engines of each protocol).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetfl import hetero
from hetfl.algorithms.base import Context, EvalTarget, ServerState, Weights, round_seed, weights_of
from hetfl.algorithms.families import RunningMean, parse_families, resolve_families
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo
from hetfl.data.server import ServerDataSpec
from hetfl.decentralized.prototypes import check_prototypes
from hetfl.decentralized.topology import GraphConfig, Topology, sample_topology
from hetfl.distill import kl_to_teacher
from hetfl.errors import ConfigError
from hetfl.hetero import prefix_submodel, spec_for, submodel_ref
from hetfl.hetero.extract import OverlapAverage
from hetfl.hetero.policy import Selection
from hetfl.models import ModelRef
from hetfl.reliability import FaultsConfig
from hetfl.train import local_sgd, lr_schedule

GOSSIP_MODES = ("tier", "overlap", "wider", "narrower", "none")
GOSSIP_WEIGHTS = ("graph", "subgraph")
KD_RETURNS = ("own", "mean")
TEACHERS = ("own", "ensemble")
MODEL_CHOICES = ("own", "smallest")
DIRECTIONS = ("down", "up", "both")
NO_STRONGER = ("gossip", "error")


def node_key(i: int) -> str:
    return f"node{i}"


def edge_seed(seed: int, rnd: int, strong: int, weak: int) -> int:
    """The seed of the distillation of ``weak``'s model at ``strong`` in round ``rnd``."""
    ss = np.random.SeedSequence([seed, rnd, strong, weak, 0x6B64])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


# --------------------------------------------------------------------------------------------------
# who is who
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Layout:
    """Static facts of a run: every node's model, capability tier and model rank."""

    refs: tuple[ModelRef, ...]
    tiers: np.ndarray  # capability tier per node: index into ``levels`` (0 = most capable)
    levels: tuple[float, ...]  # the fleet's width levels, largest first
    rank: np.ndarray  # 0 = the largest model; node a is stronger than b when rank[a] < rank[b]

    @property
    def n(self) -> int:
        return len(self.refs)

    def label(self, tier: int) -> str:
        return f"w{self.levels[tier]:g}"

    def tier_members(self) -> dict[str, np.ndarray]:
        """Nodes of every capability tier that has any, by label (``w1``, ``w0.25``, ...)."""
        return {self.label(t): np.flatnonzero(self.tiers == t) for t in range(len(self.levels))
                if np.any(self.tiers == t)}

    def compatible(self, a: int, b: int) -> bool:
        """Width-slices of one architecture (same model and parameters, any width)."""
        ra, rb = self.refs[a], self.refs[b]
        return ra.name == rb.name and ra.params == rb.params

    def payload_ref(self, src: int, dst: int) -> ModelRef:
        """What ``src`` sends ``dst`` when they gossip: its model, cut to ``dst``'s slice if wider."""
        rs, rd = self.refs[src], self.refs[dst]
        return rd if rs != rd and self.compatible(src, dst) and rs.width > rd.width else rs


def prefix_selection(big: ModelRef, small: ModelRef, info: DataInfo) -> Selection:
    """The channels of ``small`` (a narrower width of ``big``'s architecture) inside ``big``: a prefix."""
    return hetero.prefix_selection(big, info, small.width / big.width)


def cut(weights: Weights, big: ModelRef, small: ModelRef, info: DataInfo) -> Weights:
    """``small``'s slice of weights of the wider ``big`` (the same tensors when the refs are equal): a prefix."""
    if big == small:
        return weights
    return prefix_submodel(big, info, weights, small.width / big.width)[1]


@dataclass(frozen=True)
class RoundPlan:
    """Everything every host must agree on for one round (a pure function of seed, round and layout)."""

    rnd: int
    topology: Topology
    kd: tuple[tuple[int, int], ...]  # (teacher, student) pairs, sorted: (strong, weak) and/or (weak, strong)
    gossip: tuple[tuple[int, ...], ...]  # per node: the neighbours it gossips with, sorted
    coeffs: tuple[dict[int, float], ...]  # per node: contributor (itself included) -> mixing weight
    lonely: tuple[int, ...]  # nodes below the largest model with no stronger neighbour (no distillation)

    def teachers_of(self, weak: int) -> list[int]:
        return [s for s, w in self.kd if w == weak]

    def students_of(self, strong: int) -> list[int]:
        return [w for s, w in self.kd if s == strong]


# --------------------------------------------------------------------------------------------------
# the algorithms
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GraphAlgorithm:
    """The graph protocol: one model per node, exchanges along a graph (see the module doc).

    Subclasses are frozen dataclasses whose fields are their hyperparameters (the ``[algorithm]`` section),
    registered in :data:`hetfl.algorithms.ALGORITHMS` like server algorithms.  Every node takes part in
    every round.
    """

    families: str = ""
    models: str = "own"
    gossip: str = "tier"
    kd_weight: float = 1.0
    alpha: float = 0.5
    temperature: float = 1.0
    kd_epochs: int = 0
    kd_steps: int = 0
    kd_lr: float = 0.0
    no_stronger: str = "gossip"
    gossip_weights: str = "graph"
    kd_return: str = "own"
    teacher: str = "own"
    direction: str = "down"
    prototypes: float = 0.0

    #: no trusted aggregator to privatise (docs/privacy.md)
    private_refusal = ("decentralized training has no trusted aggregator: every neighbour sees a node's model in the "
                       "clear (hetfl's 'dpsgd' is decentralized SGD, not DP-SGD)")

    def __post_init__(self) -> None:
        checks = [
            (self.models in MODEL_CHOICES, "models", f"must be one of {', '.join(MODEL_CHOICES)}"),
            (self.gossip in GOSSIP_MODES, "gossip", f"must be one of {', '.join(GOSSIP_MODES)}"),
            (self.kd_weight >= 0, "kd_weight", "must be >= 0 (0 = no distillation)"),
            (0.0 <= self.alpha <= 1.0, "alpha", "must be in [0, 1] (the KD share of the distillation loss)"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.kd_epochs >= 0, "kd_epochs", "must be >= 0 (0 = as train.epochs)"),
            (self.kd_steps >= 0, "kd_steps", "must be >= 0 (0 = use kd_epochs / train)"),
            (self.kd_lr >= 0, "kd_lr", "must be >= 0 (0 = as train.lr)"),
            (self.no_stronger in NO_STRONGER, "no_stronger", f"must be one of {', '.join(NO_STRONGER)}"),
            (self.gossip_weights in GOSSIP_WEIGHTS, "gossip_weights", f"must be one of {', '.join(GOSSIP_WEIGHTS)}"),
            (self.kd_return in KD_RETURNS, "kd_return", f"must be one of {', '.join(KD_RETURNS)}"),
            (self.teacher in TEACHERS, "teacher", f"must be one of {', '.join(TEACHERS)}"),
            (self.direction in DIRECTIONS, "direction", f"must be one of {', '.join(DIRECTIONS)}"),
            (self.prototypes >= 0, "prototypes", "must be >= 0 (the weight λ of the prototype term; 0 = off)"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ConfigError(f"algorithm.{name} {msg}, got {getattr(self, name)!r}")
        if self.families:
            parse_families(self.families)

    # ---------------------------------------------------------------- layout and checks
    def layout(self, ctx: Context) -> Layout:
        fleet = ctx.fleet
        n = ctx.num_clients
        if fleet is not None and fleet.assignment != "fixed":
            raise ConfigError("decentralized algorithms keep one model per node for the whole run: "
                              f"fleet.assignment must be 'fixed', got {fleet.assignment!r}")
        tiers = fleet.tiers() if fleet is not None else np.zeros(n, dtype=np.int64)
        levels = tuple(fleet.levels) if fleet is not None else (1.0,)
        if self.families:
            fams = resolve_families(self.families, ctx.model)
            idx = np.minimum(tiers, len(fams) - 1)
            if self.models == "smallest":
                idx = np.full(n, len(fams) - 1)
            return Layout(tuple(fams[int(k)].ref for k in idx), tiers, levels, idx.astype(np.int64))
        rates = np.asarray(fleet.max_width if fleet is not None else np.ones(n), dtype=np.float64)
        if self.models == "smallest":
            rates = np.full(n, rates.min())
        distinct = sorted({float(r) for r in rates}, reverse=True)
        rank = np.array([distinct.index(float(r)) for r in rates], dtype=np.int64)
        return Layout(tuple(submodel_ref(ctx.model, float(r)) for r in rates), tiers, levels, rank)

    def check_setup(self, ctx: Context, graph: GraphConfig) -> None:
        """Fail before any file is written: layout, faults, slicing, the graph of round 1."""
        lay = self.layout(ctx)
        if ctx.faults is not None and ctx.faults != FaultsConfig():
            raise ConfigError("[faults] (dropouts, deadlines, update validation) is not simulated by decentralized "
                              "algorithms; remove the [faults] section")
        if graph.processes > lay.n:
            raise ConfigError(f"graph.processes={graph.processes} exceeds the {lay.n} nodes (data.num_clients)")
        refs = list(dict.fromkeys(lay.refs))
        if not self.families:
            refs.append(ctx.model)  # width-slices start as prefixes of the full model
        if not self.families or self.gossip in ("overlap", "wider", "narrower"):
            for big in refs:  # a model that cannot be sliced fails here, naming the layer
                for small in refs:
                    if big != small and big.name == small.name and big.params == small.params \
                            and big.width > small.width:
                        prefix_selection(big, small, ctx.info)
        if self.prototypes > 0:
            check_prototypes(list(dict.fromkeys(lay.refs)), ctx.info,
                             lambda a, b: a.name == b.name and a.params == b.params)
        self.plan(1, lay, sample_topology(graph, lay.n, lay.tiers, ctx.seed, 1))

    def model_refs(self, ctx: Context) -> list[ModelRef]:
        seen: list[ModelRef] = []
        for ref in self.layout(ctx).refs:
            if ref not in seen:
                seen.append(ref)
        return seen

    def clients_for(self, num_clients: int) -> int:
        return num_clients

    # ---------------------------------------------------------------- the round plan
    def plan(self, rnd: int, lay: Layout, topo: Topology) -> RoundPlan:
        kd: list[tuple[int, int]] = []
        nbrs: list[list[int]] = [[] for _ in range(lay.n)]
        taught: set[int] = set()  # nodes with a more capable neighbour
        for a, b in topo.edges:
            if self.kd_weight > 0 and lay.rank[a] != lay.rank[b]:
                strong, weak = (a, b) if lay.rank[a] < lay.rank[b] else (b, a)
                taught.add(weak)
                if self.direction != "up":
                    kd.append((strong, weak))
                if self.direction != "down":
                    kd.append((weak, strong))
            for i, j in ((a, b), (b, a)):
                if self.gossips_with(lay, i, j):
                    nbrs[i].append(j)
        kd.sort()
        coeffs = []
        for i in range(lay.n):
            js = sorted(nbrs[i])
            if self.gossip_weights == "subgraph":  # Metropolis-Hastings on the gossip subgraph's degrees
                c = {j: 1.0 / (1.0 + max(len(nbrs[i]), len(nbrs[j]))) for j in js}
            else:
                c = {j: float(topo.weights[i, j]) for j in js}
            c[i] = 1.0 - sum(c[j] for j in js)
            coeffs.append(dict(sorted(c.items())))
        lonely: tuple[int, ...] = ()
        if self.kd_weight > 0:
            top = int(lay.rank.min())
            lonely = tuple(i for i in range(lay.n) if lay.rank[i] > top and i not in taught)
            if lonely and self.no_stronger == "error":
                raise ConfigError(f"round {rnd}: node(s) {', '.join(map(str, lonely))} have no more capable neighbour "
                                  f"on the {topo.n}-node graph (algorithm.no_stronger = 'error'); use a denser "
                                  f"graph, graph.name = 'capability', or no_stronger = 'gossip'")
        return RoundPlan(rnd, topo, tuple(kd), tuple(tuple(sorted(x)) for x in nbrs), tuple(coeffs), lonely)

    def gossips_with(self, lay: Layout, i: int, j: int) -> bool:
        """Whether node ``i`` averages in what its neighbour ``j`` sends (``gossip``; ``wider`` / ``narrower``
        are one-way: ``i`` takes the overlapping slice of a wider / narrower neighbour, not the reverse)."""
        if self.gossip == "none":
            return False
        if lay.refs[i] == lay.refs[j]:
            return True
        if self.gossip == "tier" or not lay.compatible(i, j):
            return False
        wi, wj = lay.refs[i].width, lay.refs[j].width
        return self.gossip == "overlap" or (self.gossip == "wider" and wj > wi) or \
            (self.gossip == "narrower" and wj < wi)

    # ---------------------------------------------------------------- node-side steps
    def kd_train_config(self, train: TrainConfig) -> TrainConfig:
        changes: dict[str, Any] = {}
        if self.kd_steps > 0:
            changes.update(steps=self.kd_steps)
        elif self.kd_epochs > 0:
            changes.update(epochs=self.kd_epochs, steps=0)
        if self.kd_lr > 0:
            changes.update(lr=self.kd_lr)
        return dataclasses.replace(train, **changes) if changes else train

    def distill_into(self, student: nn.Module, teacher: nn.Module | Sequence[nn.Module], data: Any,
                     train: TrainConfig, seed: int, device: torch.device) -> Any:
        """Train ``student`` on ``data`` towards ``teacher``'s outputs: (1-a) CE + a T^2 KL (teacher frozen; the
        stronger model of an edge, or with ``direction = "up"`` / ``"both"`` the weaker one).

        Several teachers: their mean logits (``teacher = "ensemble"``)."""
        members = [teacher] if isinstance(teacher, nn.Module) else list(teacher)
        for m in members:
            m.eval()
        a, t = self.alpha, self.temperature

        def teacher_logits(xb: torch.Tensor) -> torch.Tensor:
            if len(members) == 1:
                return members[0](xb)
            return torch.stack([m(xb) for m in members]).mean(0)

        def hard(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return (1.0 - a) * F.cross_entropy(logits, y)

        def soft(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                target = teacher_logits(xb)
            return (a * t * t) * kl_to_teacher(logits, target, t)

        return local_sgd(student, data, self.kd_train_config(train), seed=seed, device=device, loss_fn=hard,
                         loss_terms=(soft,) if a > 0 else ())

    def merge(self, own: Weights, returned: Sequence[Weights]) -> Weights:
        """Own model (weight 1) averaged with every returned distilled version (weight ``kd_weight``)."""
        if not returned or self.kd_weight == 0:
            return own
        acc = RunningMean()
        acc.add(own, 1.0)
        for w in returned:
            acc.add(w, self.kd_weight)
        return acc.value()

    def mix(self, lay: Layout, i: int, own: Weights, received: dict[int, Weights], coeffs: dict[int, float],
            info: DataInfo) -> Weights:
        """Gossip average of node ``i``: contributors in ascending order, each element over those holding it."""
        if not received:
            return own
        ref = lay.refs[i]
        narrower = [j for j in received if lay.payload_ref(j, i) != ref]
        if not narrower:  # every contributor holds all of i's elements: a plain weighted average
            acc = RunningMean()
            for j, c in coeffs.items():
                acc.add(own if j == i else received[j], c)
            return acc.value()
        over = OverlapAverage(own, spec_for(ref, info))
        for j, c in coeffs.items():
            if j == i or j not in narrower:
                over.add(own if j == i else received[j], {}, c)
            else:
                over.add(received[j], prefix_selection(ref, lay.refs[j], info), c)
        return over.result()

    # ---------------------------------------------------------------- runner hooks
    def init_state(self, ctx: Context) -> ServerState:
        """Every node of one architecture starts from the same weights (a shared seed, no communication);
        width-slices start as prefixes of one full model, as HeteroFL's submodels."""
        lay = self.layout(ctx)
        models: dict[str, Weights] = {}
        if self.families:
            built: dict[ModelRef, Weights] = {}
            for k, ref in enumerate(dict.fromkeys(lay.refs)):
                torch.manual_seed(round_seed(ctx.seed, 0, k))
                built[ref] = weights_of(ref.build(ctx.info))
            for i, ref in enumerate(lay.refs):
                models[node_key(i)] = {k: v.clone() for k, v in built[ref].items()}
        else:
            torch.manual_seed(round_seed(ctx.seed, 0))  # the same initial model as FedAvg / HeteroFL
            full = weights_of(ctx.model.build(ctx.info))
            for i, ref in enumerate(lay.refs):
                models[node_key(i)] = {k: v.clone() for k, v in cut(full, ctx.model, ref, ctx.info).items()}
        return ServerState(round=0, models=models)

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        lay = self.layout(ctx)
        return {node_key(i): EvalTarget(lay.refs[i], state.models[node_key(i)], clients=np.array([i]))
                for i in range(lay.n)}

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        return {}  # the engine's report carries the round's metrics

    def server_data_spec(self) -> ServerDataSpec | None:
        """No server, so no server-side data."""
        return None

    def round_train_config(self, ctx: Context, rnd: int) -> TrainConfig:
        """The local config of round ``rnd`` (1-based): the configured lr decayed per round."""
        return lr_schedule(ctx.train, rnd)

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        evals = [r for r in rows if r.get("test_accuracy") is not None]
        if evals:
            last = evals[-1]
            for k, v in last.items():
                if k.startswith(("test_accuracy.", "tier_acc.")):
                    out[k] = v
                    vals = [r[k] for r in evals[-5:] if r.get(k) is not None]
                    out[f"{k}.last5_mean"] = float(np.mean(vals)) if vals else None
        totals: dict[str, float] = {}
        for r in rows:
            for k, v in r.items():
                if k.startswith(("bytes_sent.", "bytes_recv.", "flops.")) and isinstance(v, (int, float)):
                    totals[k] = totals.get(k, 0.0) + v
        out.update({f"{k}.total_per_node": v for k, v in sorted(totals.items())})
        node_rows = [r["node.bytes_sent"] for r in rows if isinstance(r.get("node.bytes_sent"), list)]
        if node_rows:
            per_node = np.sum(np.array(node_rows, dtype=np.float64), axis=0)
            out["bytes_sent_per_node_mean"] = float(per_node.mean())
            out["bytes_sent_per_node_max"] = float(per_node.max())
        return out


@ALGORITHMS.register("dkd")
@dataclass(frozen=True)
class DKD(GraphAlgorithm):
    """Decentralized distillation into weaker neighbours on their models, plus gossip among equal models; options
    add the other channels: distillation both ways (direction), overlap gossip, neighbour prototypes."""


@ALGORITHMS.register("dpsgd")
@dataclass(frozen=True)
class DPSGD(GraphAlgorithm):
    """D-PSGD: local SGD then gossip with mixing weights; width-slices average overlaps (HeteroFL-style)."""

    kd_weight: float = 0.0
    gossip: str = "overlap"


@ALGORITHMS.register("isolated")
@dataclass(frozen=True)
class Isolated(GraphAlgorithm):
    """Isolated local training: every node trains its own model on its own data, no communication."""

    kd_weight: float = 0.0
    gossip: str = "none"


__all__ = ["DKD", "DPSGD", "GraphAlgorithm", "Isolated", "Layout", "RoundPlan", "cut", "edge_seed", "node_key",
           "prefix_selection"]
