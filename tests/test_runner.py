"""End to end through the runner: determinism, resume, accuracy, bad input leaves nothing behind."""

from __future__ import annotations

import json

import pytest
import torch

from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError, DataError, HetflError
from hetfl.resolve import load_config
from hetfl.results import read_metrics, strip_timing
from hetfl.runner import run, run_or_resume


def _final_weights(run_dir):
    ckpt = torch.load(run_dir / "checkpoint.pt", weights_only=True)
    return ckpt["state"]["models"]["global"]


def test_same_seed_same_metrics(tmp_path, digits_cfg):
    cfg = digits_cfg()
    run(cfg, tmp_path / "a", quiet=True)
    run(cfg, tmp_path / "b", quiet=True)
    a, b = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert len(a) == cfg.rounds
    assert strip_timing(a) == strip_timing(b)
    run(digits_cfg("seed=1"), tmp_path / "c", quiet=True)
    assert strip_timing(read_metrics(tmp_path / "c")) != strip_timing(a)


def test_rounds_report_server_time_and_state_size(tmp_path, digits_cfg):
    """Every round states the server's own time and the bytes it keeps: for FedAvg, exactly the model."""
    run(digits_cfg(), tmp_path / "a", quiet=True)
    weights = _final_weights(tmp_path / "a")
    model_bytes = sum(t.numel() * t.element_size() for t in weights.values())
    for row in read_metrics(tmp_path / "a"):
        assert row["server_state_bytes"] == model_bytes
        assert 0.0 <= row["server_time_s"] <= row["round_time_s"]


def test_resume_after_interrupt_equals_uninterrupted(tmp_path, digits_cfg, monkeypatch):
    cfg = digits_cfg("rounds=5", "checkpoint_every=2")
    run(cfg, tmp_path / "full", quiet=True)

    original = Simulator.run_round

    def crash_at_4(self, state, rnd):
        if rnd == 4:
            raise KeyboardInterrupt
        return original(self, state, rnd)

    monkeypatch.setattr(Simulator, "run_round", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", quiet=True)
    assert json.loads((tmp_path / "cut" / "summary.json").read_text())["status"] == "interrupted"
    assert len(read_metrics(tmp_path / "cut")) == 3  # rounds 1-3 logged, checkpoint at round 2
    monkeypatch.setattr(Simulator, "run_round", original)

    summary = run(None, resume=tmp_path / "cut", quiet=True)
    assert summary["status"] == "complete" and summary["rounds_completed"] == 5
    assert strip_timing(read_metrics(tmp_path / "cut")) == strip_timing(read_metrics(tmp_path / "full"))
    full, cut = _final_weights(tmp_path / "full"), _final_weights(tmp_path / "cut")
    assert all(torch.equal(full[k], cut[k]) for k in full)


def test_resume_can_extend_rounds(tmp_path, digits_cfg):
    run(digits_cfg("rounds=2"), tmp_path / "r", quiet=True)
    summary = run(digits_cfg("rounds=4"), resume=tmp_path / "r", quiet=True)
    assert summary["rounds_completed"] == 4
    with pytest.raises(ConfigError, match="only rounds"):
        run(digits_cfg("rounds=4", "train.lr=0.5"), resume=tmp_path / "r", quiet=True)


def test_run_or_resume_reuses_extends_or_starts(tmp_path, digits_cfg):
    out = tmp_path / "r"
    assert run_or_resume(digits_cfg("rounds=2"), out) == "done"
    assert run_or_resume(digits_cfg("rounds=2"), out) == "reused"
    assert run_or_resume(digits_cfg("rounds=3"), out) == "resumed"
    assert len(read_metrics(out)) == 3


def test_digits_fedavg_reaches_90_percent(tmp_path):
    cfg = load_config("configs/digits_fedavg.toml")
    summary = run(cfg, tmp_path / "run", quiet=True)
    assert summary["test_accuracy"] >= 0.90, summary  # ~3 s on an idle 2-core machine (README); not timed here
    row = read_metrics(tmp_path / "run")[-1]
    for key in ("client_acc_mean", "client_acc_p10", "client_acc_worst10", "bytes_up", "bytes_down",
                "train_loss", "time_s"):
        assert key in row
    for key in ("rounds_completed", "test_accuracy", "best_test_accuracy", "wall_time_s"):
        assert key in summary


@pytest.mark.parametrize(
    "overrides, error, message",
    [
        (["data.num_clients=5000"], ConfigError, "data.num_clients=5000 exceeds the"),
        (['data.name="mnist"', 'data.data_dir="/nonexistent/hetfl-data"'], DataError, "/nonexistent/hetfl-data"),
        (['model={name="lstm"}'], ConfigError, "token"),
        (['data.partition={name="natural"}'], ConfigError, "natural groups"),
    ],
)
def test_bad_input_fails_before_writing(tmp_path, digits_cfg, overrides, error, message):
    out = tmp_path / "run"
    with pytest.raises(error) as err:
        run(digits_cfg(*overrides), out, quiet=True)
    assert message in str(err.value)
    assert not out.exists()


def test_existing_out_dir_is_not_clobbered(tmp_path, digits_cfg):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(HetflError, match="already exists and is not empty"):
        run(digits_cfg(), out, quiet=True)
    assert (out / "keep.txt").read_text() == "x"
