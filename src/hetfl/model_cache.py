"""One reusable module per model architecture (:class:`~hetfl.models.ModelRef`), loaded with a client's
weights by plain copies: what engines, evaluation and decentralized nodes train and evaluate with."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from hetfl.algorithms.base import Context
    from hetfl.models import ModelRef


class ModelCache:
    """One module per ModelRef, built once and reused by every client that trains that model."""

    def __init__(self, ctx: Context, device: torch.device) -> None:
        self.ctx = ctx
        self.device = device
        self._modules: dict[ModelRef, nn.Module] = {}
        self._slots: dict[ModelRef, _StateSlots | None] = {}

    def get(self, ref: ModelRef) -> nn.Module:
        module = self._modules.get(ref)
        if module is None:
            module = ref.build(self.ctx.info).to(self.device)
            self._modules[ref] = module
            self._slots[ref] = _StateSlots.of(module)
        return module

    def loaded(self, ref: ModelRef, weights: dict[str, torch.Tensor]) -> nn.Module:
        """The module of ``ref`` with ``weights`` loaded (``load_state_dict``'s result, strict)."""
        module = self.get(ref)
        slots = self._slots[ref]
        if slots is None or not slots.load(weights):
            module.load_state_dict(weights)
        return module


class _StateSlots:
    """Where each entry of a module's state dict lives (submodule, attribute), to load weights with one
    ``copy_`` per tensor.  ``load_state_dict`` does the same copies but walks the module tree, checks and
    calls hooks in Python on every call (111 us for the 2NN against 51 us by plain copies, one thread).
    Only for modules without load hooks or custom ``_load_from_state_dict``; anything that is not an exact
    match (keys in order, shapes) goes to ``load_state_dict``, which raises its own errors."""

    def __init__(self, keys: tuple[str, ...], places: list[tuple[nn.Module, str]], shapes: list[torch.Size]) -> None:
        self.keys, self.places, self.shapes = keys, places, shapes

    @staticmethod
    def of(module: nn.Module) -> _StateSlots | None:
        base = nn.Module._load_from_state_dict
        for m in module.modules():
            if m._load_state_dict_pre_hooks or m._load_state_dict_post_hooks \
                    or type(m)._load_from_state_dict is not base:
                return None
        state = module.state_dict(keep_vars=True)
        places = []
        for key in state:
            path, _, attr = key.rpartition(".")
            places.append((module.get_submodule(path) if path else module, attr))
        return _StateSlots(tuple(state), places, [t.shape for t in state.values()])

    def load(self, weights: dict[str, torch.Tensor]) -> bool:
        """Copy ``weights`` in if they match exactly; False (nothing copied) if they do not."""
        if len(weights) != len(self.keys) or tuple(weights) != self.keys:
            return False
        values = list(weights.values())
        if any(v.shape != s for v, s in zip(values, self.shapes)):
            return False
        with torch.no_grad():
            for (m, attr), v in zip(self.places, values):
                getattr(m, attr).copy_(v)
        return True
