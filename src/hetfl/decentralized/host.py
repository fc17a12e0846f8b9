"""One decentralized round on one host: the nodes it holds, the transport to the others, the round's metrics.

:class:`NodeHost` runs rounds of a :class:`~hetfl.decentralized.protocol.GraphAlgorithm` for the nodes one
process hosts (every node: the in-process engine; some: a torchrun rank); a :class:`Transport` carries the
models between hosts (:class:`LocalTransport`: nothing to carry; torchrun: gloo point-to-point), so both
graph engines execute the same arithmetic in the same order and give the same models.  :func:`round_report`
turns every node's :class:`NodeStats` into the round's metrics.jsonl entries, the same in every engine.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from hetfl.accounting import model_cost
from hetfl.algorithms.base import Context, Weights, nbytes, round_seed, weights_of
from hetfl.algorithms.families import RunningMean
from hetfl.decentralized.protocol import GraphAlgorithm, Layout, RoundPlan, cut, edge_seed
from hetfl.decentralized.prototypes import (
    PROTO_KEY,
    PrototypePull,
    cut_prototype,
    feature_size,
    neighbour_mean,
    node_prototypes,
)
from hetfl.decentralized.topology import GraphConfig, Topology, sample_topology
from hetfl.model_cache import ModelCache
from hetfl.models import ModelRef
from hetfl.train import local_sgd

#: a payload's layout: (key, shape, dtype) of every tensor, in order
Template = list[tuple[str, tuple[int, ...], torch.dtype]]


class Transport(Protocol):
    def exchange(self, phase: str, messages: Sequence[tuple[int, int]], payload: Callable[[int, int], Weights],
                 template: Callable[[int, int], ModelRef | Template]) -> dict[tuple[int, int], Weights]:
        """Deliver ``payload(src, dst)`` for every ``(src, dst)`` of ``messages`` (the same list, in the same order,
        on every host); return what this host's nodes received, by ``(src, dst)``.  ``template(src, dst)`` is the
        model whose state-dict shapes the payload has, or the payload's layout itself."""
        ...


class LocalTransport:
    """Every node lives in this process: a message is the sender's tensors, unchanged."""

    def exchange(self, phase: str, messages: Sequence[tuple[int, int]], payload: Callable[[int, int], Weights],
                 template: Callable[[int, int], ModelRef | Template]) -> dict[tuple[int, int], Weights]:
        return {(s, d): payload(s, d) for s, d in messages}


@dataclass
class NodeStats:
    train_loss: float = float("nan")
    samples: int = 0
    steps: int = 0
    flops: int = 0
    kd_loss_sum: float = 0.0
    kd_runs: int = 0
    bytes_sent: int = 0
    bytes_recv: int = 0
    train_time_s: float = 0.0


class NodeHost:
    """Runs rounds for the nodes ``nodes`` of a run; the others are reached through ``transport``."""

    def __init__(self, algorithm: GraphAlgorithm, federation: Any, ctx: Context, device: torch.device,
                 graph: GraphConfig, nodes: Sequence[int], transport: Transport) -> None:
        self.algorithm = algorithm
        self.federation = federation
        self.ctx = ctx
        self.device = torch.device(device)
        self.graph = graph
        self.layout = algorithm.layout(ctx)
        self.nodes = sorted(int(i) for i in nodes)
        self.local = set(self.nodes)
        self.transport = transport
        self.models = ModelCache(ctx, self.device)
        self.teachers = ModelCache(ctx, self.device)
        self._members: dict[tuple[ModelRef, int], nn.Module] = {}  # extra teacher modules (teacher = "ensemble")
        self._topology: Topology | None = None
        self._costs: dict[ModelRef, int] = {}

    # ---------------------------------------------------------------- shared helpers
    def topology(self, rnd: int) -> Topology:
        lay = self.layout
        if self.graph.resample:
            return sample_topology(self.graph, lay.n, lay.tiers, self.ctx.seed, rnd)
        if self._topology is None:
            self._topology = sample_topology(self.graph, lay.n, lay.tiers, self.ctx.seed, rnd)
        return self._topology

    def plan(self, rnd: int) -> RoundPlan:
        return self.algorithm.plan(rnd, self.layout, self.topology(rnd))

    def member(self, ref: ModelRef, k: int, weights: Weights) -> nn.Module:
        """The ``k``-th extra module of ``ref`` (ensemble teachers), loaded with ``weights``."""
        module = self._members.get((ref, k))
        if module is None:
            module = self._members[(ref, k)] = ref.build(self.ctx.info).to(self.device)
        module.load_state_dict(weights)
        return module

    def teacher_for(self, s: int, plan: RoundPlan, half: dict[int, Weights],
                    sent: dict[tuple[int, int], Weights]) -> nn.Module | list[nn.Module]:
        """Node ``s``'s teacher: its own model, or (``teacher = "ensemble"``) its own model and every model its
        weaker neighbours sent it this round (mean logits)."""
        lay = self.layout
        own = self.teachers.loaded(lay.refs[s], half[s])
        if self.algorithm.teacher == "own":
            return own
        members: list[nn.Module] = [own]
        count: dict[ModelRef, int] = {}
        for w in plan.students_of(s):
            k = count.get(lay.refs[w], 0)
            count[lay.refs[w]] = k + 1
            members.append(self.member(lay.refs[w], k, sent[(w, s)]))
        return members

    def forward_flops(self, ref: ModelRef) -> int:
        """Forward FLOPs per sample of ``ref`` (counted once per model)."""
        if ref not in self._costs:
            module = self.models.get(ref)
            self._costs[ref] = model_cost(module, self.federation.train.x[:1].to(self.device)).forward_flops
        return self._costs[ref]

    def _exchange(self, phase: str, messages: list[tuple[int, int]], payload: Callable[[int, int], Weights],
                  template: Callable[[int, int], ModelRef | Template],
                  stats: dict[int, NodeStats]) -> dict[tuple[int, int], Weights]:
        def counted(s: int, d: int) -> Weights:
            w = payload(s, d)
            stats[s].bytes_sent += nbytes(w)
            return w

        got = self.transport.exchange(phase, messages, counted, template)
        for (_, d), w in got.items():
            if d in self.local:
                stats[d].bytes_recv += nbytes(w)
        return got

    # ---------------------------------------------------------------- the round
    def round(self, rnd: int, models: dict[int, Weights]) -> tuple[dict[int, Weights], dict[int, NodeStats], RoundPlan]:
        """One synchronous round for this host's nodes; returns their new models and statistics, and the plan."""
        algo, lay, ctx = self.algorithm, self.layout, self.ctx
        plan = self.plan(rnd)
        train = algo.round_train_config(ctx, rnd)
        stats = {i: NodeStats() for i in self.nodes}
        # 0. prototypes (prototypes > 0, from round 2): every node's, to every graph neighbour
        pulls = self.prototype_targets(rnd, plan, models, train, stats) if algo.prototypes > 0 and rnd > 1 else {}
        half: dict[int, Weights] = {}
        for i in self.nodes:  # 1. local training
            t0 = time.perf_counter()
            module = self.models.loaded(lay.refs[i], models[i])
            if i in pulls:
                with PrototypePull(module, pulls[i], algo.prototypes, self.device) as pull:
                    st = local_sgd(module, self.federation.client_train(i), train,
                                   seed=round_seed(ctx.seed, rnd, i), device=self.device, loss_terms=(pull,))
            else:
                st = local_sgd(module, self.federation.client_train(i), train, seed=round_seed(ctx.seed, rnd, i),
                               device=self.device)
            half[i] = weights_of(module)
            s = stats[i]
            s.train_loss, s.samples, s.steps = st.loss, st.samples, st.steps
            s.flops += 3 * self.forward_flops(lay.refs[i]) * st.samples
            s.train_time_s += time.perf_counter() - t0

        # 2. distillation into weaker neighbours: weak -> strong, train at strong, strong -> weak
        returned: dict[tuple[int, int], Weights] = {}
        back: dict[tuple[int, int], Weights] = {}
        sent: dict[tuple[int, int], Weights] = {}
        if plan.kd:
            sent = self._exchange("kd_send", [(w, s) for s, w in plan.kd], lambda src, dst: half[src],
                                  lambda src, dst: lay.refs[src], stats)
            teachers: dict[int, Any] = {}
            for s, w in plan.kd:
                if s not in self.local:
                    continue
                t0 = time.perf_counter()
                if s not in teachers:
                    teachers[s] = self.teacher_for(s, plan, half, sent)
                teacher = teachers[s]
                student = self.models.loaded(lay.refs[w], sent[(w, s)])
                st = algo.distill_into(student, teacher, self.federation.client_train(s), train,
                                       edge_seed(ctx.seed, rnd, s, w), self.device)
                returned[(s, w)] = weights_of(student)
                stats[s].kd_loss_sum += st.loss
                stats[s].kd_runs += 1
                teacher_flops = self.forward_flops(lay.refs[s]) + (
                    sum(self.forward_flops(lay.refs[v]) for v in plan.students_of(s)) if algo.teacher == "ensemble"
                    else 0)
                stats[s].flops += (3 * self.forward_flops(lay.refs[w]) + teacher_flops) * st.samples
                stats[s].train_time_s += time.perf_counter() - t0
            if algo.kd_return == "mean":  # a teacher returns the mean of the copies of one model it distilled
                returned = relay_mean(returned, lay)
            back = self._exchange("kd_return", list(plan.kd), lambda src, dst: returned[(src, dst)],
                                  lambda src, dst: lay.refs[dst], stats)
        merged = {}
        for w in self.nodes:
            merged[w] = algo.merge(half[w], [back[(s, w)] for s in plan.teachers_of(w)])

        # 3. gossip among the neighbours each node averages with
        # (gossip = "narrower": a wider node averages in the model its narrower neighbour already sent it for
        # distillation this round, the weak model after local training, instead of a second message)
        reuse = {(s, w) for s, w in plan.kd if lay.rank[s] < lay.rank[w]} if algo.gossip == "narrower" else set()
        messages = [(j, i) for i in range(lay.n) for j in plan.gossip[i] if (i, j) not in reuse]
        got = self._exchange("gossip", messages,
                             lambda src, dst: cut(merged[src], lay.refs[src], lay.payload_ref(src, dst), ctx.info),
                             lambda src, dst: lay.payload_ref(src, dst), stats) if messages else {}
        new = {}
        for i in self.nodes:
            received = {j: sent[(j, i)] if (i, j) in reuse else got[(j, i)] for j in plan.gossip[i]}
            new[i] = algo.mix(lay, i, merged[i], received, plan.coeffs[i], ctx.info)
        return new, stats, plan

    def prototype_targets(self, rnd: int, plan: RoundPlan, models: dict[int, Weights], train: Any,
                          stats: dict[int, NodeStats]) -> dict[int, torch.Tensor]:
        """Every hosted node's prototypes (this round's minibatches, current model) sent to every graph neighbour
        (cut to the receiver's feature size); returns each hosted node's neighbour mean per class."""
        lay, ctx = self.layout, self.ctx
        classes = ctx.info.num_classes
        size = [feature_size(ref, ctx.info) for ref in lay.refs]
        mine: dict[int, torch.Tensor] = {}
        for i in self.nodes:
            t0 = time.perf_counter()
            module = self.models.loaded(lay.refs[i], models[i])
            mine[i], samples = node_prototypes(module, self.federation.client_train(i), train,
                                               round_seed(ctx.seed, rnd, i), classes)
            stats[i].flops += self.forward_flops(lay.refs[i]) * samples
            stats[i].train_time_s += time.perf_counter() - t0
        nbrs = plan.topology.neighbours
        messages = [(j, i) for i in range(lay.n) for j in nbrs[i]]
        got = self._exchange("prototypes", messages, lambda s, d: {PROTO_KEY: cut_prototype(mine[s], size[d])},
                             lambda s, d: [(PROTO_KEY, (classes, min(size[s], size[d])), torch.float32)], stats)
        return {i: neighbour_mean(size[i], [got[(j, i)][PROTO_KEY].cpu() for j in nbrs[i]])
                for i in self.nodes if nbrs[i]}


def relay_mean(returned: dict[tuple[int, int], Weights], lay: Layout) -> dict[tuple[int, int], Weights]:
    """``kd_return = "mean"``: every teacher returns to each student the mean of the distilled copies of the
    students that hold the same model (weight 1 each), so that equal weak models mix through their common
    stronger neighbour; a teacher with one student of a model returns its copy unchanged."""
    groups: dict[tuple[int, ModelRef], list[int]] = {}
    for s, w in returned:
        groups.setdefault((s, lay.refs[w]), []).append(w)
    out = dict(returned)
    for (s, _), ws in groups.items():
        if len(ws) < 2:
            continue
        acc = RunningMean()
        for w in sorted(ws):
            acc.add(returned[(s, w)], 1.0)
        avg = acc.value()
        for w in ws:
            out[(s, w)] = avg
    return out


# --------------------------------------------------------------------------------------------------
# round metrics shared by the engines
# --------------------------------------------------------------------------------------------------


def consensus(lay: Layout, models: dict[int, Weights]) -> dict[str, float]:
    """Consensus distance within every tier that shares one model: (1/n) sum_i ||x_i - mean||^2 (Kong et al.)."""
    out: dict[str, float] = {}
    groups = dict(lay.tier_members())
    if len(set(lay.refs)) == 1 and len(groups) > 1:
        groups["all"] = np.arange(lay.n)
    for label, members in groups.items():
        if len(members) < 2 or len({lay.refs[i] for i in members}) != 1:
            continue
        keys = [k for k, v in models[int(members[0])].items() if v.is_floating_point()]
        flat = torch.stack([torch.cat([models[int(i)][k].detach().reshape(-1).double().cpu() for k in keys])
                            for i in members])
        out[f"consensus.{label}"] = float(((flat - flat.mean(0)) ** 2).sum(1).mean())
    return out


def round_report(lay: Layout, plan: RoundPlan, stats: dict[int, NodeStats], models: dict[int, Weights],
                 train_time_s: float) -> dict[str, Any]:
    """The metrics.jsonl entries of a round, from every node's statistics (the same in every engine)."""
    nodes = range(lay.n)
    samples = sum(stats[i].samples for i in nodes)
    loss = sum(stats[i].train_loss * stats[i].samples for i in nodes if np.isfinite(stats[i].train_loss))
    kd_runs = sum(stats[i].kd_runs for i in nodes)
    sent = [stats[i].bytes_sent for i in nodes]
    recv = [stats[i].bytes_recv for i in nodes]
    flops = [stats[i].flops for i in nodes]
    row: dict[str, Any] = {
        "clients": lay.n,
        "samples": samples,
        "train_loss": loss / samples if samples else float("nan"),
        "bytes_up": int(sum(sent)),
        "bytes_down": int(sum(recv)),
        "train_time_s": round(train_time_s, 4),
        "graph_edges": len(plan.topology.edges),
        "graph_spectral_gap": round(plan.topology.spectral_gap, 6),
        "kd_pairs": len(plan.kd),
        "kd_loss": sum(stats[i].kd_loss_sum for i in nodes) / kd_runs if kd_runs else None,
        "no_stronger": len(plan.lonely),
    }
    for label, members in lay.tier_members().items():
        row[f"bytes_sent.{label}"] = float(np.mean([sent[i] for i in members]))
        row[f"bytes_recv.{label}"] = float(np.mean([recv[i] for i in members]))
        row[f"flops.{label}"] = float(np.mean([flops[i] for i in members]))
    row.update(consensus(lay, models))
    row["node.bytes_sent"] = sent
    row["node.bytes_recv"] = recv
    row["node.flops"] = flops
    return row


def lonely_message(plan: RoundPlan) -> str:
    nodes = ", ".join(map(str, plan.lonely))
    return (f"{len(plan.lonely)} node(s) below the largest model have no more capable neighbour ({nodes}): "
            f"no distillation for them this round, they train locally and gossip only")


__all__ = ["LocalTransport", "NodeHost", "NodeStats", "Template", "Transport", "consensus", "lonely_message",
           "relay_mean", "round_report"]
