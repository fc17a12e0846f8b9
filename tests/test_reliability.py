"""Reliability: fault injection (NaN, raising and straggling clients), validation, robust aggregation,
the time model, and crash safety (a run killed with SIGKILL resumes to the identical model)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hetfl.accounting import ModelCost
from hetfl.algorithms.base import ClientResult, ClientTask
from hetfl.algorithms.fedavg import FedAvg, average_weights
from hetfl.cli import main
from hetfl.config import TrainConfig
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.reliability import FaultsConfig
from hetfl.reliability.guard import ClientsFailedError, fault_summary
from hetfl.reliability.plan import dropout_draw, plan_round, planned_samples
from hetfl.reliability.validate import all_finite, validate_result
from hetfl.resolve import load_config
from hetfl.results import METRICS, RunDir, read_metrics, strip_timing
from hetfl.robust import robust_average, robust_reduce
from hetfl.runner import prepare, run
from hetfl.train import batch_indices

ROOT = Path(__file__).parents[1]
ALL5 = ("algorithm.clients_per_round=5",)  # digits_cfg has 5 clients: every round selects all of them


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models: one intra-op thread is as fast alone and far faster on a busy shared machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _setup(digits_cfg, *overrides):
    exp = prepare(digits_cfg(*ALL5, *overrides))
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    return exp, sim, exp.algorithm.init_state(exp.ctx)


def _honest(exp, sim, state, rnd=1):
    """Every client's honest result of round ``rnd`` (all 5 clients are selected)."""
    tasks = exp.algorithm.configure_round(state, rnd, np.arange(5), exp.ctx)
    return [sim.run_client(t) for t in tasks]


def _equal(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _corrupt(monkeypatch, bad_client, how):
    """Make client ``bad_client``'s local update misbehave (``how(result) -> result``, or raise)."""
    original = FedAvg.local_update
    calls = []

    def local_update(self, task, model, data, device):
        calls.append(task.client_id)
        res = original(self, task, model, data, device)
        return how(res) if task.client_id == bad_client else res

    monkeypatch.setattr(FedAvg, "local_update", local_update)
    return calls


# --------------------------------------------------------------------------------------------------
# fault injection: the round still aggregates exactly the good clients
# --------------------------------------------------------------------------------------------------


def test_nan_client_is_rejected_and_the_rest_aggregate_exactly(digits_cfg, monkeypatch):
    exp, sim, state = _setup(digits_cfg)
    honest = _honest(exp, sim, state)

    def nan(res):
        res.weights["fc1.weight"][0, 0] = float("nan")
        return res

    _corrupt(monkeypatch, 2, nan)
    new, report = sim.run_round(state, 1)
    expected, count, _ = average_weights(r for r in honest if r.client_id != 2)
    assert count == 4 and _equal(new.models["global"], expected)
    m = report.as_metrics()
    assert (m["clients_selected"], m["clients_reported"], m["rejected_invalid"], m["skipped"]) == (5, 4, 1, False)
    assert m["rejected"] == [{"client": 2, "reason": "fc1.weight has 1 non-finite value(s) (NaN/Inf) of 2048"}]
    assert report.clients == [0, 1, 3, 4] and any("client 2 rejected" in line for line in report.messages)


def test_raising_client_counts_as_failed_and_the_round_goes_on(digits_cfg, monkeypatch):
    exp, sim, state = _setup(digits_cfg)
    honest = _honest(exp, sim, state)

    def boom(res):
        raise RuntimeError("device lost its connection\nsecond line")

    _corrupt(monkeypatch, 4, boom)
    new, report = sim.run_round(state, 1)
    assert _equal(new.models["global"], average_weights(r for r in honest if r.client_id != 4)[0])
    m = report.as_metrics()
    assert (m["clients_reported"], m["dropped_failure"]) == (4, 1)
    assert m["failed"] == [{"client": 4, "reason": "RuntimeError: device lost its connection"}]

    # fail_fast re-raises; a round in which every client raised is a bug, not a fault
    exp, sim, state = _setup(digits_cfg, "faults.fail_fast=true")
    with pytest.raises(RuntimeError, match="lost its connection"):
        sim.run_round(state, 1)
    monkeypatch.setattr(FedAvg, "local_update", lambda *a: 1 / 0)
    exp, sim, state = _setup(digits_cfg)
    with pytest.raises(ClientsFailedError, match="every client that trained") as err:
        sim.run_round(state, 1)
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_stragglers_miss_the_deadline_without_training(digits_cfg, monkeypatch):
    # tiers a-e: clients 0-1 at width 1 (speed 1), clients 2-4 at 1/16 (speed 1/256); 1 MFLOP/s devices:
    # the fast ones need a few seconds, the slow ones ~15 minutes, the deadline is 60 s
    exp, sim, state = _setup(digits_cfg, 'fleet={source="tiers", mix="a-e"}', "faults.device_gflops=0.001",
                             "faults.deadline_s=60")
    honest = _honest(exp, sim, state)
    tasks = exp.algorithm.configure_round(state, 1, np.arange(5), exp.ctx)
    plan = plan_round(tasks, 1, exp.ctx, exp.ctx.faults, sim.round.guard.costs.for_tasks(tasks))
    times = [p.time_s for p in plan.clients]
    assert max(times[:2]) < 60 < min(times[2:]) and [p.drop for p in plan.clients] == [None] * 2 + ["deadline"] * 3
    calls = _corrupt(monkeypatch, -1, lambda r: r)
    new, report = sim.run_round(state, 1)
    assert calls == [0, 1]  # the stragglers were never trained: their updates would be discarded
    assert _equal(new.models["global"], average_weights(honest[:2])[0])
    m = report.as_metrics()
    assert (m["dropped_deadline"], m["clients_reported"], m["round_sim_time_s"]) == (3, 2, 60.0)
    assert (m["participation.tier0"], m["participation.tier1"]) == (1.0, 0.0)
    assert (m["tier_selected"], m["tier_reported"]) == ([2, 3], [2, 0])
    assert any("tier 1 (width 0.0625) misses the faults.deadline_s=60 deadline" in line for line in report.messages)

    # with faults.min_clients=3 the plan already leaves too few clients: nobody trains, the model stays
    exp, sim, state = _setup(digits_cfg, 'fleet={source="tiers", mix="a-e"}', "faults.device_gflops=0.001",
                             "faults.deadline_s=60", "faults.min_clients=3")
    calls.clear()
    new, report = sim.run_round(state, 1)
    assert calls == [] and report.as_metrics()["skipped"] and new.models is state.models and new.round == 1


def test_too_few_reports_skip_the_round_and_keep_the_model(tmp_path, digits_cfg, monkeypatch, capsys):
    def nan(res):
        res.weights["out.bias"][:] = float("inf")
        return res

    _corrupt(monkeypatch, 3, nan)
    cfg = digits_cfg(*ALL5, "faults.min_clients=5", "rounds=2")
    summary = run(cfg, tmp_path / "r", quiet=False)
    console = " ".join(capsys.readouterr().err.split())  # the console may wrap long lines
    assert "round 2: client 3 rejected: out.bias has 10 non-finite value(s)" in console
    assert "round 1: skipped: 4 of 5 clients reported, fewer than faults.min_clients=5" in console
    rows = read_metrics(tmp_path / "r")
    assert [r["skipped"] for r in rows] == [True, True] and all(r["rejected_invalid"] == 1 for r in rows)
    exp = prepare(cfg)
    init = exp.algorithm.init_state(exp.ctx).models["global"]
    final = torch.load(tmp_path / "r" / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
    assert _equal(final, init)
    assert summary["rounds_skipped"] == 2 and summary["status"] == "complete"
    assert summary["participation_by_tier"] == {"tier0": 0.8}


def test_norm_bound_and_median_resist_a_scaled_update(digits_cfg, monkeypatch):
    def scaled(res):
        res.weights = {k: v * 1000 if v.is_floating_point() else v for k, v in res.weights.items()}
        return res

    exp, sim, state = _setup(digits_cfg, "faults.max_update_ratio=10")
    honest = _honest(exp, sim, state)
    _corrupt(monkeypatch, 1, scaled)
    new, report = sim.run_round(state, 1)
    assert "above faults.max_update_ratio=10" in report.as_metrics()["rejected"][0]["reason"]
    assert _equal(new.models["global"], average_weights(r for r in honest if r.client_id != 1)[0])

    exp, sim, state = _setup(digits_cfg, 'algorithm.aggregator="median"')
    new, report = sim.run_round(state, 1)
    attacked = _honest(exp, sim, state)  # the same tasks as above, client 1 still scaled by the patch
    assert report.as_metrics()["clients_reported"] == 5
    assert _equal(new.models["global"], robust_average([r.weights for r in attacked], "median"))
    honest_mean = average_weights(honest)[0]
    assert max(float((new.models["global"][k] - honest_mean[k]).abs().max()) for k in honest_mean) < 0.5


# --------------------------------------------------------------------------------------------------
# validation, robust reducers, time model
# --------------------------------------------------------------------------------------------------


def _task_and_result():
    w = {"a.weight": torch.ones(3, 2), "a.bias": torch.zeros(3), "bn.count": torch.tensor(4)}
    task = ClientTask(7, None, w, TrainConfig(), seed=0)
    return task, ClientResult(7, 10, {k: v.clone() for k, v in w.items()})


@pytest.mark.parametrize(
    "corrupt, faults, reason",
    [
        (lambda r: None, {}, None),
        (lambda r: r.weights.__setitem__("a.weight", torch.ones(2, 3)), {},
         "a.weight has shape (2, 3) but the task sent (3, 2)"),
        (lambda r: r.weights.__setitem__("a.bias", torch.zeros(3, dtype=torch.float64)), {},
         "a.bias has dtype torch.float64 but the task sent torch.float32"),
        (lambda r: r.weights.pop("a.bias"), {}, "missing weights a.bias"),
        (lambda r: r.weights.__setitem__("x", torch.zeros(1)), {}, "unexpected weights x"),
        (lambda r: r.weights["a.bias"].__setitem__(1, float("inf")), {}, "a.bias has 1 non-finite value(s)"),
        (lambda r: r.weights.__setitem__("a.bias", [0.0, 0.0, 0.0]), {}, "a.bias is a list, not a tensor"),
        (lambda r: setattr(r, "client_id", 8), {}, "answered for client 8 instead of 7"),
        (lambda r: setattr(r, "num_samples", -1), {}, "num_samples must be an integer >= 0"),
        (lambda r: r.weights["a.bias"].fill_(3.0), {"max_update_norm": 5.3}, None),  # norm sqrt(27) = 5.196
        (lambda r: r.weights["a.bias"].fill_(3.0), {"max_update_norm": 5.1}, "update norm 5.196 exceeds"),
        (lambda r: r.weights["a.bias"].fill_(3.0), {"max_update_ratio": 2.0}, "2.121 × the task's weight norm"),
    ],
)
def test_validate_result(corrupt, faults, reason):
    task, res = _task_and_result()
    corrupt(res)
    got = validate_result(task, res, FaultsConfig(**faults))
    assert got == reason if reason is None else reason in got


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.complex64])
def test_all_finite_agrees_with_isfinite(dtype):
    big = torch.finfo(dtype if not dtype.is_complex else torch.float32).max
    inf, nan = float("inf"), float("nan")
    cases = [[], torch.randn(1000).tolist(), [big] * 50,  # the sum of the last one overflows
             [big, -big, big], [1.0, nan], [inf], [inf, -inf], [-inf, 2.0, 3.0]]
    for case in cases:
        value = torch.tensor(case, dtype=dtype)
        assert all_finite(value) == bool(torch.isfinite(value).all()), (dtype, case)
        assert all_finite(value.view(-1, 1)[::2]) == bool(torch.isfinite(value[::2]).all())  # non-contiguous


def test_robust_reduce_matches_numpy_and_respects_partial_overlap():
    gen = torch.Generator().manual_seed(0)
    vals = torch.randn(7, 4, 5, generator=gen)
    med, cov = robust_reduce(vals, None, "median")
    assert cov.all() and torch.allclose(med, torch.from_numpy(np.median(vals.numpy(), axis=0)))
    trimmed, _ = robust_reduce(vals, None, "trimmed_mean", 0.2)  # k=7: drop 1 from each end
    s = np.sort(vals.numpy(), axis=0)[1:-1].mean(axis=0)
    assert torch.allclose(trimmed, torch.from_numpy(s))

    # width-sliced clients: client i covers the first (i + 1) rows; row 3+ covered by nobody
    mask = torch.zeros(3, 5, 2, dtype=torch.bool)
    for i in range(3):
        mask[i, : i + 1] = True
    vals = torch.arange(30, dtype=torch.float32).view(3, 5, 2) * torch.tensor([1.0, -1.0, 100.0]).view(3, 1, 1)
    vals[~mask] = float("nan")  # whatever an uncovered entry holds is ignored
    med, cov = robust_reduce(vals, mask, "median")
    assert cov[:, 0].tolist() == [True, True, True, False, False]
    v = vals.numpy()
    assert med[0].tolist() == np.median(v[:, 0], axis=0).tolist()  # 3 clients
    assert med[1].tolist() == ((v[1, 1] + v[2, 1]) / 2).tolist()  # 2 clients: mean of the middle two
    assert med[2].tolist() == v[2, 2].tolist() and med[3:].eq(0).all()
    ints, _ = robust_reduce(torch.tensor([[1], [2], [4], [9]]), None, "median")
    assert ints.dtype == torch.int64 and ints.tolist() == [3]
    with pytest.raises(ConfigError, match="algorithm.aggregator must be one of 'mean', 'median', 'trimmed_mean'"):
        FedAvg(aggregator="mode")


def test_time_model_and_dropout_are_pure_functions(digits_cfg):
    exp = prepare(digits_cfg(*ALL5, 'fleet={source="tiers", mix="a-b"}', "faults.dropout=0.4",
                             "faults.deadline_s=0.5", "train.steps=7", "train.epochs=0"))
    ctx, fleet = exp.ctx, exp.ctx.fleet
    tasks = exp.algorithm.configure_round(exp.algorithm.init_state(ctx), 3, np.arange(5), ctx)
    cost = ModelCost(params=1000, forward_flops=5_000_000, activation_bytes=100)
    plan = plan_round(tasks, 3, ctx, ctx.faults, {ctx.model: cost})
    for p, task in zip(plan.clients, tasks):
        c = task.client_id
        n = int(ctx.client_sizes[c])
        assert p.samples == planned_samples(n, task.train) == sum(len(b) for b in batch_indices(
            n, task.train.batch_size, 0, 7, torch.Generator().manual_seed(0)))
        assert p.flops == 3 * 5_000_000 * p.samples
        assert p.compute_s == pytest.approx(p.flops / (fleet.speed[c] * 10e9))
        size = sum(t.numel() * t.element_size() for t in task.weights.values())
        assert p.comm_s == pytest.approx(2 * size * 8 / (fleet.bandwidth_mbps[c] * 1e6))
        dropped = dropout_draw(ctx.seed, 3, c) < 0.4
        assert p.drop == ("dropout" if dropped else "deadline" if p.time_s > 0.5 else None)
    assert plan_round(tasks[::-1], 3, ctx, ctx.faults, {ctx.model: cost}).clients == plan.clients[::-1]
    rate = np.mean([dropout_draw(0, r, c) < 0.4 for r in range(50) for c in range(100)])
    assert abs(rate - 0.4) < 0.03
    assert planned_samples(23, TrainConfig(epochs=2, batch_size=10)) == 46


def test_fault_summary_totals():
    rows = [{"clients_selected": 4, "clients_reported": 3, "dropped_failure": 1, "dropped_deadline": 0,
             "rejected_invalid": 0, "round_sim_time_s": 1.5, "skipped": False, "tier_selected": [2, 2],
             "tier_reported": [2, 1]},
            {"clients_selected": 4, "clients_reported": 0, "dropped_failure": 0, "dropped_deadline": 4,
             "rejected_invalid": 0, "round_sim_time_s": 2.0, "skipped": True, "tier_selected": [1, 3],
             "tier_reported": [0, 0]}]
    s = fault_summary(rows)
    assert s["rounds_skipped"] == 1 and s["sim_time_s"] == 3.5 and s["clients_reported"] == 3
    assert s["participation_by_tier"] == {"tier0": pytest.approx(2 / 3), "tier1": 0.2}
    assert fault_summary([{"round": 1}]) == {}


# --------------------------------------------------------------------------------------------------
# crash safety
# --------------------------------------------------------------------------------------------------


def test_torn_metrics_line_and_stale_temp_files_are_dropped_on_resume(tmp_path, digits_cfg):
    cfg = digits_cfg("rounds=3")
    run(cfg, tmp_path / "full", quiet=True)
    run(digits_cfg("rounds=2"), tmp_path / "cut", quiet=True)
    with open(tmp_path / "cut" / METRICS, "a") as f:  # a crash in the middle of writing round 3's line
        f.write('{"round":3,"clients":3,"train_lo')
    (tmp_path / "cut" / ".checkpoint.pt.abc123.tmp").write_bytes(b"half a checkpoint")
    assert len(read_metrics(tmp_path / "cut")) == 2
    summary = run(cfg, resume=tmp_path / "cut", quiet=True)
    assert summary["status"] == "complete" and not list((tmp_path / "cut").glob(".*.tmp"))
    assert strip_timing(read_metrics(tmp_path / "cut")) == strip_timing(read_metrics(tmp_path / "full"))
    assert (tmp_path / "cut" / METRICS).read_text().endswith("}\n")


def test_long_metrics_lines_are_one_write(tmp_path, monkeypatch):
    writes = []
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: writes.append(len(data)) or real_write(fd, data))
    rd = RunDir(tmp_path)
    rd.append_metrics({"round": 1, "rejected": [{"client": i, "reason": "x" * 50} for i in range(500)]})
    assert len(writes) == 1 and writes[0] > 30000
    assert read_metrics(tmp_path)[0]["rejected"][499]["client"] == 499


def _wait_rows(path: Path, proc: subprocess.Popen, n: int, timeout: float = 60.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        rows = len(read_metrics(path)) if (path / METRICS).exists() else 0
        if rows >= n or proc.poll() is not None:
            return rows
        time.sleep(0.005)
    raise AssertionError(f"no {n} rows in {path} after {timeout} s")


def test_sigkill_mid_round_then_resume_equals_uninterrupted(tmp_path):
    """kill -9 a `python -m hetfl run` as soon as it has logged 2 rounds (so mid-round 3 or later), resume
    it with `hetfl run --resume`, and compare with an uninterrupted run: identical weights and metrics."""
    config = str(ROOT / "configs/digits_fedavg.toml")
    sets = ["rounds=20", "checkpoint_every=1", "faults.dropout=0.2", "data.num_clients=4", "train.batch_size=32",
            "algorithm.clients_per_round=4"]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}  # as in this process
    cut = tmp_path / "cut"
    cmd = [sys.executable, "-m", "hetfl", "run", config, *[x for s in sets for x in ("--set", s)], "--out", str(cut),
           "--quiet"]
    proc = subprocess.Popen(cmd, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        rows = _wait_rows(cut, proc, 2)
        alive = proc.poll() is None
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        _, err = proc.communicate(timeout=30)
    assert alive and rows >= 2, f"the run ended before it could be killed: {err.decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    text = (cut / METRICS).read_text()
    assert text.endswith("\n") and all(json.loads(line) for line in text.splitlines())  # no torn line
    assert json.loads((cut / "summary.json").read_text())["status"] == "running"  # never "complete"
    killed_at = len(text.splitlines())

    assert main(["run", "--resume", str(cut), "--quiet"]) == 0
    full = run(load_config(config, sets), tmp_path / "full", quiet=True)
    summary = json.loads((cut / "summary.json").read_text())
    assert summary["status"] == full["status"] == "complete" and summary["rounds_completed"] == 20
    a = torch.load(cut / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
    b = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
    assert _equal(a, b)
    assert strip_timing(read_metrics(cut)) == strip_timing(read_metrics(tmp_path / "full"))
    print(f"killed after {killed_at} logged rounds; resumed to 20; {len(a)} tensors equal")


def test_cli_reports_participation_per_tier(tmp_path, capsys):
    sets = ["rounds=2", "data.num_clients=5", "algorithm.clients_per_round=5", "eval.local=false",
            'fleet={source="tiers", mix="a-e"}', "faults.device_gflops=0.01", "faults.deadline_s=60"]
    args = ["run", str(ROOT / "configs/digits_fedavg.toml"), "--out", str(tmp_path / "r"), "--quiet"]
    assert main([*args, *[x for s in sets for x in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    assert "participation tier0=1.00 tier1=0.00  rounds_skipped=0  rejected_invalid=0" in out
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["dropped_deadline"] == 6 and summary["participation_by_tier"] == {"tier0": 1.0, "tier1": 0.0}
