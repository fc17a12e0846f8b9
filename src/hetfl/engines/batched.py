"""Train several same-shape clients of a round as one batched model (``torch.func`` + ``vmap``).

Clients that train the same :class:`~hetfl.algorithms.base.ModelRef` with the same local config and the
same minibatch-size schedule (equal data sizes, or equal ``train.steps`` with full batches) are stacked:
their parameters get a leading client dimension, every step gathers each client's own minibatch (one
index tensor per step, built once per group), and autograd through the loss ``vmap``-ped over
``functional_call`` computes every client's gradient in one pass.  The update is ``local_sgd``'s:
per-client gradient-norm clipping, then ``hetfl.train.SGD`` (momentum, weight decay) on the stacked
weights.  Each client draws its own batch order from its task
seed exactly as ``local_sgd`` does, so a client's result equals its sequential result up to float
rounding (different kernels sum in a different order).

This pays where one kernel launch per layer for K clients beats K launches: small models on a GPU, and
on a CPU too for small models in chunks of :data:`MAX_GROUP` (1.7x per client for the 2NN at one thread,
docs/performance.md).  ``batched = "auto"`` (the default) enables it only on a CUDA device and only when
a start-up micro-benchmark on the run's model says it is faster (on a CPU a timing-based choice would make
a run's last bits depend on the load); ``true`` forces it (any device), ``false`` turns it off.

Only algorithms that declare their client update to be plain ``local_sgd`` qualify
(:attr:`~hetfl.algorithms.base.Algorithm.batchable`: FedAvg), and only models without buffers (BatchNorm
statistics) or dropout, whose per-client state or randomness a stacked model would not reproduce.
Everything else runs sequentially, unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetfl import packed
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Context
from hetfl.config import TrainConfig
from hetfl.data.base import Split
from hetfl.data.federation import Federation
from hetfl.errors import ConfigError
from hetfl.models import ModelRef
from hetfl.precision import autocast
from hetfl.train import SGD, batch_indices, local_sgd

SETTINGS = ("auto", True, False)


def check_setting(value: Any) -> bool | str:
    if isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if value not in SETTINGS or (isinstance(value, str) and value != "auto"):
        raise ConfigError(f"batched must be \"auto\", true or false, got {value!r}")
    return value


def algorithm_qualifies(algorithm: Algorithm) -> bool:
    """True if the algorithm declares its client update batchable (plain local SGD, no per-client state)."""
    return algorithm.batchable


def module_qualifies(module: nn.Module) -> bool:
    """No buffers (BatchNorm statistics) and no dropout: a stacked copy trains exactly like each client."""
    if any(True for _ in module.buffers()):
        return False
    return not any(isinstance(m, nn.modules.dropout._DropoutNd) for m in module.modules())


def batch_schedule(n: int, cfg: TrainConfig) -> tuple[int, ...]:
    """The minibatch sizes ``local_sgd`` uses on ``n`` samples (what must match to stack clients)."""
    if n <= 0:
        return ()
    if cfg.steps > 0:
        per_pass = [min(cfg.batch_size, n - s) for s in range(0, n, cfg.batch_size)]
        full, rest = divmod(cfg.steps, len(per_pass))
        return tuple(per_pass * full + per_pass[:rest])
    return tuple([min(cfg.batch_size, n - s) for s in range(0, n, cfg.batch_size)] * cfg.epochs)


def train_group(module: nn.Module, weights: Sequence[dict[str, torch.Tensor]], x: torch.Tensor,
                y: torch.Tensor, client_indices: Sequence[np.ndarray], cfg: TrainConfig,
                seeds: Sequence[int], into: Sequence[dict[str, torch.Tensor]] | None = None,
                ) -> tuple[list[dict[str, torch.Tensor]], list[float], int]:
    """Train K clients with equal batch schedules in lockstep; returns (weights, mean losses, steps).

    ``x``/``y`` hold the whole training split (on the device); ``client_indices[k]`` are client k's
    indices into it; ``weights[k]`` its starting weights (parameter names of ``module``).  With
    ``into`` (one dict of tensors per client, e.g. a worker's shared result buffers), client k's
    final weights are copied into ``into[k]`` and returned as those tensors.
    """
    from torch.func import functional_call, vmap

    k = len(weights)
    names = [n for n, _ in module.named_parameters()]
    device = x.device
    # every client's minibatches, as global indices: steps x [K, B] (one host-to-device copy per group)
    per_client = []
    for idx, seed in zip(client_indices, seeds):
        gen = torch.Generator().manual_seed(int(seed))
        local = torch.as_tensor(idx, dtype=torch.long)
        per_client.append([local[b] for b in batch_indices(len(local), cfg.batch_size, cfg.epochs, cfg.steps, gen)])
    steps = len(per_client[0])
    per_step = [torch.stack([per_client[c][s] for c in range(k)]) for s in range(steps)]  # [K, B_s] each
    flat = torch.cat([b.reshape(-1) for b in per_step]).to(device)  # one host-to-device copy for the group
    batches = [part.view(k, -1) for part in flat.split([b.numel() for b in per_step])]
    # leaves that require grad, updated in place under no_grad: autograd through the vmapped loss gives
    # every client's own gradient in its slice (the clients' losses are summed, each depends on its slice)
    params = {n: torch.stack([w[n].detach().to(device) for w in weights]).clone().requires_grad_(True)
              for n in names}
    leaves = list(params.values())
    opt = SGD(leaves, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def loss_one(p: dict[str, torch.Tensor], xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(functional_call(module, p, (xb,)).float(), yb)

    # vmap of the loss and plain autograd, not torch.func.grad: same numbers (checked bit for bit on the
    # 2NN), but functorch's grad transform imports torch._dynamo (~1 s per process)
    batched_loss = vmap(loss_one)
    module.train()
    total = torch.zeros(k, device=device)
    samples = 0
    with torch.no_grad():
        for idx in batches:
            with torch.enable_grad():
                with autocast(cfg.precision, device):  # bf16: forward and loss only, as local_sgd
                    loss = batched_loss(params, x[idx], y[idx])
                grads = dict(zip(names, torch.autograd.grad(loss.sum(), leaves)))
            if cfg.grad_clip > 0:  # torch.nn.utils.clip_grad_norm_, per client
                norms = torch.stack([torch.linalg.vector_norm(grads[n].reshape(k, -1), dim=1) for n in names], 1)
                coef = (cfg.grad_clip / (torch.linalg.vector_norm(norms, dim=1) + 1e-6)).clamp(max=1.0)
                grads = {n: g * coef.view(-1, *([1] * (g.dim() - 1))) for n, g in grads.items()}
            for n, leaf in zip(names, leaves):  # local_sgd's update, on every client's slice at once
                leaf.grad = grads[n]
            opt.step()
            total += loss.detach() * idx.shape[1]
            samples += idx.shape[1]
        if into is not None:
            for c, dest in enumerate(into):
                for n in names:
                    dest[n].copy_(params[n][c])
            out = [dict(dest) for dest in into]
        else:
            out = [{n: params[n][c].clone() for n in names} for c in range(k)]
    losses = (total / max(samples, 1)).tolist()
    return out, losses, steps


#: Clients trained together at most: larger groups of a round are cut, in task order, into chunks of
#: this many (the last one shorter).  16 x a small model stays in a core's cache, and chunks of a fixed
#: size are the same whoever trains them, so client-parallel workers that each train whole chunks give
#: the in-process result bit for bit.
MAX_GROUP = 16


def train_tasks(module: nn.Module, tasks: Sequence[ClientTask], federation: Federation,
                into: Sequence[dict[str, torch.Tensor]] | None = None) -> list[ClientResult]:
    """Train one chunk of same-key tasks batched; their results in task order (see :func:`train_group`)."""
    idx = [federation.train_idx[t.client_id] for t in tasks]
    if into is None:  # each result packed in one buffer: the aggregation adds it in one pass (hetfl.packed)
        names = [n for n, _ in module.named_parameters()]
        into = [packed.empty_like({n: tasks[0].weights[n] for n in names}, federation.train.x.device) for _ in tasks]
    weights, losses, steps = train_group(module, [t.weights for t in tasks], federation.train.x,
                                         federation.train.y, idx, tasks[0].train, [t.seed for t in tasks], into)
    return [ClientResult(client_id=t.client_id, num_samples=len(i), weights=w,
                         metrics={"train_loss": loss, "steps": steps})
            for t, w, loss, i in zip(tasks, weights, losses, idx)]


class Batcher:
    """The simulator's hook: groups a round's tasks and trains each chunk of >= 2 clients batched."""

    def __init__(self, algorithm: Algorithm, federation: Federation, ctx: Context, device: torch.device,
                 module_for) -> None:
        self.algorithm = algorithm
        self.federation = federation
        self.ctx = ctx
        self.device = device
        self.module_for = module_for  # ModelRef -> a built module (the simulator's ModelCache.get)
        self.chunks: list[list[ClientTask]] = []  # this round's chunks of >= 2 tasks, by first task
        self._pending: dict[int, list[ClientTask]] = {}
        self._done: dict[int, ClientResult | BaseException] = {}
        self._ok_refs: dict[ModelRef, bool] = {}
        self.clients_batched = 0

    def _qualifies(self, ref: ModelRef) -> bool:
        ok = self._ok_refs.get(ref)
        if ok is None:
            ok = self._ok_refs[ref] = module_qualifies(self.module_for(ref))
        return ok

    def plan(self, tasks: Sequence[ClientTask]) -> None:
        """Group the round's runnable tasks and cut the groups into chunks (:data:`MAX_GROUP`); chunks
        are trained lazily, on the first :meth:`take` of one of their tasks."""
        self._pending.clear()
        self._done.clear()
        sizes = self.federation.sizes
        groups: dict[Any, list[ClientTask]] = {}
        for task in tasks:
            if not self._qualifies(task.model):
                continue
            key = (task.model, task.train, batch_schedule(int(sizes[task.client_id]), task.train))
            if key[2]:
                groups.setdefault(key, []).append(task)
        chunks = [group[i:i + MAX_GROUP] for group in groups.values() for i in range(0, len(group), MAX_GROUP)]
        self.chunks = [chunk for chunk in chunks if len(chunk) >= 2]
        order = {id(task): i for i, task in enumerate(tasks)}
        self.chunks.sort(key=lambda chunk: order[id(chunk[0])])
        for chunk in self.chunks:
            for task in chunk:
                self._pending[id(task)] = chunk

    def take(self, task: ClientTask) -> ClientResult | None:
        """The task's batched result, or None (run it sequentially).  If its chunk failed, every task of
        the chunk raises the chunk's exception (as when a worker trains the chunk)."""
        if id(task) not in self._done:
            chunk = self._pending.get(id(task))
            if chunk is None:
                return None
            for t in chunk:
                self._pending.pop(id(t), None)
            try:
                results: list[ClientResult | BaseException] = list(
                    train_tasks(self.module_for(chunk[0].model), chunk, self.federation))
                self.clients_batched += len(chunk)
            except Exception as exc:  # noqa: BLE001 - recorded per client by the round's guard
                results = [exc] * len(chunk)
            for t, res in zip(chunk, results):
                self._done[id(t)] = res
        res = self._done.pop(id(task))
        if isinstance(res, BaseException):
            raise res
        return res


def microbenchmark(module: nn.Module, ref_weights: dict[str, torch.Tensor], example: torch.Tensor,
                   num_classes: int, cfg: TrainConfig, k: int, device: torch.device, repeats: int = 3) -> dict:
    """Seconds for ``k`` clients x a few steps, sequential (plain SGD loop) vs batched, on random data."""

    steps = 4
    cfg = TrainConfig(epochs=1, steps=steps, batch_size=cfg.batch_size, lr=cfg.lr, momentum=cfg.momentum,
                      weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip, memory_format=cfg.memory_format,
                      precision=cfg.precision)
    n = cfg.batch_size * steps
    gen = torch.Generator().manual_seed(0)
    x = torch.randn((k * n, *example.shape[1:]), generator=gen).to(device=device, dtype=example.dtype) \
        if example.is_floating_point() else example[torch.randint(len(example), (k * n,), generator=gen)].to(device)
    y = torch.randint(num_classes, (k * n,), generator=gen).to(device)
    idx = [np.arange(c * n, (c + 1) * n) for c in range(k)]

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def sequential() -> None:
        for c in range(k):
            module.load_state_dict(ref_weights)
            local_sgd(module, Split(x[idx[c]], y[idx[c]]), cfg, seed=c, device=device)

    def batched() -> None:
        train_group(module, [ref_weights] * k, x, y, idx, cfg, list(range(k)))

    times = {}
    for name, fn in (("sequential", sequential), ("batched", batched)):
        fn()  # warm-up (kernels, autotuning)
        best = float("inf")
        for _ in range(repeats):
            sync()
            t0 = time.perf_counter()
            fn()
            sync()
            best = min(best, time.perf_counter() - t0)
        times[name] = best
    return times


def make_batcher(setting: bool | str, algorithm: Algorithm, federation: Federation, ctx: Context,
                 device: torch.device, module_for) -> Batcher | None:
    """The batcher the setting asks for, or None: off, an unsuitable algorithm/model, or ``auto`` where
    batching does not pay (not CUDA, or slower in the start-up micro-benchmark)."""
    setting = check_setting(setting)
    if setting is False or not algorithm_qualifies(algorithm):
        return None
    if ctx.train.augment != "none":  # the vmapped loop does not augment: clients train one by one
        return None
    if setting == "auto":
        if device.type != "cuda":
            return None
        module = module_for(ctx.model)
        if not module_qualifies(module):
            return None
        k = min(algorithm.clients_for(ctx.num_clients), 16)
        if k < 2:
            return None
        weights = {n: p.detach().clone() for n, p in module.named_parameters()}
        t = microbenchmark(module, weights, federation.train.x[:1], ctx.info.num_classes, ctx.train, k, device)
        if t["batched"] >= t["sequential"]:
            return None
    return Batcher(algorithm, federation, ctx, device, module_for)
