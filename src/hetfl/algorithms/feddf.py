"""FedDF (Lin, Kong, Stich, Jaggi, NeurIPS 2020): ensemble distillation across architecture families.

Every round, per architecture family (see :mod:`hetfl.algorithms.families`):

1. the family's sampled clients train its current model with local SGD;
2. the server averages the family's updates (uniformly by default, as FedDF's code; ``weighted`` = by samples);
3. every family's average is then distilled towards the ensemble of *all* received client models of *all*
   families (mean of their logits, or of their probabilities) on unlabeled server data, at a temperature,
   with Adam, a cosine-annealed step budget and early stopping on a small labeled server validation split;
   the best student on validation becomes the family's model.

The server data comes from ``ctx.server_data`` (see :mod:`hetfl.data.server`): a held-out slice of the
training distribution removed from the clients' pool, another dataset, or noise.

Two teacher implementations, chosen by ``teachers``:

* ``"streaming"`` (default): each client model is run over the server inputs once, as its result arrives,
  and added to a running sum of logits; only one module per architecture is resident, the ensemble is a
  ``server_data_size x classes`` tensor, and the teacher costs K forwards over the server set per round.
* ``"resident"``: what FedDF's code does: all K received client models are kept as modules and the ensemble
  is recomputed for every distillation batch of every family (K forwards per batch per family).

Both give the same targets (the inputs are fixed within a round); metrics.jsonl records the server's cost of
each: ``server_teacher_s``, ``server_distill_s``, ``server_teacher_bytes`` and ``server_peak_bytes``
(accounted bytes of tensors held: teachers, running averages, student with its best copy and Adam moments).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from hetfl.algorithms.base import ClientResult, ClientTask, Context, ServerState, Weights, round_seed, weights_of
from hetfl.algorithms.families import FamilyAlgorithm, build_detached
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.data.base import Split
from hetfl.data.server import ServerDataSpec
from hetfl.distill import ENSEMBLE_MODES, LogitEnsemble, distill, ensemble_logits, nbytes_of
from hetfl.errors import HetflError
from hetfl.models import ModelRef
from hetfl.train import local_sgd

TEACHER_MODES = ("streaming", "resident")


@dataclass
class FedDFUpdate:
    """What :meth:`FedDF.aggregate` hands to :meth:`FedDF.server_step` (server side only, never transported)."""

    means: dict[str, Weights]
    clients: dict[str, int]
    teachers: int = 0
    cache: torch.Tensor | None = None  # streaming: ensemble logits on the server inputs
    val_logits: torch.Tensor | None = None  # ensemble logits on the validation inputs
    resident: list[nn.Module] = field(default_factory=list)  # resident: every client model
    teacher_s: float = 0.0
    teacher_bytes: int = 0
    mean_bytes: int = 0


class _Teachers:
    """FedDF's side channel: every received client model as a teacher (streaming logits or resident modules)."""

    def __init__(self, algo: FedDF, ctx: Context, distilling: bool) -> None:
        self.algo = algo
        self.distilling = distilling
        self.refs = {f.key: f.ref for f in algo.family_list(ctx)}
        self.sd = ctx.server_data
        self.streaming = algo.teachers == "streaming"
        self.ens = self.ens_val = None
        if self.streaming and distilling:
            # teachers run at the distillation batch size, as resident teachers do: the same activation memory
            kw = {"mode": algo.ensemble, "temperature": algo.temperature, "batch_size": algo.distill_batch}
            self.ens = LogitEnsemble(self.sd.x, **kw)
            self.ens_val = LogitEnsemble(self.sd.val.x, **kw) if self.sd.val else None
        self.info = ctx.info
        self.modules: dict[ModelRef, nn.Module] = {}
        self.upd = FedDFUpdate(means={}, clients={})

    def add(self, res: ClientResult, placement: Any) -> None:
        ref = self.refs[placement.model]
        upd = self.upd
        upd.clients[placement.model] = upd.clients.get(placement.model, 0) + 1
        if not self.distilling:
            return
        t0 = time.perf_counter()
        if self.streaming:
            module = self.modules.get(ref)
            if module is None:
                module = self.modules[ref] = build_detached(ref, self.info).to(self.sd.x.device)
            module.load_state_dict(res.weights)
            self.ens.add(module)
            if self.ens_val is not None:
                self.ens_val.add(module)
        else:
            module = build_detached(ref, self.info).to(self.sd.x.device)
            module.load_state_dict(res.weights)
            module.eval()
            upd.resident.append(module)
        upd.teachers += 1
        upd.teacher_s += time.perf_counter() - t0

    def update(self) -> FedDFUpdate:
        upd = self.upd
        if upd.teachers and self.streaming:
            upd.cache = self.ens.logits()
            upd.val_logits = self.ens_val.logits() if self.ens_val is not None else None
            upd.teacher_bytes = (self.ens.nbytes + (self.ens_val.nbytes if self.ens_val else 0)
                                 + sum(map(nbytes_of, self.modules.values())))
        elif upd.teachers:
            t0 = time.perf_counter()
            if self.sd.val is not None:
                upd.val_logits = ensemble_logits(upd.resident, self.sd.val.x, mode=self.algo.ensemble,
                                                 temperature=self.algo.temperature, batch_size=self.algo.distill_batch)
            upd.teacher_s += time.perf_counter() - t0
            upd.teacher_bytes = sum(map(nbytes_of, upd.resident))
        return upd


@ALGORITHMS.register("feddf")
@dataclass(frozen=True)
class FedDF(FamilyAlgorithm):
    """FedDF: per-family FedAvg, then every family distilled towards the all-client ensemble on server data."""

    server_data: str = "heldout"
    server_data_size: int = 5000
    server_val_size: int = 500
    distill_steps: int = 1000
    distill_batch: int = 128
    distill_lr: float = 1e-3
    temperature: float = 1.0
    ensemble: str = "logits"
    teachers: str = "streaming"
    val_every: int = 100
    patience: int = 1000
    keep_start: bool = False
    cosine: bool = True
    distill_grad_clip: float = 5.0

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_fields([
            (self.distill_steps >= 0, "distill_steps", "must be >= 0 (0 = no distillation: per-family FedAvg)"),
            (self.distill_batch >= 1, "distill_batch", "must be >= 1"),
            (self.server_data_size >= 1, "server_data_size", "must be >= 1"),
            (self.distill_lr > 0, "distill_lr", "must be > 0"),
            (self.temperature > 0, "temperature", "must be > 0"),
            (self.ensemble in ENSEMBLE_MODES, "ensemble", f"must be one of {', '.join(ENSEMBLE_MODES)}"),
            (self.teachers in TEACHER_MODES, "teachers", f"must be one of {', '.join(TEACHER_MODES)}"),
            (self.val_every >= 1, "val_every", "must be >= 1"),
            (self.patience >= 1, "patience", "must be >= 1"),
            (self.distill_grad_clip >= 0, "distill_grad_clip", "must be >= 0 (0 = off)"),
        ])
        ServerDataSpec(self.server_data, self.server_data_size, self.server_val_size)

    # ---------------------------------------------------------------- hooks
    def server_data_spec(self) -> ServerDataSpec:
        # reserved even with distill_steps = 0, so that per-family FedAvg sees exactly FedDF's client pool
        return ServerDataSpec(self.server_data, self.server_data_size, self.server_val_size)

    # ---------------------------------------------------------------- server
    def init_state(self, ctx: Context) -> ServerState:
        return ServerState(round=0, models=self.initial_models(ctx))

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int],
                        ctx: Context) -> list[ClientTask]:
        return self.family_tasks(state, rnd, clients, ctx)

    def _distilling(self, ctx: Context) -> bool:
        if self.distill_steps == 0:
            return False
        if ctx.server_data is None:
            raise HetflError("feddf needs server data (ctx.server_data); run it through hetfl.runner, which draws "
                             "it from algorithm.server_data")
        return True

    def side_channel(self, state: ServerState, rnd: int, ctx: Context) -> _Teachers | None:
        """Clients per family and the ensemble of every received client model (not in a private round: there
        the teachers are the noised family means, post-processing of the release)."""
        return _Teachers(self, ctx, self._distilling(ctx))

    def combine(self, state: ServerState, rnd: int, models: dict[str, Weights], side: _Teachers | None,
                ctx: Context) -> FedDFUpdate:
        upd = side.update() if side is not None else FedDFUpdate(means={}, clients={})
        upd.means = {key: w for key, w in models.items() if w}
        upd.mean_bytes = sum(8 * v.numel() for w in upd.means.values() for v in w.values())  # float64 running sums
        if side is None and ctx.privacy is not None and upd.means and self._distilling(ctx):
            fams = {f.key: f for f in self.family_list(ctx)}
            t0 = time.perf_counter()
            for key, weights in upd.means.items():
                module = build_detached(fams[key].ref, ctx.info).to(ctx.server_data.x.device)
                module.load_state_dict(weights)
                module.eval()
                upd.resident.append(module)
            upd.teachers = len(upd.resident)
            if ctx.server_data.val is not None:
                upd.val_logits = ensemble_logits(upd.resident, ctx.server_data.val.x, mode=self.ensemble,
                                                 temperature=self.temperature, batch_size=self.distill_batch)
            upd.teacher_s = time.perf_counter() - t0
            upd.teacher_bytes = sum(map(nbytes_of, upd.resident))
        return upd

    def _teacher_fn(self, upd: FedDFUpdate):
        if upd.cache is not None:
            cache = upd.cache
            return lambda xb, i: cache[i]
        resident, mode, t = upd.resident, self.ensemble, self.temperature
        return lambda xb, i: ensemble_logits(resident, xb, mode=mode, temperature=t, batch_size=len(xb))

    def server_step(self, state: ServerState, update: FedDFUpdate, ctx: Context) -> ServerState:
        rnd = state.round + 1
        fams = self.family_list(ctx)
        models = dict(state.models)
        metrics: dict[str, Any] = {"teachers": update.teachers, "server_teacher_s": round(update.teacher_s, 4)}
        for f in fams:
            metrics[f"clients.{f.key}"] = update.clients.get(f.key, 0)
            if f.key in update.means:
                models[f.key] = update.means[f.key]
        if update.teachers and self.distill_steps > 0:
            sd = ctx.server_data
            teacher = self._teacher_fn(update)
            if update.val_logits is not None:
                acc = (update.val_logits.argmax(1) == sd.val.y).float().mean()
                metrics["ensemble_val_acc"] = float(acc)
            t0 = time.perf_counter()
            student_bytes = 0
            for i, f in enumerate(fams):
                student = build_detached(f.ref, ctx.info).to(sd.x.device)
                student.load_state_dict(models[f.key])
                # student + best copy + Adam's two moments
                student_bytes = max(student_bytes, 4 * nbytes_of(student))
                rep = distill(student, teacher, sd.x, self.distill_steps, batch_size=self.distill_batch,
                              lr=self.distill_lr, temperature=self.temperature, cosine=self.cosine,
                              grad_clip=self.distill_grad_clip, val=sd.val, val_every=self.val_every,
                              patience=self.patience, keep_start=self.keep_start,
                              seed=round_seed(ctx.seed, rnd, 0x7FFF_0000 + i))
                models[f.key] = weights_of(student)
                metrics.update({f"distill_steps.{f.key}": rep.steps, f"distill_best_step.{f.key}": rep.best_step,
                                f"distill_kl0.{f.key}": rep.kl_start, f"distill_kl.{f.key}": rep.kl_end,
                                f"distill_val_acc0.{f.key}": rep.val_acc_start,
                                f"distill_val_acc.{f.key}": rep.val_acc_best})
            metrics["server_distill_s"] = round(time.perf_counter() - t0, 4)
            metrics["server_teacher_bytes"] = update.teacher_bytes
            metrics["server_peak_bytes"] = update.teacher_bytes + update.mean_bytes + student_bytes
        return ServerState(rnd, models, {**state.buffers, "metrics": metrics})

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().summarize(rows)
        for key in ("server_distill_s", "server_teacher_s"):
            vals = [r[key] for r in rows if key in r]
            if vals:
                out[f"{key}_mean"] = float(np.mean(vals))
        peaks = [r["server_peak_bytes"] for r in rows if "server_peak_bytes" in r]
        if peaks:
            out["server_peak_bytes_max"] = int(max(peaks))
        return out

    # ---------------------------------------------------------------- client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        stats = local_sgd(model, data, task.train, seed=task.seed, device=device)
        return ClientResult(client_id=task.client_id, num_samples=len(data), weights=weights_of(model),
                            metrics={"train_loss": stats.loss, "steps": stats.steps})
