"""Mixed precision for the client step and evaluation (``train.precision``).

``"fp32"`` (the default) trains and evaluates in float32: results are reproducible bit for bit, which
the golden and identity tests rely on.  ``"bf16"`` runs the forward pass and the loss under
``torch.autocast(device, bfloat16)``: matrix products and convolutions in bfloat16 on the CPU's bf16
matrix units (AVX512-BF16, AMX) or a GPU's tensor cores, while the model's parameters -- the master
weights the optimiser updates -- their gradients, the aggregation, DP noise and checkpoints stay float32.
``"auto"`` picks bf16 only where the hardware has bf16 units *and* a short measured training step of the
run's own model is faster (on this project's CPU the 2NN MLP is slower in bf16, the CNNs faster); the
4-D weight layout (``train.memory_format = "auto"``) is chosen in the same measurement for bf16.

The measurement runs on one CPU thread (what a worker process trains with; on a shared machine a
multi-threaded timing swings by several times, one thread far less).  The decision is made once, at the
start of a run (:func:`hetfl.runner.run`), written into the tasks'
train config (so worker processes, batched clients and Flower nodes all follow it, none measures
again) and recorded in ``summary.json``; a resumed run reuses it.  Measurements are cached per
(model, input shape, batch size, device, threads) in the process.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from hetfl.config import TrainConfig
from hetfl.models.registry import PREFERS_CHANNELS_LAST

#: bf16 is chosen by ``auto`` only when its measured step takes at most this fraction of fp32's
#: (a margin against timing noise: a tie stays in fp32, which is exact and reproducible)
AUTO_MARGIN = 0.9


def training_memory_format(setting: str, model: nn.Module, device: torch.device | str) -> torch.memory_format:
    """The layout of the model's 4-D weights while :func:`local_sgd` trains it.

    ``"auto"``: ``channels_last`` on the CPU for a model whose builder marked it so (attribute
    :data:`PREFERS_CHANNELS_LAST`: FedAvg's CNN trains 1.25-1.4x faster so with oneDNN's kernels, measured
    in benchmarks/README.md; HeteroFL's BN conv net and the ResNet gain nothing and are left alone), else
    contiguous.  The layout changes how convolutions sum, so results differ from contiguous training in
    the last bits; every engine trains through this function, so they agree with each other.
    """
    if setting == "channels_last":
        return torch.channels_last
    if setting == "auto" and torch.device(device).type == "cpu" and getattr(model, PREFERS_CHANNELS_LAST, False):
        return torch.channels_last
    return torch.contiguous_format


def bf16_hardware(device: torch.device | str = "cpu") -> tuple[bool, str]:
    """Whether ``device`` has bf16 matrix units (not emulation), and a sentence saying what was found."""
    device = torch.device(device)
    if device.type == "cuda":
        try:
            ok = bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # older torch: no emulation flag
            ok = bool(torch.cuda.is_bf16_supported())
        name = torch.cuda.get_device_name(device)
        return ok, f"{name} {'supports' if ok else 'lacks'} bf16"
    if device.type != "cpu":
        return False, f"no bf16 probe for device type {device.type!r}"
    probe = getattr(torch, "cpu", None)
    avx = bool(getattr(probe, "_is_avx512_bf16_supported", lambda: False)())
    amx = bool(getattr(probe, "_is_amx_tile_supported", lambda: False)())
    onednn = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    units = " + ".join(n for n, have in (("AVX512-BF16", avx), ("AMX", amx)) if have)
    if (avx or amx) and onednn:
        return True, f"the CPU has {units} (oneDNN bf16 kernels)"
    if not (avx or amx):
        return False, "the CPU has no bf16 matrix units (neither AVX512-BF16 nor AMX)"
    return False, "this torch build has no oneDNN bf16 kernels"


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager[Any]:
    """The context the forward pass and loss run in: bf16 autocast, or nothing for fp32."""
    if precision == "bf16":
        return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class PrecisionChoice:
    """What a run trains with: a concrete ``precision`` ("fp32"/"bf16") and ``memory_format`` setting."""

    precision: str
    memory_format: str
    reason: str
    step_ms: tuple[tuple[str, float], ...] = ()  # fastest measured step per candidate, when measured

    def summary(self) -> dict[str, Any]:
        out: dict[str, Any] = {"precision": self.precision, "memory_format": self.memory_format,
                               "precision_reason": self.reason}
        if self.step_ms:
            out["precision_step_ms"] = dict(self.step_ms)
        return out

    def apply(self, train: TrainConfig) -> TrainConfig:
        return dataclasses.replace(train, precision=self.precision, memory_format=self.memory_format)


_CACHE: dict[Any, PrecisionChoice] = {}


def _has_4d_weights(model: nn.Module) -> bool:
    return any(p.dim() == 4 for p in model.parameters())


def _step_times(build, x: torch.Tensor, y: torch.Tensor, candidates: list[tuple[str, str]],
                device: torch.device, rounds: int = 9, budget_s: float = 2.0) -> dict[tuple[str, str], float]:
    """Fastest seconds of one SGD step (forward, loss, backward, update) per (precision, format)
    candidate, measured round robin (so load on the machine hits every candidate alike)."""

    models = {}
    for prec, fmt in candidates:
        model = build().to(device)
        model.train()
        layout = training_memory_format(fmt, model, device)
        if layout is not torch.contiguous_format:
            model.to(memory_format=layout)
        models[(prec, fmt)] = model

    def step(key: tuple[str, str]) -> float:
        model = models[key]
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        with autocast(key[0], device):
            loss = F.cross_entropy(model(x).float(), y)
        model.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p.add_(p.grad, alpha=-1e-4)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - t0

    for key in models:  # warm-up: kernel selection, oneDNN primitive caches, allocator
        step(key)
        step(key)
    times: dict[tuple[str, str], list[float]] = {key: [] for key in models}
    t_end = time.perf_counter() + budget_s
    for r in range(rounds):
        for key in models:
            times[key].append(step(key))
        if r >= 2 and time.perf_counter() > t_end:  # a large model: three rounds suffice
            break
    # the minimum, not the median: on a shared machine other load only ever adds time
    return {key: min(ts) for key, ts in times.items()}


def choose(train: TrainConfig, build, example: torch.Tensor, num_classes: int, device: torch.device | str,
           key: Any = None) -> PrecisionChoice:
    """Resolve ``train.precision`` (and, for bf16, ``train.memory_format = "auto"``) for a model.

    ``build()`` returns a fresh model (on the CPU); ``example`` holds a few input rows (already on
    ``device``) from which a batch of ``train.batch_size`` is drawn.  ``key`` identifies the model for
    the in-process cache (e.g. its :class:`~hetfl.models.ModelRef`); None: no caching.  The global
    random state is left untouched, so measuring changes no result.
    """
    device = torch.device(device)
    if train.precision == "fp32":
        return PrecisionChoice("fp32", train.memory_format, "train.precision = fp32")
    have, why = bf16_hardware(device)
    if train.precision == "auto" and not have:
        return PrecisionChoice("fp32", train.memory_format, f"auto: {why}")
    cache_key = None if key is None else (key, train.precision, train.memory_format, train.batch_size,
                                          tuple(example.shape[1:]), example.dtype, str(device),
                                          torch.get_num_threads())
    if cache_key is not None and cache_key in _CACHE:
        return _CACHE[cache_key]
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(0)
        probe = build()
        layouts = ["contiguous", "channels_last"] if (
            train.memory_format == "auto" and _has_4d_weights(probe)) else [train.memory_format]
        candidates = [("bf16", fmt) for fmt in layouts]
        if train.precision == "auto":
            candidates.insert(0, ("fp32", train.memory_format))
        if len(candidates) == 1:  # explicit bf16 with a fixed layout: nothing to measure
            choice = PrecisionChoice("bf16", train.memory_format, f"train.precision = bf16 ({why})")
        else:
            idx = torch.randint(len(example), (train.batch_size,))
            x = example[idx.to(example.device)]
            y = torch.randint(num_classes, (train.batch_size,)).to(device)
            threads = torch.get_num_threads()
            if device.type == "cpu":  # one thread: what a worker has, and far steadier on a loaded machine
                torch.set_num_threads(1)
            try:
                times = _step_times(build, x, y, candidates, device)
            finally:
                torch.set_num_threads(threads)
            choice = _pick(train.precision, times, why)
    if cache_key is not None:
        _CACHE[cache_key] = choice
    return choice


def _pick(setting: str, times: dict[tuple[str, str], float], why: str) -> PrecisionChoice:
    step_ms = tuple((f"{p}/{f}", round(t * 1e3, 3)) for (p, f), t in times.items())
    bf16 = min((k for k in times if k[0] == "bf16"), key=times.__getitem__)
    if setting == "bf16":
        return PrecisionChoice("bf16", bf16[1], f"train.precision = bf16, {bf16[1]} measured fastest", step_ms)
    fp32 = next(k for k in times if k[0] == "fp32")
    ratio = times[fp32] / times[bf16]
    if times[bf16] <= AUTO_MARGIN * times[fp32]:
        return PrecisionChoice("bf16", bf16[1], f"auto: {why}; a bf16 step is {ratio:.2f}x faster", step_ms)
    return PrecisionChoice("fp32", fp32[1], f"auto: {why}, but a bf16 step is only {ratio:.2f}x as fast "
                           f"(needs {1 / AUTO_MARGIN:.2f}x)", step_ms)


def choose_for(ctx: Any, example: torch.Tensor, device: torch.device | str) -> PrecisionChoice:
    """:func:`choose` for a run's context: the global model, built from ``ctx.model`` and ``ctx.info``."""
    return choose(ctx.train, lambda: ctx.model.build(ctx.info), example, ctx.info.num_classes, device,
                  key=ctx.model)


def resolved(train: TrainConfig, model: nn.Module, example: torch.Tensor, device: torch.device | str) -> str:
    """The concrete precision of a train config that still says ``auto`` (a library call of
    :func:`hetfl.train.local_sgd` outside a run): the cached measurement for this model's class."""
    if train.precision != "auto":
        return train.precision
    import copy

    def build() -> nn.Module:
        return copy.deepcopy(model).to("cpu")

    return choose(train, build, example, _num_outputs(model, example), device,
                  key=("module", type(model).__qualname__, tuple(p.shape for p in model.parameters()))).precision


def _num_outputs(model: nn.Module, example: torch.Tensor) -> int:
    was = model.training
    model.eval()
    with torch.no_grad():
        n = int(model(example[:1]).shape[-1])
    model.train(was)
    return n
