"""The single local training loop every algorithm uses, and batched evaluation.

Batches are drawn by indexing in-memory tensors with a seeded permutation (no DataLoader, no worker
processes).  Variants hook in without copying the loop:

* ``forward(model, x) -> logits`` replaces the plain ``model(x)`` (e.g. a width-sampling forward);
* ``loss_terms``: extra differentiable terms ``term(model, x, y, logits) -> Tensor`` added to the
  cross-entropy (a FedProx proximal term, a distillation term, a generator regulariser);
* ``loss_fn(logits, y)`` replaces cross-entropy (e.g. masked cross-entropy).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hetfl.config import TrainConfig
from hetfl.data.augment import make_augment
from hetfl.data.base import ClientSplit, Split
from hetfl.precision import autocast, resolved, training_memory_format  # noqa: F401  (re-exported)

Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
LossTerm = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _plain_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def batch_indices(n: int, batch_size: int, cfg_epochs: int, steps: int,
                  generator: torch.Generator, device: torch.device | str | None = None) -> Iterator[torch.Tensor]:
    """Minibatch index tensors: ``cfg_epochs`` shuffled passes, or exactly ``steps`` batches if > 0.

    In step mode the shuffled passes continue as long as needed.  The last batch of a pass may be
    smaller (no samples are dropped here; :func:`local_sgd` skips a one-sample batch only where a BatchNorm
    cannot normalise it, where torch would raise).  The permutation is drawn on the CPU (``generator``) and, with
    ``device``, moved there once per pass: the batches are views, no host transfer per batch.
    """
    done = 0
    epoch = 0
    while True:
        if steps <= 0 and epoch >= cfg_epochs:
            return
        perm = torch.randperm(n, generator=generator)
        if device is not None:
            perm = perm.to(device, non_blocking=True)
        epoch += 1
        for start in range(0, n, batch_size):
            if steps > 0 and done >= steps:
                return
            yield perm[start:start + batch_size]
            done += 1


def lr_schedule(train: TrainConfig, rnd: int) -> TrainConfig:
    """The local config of round ``rnd`` (1-based): ``train.lr`` decayed by ``train.lr_decay`` per round."""
    if train.lr_decay == 1.0:
        return train
    return dataclasses.replace(train, lr=train.lr * train.lr_decay ** (rnd - 1))


def seed_torch(seed: int, device: torch.device | str = "cpu") -> None:
    """Seed the global CPU generator (and the generator of ``device`` if it is an accelerator).

    Equivalent to ``torch.manual_seed(seed)`` for everything this process draws on the CPU and on
    ``device``, but cheap: ``torch.manual_seed`` also queues a lazy seed for every uninitialised
    accelerator backend (CUDA, XPU, MTIA), each time formatting the Python stack, which costs about
    0.5 ms per call -- a quarter of a small client's update.
    """
    torch.random.default_generator.manual_seed(seed)
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)  # the device in use (initialised: no lazy queue)
    elif device.type != "cpu":
        torch.manual_seed(seed)


@dataclass
class TrainStats:
    loss: float
    steps: int
    samples: int


def local_sgd(
    model: nn.Module,
    data: Split | ClientSplit,
    cfg: TrainConfig,
    *,
    seed: int,
    device: torch.device | str = "cpu",
    forward: Forward = _plain_forward,
    loss_fn: LossFn | None = None,
    loss_terms: Sequence[LossTerm] = (),
) -> TrainStats:
    """Train ``model`` in place with SGD (fresh optimiser, as in FedAvg) and return loss statistics.

    ``data`` must already be on ``device``.  ``seed`` fixes the batch order (and anything random in
    the forward, such as dropout), so the same task gives the same update wherever it runs.
    """
    n = len(data)
    if n == 0:
        return TrainStats(loss=float("nan"), steps=0, samples=0)
    if cfg.precision == "auto":  # outside a run (which resolves it once at its start): measured, cached
        example = data.rows(torch.arange(min(n, 2), device=data.device))[0]
        cfg = dataclasses.replace(cfg, precision=resolved(cfg, model, example, device))
    gen = torch.Generator().manual_seed(seed)
    seed_torch(seed, device)
    model.train()
    fmt = training_memory_format(cfg.memory_format, model, device)
    if fmt is not torch.contiguous_format:  # 4-D weights only; back to contiguous below, whatever happens
        model.to(memory_format=fmt)
        try:
            return _sgd_loop(model, data, cfg, gen, forward, loss_fn, loss_terms, seed)
        finally:
            model.to(memory_format=torch.contiguous_format)
    return _sgd_loop(model, data, cfg, gen, forward, loss_fn, loss_terms, seed)


def _sgd_loop(model: nn.Module, data: Split | ClientSplit, cfg: TrainConfig, gen: torch.Generator, forward: Forward,
              loss_fn: LossFn | None, loss_terms: Sequence[LossTerm], seed: int = 0) -> TrainStats:
    """The SGD steps; with ``cfg.precision == "bf16"`` the forward pass and loss run under bf16 autocast
    (the logits are cast back to float32 before the loss), backward and the update in the parameters'
    float32."""
    n = len(data)
    augment = make_augment(cfg.augment, seed)  # its own generator: the batch order is the same either way
    params = [p for p in model.parameters() if p.requires_grad]
    opt = SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    loss_fn = loss_fn or F.cross_entropy
    device = data.device
    total = torch.zeros((), device=device)
    steps = samples = 0
    index_device = None if device.type == "cpu" else device  # one index transfer per pass, not per batch
    bf16 = cfg.precision == "bf16"
    for idx in batch_indices(n, cfg.batch_size, cfg.epochs, cfg.steps, gen, index_device):
        xb, yb = data.rows(idx)  # a client's data gathers only the rows of this minibatch
        if augment is not None:
            xb = augment(xb)
        saved = bn_state(model) if len(yb) == 1 else None
        try:
            if bf16:
                with autocast("bf16", device):
                    logits = forward(model, xb).float()
                    loss = loss_fn(logits, yb)
                    for term in loss_terms:
                        loss = loss + term(model, xb, yb, logits)
            else:
                logits = forward(model, xb)
                loss = loss_fn(logits, yb)
                for term in loss_terms:
                    loss = loss + term(model, xb, yb, logits)
        except ValueError as exc:
            if not saved or not str(exc).startswith(LONE_SAMPLE_BN):
                raise
            restore_bn(saved)  # the BatchNorms before the failing one had already counted the lone sample
            continue
        opt.zero_grad()
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        total += loss.detach() * len(yb)
        steps += 1
        samples += len(yb)
    return TrainStats(loss=float(total) / max(samples, 1), steps=steps, samples=samples)


#: torch's refusal to normalise one value per channel in training mode (a lone sample reaching a BatchNorm
#: whose input is 1 x 1 per channel, e.g. a conv net's last block on 8 x 8 digits)
LONE_SAMPLE_BN = "Expected more than 1 value per channel when training"


def bn_state(model: nn.Module) -> list[tuple[nn.Module, list[torch.Tensor]]]:
    """The running statistics of every BatchNorm that trains on this batch (saved before a one-sample batch)."""
    out = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training and m.running_mean is not None:
            out.append((m, [m.running_mean.clone(), m.running_var.clone(), m.num_batches_tracked.clone()]))
    return out


def restore_bn(saved: list[tuple[nn.Module, list[torch.Tensor]]]) -> None:
    for m, (mean, var, count) in saved:
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.num_batches_tracked.copy_(count)


class SGD:
    """The update of ``torch.optim.SGD`` (no dampening, no Nesterov) in a few lines, step for step the
    same arithmetic as its per-tensor CPU implementation (``tests/test_train.py`` checks bit equality).

    Why not ``torch.optim.SGD`` itself: constructing the first optimizer of a process imports
    ``torch._dynamo`` (about 1.2 s here, paid by every run and by every fresh worker or Flower actor),
    and its ``step()`` costs ~50 us of Python per call, a sixth of a small model's whole step.
    """

    def __init__(self, params: Sequence[torch.Tensor], lr: float, momentum: float = 0.0,
                 weight_decay: float = 0.0) -> None:
        self.params = list(params)
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)

    def zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        for i, p in enumerate(self.params):
            g = p.grad
            if g is None:  # no gradient reached it this step: untouched, as torch.optim.SGD leaves it
                continue
            if self.weight_decay:
                g = g.add(p, alpha=self.weight_decay)
            if self.momentum:
                buf = self.buffers[i]
                if buf is None:  # the first step starts the buffer at the gradient
                    buf = self.buffers[i] = torch.clone(g).detach()
                else:
                    buf.mul_(self.momentum).add_(g)
                g = buf
            p.add_(g, alpha=-self.lr)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 1000,
            forward: Forward = _plain_forward, precision: str = "fp32") -> torch.Tensor:
    """Logits for every row of ``x`` (eval mode), computed in batches (float32 logits, whatever the
    ``precision`` of the forward pass)."""
    model.eval()
    with autocast(precision, x.device):
        outs = [forward(model, x[i:i + batch_size]).float() for i in range(0, len(x), batch_size)]
    return torch.cat(outs) if outs else torch.empty(0)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    n: int
    correct: np.ndarray | None = None  # per-sample correctness, when asked for
    losses: np.ndarray | None = None  # per-sample loss, when asked for


@torch.no_grad()
def evaluate(model: nn.Module, data: Split, batch_size: int = 1000, *, per_sample: bool = False,
             forward: Forward = _plain_forward, precision: str = "fp32",
             memory_format: str = "contiguous") -> EvalResult:
    """Mean cross-entropy and accuracy of ``model`` on ``data`` (already on the model's device);
    ``precision = "bf16"``: the forward pass under bf16 autocast, the loss on float32 logits, and the
    4-D weights in the layout ``memory_format`` (a ``train.memory_format`` setting) picks for training:
    oneDNN's bf16 convolutions are fastest in channels_last (the fp32 path keeps its layout, so its
    numbers stay those it always gave)."""
    n = len(data)
    if n == 0:
        return EvalResult(float("nan"), float("nan"), 0)
    fmt = training_memory_format(memory_format, model, data.x.device) if precision == "bf16" else None
    if fmt is not None and fmt is not torch.contiguous_format:
        model.to(memory_format=fmt)
        try:
            return evaluate(model, data, batch_size, per_sample=per_sample, forward=forward, precision=precision)
        finally:
            model.to(memory_format=torch.contiguous_format)
    model.eval()
    loss_sum = torch.zeros((), dtype=torch.float64, device=data.x.device)
    correct_sum = torch.zeros((), dtype=torch.long, device=data.x.device)
    correct_parts, loss_parts = [], []
    for i in range(0, n, batch_size):
        xb, yb = data.x[i:i + batch_size], data.y[i:i + batch_size]
        if precision == "bf16":
            with autocast(precision, xb.device):
                logits = forward(model, xb).float()
        else:
            logits = forward(model, xb)
        losses = F.cross_entropy(logits, yb, reduction="none")
        correct = logits.argmax(1) == yb
        loss_sum += losses.sum(dtype=torch.float64)
        correct_sum += correct.sum()
        if per_sample:  # kept on the device, copied to the host once at the end
            correct_parts.append(correct)
            loss_parts.append(losses)
    return EvalResult(
        loss=float(loss_sum) / n,
        accuracy=float(correct_sum) / n,
        n=n,
        correct=torch.cat(correct_parts).cpu().numpy() if per_sample else None,
        losses=torch.cat(loss_parts).cpu().numpy() if per_sample else None,
    )
