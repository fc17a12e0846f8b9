"""FjORD's ordered dropout: a client trains nested prefix widths of its submodel, one drawn per minibatch.

A client of width ``r`` may train every fleet level ``w <= r``; inside its own submodel that is the prefix
of relative width ``w / r`` (:func:`nested_widths`).  :class:`OrderedDropout` is the forward function the
local training loop calls on every minibatch: it draws a width uniformly from the client's own stream,
slices the live parameters to that prefix (autograd flows back into the full tensors) and runs the
narrower network on them.  With self-distillation (FjORD + KD) the client's widest width teaches the drawn
narrower one.

:class:`InplaceDistill` is in-place distillation (slimmable / once-for-all networks' rule): on every
minibatch the client runs its widest width *and* narrower nested widths (all of them, or the smallest plus
a uniform draw: the sandwich rule), stacked as ``(widths, batch, classes)`` widest first; the widest is
trained on the labels and its detached softmax is the soft target of the narrower ones
(:func:`inplace_loss`); all the forwards' gradients go into one optimizer step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.hetero import prefix_submodel, submodel_ref
from hetfl.hetero.scaler import Scaler
from hetfl.models import ModelRef

_STREAM = 0x6F64  # "od": the per-minibatch width draw's random stream
_INPLACE_STREAM = 0x6970  # "ip": in-place distillation's draw of narrower widths

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def nested_widths(levels: Sequence[float], rate: float) -> list[float]:
    """The widths a client of ``rate`` trains, relative to its own submodel: every level ``<= rate``."""
    return [w / rate for w in levels if w <= rate + 1e-12]


class OrderedDropout:
    """FjORD's forward: each minibatch runs a nested prefix width drawn uniformly from ``widths``."""

    def __init__(self, model: nn.Module, ref: ModelRef, info: DataInfo, widths: tuple[float, ...], seed: int) -> None:
        self.model = model
        self.ref = ref
        self.widths = widths
        self.rng = np.random.default_rng([seed, _STREAM])
        self.info = info
        self.subs: dict[float, nn.Module] = {}
        self.teacher: torch.Tensor | None = None
        self.keep_teacher = False

    def distillation_loss(self, hard_loss: Loss) -> Loss:
        """FjORD's self-distillation (as its reference code): CE of the full-width logits against the labels
        plus CE of the sampled width's logits against the detached full-width softmax."""
        self.keep_teacher = True

        def loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            if self.teacher is None:  # the full width was drawn: plain loss
                return hard_loss(logits, y)
            teacher, self.teacher = self.teacher, None
            soft = torch.softmax(teacher.detach(), dim=-1)
            return hard_loss(teacher, y) + torch.sum(-soft * torch.log_softmax(logits, dim=-1), dim=-1).mean()

        return loss

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        p = float(self.widths[self.rng.integers(len(self.widths))])
        if p == 1.0:
            return model(x)
        if self.keep_teacher:
            self.teacher = model(x)
        return narrow_forward(self, model, live_tensors(model), p, x)


def live_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's parameters and buffers as they are now (slicing them keeps autograd)."""
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def narrow_forward(owner: OrderedDropout | InplaceDistill, model: nn.Module, tensors: dict[str, torch.Tensor],
                   p: float, x: torch.Tensor) -> torch.Tensor:
    """The prefix width ``p`` of ``model`` run on ``x`` with its live tensors (one built module per width)."""
    _, sliced = prefix_submodel(owner.ref, owner.info, tensors, p)
    sub = width_module(owner, p)
    sub.train(model.training)
    return torch.func.functional_call(sub, sliced, (x,))


def width_module(owner: OrderedDropout | InplaceDistill, p: float) -> nn.Module:
    """The module of prefix width ``p`` (built once per owner; its own tensors are never used)."""
    if p not in owner.subs:
        owner.subs[p] = submodel_ref(owner.ref, p).build(owner.info).to(next(owner.model.parameters()).device)
    return owner.subs[p]


class InplaceDistill:
    """In-place distillation's forward: the client's full width and narrower nested widths on every minibatch,
    their logits stacked widest first.  ``sample = 0``: every narrower width; ``k``: the smallest and ``k - 1``
    of the others drawn uniformly without replacement per minibatch (the sandwich rule)."""

    def __init__(self, model: nn.Module, ref: ModelRef, info: DataInfo, widths: Sequence[float], seed: int,
                 sample: int = 0, scaled: Sequence[str] = (), rate: float = 1.0) -> None:
        self.model = model
        self.scaled = tuple(scaled)  # HeteroFL's Scaler: a narrower width p divides these outputs by rate * p
        self.rate = rate
        self.ref = ref
        self.info = info
        self.narrow = tuple(sorted((float(w) for w in widths if w < 1.0), reverse=True))
        self.sample = sample
        self.rng = np.random.default_rng([seed, _INPLACE_STREAM])
        self.subs: dict[float, nn.Module] = {}

    def draw(self) -> tuple[float, ...]:
        """The narrower widths of this minibatch, widest first."""
        if self.sample == 0 or self.sample >= len(self.narrow):
            return self.narrow
        rest = self.narrow[:-1]
        picks = sorted(int(i) for i in self.rng.choice(len(rest), size=self.sample - 1, replace=False))
        return (*(rest[i] for i in picks), self.narrow[-1])

    def __call__(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        full = model(x)
        widths = self.draw()
        if not widths:
            return full[None]
        tensors = live_tensors(model)
        return torch.stack([full, *(self._narrow(model, tensors, p, x) for p in widths)])

    def _narrow(self, model: nn.Module, tensors: dict[str, torch.Tensor], p: float, x: torch.Tensor) -> torch.Tensor:
        if not self.scaled:
            return narrow_forward(self, model, tensors, p, x)
        with Scaler(width_module(self, p), self.scaled, self.rate * p):
            return narrow_forward(self, model, tensors, p, x)


def inplace_loss(hard_loss: Loss, weight: float) -> Loss:
    """In-place distillation's loss over stacked logits ``z`` (widest first): ``hard_loss(z[0], y)`` plus
    ``weight`` x the soft-target cross-entropy ``-sum_c p_c log softmax(z_k)_c`` (batch mean) of every narrower
    ``z[k]``, with ``p = softmax(z[0])`` detached (no temperature, no label term for the narrower widths)."""

    def loss(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        total = hard_loss(z[0], y)
        if z.shape[0] > 1:
            soft = torch.softmax(z[0].detach(), dim=-1)
            for k in range(1, z.shape[0]):
                total = total + weight * torch.sum(-soft * torch.log_softmax(z[k], dim=-1), dim=-1).mean()
        return total

    return loss


def ordered_forward(model: nn.Module, ref: ModelRef, info: DataInfo, widths: Sequence[float],
                    seed: int) -> OrderedDropout | None:
    """The per-minibatch forward for a client that trains ``widths`` (None: only its full width)."""
    ws = tuple(sorted(float(w) for w in widths))
    return None if ws == (1.0,) else OrderedDropout(model, ref, info, ws, seed)
