"""The in-process decentralized engine and the per-node evaluator.

The runner drives a decentralized algorithm like any other: ``engine.run_round(state, rnd)`` returns the
next state and a report, and the evaluator turns a state into metrics.  The "state" holds no server
model: ``state.models`` maps ``node<i>`` to node i's weights (checkpointed, resumed and evaluated like
any server state).  :class:`InProcessEngine` runs every node in this process, one after another, through
:class:`~hetfl.decentralized.host.NodeHost` with a transport that carries nothing; the torchrun
engine runs the same host code in many processes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from hetfl.algorithms.base import Context, ServerState
from hetfl.config import EvalConfig, RunConfig
from hetfl.decentralized.host import LocalTransport, NodeHost, lonely_message, round_report
from hetfl.decentralized.protocol import GraphAlgorithm, Layout, RoundPlan, node_key
from hetfl.errors import ConfigError
from hetfl.evaluation import client_distribution
from hetfl.train import evaluate


def require_graph(algorithm: Any, engine: str) -> GraphAlgorithm:
    """``algorithm``, checked to implement the graph protocol (:func:`hetfl.engines.engine_for` picks graph
    engines only for graph algorithms; this guards direct construction)."""
    if not isinstance(algorithm, GraphAlgorithm):
        raise ConfigError(f"engine {engine!r} runs graph algorithms (dkd, dpsgd, isolated); "
                          f"algorithm {type(algorithm).__name__} needs a server engine (simulator, flower)")
    return algorithm


@dataclass
class GraphReport:
    """A decentralized round for metrics.jsonl (the runner calls ``as_metrics`` and logs ``messages``)."""

    metrics: dict[str, Any]
    messages: list[str] = field(default_factory=list)

    def as_metrics(self) -> dict[str, Any]:
        return dict(self.metrics)


class LonelyLog:
    """Says once, and again whenever it changes, which nodes have no more capable neighbour."""

    def __init__(self) -> None:
        self.last: tuple[int, ...] | None = None

    def __call__(self, plan: RoundPlan) -> list[str]:
        if plan.lonely == self.last:
            return []
        self.last = plan.lonely
        return [lonely_message(plan)] if plan.lonely else []


def models_of(state: ServerState, n: int) -> dict[int, dict[str, torch.Tensor]]:
    return {i: state.models[node_key(i)] for i in range(n)}


def state_of(rnd: int, models: dict[int, dict[str, torch.Tensor]]) -> ServerState:
    return ServerState(rnd, {node_key(i): models[i] for i in sorted(models)})


class InProcessEngine:
    """Every node of the graph in this process (the default engine of decentralized algorithms)."""

    name = "simulator"

    def __init__(self, algorithm: Any, federation: Any, ctx: Context, device: torch.device | str,
                 cfg: RunConfig) -> None:
        self.algorithm = require_graph(algorithm, "simulator")
        self.host = NodeHost(self.algorithm, federation, ctx, torch.device(device), cfg.graph,
                             range(ctx.num_clients), LocalTransport())
        self.lonely = LonelyLog()

    def close(self) -> None:
        """Nothing to release: everything lives in this process."""

    def run_round(self, state: ServerState, rnd: int) -> tuple[ServerState, GraphReport]:
        lay = self.host.layout
        t0 = time.perf_counter()
        new, stats, plan = self.host.round(rnd, models_of(state, lay.n))
        metrics = round_report(lay, plan, stats, new, time.perf_counter() - t0)
        return state_of(rnd, new), GraphReport(metrics, self.lonely(plan))


class NodeEvaluator:
    """Evaluates every node's own model: on the global test set, and on the node's local test split.

    Metrics: ``test_accuracy`` / ``test_loss`` (mean over nodes), ``test_accuracy.<tier>`` (mean over the
    tier's nodes, tiers labelled by fleet level: ``w1``, ``w0.25``, ...), ``tier_acc.<tier>`` (mean local
    accuracy of the tier's nodes), ``client_acc_mean/p10/worst10/min`` over nodes' local accuracies,
    and the per-node lists ``node.test_acc`` / ``node.local_acc``.
    """

    def __init__(self, federation: Any, ctx: Context, cfg: EvalConfig, models: Any, device: torch.device,
                 seed: int) -> None:
        self.federation = federation
        self.ctx = ctx
        self.cfg = cfg
        self.models = models
        self.test = federation.dataset.test.to(device)
        self._layout: Layout | None = None

    def __call__(self, algorithm: GraphAlgorithm, state: ServerState) -> dict[str, Any]:
        if self._layout is None:
            self._layout = algorithm.layout(self.ctx)
        lay = self._layout
        bs = self.cfg.batch_size
        # the run's resolved arithmetic and layout (hetfl.precision)
        prec = {"precision": self.ctx.train.precision, "memory_format": self.ctx.train.memory_format}
        test_acc, test_loss, local_acc = [], [], []
        for i in range(lay.n):
            model = self.models.loaded(lay.refs[i], state.models[node_key(i)])
            res = evaluate(model, self.test, bs, **prec)
            test_acc.append(res.accuracy)
            test_loss.append(res.loss)
            local = self.federation.client_test(i) if self.cfg.local else None
            local_acc.append(evaluate(model, local, bs, **prec).accuracy
                             if local is not None and len(local) else float("nan"))
        acc, loss, loc = np.array(test_acc), np.array(test_loss), np.array(local_acc)
        out: dict[str, Any] = {"test_accuracy": float(acc.mean()), "test_loss": float(loss.mean())}
        for label, members in lay.tier_members().items():
            out[f"test_accuracy.{label}"] = float(acc[members].mean())
            out[f"test_loss.{label}"] = float(loss[members].mean())
            tier_local = loc[members][np.isfinite(loc[members])]
            if len(tier_local):
                out[f"tier_acc.{label}"] = float(tier_local.mean())
        out.update(client_distribution(loc[np.isfinite(loc)]))
        out["node.test_acc"] = [round(float(a), 6) for a in acc]
        if np.isfinite(loc).any():
            out["node.local_acc"] = [None if not np.isfinite(a) else round(float(a), 6) for a in loc]
        return out
