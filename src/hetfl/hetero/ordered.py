"""FjORD's ordered dropout: a client trains nested prefix widths of its submodel, one drawn per minibatch.

A client of width ``r`` may train every fleet level ``w <= r``; inside its own submodel that is the prefix
of relative width ``w / r`` (:func:`nested_widths`).  :class:`OrderedDropout` is the forward function the
local training loop calls on every minibatch: it draws a width uniformly from the client's own stream,
slices the live parameters to that prefix (autograd flows back into the full tensors) and runs the
narrower network on them.  With self-distillation (FjORD + KD) the client's widest width teaches the drawn
narrower one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
from torch import nn

from hetfl.data.base import DataInfo
from hetfl.hetero import prefix_submodel
from hetfl.models import ModelRef

_STREAM = 0x6F64  # "od": the per-minibatch width draw's random stream

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
        tensors = {**dict(model.named_parameters()), **dict(model.named_buffers())}
        ref, sliced = prefix_submodel(self.ref, self.info, tensors, p)
        if p not in self.subs:
            self.subs[p] = ref.build(self.info).to(next(self.model.parameters()).device)
        sub = self.subs[p]
        sub.train(model.training)
        return torch.func.functional_call(sub, sliced, (x,))


def ordered_forward(model: nn.Module, ref: ModelRef, info: DataInfo, widths: Sequence[float],
                    seed: int) -> OrderedDropout | None:
    """The per-minibatch forward for a client that trains ``widths`` (None: only its full width)."""
    ws = tuple(sorted(float(w) for w in widths))
    return None if ws == (1.0,) else OrderedDropout(model, ref, info, ws, seed)
