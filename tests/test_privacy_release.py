"""What a private run releases (issue 37): noise no seed replays, a released round never re-run on resume,
the tight (PLD) accountant by default, only the noised clipped count."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from hetfl.algorithms.base import ClientResult, ServerState
from hetfl.algorithms.fedavg import FedAvg
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.privacy.mechanism import PrivateRound
from hetfl.privacy.plan import REPRODUCIBLE_WARNING, PrivacyPlan
from hetfl.results import RunDir, read_metrics
from hetfl.runner import run

dpa = pytest.importorskip("dp_accounting")

from hetfl.privacy.accountant import epsilon, noise_for_epsilon  # noqa: E402

DP = ("privacy.clip=1.0", "privacy.noise_multiplier=1.0")


def _weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]


class _Ctx:
    seed = 0
    fleet = None
    num_clients = 40


def _release(z: float, reproducible: bool, updates: list[torch.Tensor]) -> torch.Tensor:
    """One round released at noise multiplier z (q = 1: the cohort is everyone, only the noise differs):
    the noised sum of the clipped updates, n * (new - old)."""
    n = len(updates)
    plan = PrivacyPlan(noise_multiplier=z, clip=1.0, delta=1e-5, sampling_rate=1.0, eligible=tuple(range(n)),
                       rounds=1, reproducible_noise=reproducible)
    glob = {"w": torch.zeros(updates[0].shape, dtype=torch.float64)}
    dp = PrivateRound(FedAvg(), _Ctx(), plan)
    results = [ClientResult(k, 10, {"w": u}) for k, u in enumerate(updates)]
    return dp.aggregate(ServerState(0, {"global": glob}), 1, results)["w"] * n


@pytest.mark.parametrize("reproducible", [True, False])
def test_two_releases_of_one_round_no_longer_cancel_the_noise(reproducible):
    """The attack of issue 37: one round released at z = 3.186 and at z = 1.0 with one seed. With the same
    noise draw xi, a = S + 3.186 C xi and b = S + C xi give S = (a - 3.186 b) / (1 - 3.186) exactly. Under
    reproducible_noise it still works (that is why the option warns); by default it recovers nothing."""
    gen = torch.Generator().manual_seed(1)
    updates = [torch.randn(2000, generator=gen, dtype=torch.float64) * 0.1 for _ in range(40)]
    clipped = sum(u * min(1.0, 1.0 / float(u.norm())) for u in updates)
    a, b = _release(3.186, reproducible, updates), _release(1.0, reproducible, updates)
    recovered = (a - 3.186 * b) / (1.0 - 3.186)
    error = float((recovered - clipped).norm())
    if reproducible:
        assert error < 1e-6 * float(clipped.norm())
    else:
        assert error > 0.5 * math.sqrt(2000) * 1.0  # noise-sized: about |xi1 - xi2| scaled, never near 0
        assert error > 10 * float(clipped.norm())


def test_two_private_runs_with_one_seed_end_with_different_weights(tmp_path, digits_cfg):
    cfg = digits_cfg("rounds=2", *DP)
    run(cfg, tmp_path / "a", quiet=True)
    run(cfg, tmp_path / "b", quiet=True)
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert any(not torch.equal(a[k], b[k]) for k in a if a[k].is_floating_point())
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())["privacy"]
    assert summary["noise_source"] == "os entropy" and "reproducible_noise" not in summary
    ckpt = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=True)
    assert set(ckpt) == {"format", "round", "state", "elapsed_s", "seed", "torch_rng", "row"}  # no noise seed


def test_reproducible_noise_replays_warns_and_is_marked(tmp_path, digits_cfg, capfd):
    cfg = digits_cfg("rounds=2", *DP, "privacy.reproducible_noise=true")
    run(cfg, tmp_path / "a", quiet=True)
    run(cfg, tmp_path / "b", quiet=True)
    err = capfd.readouterr().err
    assert err.count(REPRODUCIBLE_WARNING) == 2 and REPRODUCIBLE_WARNING.count("\n") == 0  # one line per run
    a, b = _weights(tmp_path / "a"), _weights(tmp_path / "b")
    assert all(torch.equal(a[k], b[k]) for k in a)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())["privacy"]
    assert summary["reproducible_noise"] is True and "NOT private" in summary["noise_source"]


# ---------------------------------------------------------------------------------------------- resume rule
def _crash(monkeypatch, target, name, at_round, *, arg=1):
    original = getattr(target, name)

    def crashing(self, *args, **kwargs):
        value = args[arg - 1]
        rnd = value if isinstance(value, int) else value.get("round")
        if rnd == at_round:
            raise KeyboardInterrupt
        return original(self, *args, **kwargs)

    monkeypatch.setattr(target, name, crashing)
    return original


def test_resume_never_reruns_a_released_round(tmp_path, digits_cfg, monkeypatch):
    """Round 3 is checkpointed before its model leaves the server; a kill right after (before its metrics row)
    resumes at round 4 with round 3's saved row, not with a re-run of round 3 under fresh noise."""
    cfg = digits_cfg("rounds=4", *DP)
    original = _crash(monkeypatch, RunDir, "append_metrics", 3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "r", quiet=True)
    monkeypatch.setattr(RunDir, "append_metrics", original)
    assert [r["round"] for r in read_metrics(tmp_path / "r")] == [1, 2]
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["round"] == 3
    ran = []
    run_round = Simulator.run_round
    monkeypatch.setattr(Simulator, "run_round", lambda self, state, rnd: (ran.append(rnd), run_round(self, state,
                                                                                                        rnd))[1])
    s = run(None, resume=tmp_path / "r", quiet=True)
    assert ran == [4]  # round 3 was released: kept, not redrawn
    rows = read_metrics(tmp_path / "r")
    assert [r["round"] for r in rows] == [1, 2, 3, 4] and rows[2]["test_accuracy"] is not None
    assert s["privacy"]["rounds_accounted"] == 4


def test_resume_reruns_only_a_round_never_released(tmp_path, digits_cfg, monkeypatch):
    """A kill inside round 3 (nothing of it saved or sent on): the resume runs round 3 afresh, which is one
    release of round 3, not two."""
    cfg = digits_cfg("rounds=4", *DP)
    original = _crash(monkeypatch, Simulator, "run_round", 3, arg=2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "r", quiet=True)
    monkeypatch.setattr(Simulator, "run_round", original)
    assert torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["round"] == 2
    s = run(None, resume=tmp_path / "r", quiet=True)
    assert [r["round"] for r in read_metrics(tmp_path / "r")] == [1, 2, 3, 4]
    assert s["privacy"]["rounds_accounted"] == 4


def test_noised_run_needs_a_checkpoint_every_round(tmp_path, digits_cfg):
    with pytest.raises(ConfigError, match="checkpoint_every=2: a \\[privacy\\] run with noise checkpoints every"):
        run(digits_cfg("checkpoint_every=2", *DP), tmp_path / "r", quiet=True)


# ---------------------------------------------------------------------------------------------- accountant
def test_target_epsilon_is_calibrated_and_reported_with_pld(tmp_path, digits_cfg):
    """No ``accountant`` given: z comes from PLD (smaller than RDP's for the same target) and the final epsilon
    is dp-accounting's PLD figure; the summary names the accountant of each figure."""
    s = run(digits_cfg("rounds=3", "privacy.clip=1.0", "privacy.target_epsilon=4.0"), tmp_path / "r", quiet=True)
    p = s["privacy"]
    q = 3 / 5
    assert p["accountant"] == "pld" and p["noise_multiplier_from"] == "target_epsilon, calibrated with pld"
    assert p["noise_multiplier"] == pytest.approx(noise_for_epsilon(4.0, q, 3, 1e-5, "pld"))
    assert p["noise_multiplier"] < noise_for_epsilon(4.0, q, 3, 1e-5, "rdp")
    acc = dpa.pld.PLDAccountant()
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(p["noise_multiplier"])), 3))
    assert p["epsilon"] == pytest.approx(acc.get_epsilon(1e-5), abs=1e-3)
    assert p["epsilon"] <= 4.0 < p["epsilon_rdp"]
    rows = read_metrics(tmp_path / "r")
    assert [("privacy.epsilon" in r) for r in rows] == [False, False, True]  # PLD: the last round only
    assert rows[-1]["privacy.epsilon"] == pytest.approx(p["epsilon"])
    assert [r["privacy.epsilon_rdp"] for r in rows] == [pytest.approx(epsilon(q, p["noise_multiplier"], t, 1e-5))
                                                        for t in (1, 2, 3)]


# ---------------------------------------------------------------------------------------------- released counts
def test_private_rows_release_only_the_noised_clipped_count(tmp_path, digits_cfg):
    """``privacy.clipped`` (raw) with ``clients_reported`` and ``next_clip`` gives back the count noise, so a
    noised run does not write it; adaptive clipping writes the noised fraction it used instead."""
    run(digits_cfg("rounds=2", *DP), tmp_path / "fixed", quiet=True)
    assert not any("privacy.clipped" in r for r in read_metrics(tmp_path / "fixed"))
    run(digits_cfg("rounds=2", "privacy.clip=0.01", "privacy.noise_multiplier=1.0", "privacy.adaptive_clip=true",
                   "privacy.count_noise=2.0"), tmp_path / "adaptive", quiet=True)
    for r in read_metrics(tmp_path / "adaptive"):
        assert "privacy.clipped" not in r
        assert r["privacy.next_clip"] == pytest.approx(r["privacy.clip"] * np.exp(-0.2 * (r["privacy.within_noised"]
                                                                                         - 0.5)))
    run(digits_cfg("rounds=1", "privacy.clip=0.01"), tmp_path / "plain", quiet=True)  # no noise, no guarantee
    assert read_metrics(tmp_path / "plain")[0]["privacy.clipped"] == 1.0
