"""train.precision: fp32 by default (bit-identity elsewhere), bf16 within tolerance, auto decided once."""

from __future__ import annotations

import json
import os
import sys

import pytest
import torch

from hetfl import precision
from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo, Split
from hetfl.engines.batched import train_group
from hetfl.errors import ConfigError
from hetfl.models import ModelRef
from hetfl.results import read_metrics
from hetfl.runner import run
from hetfl.train import evaluate, local_sgd

SMALL_CNN = 'model={name="cnn", conv1=4, conv2=8, fc=16}'


@pytest.fixture(autouse=True)
def fresh_cache():
    precision._CACHE.clear()
    yield
    precision._CACHE.clear()


def _data(n=64, shape=(1, 8, 8), classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randn((n, *shape), generator=g), torch.randint(classes, (n,), generator=g))


def test_default_is_fp32_and_bad_values_name_the_field(digits_cfg):
    assert TrainConfig().precision == "fp32"
    assert digits_cfg().train.precision == "fp32"
    with pytest.raises(ConfigError, match=r"train.precision must be one of 'fp32', 'auto', 'bf16', got 'fp16'"):
        digits_cfg('train.precision="fp16"')


@pytest.mark.parametrize("name,params", [("mlp", (("hidden", "32"),)),
                                         ("cnn", (("conv1", 4), ("conv2", 8), ("fc", 16)))])
def test_bf16_step_keeps_fp32_weights_and_tracks_fp32(name, params):
    """Autocast changes the arithmetic, not the master weights: parameters stay float32, and a few
    epochs of bf16 training land close to fp32's loss and weights."""
    info = DataInfo((1, 8, 8), 10)
    data = _data()
    ref = ModelRef(name, 1.0, params)
    torch.manual_seed(0)
    start = ref.build(info).state_dict()
    out = {}
    for prec in ("fp32", "bf16"):
        model = ref.build(info)
        model.load_state_dict(start)
        stats = local_sgd(model, data, TrainConfig(epochs=3, batch_size=16, lr=0.05, precision=prec), seed=1)
        assert all(p.dtype == torch.float32 for p in model.parameters())
        out[prec] = (stats.loss, torch.cat([p.detach().flatten() for p in model.parameters()]),
                     evaluate(model, data, precision=prec))
    (l32, w32, e32), (l16, w16, e16) = out["fp32"], out["bf16"]
    assert l16 == pytest.approx(l32, rel=0.05)
    assert not torch.equal(w16, w32)  # bf16 really ran
    assert (w16 - w32).norm() / w32.norm() < 0.02
    assert e16.loss == pytest.approx(e32.loss, rel=0.05)
    assert abs(e16.accuracy - e32.accuracy) <= 0.1


def test_batched_clients_honour_bf16():
    """The vmapped path autocasts like local_sgd: its bf16 result is near local_sgd's bf16 one, not fp32's
    bit pattern."""
    info = DataInfo((1, 8, 8), 10)
    data = _data(n=64)
    model = ModelRef("mlp", 1.0, (("hidden", "32"),)).build(info)
    w0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = [torch.arange(0, 32).numpy(), torch.arange(32, 64).numpy()]
    res = {}
    for prec in ("fp32", "bf16"):
        cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05, precision=prec)
        res[prec], _, _ = train_group(model, [w0, w0], data.x, data.y, idx, cfg, [3, 4])
    seq = ModelRef("mlp", 1.0, (("hidden", "32"),)).build(info)
    seq.load_state_dict(w0)
    local_sgd(seq, Split(data.x[:32], data.y[:32]), TrainConfig(epochs=2, batch_size=8, lr=0.05, precision="bf16"),
              seed=3)
    for n, p in seq.named_parameters():
        assert res["bf16"][0][n].dtype == torch.float32
        assert torch.allclose(res["bf16"][0][n], p.detach(), atol=2e-2), n
    assert any(not torch.equal(res["bf16"][0][n], res["fp32"][0][n]) for n in w0)


def test_auto_without_bf16_hardware_is_fp32(monkeypatch):
    monkeypatch.setattr(precision, "bf16_hardware", lambda device="cpu": (False, "no bf16 units (test)"))
    info = DataInfo((1, 8, 8), 10)
    choice = precision.choose(TrainConfig(precision="auto"), lambda: ModelRef("mlp").build(info),
                              torch.zeros(4, 1, 8, 8), 10, "cpu")
    assert (choice.precision, choice.memory_format) == ("fp32", "auto")
    assert "no bf16 units" in choice.reason


@pytest.mark.parametrize("bf16_ms,expect", [(9.5, ("fp32", "auto")), (5.0, ("bf16", "channels_last"))])
def test_auto_takes_bf16_only_when_measured_faster(monkeypatch, bf16_ms, expect):
    """A measured bf16 step must beat fp32 by the margin; the 4-D layout is chosen in the same measurement."""
    monkeypatch.setattr(precision, "bf16_hardware", lambda device="cpu": (True, "bf16 units (test)"))
    seen = []

    def fake_times(build, x, y, candidates, device):
        seen.append(candidates)
        return {("fp32", "auto"): 0.010, ("bf16", "contiguous"): 0.011, ("bf16", "channels_last"): bf16_ms / 1e3}

    monkeypatch.setattr(precision, "_step_times", fake_times)
    info = DataInfo((1, 8, 8), 10)
    ref = ModelRef("cnn", 1.0, (("conv1", 4), ("conv2", 8), ("fc", 16)))
    cfg = TrainConfig(precision="auto")
    choice = precision.choose(cfg, lambda: ref.build(info), torch.zeros(4, 1, 8, 8), 10, "cpu", key=ref)
    assert (choice.precision, choice.memory_format) == expect
    assert seen == [[("fp32", "auto"), ("bf16", "contiguous"), ("bf16", "channels_last")]]
    precision.choose(cfg, lambda: ref.build(info), torch.zeros(4, 1, 8, 8), 10, "cpu", key=ref)
    assert len(seen) == 1  # cached per (model, shape, device, ...)


def test_measuring_leaves_the_global_random_state_alone():
    info = DataInfo((1, 8, 8), 10)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    precision.choose(TrainConfig(precision="bf16"), lambda: ModelRef("cnn", 1.0, (("conv1", 4),)).build(info),
                     torch.zeros(4, 1, 8, 8), 10, "cpu")
    assert torch.equal(before, torch.get_rng_state())


def _summary(path):
    return json.loads((path / "summary.json").read_text())


def test_run_records_the_choice_and_resume_keeps_it(tmp_path, digits_cfg, monkeypatch):
    """auto is decided once at the run's start and recorded; a resumed run reuses the record instead of
    measuring again (a different answer on a busy machine must not change the rest of the run)."""
    monkeypatch.setattr(precision, "bf16_hardware", lambda device="cpu": (True, "bf16 units (test)"))
    calls = []

    def fake_times(build, x, y, candidates, device):
        calls.append(candidates)
        return {c: (0.010 if c[0] == "fp32" else 0.004 + 0.001 * (c[1] == "contiguous")) for c in candidates}

    monkeypatch.setattr(precision, "_step_times", fake_times)
    cfg = digits_cfg(SMALL_CNN, "train.precision=\"auto\"", "rounds=2")
    run(cfg.replace(rounds=1), tmp_path / "r", quiet=True)
    s = _summary(tmp_path / "r")
    assert (s["precision"], s["memory_format"]) == ("bf16", "channels_last")
    assert s["precision_step_ms"]["fp32/auto"] == 10.0
    config_text = (tmp_path / "r" / "config.toml").read_text()
    assert 'precision = "auto"' in config_text  # the config keeps what was asked; the summary what was chosen
    precision._CACHE.clear()
    monkeypatch.setattr(precision, "_step_times", lambda *a: pytest.fail("a resumed run must not measure again"))
    run(cfg, resume=tmp_path / "r", quiet=True)
    s = _summary(tmp_path / "r")
    assert (s["status"], s["precision"], s["memory_format"]) == ("complete", "bf16", "channels_last")


def test_fp32_runs_record_fp32_and_measure_nothing(tmp_path, digits_cfg, monkeypatch):
    monkeypatch.setattr(precision, "_step_times", lambda *a: pytest.fail("fp32 measures nothing"))
    run(digits_cfg("rounds=1"), tmp_path / "r", quiet=True)
    s = _summary(tmp_path / "r")
    assert (s["precision"], s["memory_format"]) == ("fp32", "auto")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="worker processes need fork (Linux)")
def test_workers_follow_the_runs_bf16(tmp_path, digits_cfg):
    """Worker processes receive the resolved precision with every task: the same bf16 result as in process
    (one thread each, as for the fp32 identity)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cfg = digits_cfg(SMALL_CNN, 'train.precision="bf16"', 'train.memory_format="contiguous"', "rounds=2")
        run(cfg.with_engine(workers=1), tmp_path / "seq", quiet=True)
        run(cfg.with_engine(workers=2), tmp_path / "par", quiet=True)
    finally:
        torch.set_num_threads(before)
    strip = [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in read_metrics(tmp_path / "seq")]
    assert strip == [{k: v for k, v in r.items() if not k.endswith("time_s")} for r in read_metrics(tmp_path / "par")]
    fp32 = tmp_path / "fp32"
    run(cfg.with_engine(workers=1).replace(train=TrainConfig(**{**cfg.train.__dict__, "precision": "fp32"})), fp32,
        quiet=True)
    assert read_metrics(fp32)[-1]["train_loss"] != read_metrics(tmp_path / "seq")[-1]["train_loss"]
    assert read_metrics(fp32)[-1]["train_loss"] == pytest.approx(read_metrics(tmp_path / "seq")[-1]["train_loss"],
                                                                rel=0.05)


def test_flower_task_carries_the_precision():
    pytest.importorskip("flwr")
    from hetfl.algorithms import ALGORITHMS
    from hetfl.algorithms.base import ClientTask
    from hetfl.flower.codec import decode_task, encode_task, run_record

    task = ClientTask(client_id=1, model=ModelRef("mlp"), weights={"w": torch.zeros(2)},
                      train=TrainConfig(precision="bf16", memory_format="channels_last"), seed=3)
    algo = ALGORITHMS.get("fedavg")(clients_per_round=3)
    back, _, _ = decode_task(encode_task(task, algo, run_record("rounds = 1\n")))
    assert (back.train.precision, back.train.memory_format) == ("bf16", "channels_last")


def test_local_sgd_outside_a_run_resolves_auto(monkeypatch):
    monkeypatch.setattr(precision, "bf16_hardware", lambda device="cpu": (False, "none (test)"))
    info = DataInfo((1, 8, 8), 10)
    model = ModelRef("mlp", 1.0, (("hidden", "16"),)).build(info)
    stats = local_sgd(model, _data(n=16), TrainConfig(batch_size=8, precision="auto"), seed=0)
    assert stats.steps == 2


@pytest.mark.skipif(os.environ.get("HETFL_SKIP_PROBE") == "1", reason="probe disabled")
def test_hardware_probe_answers():
    ok, why = precision.bf16_hardware("cpu")
    assert isinstance(ok, bool) and why
