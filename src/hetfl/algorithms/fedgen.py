"""FedGen (Zhu, Hong, Zhou, ICML 2021): data-free knowledge transfer through a server-side feature generator.

A lightweight generator ``G(y, eps)`` (one-hot label + noise -> Linear, BatchNorm, ReLU, Linear) maps to the
feature space in front of the clients' classifier head (the model's last ``nn.Linear``).  Every round:

1. clients train with local SGD; from round 2 on their loss adds ``alpha_t * (gen_samples / batch) *
   CE(head(G(y~)), y~)`` on labels ``y~`` drawn uniformly from the labels they hold, and ``beta_t *
   KL(softmax(head(G(y))) || model(x))`` on the real batch's labels (a term of FedGen's code, not of its paper);
   ``alpha_t = max(reg_floor, alpha * reg_decay**(t-1))`` and the same for ``beta_t``;
2. clients upload their weights and their label counts (``extra["label_counts"]``);
3. the server trains the generator (Adam, ``gen_steps`` steps of ``gen_batch`` labels drawn uniformly from the
   labels some client counts more than once) so that every received head classifies its samples correctly,
   each head's cross-entropy on label y weighted by its share of the round's count of y, plus the diversity
   loss ``exp(-mean_ij(||eps_i - eps_j||² · |z_i - z_j|))``;
4. the server averages the models (per architecture family; heterogeneous families must share the feature
   dimension, which :meth:`FedGen.model_refs` checks).

Label counts are private information.  ``label_counts = "histogram"`` sends the client's full label histogram
(PFLlib/HtFLlib's protocol); ``"batches"`` sends 1 + the labels of the minibatches drawn that round (FedGen's
code).  ``label_noise`` adds Laplace or Gaussian noise on the client, calibrated for ``label_epsilon`` per
release under replace-one-record neighbours (L1 sensitivity 2, L2 sensitivity √2; ``num_samples`` is sent in
the clear, so add/remove neighbours would not be consistent), then clamps at 0.  ``label_release = "once"``
makes every release of a client identical (noise drawn from a per-client seed), so the total ε stays
``label_epsilon``; ``"every_round"`` draws fresh noise each round and ε adds up (basic composition).
In the simulator the noise seed comes from the run seed, for reproducibility; a deployment must draw it on
the device.  Each client also reports, as a simulation-only diagnostic, the total-variation distance between
its true label distribution and what the server recovers from the counts (``label_leak_tv``: 0 for raw
histograms).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetfl.algorithms.base import (
    ClientResult,
    ClientTask,
    Context,
    ServerState,
    Weights,
    nbytes,
    round_seed,
    weights_of,
)
from hetfl.algorithms.families import FamilyAlgorithm, build_detached
from hetfl.algorithms.registry import ALGORITHMS
from hetfl.data.base import DataInfo, Split
from hetfl.errors import ConfigError
from hetfl.models import ModelRef
from hetfl.train import local_sgd

NOISES = ("uniform", "gaussian")
COUNT_MODES = ("histogram", "batches")
LABEL_NOISES = ("none", "laplace", "gaussian")
RELEASES = ("once", "every_round")
L1_SENSITIVITY = 2.0  # replace-one-record: two bins change by one
L2_SENSITIVITY = math.sqrt(2.0)


# ---------------------------------------------------------------------------------------------- pieces
class Generator(nn.Module):
    """(label, noise) -> a feature vector for the classifier head: Linear, BatchNorm1d, ReLU, Linear."""

    def __init__(self, num_classes: int, noise_dim: int, hidden: int, feature_dim: int) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.noise_dim = noise_dim
        self.body = nn.Sequential(nn.Linear(noise_dim + num_classes, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                  nn.Linear(hidden, feature_dim))

    def forward(self, y: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return self.body(torch.cat([eps, F.one_hot(y, self.num_classes).to(eps.dtype)], dim=1))


def find_head(model: nn.Module, who: str = "fedgen") -> tuple[str, nn.Linear]:
    """The classifier head: the model's last ``nn.Linear`` (by registration order), with its name (``who``:
    the algorithm that needs it, for the error)."""
    found = None
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found = (name, mod)
    if found is None:
        raise ConfigError(f"{who} needs a model whose classifier is a final nn.Linear; "
                          f"{type(model).__name__} has none")
    return found


@lru_cache(maxsize=64)
def head_shape(ref: ModelRef, info: DataInfo) -> tuple[str, int, int]:
    """(head name, feature dim, classes) of a model, from one build."""
    name, head = find_head(build_detached(ref, info))
    return name, head.in_features, head.out_features


def diversity_loss(eps: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """exp(-mean over pairs of (mean squared noise distance x mean absolute feature distance))."""
    dn = (eps[:, None, :] - eps[None, :, :]).pow(2).mean(-1)
    dz = (z[:, None, :] - z[None, :, :]).abs().mean(-1)
    return torch.exp(-(dn * dz).mean())


def label_distribution(counts: torch.Tensor | np.ndarray) -> np.ndarray:
    """What a server recovers from label counts: clamp at 0 and normalise (all zero: uniform)."""
    c = counts.detach().cpu().numpy() if isinstance(counts, torch.Tensor) else np.asarray(counts)
    c = np.clip(c.astype(np.float64), 0.0, None)
    s = c.sum()
    return c / s if s > 0 else np.full(len(c), 1.0 / max(len(c), 1))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total-variation distance ½·Σ|p − q| (0 = identical distributions, 1 = disjoint supports)."""
    return 0.5 * float(np.abs(np.asarray(p, np.float64) - np.asarray(q, np.float64)).sum())


def noise_scale(mechanism: str, epsilon: float, delta: float) -> float:
    """Laplace scale b = Δ1/ε, or Gaussian σ = Δ2·sqrt(2 ln(1.25/δ))/ε (the classic bound, ε ≤ 1)."""
    if mechanism == "laplace":
        return L1_SENSITIVITY / epsilon
    if mechanism == "gaussian":
        return L2_SENSITIVITY * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon
    return 0.0


def privatize_counts(counts: torch.Tensor, mechanism: str, epsilon: float, delta: float, seed: int) -> torch.Tensor:
    """Counts plus Laplace/Gaussian noise (seeded), clamped at 0; unchanged for mechanism "none"."""
    out = counts.to(torch.float64)
    if mechanism != "none":
        rng = np.random.default_rng(seed)
        scale = noise_scale(mechanism, epsilon, delta)
        size = len(out)
        noise = rng.laplace(0.0, scale, size) if mechanism == "laplace" else rng.normal(0.0, scale, size)
        out = (out + torch.from_numpy(noise)).clamp_min(0.0)
    return out.to(torch.float32)


def _noise(kind: str, n: int, dim: int, gen: torch.Generator, device: torch.device) -> torch.Tensor:
    eps = torch.rand(n, dim, generator=gen) if kind == "uniform" else torch.randn(n, dim, generator=gen)
    return eps.to(device)


@dataclass
class FedGenUpdate:
    """What :meth:`FedGen.aggregate` hands to :meth:`FedGen.server_step` (server side only)."""

    means: dict[str, Weights]
    clients: dict[str, int]
    heads_w: list[torch.Tensor] = field(default_factory=list)
    heads_b: list[torch.Tensor] = field(default_factory=list)
    counts: list[torch.Tensor] = field(default_factory=list)
    client_ids: list[int] = field(default_factory=list)
    leak_tv: list[float] = field(default_factory=list)
    leak_mae: list[float] = field(default_factory=list)


class _Heads:
    """FedGen's side channel: every result's classifier head, label counts and leakage figures."""

    def __init__(self, algo: FedGen, ctx: Context) -> None:
        self.refs = {f.key: f.ref for f in algo.family_list(ctx)}
        self.info = ctx.info
        self.upd = FedGenUpdate(means={}, clients={})

    def add(self, res: ClientResult, placement: Any) -> None:
        upd = self.upd
        upd.clients[placement.model] = upd.clients.get(placement.model, 0) + 1
        head = head_shape(self.refs[placement.model], self.info)[0]
        upd.heads_w.append(res.weights[f"{head}.weight"].detach().float())
        upd.heads_b.append(res.weights[f"{head}.bias"].detach().float())
        upd.counts.append(torch.as_tensor(res.extra["label_counts"], dtype=torch.float32).flatten())
        upd.client_ids.append(res.client_id)
        if "label_leak_tv" in res.metrics:
            upd.leak_tv.append(float(res.metrics["label_leak_tv"]))
            upd.leak_mae.append(float(res.metrics["label_leak_count_mae"]))


# ---------------------------------------------------------------------------------------------- algorithm
@ALGORITHMS.register("fedgen")
@dataclass(frozen=True)
class FedGen(FamilyAlgorithm):
    """FedGen: a server generator of head-space features, trained on the clients' heads, regularises clients."""

    private_refusal: ClassVar[str | None] = (
        "FedGen's clients upload their label counts and the server trains its generator on every client's own "
        "classifier head, releases beside the model update that the DP-FedAvg accountant does not cover "
        "(algorithm.label_noise privatises the counts alone)")

    weighted: bool = True
    gen_noise_dim: int = 32
    gen_hidden: int = 256
    gen_noise: str = "uniform"
    gen_lr: float = 3e-4
    gen_weight_decay: float = 1e-2
    gen_lr_decay: float = 0.98
    gen_steps: int = 50
    gen_batch: int = 32
    teacher_weight: float = 1.0
    diversity_weight: float = 1.0
    alpha: float = 10.0
    beta: float = 10.0
    reg_decay: float = 0.98
    reg_floor: float = 1e-4
    gen_samples: int = 32
    label_counts: str = "histogram"
    label_noise: str = "none"
    label_epsilon: float = 1.0
    label_delta: float = 1e-5
    label_release: str = "once"
    report_leakage: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        self.check_fields([
            (self.gen_noise_dim >= 1, "gen_noise_dim", "must be >= 1"),
            (self.gen_hidden >= 1, "gen_hidden", "must be >= 1"),
            (self.gen_noise in NOISES, "gen_noise", f"must be one of {', '.join(NOISES)}"),
            (self.gen_lr > 0, "gen_lr", "must be > 0"),
            (self.gen_weight_decay >= 0, "gen_weight_decay", "must be >= 0"),
            (0 < self.gen_lr_decay <= 1, "gen_lr_decay", "must be in (0, 1]"),
            (self.gen_steps >= 0, "gen_steps", "must be >= 0 (0 = never train the generator)"),
            (self.gen_batch >= 2, "gen_batch", "must be >= 2 (BatchNorm and the diversity loss need pairs)"),
            (self.teacher_weight >= 0, "teacher_weight", "must be >= 0"),
            (self.diversity_weight >= 0, "diversity_weight", "must be >= 0"),
            (self.alpha >= 0, "alpha", "must be >= 0"),
            (self.beta >= 0, "beta", "must be >= 0"),
            (0 < self.reg_decay <= 1, "reg_decay", "must be in (0, 1]"),
            (self.reg_floor >= 0, "reg_floor", "must be >= 0"),
            (self.gen_samples >= 1, "gen_samples", "must be >= 1"),
            (self.label_counts in COUNT_MODES, "label_counts", f"must be one of {', '.join(COUNT_MODES)}"),
            (self.label_noise in LABEL_NOISES, "label_noise", f"must be one of {', '.join(LABEL_NOISES)}"),
            (self.label_epsilon > 0, "label_epsilon", "must be > 0"),
            (0 < self.label_delta < 1, "label_delta", "must be in (0, 1)"),
            (self.label_release in RELEASES, "label_release", f"must be one of {', '.join(RELEASES)}"),
        ])
        if self.label_noise == "gaussian" and self.label_epsilon > 1:
            raise ConfigError(f"algorithm.label_epsilon must be <= 1 with label_noise='gaussian' (the classic "
                              f"Gaussian-mechanism bound), got {self.label_epsilon!r}; use 'laplace' for larger ε")
        if self.label_counts == "batches" and self.label_release == "once" and self.label_noise != "none":
            raise ConfigError("algorithm.label_release='once' cannot be used with label_counts='batches': batch "
                              "counts change every round, so each round is a fresh release; set "
                              "label_release='every_round'")

    # ---------------------------------------------------------------- hooks
    def model_refs(self, ctx: Context) -> list[ModelRef]:
        fams = self.family_list(ctx)
        shapes = {}
        for f in fams:
            _, dim, classes = head_shape(f.ref, ctx.info)
            if classes != ctx.info.num_classes:
                raise ConfigError(f"fedgen: the last nn.Linear of {f.key!r} outputs {classes} values, not the "
                                  f"{ctx.info.num_classes} classes; its classifier head must be a final Linear")
            shapes[f.key] = dim
        if len(set(shapes.values())) > 1:
            listed = ", ".join(f"{k}: {d}" for k, d in shapes.items())
            raise ConfigError(f"algorithm.families: fedgen's generator needs one feature dimension in front of every "
                              f"family's head, got {listed}; give the families equal head inputs (e.g. cnn(fc=32), "
                              f"mlp(hidden=200,32))")
        return [f.ref for f in fams]

    def feature_dim(self, ctx: Context) -> int:
        return head_shape(self.family_list(ctx)[0].ref, ctx.info)[1]

    def regularizer_weights(self, rnd: int) -> tuple[float, float]:
        """(alpha_t, beta_t) of round ``rnd`` (1-based); 0 in round 1, before the generator has been trained."""
        if rnd < 2:
            return 0.0, 0.0
        d = self.reg_decay ** (rnd - 1)
        return (max(self.reg_floor, self.alpha * d) if self.alpha > 0 else 0.0,
                max(self.reg_floor, self.beta * d) if self.beta > 0 else 0.0)

    def epsilon_per_release(self) -> float:
        return self.label_epsilon if self.label_noise != "none" else math.inf

    # ---------------------------------------------------------------- server
    def _generator(self, ctx: Context) -> Generator:
        return Generator(ctx.info.num_classes, self.gen_noise_dim, self.gen_hidden, self.feature_dim(ctx))

    def init_state(self, ctx: Context) -> ServerState:
        models = self.initial_models(ctx)
        models["generator"] = weights_of(self._generator(ctx))
        releases = torch.zeros(ctx.num_clients, dtype=torch.int64)
        return ServerState(round=0, models=models, buffers={"label_releases": releases})

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int],
                        ctx: Context) -> list[ClientTask]:
        alpha, beta = self.regularizer_weights(rnd)

        def extra(c: int) -> dict[str, Any]:
            out: dict[str, Any] = {}
            if alpha > 0 or beta > 0:
                out.update(generator=state.models["generator"], alpha=alpha, beta=beta)
            if self.label_noise != "none":
                out["noise_seed"] = round_seed(ctx.seed, 0 if self.label_release == "once" else rnd, c)
            return out

        return self.family_tasks(state, rnd, clients, ctx, extra)

    def side_channel(self, state: ServerState, rnd: int, ctx: Context) -> FedGenUpdate:
        """The round's heads, label counts and leakage figures, read from every result beside the mean."""
        return _Heads(self, ctx)

    def combine(self, state: ServerState, rnd: int, models: dict[str, Weights], side: _Heads | None,
                ctx: Context) -> FedGenUpdate:
        upd = side.upd if side is not None else FedGenUpdate(means={}, clients={})
        upd.means = {key: w for key, w in models.items() if w}
        return upd

    def train_generator(self, gen_weights: Weights, opt_state: dict[str, Any] | None, upd: FedGenUpdate, rnd: int,
                        ctx: Context) -> tuple[Weights, dict[str, Any], dict[str, float]]:
        """``gen_steps`` Adam steps of the generator against the round's heads; returns weights, optimiser, stats."""
        dev = upd.heads_w[0].device
        counts = torch.stack(upd.counts).to(dev).clamp_min(0.0)  # clients x classes
        qualified = torch.nonzero(counts.max(0).values > 1).flatten()
        if len(qualified) == 0 or self.gen_steps == 0:
            return gen_weights, opt_state or {}, {}
        share = counts / counts.sum(0, keepdim=True).clamp_min(1e-12)  # each client's share of every label
        w = torch.stack(upd.heads_w)  # K x C x D
        b = torch.stack(upd.heads_b)  # K x C
        k = len(w)
        gen = self._generator(ctx).to(dev)
        gen.load_state_dict(gen_weights)
        gen.train()
        opt = torch.optim.Adam(gen.parameters(), lr=self.gen_lr, weight_decay=self.gen_weight_decay)
        if opt_state:
            opt.load_state_dict(opt_state)
        for group in opt.param_groups:
            group["lr"] = self.gen_lr * self.gen_lr_decay ** (rnd - 1)
        rng = torch.Generator().manual_seed(round_seed(ctx.seed, rnd, 0x6765_6E00))
        teacher_sum = div_sum = 0.0
        for _ in range(self.gen_steps):
            y = qualified[torch.randint(len(qualified), (self.gen_batch,), generator=rng).to(dev)]
            eps = _noise(self.gen_noise, self.gen_batch, self.gen_noise_dim, rng, dev)
            z = gen(y, eps)
            logits = torch.einsum("kcd,bd->kbc", w, z) + b[:, None, :]
            ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.repeat(k), reduction="none").view(k, -1)
            teacher = (ce * share[:, y]).mean(1).sum()
            div = diversity_loss(eps, z)
            loss = self.teacher_weight * teacher + self.diversity_weight * div
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            teacher_sum += teacher.item()
            div_sum += div.item()
        stats = {"gen_teacher_loss": teacher_sum / self.gen_steps, "gen_diversity_loss": div_sum / self.gen_steps,
                 "gen_qualified_labels": len(qualified)}
        return weights_of(gen), opt.state_dict(), stats

    def server_step(self, state: ServerState, update: FedGenUpdate, ctx: Context) -> ServerState:
        rnd = state.round + 1
        models = dict(state.models)
        buffers = dict(state.buffers)
        metrics: dict[str, Any] = {}
        for f in self.family_list(ctx):
            if f.key in update.means:
                models[f.key] = update.means[f.key]
            if len(self.family_list(ctx)) > 1:
                metrics[f"clients.{f.key}"] = update.clients.get(f.key, 0)
        if update.heads_w:
            t0 = time.perf_counter()
            gen, opt_state, stats = self.train_generator(models["generator"], buffers.get("gen_opt"), update, rnd, ctx)
            models["generator"], buffers["gen_opt"] = gen, opt_state
            metrics.update(stats)
            metrics["server_gen_s"] = round(time.perf_counter() - t0, 4)
            releases = buffers.get("label_releases", torch.zeros(ctx.num_clients, dtype=torch.int64)).clone()
            releases[torch.as_tensor(update.client_ids, dtype=torch.long)] += 1
            buffers["label_releases"] = releases
            alpha, beta = self.regularizer_weights(rnd)
            got_gen = len(update.client_ids) if (alpha > 0 or beta > 0) else 0
            metrics["gen_bytes_down"] = got_gen * nbytes(state.models["generator"])
            metrics["label_bytes_up"] = sum(4 * len(c) for c in update.counts)
            if update.leak_tv:
                metrics.update(label_leak_tv_mean=float(np.mean(update.leak_tv)),
                               label_leak_tv_max=float(np.max(update.leak_tv)),
                               label_leak_count_mae=float(np.mean(update.leak_mae)))
            if self.label_noise != "none":
                per_client = (releases > 0).double() if self.label_release == "once" else releases.double()
                metrics.update(label_dp_eps_round=self.label_epsilon,
                               label_dp_eps_total_max=float(per_client.max()) * self.label_epsilon,
                               label_dp_eps_total_mean=float(per_client[releases > 0].mean()) * self.label_epsilon)
                if self.label_noise == "gaussian":
                    metrics["label_dp_delta_total_max"] = float(per_client.max()) * self.label_delta
        buffers["metrics"] = metrics
        return ServerState(rnd, models, buffers)

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        out = super().summarize(rows)
        tv = [r["label_leak_tv_mean"] for r in rows if "label_leak_tv_mean" in r]
        if tv:
            out["label_leak_tv_mean"] = float(np.mean(tv))
        dp = [r for r in rows if "label_dp_eps_total_max" in r]
        out["label_noise"] = self.label_noise
        if dp:
            out["label_dp_eps_round"] = self.label_epsilon
            out["label_dp_eps_total_max"] = dp[-1]["label_dp_eps_total_max"]
        return out

    # ---------------------------------------------------------------- client
    def local_update(self, task: ClientTask, model: nn.Module, data: Split, device: torch.device) -> ClientResult:
        _, head = find_head(model)
        num_classes = head.out_features
        hist = torch.bincount(data.y.cpu(), minlength=num_classes).to(torch.float64)
        alpha, beta = float(task.extra.get("alpha", 0.0)), float(task.extra.get("beta", 0.0))
        gen: Generator | None = None
        if "generator" in task.extra and (alpha > 0 or beta > 0):
            gen = Generator(num_classes, self.gen_noise_dim, self.gen_hidden, head.in_features).to(device)
            gen.load_state_dict(task.extra["generator"])
            gen.eval()
            gen.requires_grad_(False)
        batch_counts = torch.ones(num_classes, dtype=torch.float64) if self.label_counts == "batches" else None
        available = torch.nonzero(hist > 0).flatten().to(device)
        rng = torch.Generator().manual_seed(task.seed ^ 0x6765_6E)
        noise_kind, noise_dim, k = self.gen_noise, self.gen_noise_dim, self.gen_samples

        def regularizer(m: nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
            if batch_counts is not None:
                batch_counts.add_(torch.bincount(y.cpu(), minlength=num_classes).to(torch.float64))
            if gen is None:
                return logits.new_zeros(())
            y_gen = available[torch.randint(len(available), (k,), generator=rng).to(device)]
            with torch.no_grad():
                z = gen(y_gen, _noise(noise_kind, k, noise_dim, rng, device))
            loss = alpha * (k / len(y)) * F.cross_entropy(head(z), y_gen)
            if beta > 0:
                with torch.no_grad():
                    target = F.softmax(head(gen(y, _noise(noise_kind, len(y), noise_dim, rng, device))), dim=1)
                loss = loss + beta * F.kl_div(F.log_softmax(logits, dim=1), target, reduction="batchmean")
            return loss

        terms = [regularizer] if (gen is not None or batch_counts is not None) else []
        stats = local_sgd(model, data, task.train, seed=task.seed, device=device, loss_terms=terms)
        raw = hist if batch_counts is None else batch_counts
        sent = privatize_counts(raw, self.label_noise, self.label_epsilon, self.label_delta,
                                int(task.extra.get("noise_seed", 0)))
        metrics = {"train_loss": stats.loss, "steps": stats.steps}
        if self.report_leakage:  # simulation-only diagnostic: how well the server recovers the true distribution
            metrics["label_leak_tv"] = total_variation(label_distribution(hist), label_distribution(sent))
            metrics["label_leak_count_mae"] = float((sent.double() - hist).abs().mean())
        return ClientResult(client_id=task.client_id, num_samples=len(data), weights=weights_of(model),
                            metrics=metrics, extra={"label_counts": sent})
