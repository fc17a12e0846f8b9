"""Knowledge distillation helpers shared by every algorithm that transfers knowledge between models.

Generic on purpose (server-side FedDF uses them, decentralized distillation can too):

* :func:`kl_to_teacher`: KL(teacher || student) at a temperature, FedDF's loss;
* :class:`LogitEnsemble` / :func:`ensemble_logits`: the (weighted) average of teacher logits on fixed inputs,
  built *streaming*: teachers are added one at a time, so only one teacher model need be resident and the
  ensemble costs ``len(x) * classes`` floats whatever the number of teachers;
* :func:`distill`: train a student towards teacher logits on unlabeled inputs (Adam, cosine schedule, gradient
  clipping, early stopping on a labeled validation split, best student kept), returning a :class:`DistillReport`;
* :class:`PeakMemory`: the peak memory of a block of code (CUDA allocator peak, or the process's peak resident
  set size on Linux), for cost measurements.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from hetfl.data.base import Split
from hetfl.train import batch_indices, evaluate, predict

Weights = dict[str, torch.Tensor]
Forward = Callable[[nn.Module, torch.Tensor], torch.Tensor]
#: ``fn(x_batch, idx_batch) -> teacher logits`` for the batch (``idx`` indexes the distillation inputs)
TeacherFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
#: a teacher: a module, or a (module, weights) pair whose weights are loaded into the module before use
Teacher = nn.Module | tuple[nn.Module, Weights]
ENSEMBLE_MODES = ("logits", "probs")


def _plain_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def kl_to_teacher(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0,
                  reduction: str = "batchmean") -> torch.Tensor:
    """KL(softmax(teacher / T) || softmax(student / T)); "batchmean" averages over rows.

    No T² rescaling (FedDF's code does not rescale; at its default T = 1 it makes no difference).
    """
    t = float(temperature)
    return F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits.detach() / t, dim=1),
                    reduction=reduction, log_target=True)


def nbytes_of(obj: nn.Module | Weights | torch.Tensor) -> int:
    """Bytes of a tensor, a weights dict, or a module's parameters and buffers."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    tensors = obj.state_dict().values() if isinstance(obj, nn.Module) else obj.values()
    return sum(t.numel() * t.element_size() for t in tensors)


class LogitEnsemble:
    """Streaming (weighted) ensemble of teacher outputs on fixed inputs ``x``.

    ``add(model, weight)`` runs one teacher over ``x`` (eval mode, batched) and adds to a running sum, so the
    memory is one ``(len(x), classes)`` float32 tensor however many teachers are added.  ``mode="logits"``
    averages logits (FedDF's ``avg_logits``); ``"probs"`` averages ``softmax(z / T)`` and returns
    ``T * log(mean probs)``, whose softmax at temperature ``T`` is exactly the mean probability, so both modes
    feed :func:`kl_to_teacher` the same way.
    """

    def __init__(self, x: torch.Tensor, *, mode: str = "logits", temperature: float = 1.0, batch_size: int = 1000,
                 forward: Forward = _plain_forward) -> None:
        if mode not in ENSEMBLE_MODES:
            raise ValueError(f"ensemble mode must be one of {ENSEMBLE_MODES}, got {mode!r}")
        self.x = x
        self.mode = mode
        self.temperature = float(temperature)
        self.batch_size = batch_size
        self.forward = forward
        self.sum: torch.Tensor | None = None
        self.total_weight = 0.0
        self.count = 0

    def add(self, model: nn.Module, weight: float = 1.0) -> None:
        out = predict(model, self.x, self.batch_size, forward=self.forward).float()
        if self.mode == "probs":
            out = F.softmax(out / self.temperature, dim=1)
        out = out.mul_(float(weight))
        self.sum = out if self.sum is None else self.sum.add_(out)
        self.total_weight += float(weight)
        self.count += 1

    def logits(self) -> torch.Tensor:
        if self.sum is None or self.total_weight <= 0:
            raise ValueError("the ensemble has no teachers")
        mean = self.sum / self.total_weight
        if self.mode == "probs":
            return self.temperature * torch.log(mean.clamp_min(1e-12))
        return mean

    @property
    def nbytes(self) -> int:
        return 0 if self.sum is None else nbytes_of(self.sum)


def _load(teacher: Teacher) -> nn.Module:
    if isinstance(teacher, nn.Module):
        return teacher
    module, weights = teacher
    module.load_state_dict(weights)
    return module


def ensemble_logits(teachers: Iterable[Teacher], x: torch.Tensor, *, weights: Sequence[float] | None = None,
                    mode: str = "logits", temperature: float = 1.0, batch_size: int = 1000,
                    forward: Forward = _plain_forward) -> torch.Tensor:
    """The ensemble's logits on ``x``: the weighted mean of teacher logits (or of probabilities, ``mode="probs"``).

    ``teachers`` is consumed one at a time; a ``(module, weights)`` teacher loads its weights into the module
    first, so passing a generator of pairs that share one module keeps a single teacher resident.
    """
    ens = LogitEnsemble(x, mode=mode, temperature=temperature, batch_size=batch_size, forward=forward)
    for i, teacher in enumerate(teachers):
        ens.add(_load(teacher), 1.0 if weights is None else float(weights[i]))
    return ens.logits()


def cached_teacher(logits: torch.Tensor) -> TeacherFn:
    """A teacher function that looks precomputed logits up by sample index."""
    return lambda xb, idx: logits[idx]


@dataclass
class DistillReport:
    steps: int  # optimisation steps run
    best_step: int  # the step whose student was kept (0 = the starting student)
    stopped_early: bool
    kl_start: float  # mean KL to the teacher on a probe batch, before and after
    kl_end: float
    val_acc_start: float  # validation accuracy before distillation and of the kept student (nan: no val)
    val_acc_best: float
    seconds: float


@torch.no_grad()
def _probe_kl(student: nn.Module, teacher: TeacherFn, x: torch.Tensor, idx: torch.Tensor, temperature: float,
              forward: Forward, batch_size: int) -> float:
    student.eval()
    total = 0.0
    for i in range(0, len(idx), batch_size):
        part = idx[i:i + batch_size]
        total += float(kl_to_teacher(forward(student, x[part]), teacher(x[part], part), temperature, "sum"))
    return total / max(len(idx), 1)


def distill(
    student: nn.Module,
    teacher_logits_fn: TeacherFn | torch.Tensor,
    data: torch.Tensor,
    steps: int,
    *,
    batch_size: int = 128,
    lr: float = 1e-3,
    temperature: float = 1.0,
    cosine: bool = True,
    grad_clip: float = 5.0,
    val: Split | None = None,
    val_every: int = 100,
    patience: int = 1000,
    keep_start: bool = False,
    seed: int = 0,
    probe: int = 512,
    forward: Forward = _plain_forward,
) -> DistillReport:
    """Distill ``student`` (in place) towards a teacher on the unlabeled inputs ``data``.

    ``teacher_logits_fn(x_batch, idx_batch)`` gives the teacher's logits for a batch (a tensor of logits for all
    of ``data`` may be passed instead).  Adam at ``lr`` (cosine-annealed to 0 over ``steps`` if ``cosine``), loss
    :func:`kl_to_teacher` at ``temperature``, gradient norm clipped at ``grad_clip`` (0 = off), batches drawn by
    shuffled passes under ``seed``.  With a labeled ``val`` split the student is validated (top-1) every
    ``val_every`` steps and after the last; the best one is kept and training stops once the best is ``patience``
    steps old (FedDF's early stopping).  ``keep_start`` also counts the starting student as a candidate, so
    distillation can never lower validation accuracy.  Without ``val`` the last student is kept.
    """
    t0 = time.perf_counter()
    teacher = cached_teacher(teacher_logits_fn) if isinstance(teacher_logits_fn, torch.Tensor) else teacher_logits_fn
    n = len(data)
    dev = data.device
    probe_idx = torch.arange(min(n, probe), device=dev)
    kl_start = _probe_kl(student, teacher, data, probe_idx, temperature, forward, batch_size) if n else float("nan")
    val_acc = ((lambda: evaluate(student, val, batch_size, forward=forward).accuracy)
               if val is not None and len(val) else None)
    acc_start = val_acc() if val_acc else float("nan")
    best_acc, best_state, best_step = -math.inf, None, 0
    if val_acc and keep_start:
        best_acc, best_state = acc_start, {k: v.detach().clone() for k, v in student.state_dict().items()}
    params = [p for p in student.parameters() if p.requires_grad]
    done, stopped = 0, False
    if n and steps > 0 and params:
        opt = torch.optim.Adam(params, lr=lr)
        gen = torch.Generator().manual_seed(seed)
        for idx in batch_indices(n, batch_size, 0, steps, gen):
            if cosine:
                for group in opt.param_groups:
                    group["lr"] = 0.5 * lr * (1.0 + math.cos(math.pi * done / steps))
            if dev.type != "cpu":
                idx = idx.to(dev, non_blocking=True)
            xb = data[idx]
            student.train()
            loss = kl_to_teacher(forward(student, xb), teacher(xb, idx), temperature)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            opt.step()
            done += 1
            if val_acc and (done % val_every == 0 or done == steps):
                acc = val_acc()
                if acc > best_acc:
                    best_acc, best_step = acc, done
                    best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
                elif done - best_step >= patience:
                    stopped = True
                    break
    if best_state is not None:
        student.load_state_dict(best_state)
    elif not val_acc:
        best_step = done
    kl_end = _probe_kl(student, teacher, data, probe_idx, temperature, forward, batch_size) if n else float("nan")
    return DistillReport(steps=done, best_step=best_step, stopped_early=stopped, kl_start=kl_start, kl_end=kl_end,
                         val_acc_start=acc_start, val_acc_best=best_acc if best_state is not None else acc_start,
                         seconds=time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------------- memory
_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")


def _status_kb(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


_HWM_TRACKS: bool | None = None


def hwm_tracks_peaks() -> bool:
    """Whether this kernel's ``VmHWM`` can be reset and then follows the resident set up (checked once per process).

    Some sandboxes accept the write to ``/proc/self/clear_refs`` but never move ``VmHWM`` past the RSS at the
    time of reading, so a peak read from it would be 0: :class:`PeakMemory` reports ``None`` there instead.
    The check touches 32 MiB once and frees it.
    """
    global _HWM_TRACKS
    if _HWM_TRACKS is None:
        try:
            _CLEAR_REFS.write_text("5")
        except OSError:
            _HWM_TRACKS = False
            return False
        rss = _status_kb("VmRSS")
        probe = torch.ones(8 * 2**20)  # 32 MiB, touched
        float(probe.sum())
        del probe
        hwm = _status_kb("VmHWM")
        _HWM_TRACKS = rss is not None and hwm is not None and hwm - rss >= 24 * 1024
    return _HWM_TRACKS


class PeakMemory:
    """Peak memory of a ``with`` block above its start, in bytes (``None`` where it cannot be measured).

    On CUDA: the caching allocator's peak (``torch.cuda.max_memory_allocated``), exact for tensors.  On the CPU:
    the process's peak resident set size (Linux ``VmHWM``, reset at entry through ``/proc/self/clear_refs``),
    which counts every allocation of the process, so measure in a process that does nothing else.
    """

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.peak_bytes: int | None = None
        self.start_bytes: int | None = None

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
            return self
        if not hwm_tracks_peaks():
            self.start_bytes = None
            return self
        _CLEAR_REFS.write_text("5")
        rss = _status_kb("VmRSS")
        self.start_bytes = None if rss is None else rss * 1024
        return self

    def __exit__(self, *exc: object) -> None:
        if self.start_bytes is None:
            return
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device)) - self.start_bytes
            return
        hwm = _status_kb("VmHWM")
        self.peak_bytes = None if hwm is None else max(0, hwm * 1024 - self.start_bytes)

