"""Buffered asynchronous FL (hetfl.asynchronous) and the virtual clock: FedBuff with buffer = concurrency = the
cohort and equal durations is synchronous FedAvg bit for bit; stale submodel updates land where they were cut;
a resumed FedBuff run equals an uninterrupted one; the refusals name what to change."""

from __future__ import annotations

import math

import pytest
import torch

from hetfl.asynchronous import BufferedRound, staleness_weight
from hetfl.errors import ConfigError
from hetfl.results import read_metrics, strip_timing
from hetfl.runner import run

FEDBUFF = ('asynchronous.mode="fedbuff"',)
EQUAL = ("train.steps=3", "data.num_clients=8", "algorithm.clients_per_round=4",
         'data.partition={name="iid"}', "fleet.bandwidth_spread=0.0")  # 48 samples each, one link speed
TIERS = ('fleet.source="tiers"', 'fleet.mix="a-b-c"')


def _weights(d):
    return torch.load(d / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]


def test_fedbuff_with_full_buffer_and_equal_durations_is_fedavg_bit_for_bit(tmp_path, digits_cfg):
    run(digits_cfg("rounds=3", *EQUAL), tmp_path / "sync", quiet=True)
    run(digits_cfg("rounds=3", *EQUAL, *FEDBUFF, 'asynchronous.staleness="constant"'), tmp_path / "buff",
        quiet=True)
    a, b = _weights(tmp_path / "sync"), _weights(tmp_path / "buff")
    assert all(torch.equal(a[k], b[k]) for k in a)
    sync, buff = read_metrics(tmp_path / "sync"), read_metrics(tmp_path / "buff")
    assert [r["test_accuracy"] for r in sync] == [r["test_accuracy"] for r in buff]
    assert [r["virtual_time_s"] for r in sync] == pytest.approx([r["virtual_time_s"] for r in buff], abs=1e-5)
    assert all(r["staleness_max"] == 0 for r in buff)


def test_virtual_time_is_the_sum_of_round_times(tmp_path, digits_cfg):
    """A synchronous round lasts until its last client: with one client per round and a fast device the round
    time is the transfer of the model down and up at 20 Mbit/s."""
    run(digits_cfg("rounds=3", "algorithm.clients_per_round=1", "faults.device_gflops=1e9",
                   "fleet.bandwidth_spread=0.0"), tmp_path / "r", quiet=True)
    rows = read_metrics(tmp_path / "r")
    params = sum(v.numel() for v in _weights(tmp_path / "r").values())
    transfer = 2 * params * 4 * 8 / 20e6  # float32 down and up, bits over 20 Mbit/s (no fleet)
    assert rows[0]["round_sim_time_s"] == pytest.approx(transfer, rel=1e-3)
    total = 0.0
    for r in rows:
        total += r["round_sim_time_s"]
        assert r["virtual_time_s"] == pytest.approx(total, abs=1e-5)


def test_fedbuff_submodels_with_staleness_run_and_resume_exactly(tmp_path, digits_cfg, monkeypatch):
    cfg = digits_cfg("rounds=5", "checkpoint_every=1", *TIERS, "data.num_clients=10",
                     'algorithm={name="heterofl", clients_per_round=4}', *FEDBUFF, "asynchronous.concurrency=4",
                     "asynchronous.buffer=2")
    run(cfg, tmp_path / "full", quiet=True)
    rows = read_metrics(tmp_path / "full")
    assert any(r["staleness_max"] > 0 for r in rows)  # slower tiers arrive on older models
    times = [r["virtual_time_s"] for r in rows]
    assert times == sorted(times) and times[0] > 0
    assert all(bool(torch.isfinite(v).all()) for v in _weights(tmp_path / "full").values() if v.is_floating_point())
    original = BufferedRound.run

    def crash_at_3(self, state, step):
        if step == 3:
            raise KeyboardInterrupt
        return original(self, state, step)

    monkeypatch.setattr(BufferedRound, "run", crash_at_3)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(BufferedRound, "run", original)
    run(None, resume=tmp_path / "cut", quiet=True)
    assert strip_timing(read_metrics(tmp_path / "cut")) == strip_timing(rows)
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fedbuff_runs_depth_and_fiarse_and_on_workers(tmp_path, digits_cfg, one_thread):
    """The in-process run trains at one thread, as each worker does, so the two agree bit for bit."""
    base = ("rounds=2", *TIERS, "data.num_clients=8", *FEDBUFF, "asynchronous.buffer=2")
    for name, algo in (("depth", '{name="depthfl", levels="1x1,1x0.5", clients_per_round=3}'),
                       ("fiarse", '{name="fiarse", clients_per_round=3}')):
        run(digits_cfg(*base, 'model={name="mlp", hidden="32,32"}', f"algorithm={algo}"), tmp_path / name,
            quiet=True)
        assert len(read_metrics(tmp_path / name)) == 2
    run(digits_cfg(*base, 'algorithm={name="fedavg", clients_per_round=3}'), tmp_path / "one", quiet=True)
    run(digits_cfg(*base, 'algorithm={name="fedavg", clients_per_round=3}', "workers=2"), tmp_path / "two",
        quiet=True)
    a, b = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_staleness_weights():
    assert staleness_weight("sqrt", 0) == 1.0 and staleness_weight("sqrt", 3) == pytest.approx(0.5)
    assert staleness_weight("constant", 7) == 1.0 and math.isfinite(staleness_weight("sqrt", 10**6))


@pytest.mark.parametrize("overrides, message", [
    ((*FEDBUFF, "privacy.clip=1.0", "privacy.noise_multiplier=1.0"), "cannot run with \\[privacy\\]"),
    ((*FEDBUFF, "faults.deadline_s=5.0"), "faults.deadline_s must be 0"),
    ((*FEDBUFF, 'engine="flower"'), "runs on the simulator"),
    ((*FEDBUFF, 'algorithm={name="feddf"}'), "keeps several server models"),
    ((*FEDBUFF, 'algorithm={name="dkd"}'), "needs a server algorithm"),
    (('asynchronous.mode="later"',), "asynchronous.mode must be one of 'sync', 'fedbuff', got 'later'"),
    (('asynchronous.staleness="hinge"',), "asynchronous.staleness must be one of"),
])
def test_bad_async_input(tmp_path, digits_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        run(digits_cfg(*overrides), tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()
