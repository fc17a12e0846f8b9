"""hetfl.distill: KL at a temperature, streaming ensembles, the distillation loop, peak memory."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from hetfl.data.base import Split
from hetfl.distill import (
    LogitEnsemble,
    PeakMemory,
    distill,
    ensemble_logits,
    hwm_tracks_peaks,
    kl_to_teacher,
    nbytes_of,
)


def _linear(seed: int, d: int = 6, c: int = 4) -> nn.Linear:
    torch.manual_seed(seed)
    return nn.Linear(d, c)


@torch.no_grad()
def _kl(student: nn.Module, x: torch.Tensor, target: torch.Tensor) -> float:
    return float(kl_to_teacher(student(x), target))


def test_kl_matches_the_formula_and_vanishes_on_equal_logits():
    torch.manual_seed(0)
    s, t = torch.randn(5, 3), torch.randn(5, 3)
    for temp in (1.0, 3.0):
        p = F.softmax(t / temp, 1)
        want = (p * (p.log() - F.log_softmax(s / temp, 1))).sum(1).mean()
        torch.testing.assert_close(kl_to_teacher(s, t, temp), want)
    assert float(kl_to_teacher(t, t)) == pytest.approx(0.0, abs=1e-7)


def test_streaming_ensemble_equals_stacked_mean_and_shared_module_pairs():
    x = torch.randn(50, 6)
    teachers = [_linear(i) for i in range(4)]
    stacked = torch.stack([m(x) for m in teachers]).detach()
    torch.testing.assert_close(ensemble_logits(teachers, x, batch_size=7), stacked.mean(0))
    w = [1.0, 2.0, 3.0, 4.0]
    weighted = (stacked * torch.tensor(w)[:, None, None]).sum(0) / sum(w)
    torch.testing.assert_close(ensemble_logits(teachers, x, weights=w), weighted)
    # one resident module, weights loaded per teacher: the same ensemble
    shared = _linear(99)
    pairs = ((shared, {k: v.clone() for k, v in m.state_dict().items()}) for m in teachers)
    torch.testing.assert_close(ensemble_logits(pairs, x), stacked.mean(0))
    # probability averaging: softmax(L / T) is the mean of the teachers' softmax at T
    for temp in (1.0, 2.0):
        probs = ensemble_logits(teachers, x, mode="probs", temperature=temp)
        torch.testing.assert_close(F.softmax(probs / temp, 1), F.softmax(stacked / temp, 2).mean(0))
    ens = LogitEnsemble(x)
    ens.add(teachers[0])
    assert ens.nbytes == 50 * 4 * 4 and ens.count == 1
    with pytest.raises(ValueError, match="mode"):
        LogitEnsemble(x, mode="median")


def test_distillation_step_provably_reduces_kl_and_converges_to_the_ensemble():
    """Teachers are linear, so their averaged logits are the averaged linear model: a linear student can
    reach KL = 0.  One small Adam step moves along -sign(grad) (a descent direction): the KL must drop."""
    torch.manual_seed(1)
    x = torch.randn(64, 6)
    teachers = [_linear(i) for i in range(3)]
    target = ensemble_logits(teachers, x)
    student = _linear(7)
    kl0 = _kl(student, x, target)
    rep = distill(student, target, x, steps=1, batch_size=64, lr=1e-4, cosine=False)
    kl1 = _kl(student, x, target)
    assert rep.steps == 1 and kl1 < kl0
    assert rep.kl_start == pytest.approx(kl0, rel=1e-5) and rep.kl_end == pytest.approx(kl1, rel=1e-5)
    rep = distill(student, target, x, steps=600, batch_size=64, lr=0.05)
    assert _kl(student, x, target) < 1e-3 < kl0
    # a callable teacher (recomputed per batch, as with resident teachers) gives the same targets
    fn_student = _linear(7)
    distill(fn_student, lambda xb, idx: ensemble_logits(teachers, xb), x, steps=5, batch_size=16, seed=3)
    cached_student = _linear(7)
    distill(cached_student, target, x, steps=5, batch_size=16, seed=3)
    for a, b in zip(fn_student.parameters(), cached_student.parameters()):
        torch.testing.assert_close(a, b)


def test_early_stopping_keeps_the_best_student_on_validation():
    torch.manual_seed(2)
    x = torch.randn(128, 6)
    teacher = _linear(3)
    val_x = torch.randn(64, 6)
    val = Split(val_x, teacher(val_x).argmax(1).detach())
    target = teacher(x).detach()
    student = _linear(4)
    rep = distill(student, target, x, steps=400, batch_size=32, lr=0.05, val=val, val_every=10, patience=30)
    assert rep.best_step % 10 == 0 and rep.steps <= 400
    assert rep.stopped_early == (rep.steps < 400)
    if rep.stopped_early:
        assert rep.steps - rep.best_step >= 30
    got = float((student(val_x).argmax(1) == val.y).float().mean())
    assert got == pytest.approx(rep.val_acc_best)
    # keep_start: a student already perfect on validation is never replaced by a worse one
    perfect = _linear(3)
    noise = torch.randn(128, 4) * 5
    rep = distill(perfect, noise, x, steps=50, batch_size=32, lr=0.1, val=val, val_every=10, keep_start=True)
    assert rep.val_acc_start == 1.0 and rep.val_acc_best == 1.0
    assert float((perfect(val_x).argmax(1) == val.y).float().mean()) == 1.0


def test_nbytes_and_peak_memory():
    m = nn.Linear(10, 5)
    assert nbytes_of(m) == 55 * 4 == nbytes_of(m.state_dict()) == nbytes_of(m.weight) + nbytes_of(m.bias)
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak RSS needs Linux /proc")
    with PeakMemory("cpu") as pm:
        big = torch.ones(16 * 2**20 // 4 * 4)  # 64 MiB, touched
        float(big.sum())
        del big
    if pm.start_bytes is None:
        assert not hwm_tracks_peaks()
        pytest.skip("VmHWM cannot be reset or does not follow the resident set here")
    assert pm.peak_bytes is not None and pm.peak_bytes >= 48 * 2**20
