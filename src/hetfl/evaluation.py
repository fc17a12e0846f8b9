"""Evaluation of the server's models: on the global test set, and on every client's local test split.

Local evaluation runs one batched pass over the union of the clients' held-out samples and splits
per-sample correctness by client (``np.bincount``), instead of one small pass per client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from hetfl.algorithms.base import Algorithm, Context, EvalTarget, ServerState
from hetfl.config import EvalConfig
from hetfl.data.base import Split
from hetfl.data.federation import Federation
from hetfl.errors import ConfigError
from hetfl.model_cache import ModelCache
from hetfl.train import evaluate


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
        for done, (label, target) in enumerate(targets.items()):
            if self.progress is not None:
                self.progress(done, len(targets), label)
            model = self.models.loaded(target.model, target.weights)
            if calibrates(self.cfg.bn, target):
                out["bn_calibration_samples"] = recalibrate_bn(model, self.calibration_data(), self.cfg.batch_size)
            # the run's resolved arithmetic and layout (hetfl.precision)
            prec = {"precision": self.ctx.train.precision, "memory_format": self.ctx.train.memory_format}
            res = evaluate(model, self.test, self.cfg.batch_size, **prec)
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
        out.update(self._deployed(targets, out))
        if self.val is not None:
            names = {"deployed_accuracy": "deployed_val_accuracy", "smallest_accuracy": "smallest_val_accuracy"}
            out.update({names[k]: v for k, v in self._deployed(targets, out, "val_accuracy").items()})
        if deployed_local is not None and not np.isnan(deployed_local).any():
            out.update(client_distribution(deployed_local, prefix="deployed_client_acc"))
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
            return {"deployed_accuracy": acc, "smallest_accuracy": acc}
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
    for i in range(0, len(data), batch_size):
        model(data.x[i:i + batch_size])
    for m, mom in zip(norms, saved):
        m.momentum = mom
    model.eval()
    return len(data)
