"""Evaluation of the server's models: on the global test set, and on every client's local test split.

Local evaluation runs one batched pass over the union of the clients' held-out samples and splits
per-sample correctness by client (``np.bincount``), instead of one small pass per client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from hetfl.accounting import tier_label
from hetfl.algorithms.base import Algorithm, Context, EvalTarget, ServerState
from hetfl.algorithms.fedproto import prototype_forward
from hetfl.config import EvalConfig
from hetfl.data.base import Split
from hetfl.data.federation import Federation
from hetfl.errors import ConfigError
from hetfl.model_cache import ModelCache
from hetfl.train import LONE_SAMPLE_BN, bn_state, evaluate, restore_bn


def client_distribution(acc: np.ndarray, prefix: str = "client_acc") -> dict[str, float]:
    """Mean, 10th percentile and mean of the worst 10% of per-client accuracies."""
    if len(acc) == 0:
        return {}
    k = max(1, int(np.ceil(0.1 * len(acc))))
    worst = np.sort(acc)[:k]
    return {
        f"{prefix}_mean": float(acc.mean()),
        f"{prefix}_p10": float(np.percentile(acc, 10)),
        f"{prefix}_worst10": float(worst.mean()),
        f"{prefix}_min": float(acc.min()),
    }


@dataclass
class LocalTestSet:
    data: Split
    owner: np.ndarray  # position (0..k-1) of the owning client for every sample
    clients: np.ndarray  # client ids evaluated


class Evaluator:
    def __init__(self, federation: Federation, ctx: Context, cfg: EvalConfig, models: ModelCache,
                 device: torch.device, seed: int) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.models = models
        self.test = federation.dataset.test.to(device)
        #: the validation split (data.validation_fraction, or the dataset's own): every model's val_accuracy
        self.val = federation.dataset.val.to(device) if federation.dataset.val is not None else None
        self.local = self._local_set(federation, cfg, seed) if cfg.local else None
        self.federation = federation
        self.seed = seed
        self._calib: Split | None = None
        self._rows: dict[int, torch.Tensor] | None = None  # each client's rows of the local test set
        #: called as ``progress(done, total, label)`` around every evaluated model (the console's evaluation step)
        self.progress: Callable[[int, int, str], None] | None = None

    def calibration_data(self) -> Split:
        """Up to ``eval.bn_samples`` client training samples (seeded): the static-BN statistics pass."""
        if self._calib is None:
            fed = self.federation
            idx = fed.train_idx.flat
            if len(idx) > self.cfg.bn_samples:
                rng = np.random.default_rng([self.seed, 0x626E])
                idx = np.sort(rng.choice(idx, size=self.cfg.bn_samples, replace=False))
            self._calib = fed.train.subset(torch.as_tensor(idx, device=fed.train.x.device))
        return self._calib

    @staticmethod
    def _local_set(fed: Federation, cfg: EvalConfig, seed: int) -> LocalTestSet | None:
        clients = np.flatnonzero(fed.test_idx.sizes > 0)
        if len(clients) == 0:
            return None
        if 0 < cfg.local_clients < len(clients):
            rng = np.random.default_rng([seed, 0x6C6F63])
            clients = np.sort(rng.choice(clients, size=cfg.local_clients, replace=False))
        idx, owner = fed.test_idx.gather(clients)
        data = fed.train.subset(torch.as_tensor(idx, device=fed.train.x.device))
        return LocalTestSet(data, owner, clients)

    def __call__(self, algorithm: Algorithm, state: ServerState) -> dict[str, float]:
        out: dict[str, float] = {}
        targets = algorithm.eval_targets(state, self.ctx)
        # local accuracy of the model each evaluated client runs (the first target serving it)
        deployed_local = np.full(len(self.local.clients), np.nan) if self.local is not None else None
        personal: list[tuple[EvalTarget, Any, float]] = []  # one client's own model: (target, test, local accuracy)
        for done, (label, target) in enumerate(targets.items()):
            if self.progress is not None:
                self.progress(done, len(targets), label)
            model = self.models.loaded(target.model, target.weights)
            if calibrates(self.cfg.bn, target):
                out["bn_calibration_samples"] = recalibrate_bn(model, self.calibration_data(), self.cfg.batch_size)
            # the run's resolved arithmetic and layout (hetfl.precision); by the nearest prototype if the target says
            prec = {"precision": self.ctx.train.precision, "memory_format": self.ctx.train.memory_format}
            if target.prototypes is not None:
                prec["forward"] = prototype_forward(*target.prototypes)
            res = evaluate(model, self.test, self.cfg.batch_size, **prec)
            if target.personal is not None:
                personal.append((target, res, self._own_local(model, target, prec)))
                continue
            suffix = "" if label == "global" else f".{label}"
            out[f"test_accuracy{suffix}"] = res.accuracy
            out[f"test_loss{suffix}"] = res.loss
            if self.val is not None:
                val = evaluate(model, self.val, self.cfg.batch_size, **prec)
                out[f"val_accuracy{suffix}"] = val.accuracy
                out[f"val_loss{suffix}"] = val.loss
            if self.local is None or (label != "global" and target.clients is None):
                continue
            loc = evaluate(model, self.local.data, self.cfg.batch_size, per_sample=True, **prec)
            k = len(self.local.clients)
            correct = np.bincount(self.local.owner, weights=loc.correct, minlength=k)
            count = np.bincount(self.local.owner, minlength=k)
            acc = correct / count
            if label == "global":
                out.update(client_distribution(acc))
            if target.clients is not None:
                members = np.isin(self.local.clients, target.clients)
                if members.any():
                    out[f"tier_acc.{label}"] = float(acc[members].mean())
                free = members & np.isnan(deployed_local)
                deployed_local[free] = acc[free]
            elif label == "global" and not any(t.clients is not None for t in targets.values()):
                deployed_local = acc  # one model for everyone
        if self.progress is not None:
            self.progress(len(targets), len(targets), "")
        if personal:
            out.update(self._personal(personal))
            targets = {label: t for label, t in targets.items() if t.personal is None}
        if targets:
            out.update(self._deployed(targets, out))
            if self.val is not None:
                names = {"deployed_accuracy": "deployed_val_accuracy", "smallest_accuracy": "smallest_val_accuracy"}
                out.update({names[k]: v for k, v in self._deployed(targets, out, "val_accuracy").items()})
        if deployed_local is not None and not np.isnan(deployed_local).any():
            out.update(client_distribution(deployed_local, prefix="deployed_client_acc"))
            out.update(self._by_tier(deployed_local, self.local.clients, "deployed_tier_acc"))
        return out

    def _by_tier(self, per_client: np.ndarray, clients: np.ndarray, prefix: str) -> dict[str, float]:
        """``<prefix>.w<width>``: the mean of ``per_client`` over the clients of each fleet tier (labelled by the
        tier's fleet width, whatever model the method serves it), so every method -- one model for all, widths,
        depths, sizes -- has the same per-tier keys; none for a fleet of one tier."""
        fleet = self.ctx.fleet
        if fleet is None or len(fleet.levels) < 2:
            return {}
        tiers = fleet.tiers()[clients]
        return {f"{prefix}.{tier_label(w)}": float(per_client[tiers == t].mean())
                for t, w in enumerate(fleet.levels) if (tiers == t).any()}

    def _own_local(self, model: torch.nn.Module, target: EvalTarget, prec: dict[str, Any]) -> float:
        """A personal model's accuracy on its own client's local test split (NaN: none)."""
        if self.local is None:
            return float("nan")
        if self._rows is None:
            pos = {int(c): i for i, c in enumerate(self.local.clients)}
            dev = self.local.data.x.device
            self._rows = {c: torch.as_tensor(np.flatnonzero(self.local.owner == i), device=dev) for c, i in pos.items()}
        rows = self._rows.get(int(target.clients[0]))
        if rows is None or len(rows) == 0:
            return float("nan")
        return evaluate(model, self.local.data.subset(rows), self.cfg.batch_size, **prec).accuracy

    def _personal(self, personal: list[tuple[EvalTarget, Any, float]]) -> dict[str, Any]:
        """Metrics of a run whose every client runs its own model: ``test_accuracy`` / ``test_loss`` = the mean
        over clients of their model on the global test set (also ``deployed_accuracy``), per group
        ``test_accuracy.<group>`` and ``tier_acc.<group>`` when there are several, ``client_acc_*`` (and
        ``deployed_client_acc_*``) over their local accuracies, ``client.test_acc`` per client."""
        acc = np.array([r.accuracy for _, r, _ in personal])
        loss = np.array([r.loss for _, r, _ in personal])
        local = np.array([a for _, _, a in personal])
        groups = np.array([t.personal for t, _, _ in personal])
        out: dict[str, Any] = {"test_accuracy": float(acc.mean()), "test_loss": float(loss.mean())}
        if len(set(groups)) > 1:
            for g in dict.fromkeys(groups):
                out[f"test_accuracy.{g}"] = float(acc[groups == g].mean())
                out[f"test_loss.{g}"] = float(loss[groups == g].mean())
                own = local[(groups == g) & np.isfinite(local)]
                if len(own):
                    out[f"tier_acc.{g}"] = float(own.mean())
        out["deployed_accuracy"] = out["smallest_accuracy"] = out["test_accuracy"]
        if self.ctx.fleet is not None:
            clients = np.array([int(t.clients[0]) for t, _, _ in personal])
            tiers = self.ctx.fleet.tiers()[clients]
            out["smallest_accuracy"] = float(acc[tiers == tiers.max()].mean())
        finite = local[np.isfinite(local)]
        out.update(client_distribution(finite))
        out.update(client_distribution(finite, prefix="deployed_client_acc"))
        out["client.test_acc"] = [round(float(a), 6) for a in acc]
        return out

    def _deployed(self, targets: dict[str, EvalTarget], out: dict[str, float],
                  metric: str = "test_accuracy") -> dict[str, float]:
        """``deployed_accuracy``: the mean over all clients of the test accuracy of the model each client runs
        (the first target that serves it; one model for everyone when no target names its clients), and
        ``smallest_accuracy``: that of the model the fleet's lowest tier runs.  Defined the same way for every
        algorithm (widths, depths, capacities), so a comparison across methods reads one key; absent when the
        targets do not cover every client (e.g. ``eval_levels = false``).  ``metric = "val_accuracy"``: the same
        on the validation split (``deployed_val_accuracy``, ``smallest_val_accuracy``)."""
        n = self.ctx.num_clients
        served = [(label, t.clients) for label, t in targets.items() if t.clients is not None]
        if not served:
            acc = out[metric]
            res = {"deployed_accuracy": acc, "smallest_accuracy": acc}
            if metric == "test_accuracy":
                res.update(self._by_tier(np.full(n, acc), np.arange(n), "deployed_tier_test"))
            return res
        per_client = np.full(n, np.nan)
        for label, clients in served:
            free = clients[np.isnan(per_client[clients])]
            per_client[free] = out[metric if label == "global" else f"{metric}.{label}"]
        if np.isnan(per_client).any():
            return {}
        res = {"deployed_accuracy": float(per_client.mean())}
        fleet = self.ctx.fleet
        if fleet is not None:
            tiers = fleet.tiers()
            res["smallest_accuracy"] = float(per_client[tiers == tiers.max()].mean())
            if metric == "test_accuracy":
                res.update(self._by_tier(per_client, np.arange(n), "deployed_tier_test"))
        return res


def calibrates(rule: str, target: EvalTarget) -> bool:
    """Whether ``target``'s BatchNorm statistics are recomputed before it is scored: ``eval.bn = "method"``, the
    algorithm's choice (static BN); ``"recalibrate"``, always; ``"running"``, never (the averaged statistics)."""
    return target.calibrate_bn if rule == "method" else rule == "recalibrate"


def check_bn_rule(rule: str, algorithm: Algorithm, ctx: Context) -> None:
    """``eval.bn = "running"`` needs averaged running statistics: refused for an algorithm that keeps them out
    of the average (static BN) on a model with BatchNorm, whose global model then has none to run."""
    if rule != "running" or not getattr(algorithm, "static_bn", False):
        return
    with torch.random.fork_rng(devices=[]):
        model = ctx.model.build(ctx.info)
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) and m.track_running_stats for m in model.modules()):
        raise ConfigError(f'eval.bn = "running": algorithm {type(algorithm).__name__} keeps BatchNorm statistics out '
                          f'of the average (static_bn = true), so its global model has none to run; set '
                          f'algorithm.static_bn = false (the server then averages them, as FedAvg) or use '
                          f'eval.bn = "recalibrate" / "method"')


@torch.no_grad()
def recalibrate_bn(model: torch.nn.Module, data: Split, batch_size: int) -> int:
    """Static BN: reset every BatchNorm's running statistics and recompute them as a cumulative average
    (momentum=None) over ``data`` in training mode; returns the number of samples used."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    used = len(data)
    for i in range(0, len(data), batch_size):
        lone = bn_state(model) if len(data) - i == 1 else None
        try:
            model(data.x[i:i + batch_size])
        except ValueError as exc:  # a last lone sample on 1 x 1 maps: left out, as local training leaves it out
            if not lone or not str(exc).startswith(LONE_SAMPLE_BN):
                raise
            restore_bn(lone)
            used -= 1
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.eval()
    return used
