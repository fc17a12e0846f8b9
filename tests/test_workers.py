"""Client-parallel worker processes: equal to the in-process loop bit for bit, robust to dying workers."""

from __future__ import annotations

import glob
import os
import time
from dataclasses import dataclass

import pytest
import torch

from hetfl.algorithms.fedavg import FedAvg
from hetfl.cli import main
from hetfl.engines import SERVER_ENGINES
from hetfl.engines.pool import WorkerDiedError
from hetfl.engines.session import open_session
from hetfl.engines.simulator import Simulator
from hetfl.engines.workers import ParallelSimulator, resolve_workers
from hetfl.errors import ConfigError
from hetfl.resolve import load_config
from hetfl.results import read_metrics
from hetfl.runner import prepare, run

pytestmark = pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="worker processes need fork (Linux)")

HETERO = ('algorithm={name="heterofl", clients_per_round=5}', 'fleet.source="tiers"', 'fleet.mix="a-b-e"',
          "data.num_clients=6", 'model={name="heterofl_conv", hidden="8,16"}')


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped) counts as gone
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _comparable(rows):
    return [{k: v for k, v in r.items() if not k.endswith("time_s") or k == "round_sim_time_s"} for r in rows]


def _final_weights(path):
    return torch.load(path / "checkpoint.pt", weights_only=True)["state"]["models"]


# every client the same batch schedule (3 steps of 16): the round's clients form batched chunks
BATCHED = ("batched=true", "train.steps=3", "data.num_clients=20", "algorithm.clients_per_round=19",
           'data.partition={name="iid"}')


@pytest.mark.parametrize("extra", [(), HETERO, BATCHED], ids=["fedavg", "heterofl", "fedavg-batched"])
def test_workers_equal_sequential_bit_for_bit(tmp_path, digits_cfg, one_thread, extra):
    """Workers train the same clients (and the same batched chunks, each chunk in one worker) as the
    in-process engine: equal metrics and weights, bit for bit."""
    cfg = digits_cfg(*extra, "rounds=2")
    run(cfg.with_engine(workers=1), tmp_path / "seq", quiet=True)
    run(cfg.with_engine(workers=2), tmp_path / "par", quiet=True)
    assert _comparable(read_metrics(tmp_path / "seq")) == _comparable(read_metrics(tmp_path / "par"))
    seq, par = _final_weights(tmp_path / "seq"), _final_weights(tmp_path / "par")
    assert seq.keys() == par.keys()
    for name in seq:
        for k in seq[name]:
            assert torch.equal(seq[name][k], par[name][k]), (name, k)


def test_resume_may_change_workers(tmp_path, digits_cfg, one_thread):
    cfg = digits_cfg("rounds=2")
    run(cfg.with_engine(workers=1), tmp_path / "seq", quiet=True)
    run(cfg.replace(rounds=1).with_engine(workers=1), tmp_path / "res", quiet=True)
    run(cfg.with_engine(workers=2, threads_per_worker=1), resume=tmp_path / "res", quiet=True)
    assert _comparable(read_metrics(tmp_path / "seq")) == _comparable(read_metrics(tmp_path / "res"))


FEDDF = ('algorithm={name="feddf", clients_per_round=6, families="cnn, cnn@0.5, mlp(hidden=16)", '
         'server_data_size=120, server_val_size=40, distill_steps=4, distill_batch=32}',
         'model={name="cnn", conv1=4, conv2=8, fc=16}', 'fleet.source="tiers"', 'fleet.mix="a-b-c"',
         "data.num_clients=6")


@pytest.mark.parametrize("overrides", [('algorithm={name="fedgen", clients_per_round=3}',), FEDDF,
                                       ('algorithm={name="fjord", clients_per_round=5}', *HETERO[1:])],
                         ids=["fedgen", "feddf", "fjord"])
def test_algorithms_with_client_extras_equal_sequential(digits_cfg, one_thread, overrides):
    """Task/result ``extra`` (FedGen's generator and label counts, FjORD's widths) travel with the control
    messages, FedDF's clients train different architectures; the outcome is the in-process one."""
    exp = prepare(digits_cfg(*overrides))
    seq = Simulator(exp.algorithm, exp.federation, exp.ctx)
    par = ParallelSimulator(exp.algorithm, exp.federation, exp.ctx, workers=2)
    try:
        states = []
        for sim in (seq, par):
            state = exp.algorithm.init_state(exp.ctx)
            for rnd in (1, 2):
                state, report = sim.run_round(state, rnd)
                assert report.faults["clients_reported"] == report.faults["clients_selected"]
            states.append(state)
    finally:
        par.close()
    for name in states[0].models:
        for k, v in states[0].models[name].items():
            assert torch.equal(v, states[1].models[name][k]), (name, k)


# ------------------------------------------------------------------------------ failures


@dataclass(frozen=True)
class Faulty(FedAvg):
    """FedAvg whose client ``victim`` raises, exits its process, or stalls (the first ``times`` tries)."""

    victim: int = -1
    how: str = "raise"
    marker: str = ""
    times: int = 1

    def local_update(self, task, model, data, device):
        if task.client_id == self.victim:
            tries = len(glob.glob(self.marker + ".*"))
            if tries < self.times:
                open(f"{self.marker}.{tries}", "w").close()
                if self.how == "raise":
                    raise ValueError(f"client {task.client_id} broke")
                if self.how == "exit":
                    os._exit(3)
                if self.how == "stall":
                    time.sleep(60)
        return super().local_update(task, model, data, device)


def _faulty(digits_cfg, tmp_path, how, times=1, **kw):
    """8 clients on 2 workers: the victim (the 2nd task) runs on worker 1 with another task queued behind it."""
    exp = prepare(digits_cfg("data.num_clients=8", "algorithm.clients_per_round=8"))
    victim = 1
    algo = Faulty(clients_per_round=8, victim=victim, how=how, marker=str(tmp_path / "m"), times=times)
    return exp, algo, algo.init_state(exp.ctx), victim


def test_client_exception_is_a_failure_and_the_worker_survives(tmp_path, digits_cfg):
    exp, algo, state, victim = _faulty(digits_cfg, tmp_path, "raise", times=10)
    sim = ParallelSimulator(algo, exp.federation, exp.ctx, workers=2)
    try:
        pids = sim.pool.pids
        _, report = sim.run_round(state, 1)
        assert report.faults["dropped_failure"] == 1 and report.faults["clients_reported"] == 7
        assert report.faults["failed"] == [{"client": victim, "reason": f"ValueError: client {victim} broke"}]
        assert "worker_restarts" not in report.faults
        assert sim.pool.pids == pids  # nobody died
    finally:
        sim.close()


def test_dead_worker_is_restarted_and_its_client_retried(tmp_path, digits_cfg, one_thread):
    exp, algo, state, victim = _faulty(digits_cfg, tmp_path, "exit", times=1)
    sim = ParallelSimulator(algo, exp.federation, exp.ctx, workers=2)
    try:
        old = sim.pool.pids
        got, report = sim.run_round(state, 1)
        assert report.faults["worker_restarts"] == 1
        assert report.faults["clients_reported"] == 8 and report.faults["dropped_failure"] == 0
        assert any("died (exit code 3) while training client" in m and "retried" in m for m in report.messages)
        assert len(set(old) - set(sim.pool.pids)) == 1 and not any(_alive(p) for p in set(old) - set(sim.pool.pids))
        _, again = sim.run_round(got, 2)  # the replacement works
        assert again.faults["clients_reported"] == 8 and "worker_restarts" not in again.faults
    finally:
        sim.close()
    # the retried client gave the same update: the round equals an undisturbed in-process round
    _assert_equals_in_process_round(exp, state, got)


def test_client_that_kills_its_worker_twice_is_dropped(tmp_path, digits_cfg):
    exp, algo, state, victim = _faulty(digits_cfg, tmp_path, "exit", times=2)
    sim = ParallelSimulator(algo, exp.federation, exp.ctx, workers=2)
    try:
        _, report = sim.run_round(state, 1)
    finally:
        sim.close()
    assert report.faults["worker_restarts"] == 2
    assert report.faults["dropped_failure"] == 1 and report.faults["clients_reported"] == 7
    assert report.faults["failed"][0]["client"] == victim
    assert report.faults["failed"][0]["reason"].startswith(WorkerDiedError.__name__)


def test_stalled_worker_times_out(tmp_path, digits_cfg):
    exp, algo, state, victim = _faulty(digits_cfg, tmp_path, "stall", times=1)
    sim = ParallelSimulator(algo, exp.federation, exp.ctx, workers=2, timeout_s=1.0)
    try:
        t0 = time.monotonic()
        _, report = sim.run_round(state, 1)
        assert time.monotonic() - t0 < 30
    finally:
        sim.close()
    assert report.faults["worker_restarts"] == 1 and report.faults["clients_reported"] == 8
    assert any("worker_timeout_s=1" in m for m in report.messages)


def test_close_leaves_no_processes_and_no_shared_files(digits_cfg):
    exp = prepare(digits_cfg(*HETERO))
    before = set(glob.glob("/dev/shm/hetfl-w-*"))
    sim = ParallelSimulator(exp.algorithm, exp.federation, exp.ctx, workers=2)
    pids = sim.pool.pids
    state = exp.algorithm.init_state(exp.ctx)
    sim.run_round(state, 1)
    assert set(glob.glob("/dev/shm/hetfl-w-*")) == before  # unlinked as soon as both sides mapped them
    sim.close()
    sim.close()  # idempotent
    assert not any(_alive(p) for p in pids)


def test_runner_closes_workers_when_a_run_fails(tmp_path, digits_cfg, monkeypatch):
    started = []
    orig = ParallelSimulator.__init__

    def spy(self, *a, **kw):
        orig(self, *a, **kw)
        started.extend(self.pool.pids)

    monkeypatch.setattr(ParallelSimulator, "__init__", spy)
    monkeypatch.setattr("hetfl.evaluation.Evaluator.__call__", lambda *a, **k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        run(digits_cfg("workers=2"), tmp_path / "r", quiet=True)
    assert len(started) == 2 and not any(_alive(p) for p in started)


def test_threads_per_worker_above_one_uses_a_clean_start(digits_cfg):
    """More than one OpenMP thread in a forked child can hang; those workers come from forkserver."""
    exp = prepare(digits_cfg())
    sim = ParallelSimulator(exp.algorithm, exp.federation, exp.ctx, workers=2, threads_per_worker=2)
    try:
        assert sim.pool.method == "forkserver"
        _, report = sim.run_round(exp.algorithm.init_state(exp.ctx), 1)
        assert report.faults["clients_reported"] == 3
    finally:
        sim.close()


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("override, message", [
    ("workers=-1", "workers must be"),
    ('workers="many"', "workers must be int or one of 'auto'"),
    ("threads_per_worker=0", "threads_per_worker must be >= 1"),
    ("worker_timeout_s=-1", "worker_timeout_s must be >= 0"),
    ('engine="flower"', "applies to engine 'simulator'"),
])
def test_bad_worker_settings_name_the_field(digits_cfg, override, message):
    overrides = [override] + (["workers=2"] if "engine" in override else [])
    with pytest.raises(ConfigError, match=message):
        digits_cfg(*overrides)


def test_cuda_with_workers_is_refused(digits_cfg):
    with pytest.raises(ConfigError, match="train on the CPU"):
        digits_cfg("workers=2", 'device="cuda"')


def test_auto_rule(digits_cfg, monkeypatch):
    exp = prepare(digits_cfg())
    cpu = torch.device("cpu")
    monkeypatch.setattr("hetfl.engines.workers.available_cores", lambda: 8)
    n, why = resolve_workers("auto", 1, exp.algorithm, exp.ctx, cpu)
    assert n == 1 and "too little" in why  # a tiny digits round: processes would not pay
    big = prepare(digits_cfg('model={name="cnn"}', "train.epochs=5", "algorithm.clients_per_round=5"))
    assert resolve_workers("auto", 1, big.algorithm, big.ctx, cpu)[0] == 5  # capped by clients per round
    assert resolve_workers(0, 2, big.algorithm, big.ctx, cpu)[0] == 4  # 8 cores / 2 threads
    assert resolve_workers("auto", 1, big.algorithm, big.ctx, torch.device("cuda"))[0] == 1
    monkeypatch.setattr("hetfl.engines.workers.available_cores", lambda: 1)
    assert resolve_workers("auto", 1, big.algorithm, big.ctx, cpu)[0] == 1
    assert resolve_workers(3, 1, exp.algorithm, exp.ctx, cpu)[0] == 3  # explicit: as asked (<= clients)


def test_engine_factory_picks_in_process_or_workers(digits_cfg):
    cfg = digits_cfg()
    exp = prepare(cfg)
    simulator = SERVER_ENGINES.get("simulator")
    engine = simulator(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg.with_engine(workers=1))
    assert type(engine) is Simulator
    engine = simulator(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg.with_engine(workers=2))
    try:
        assert isinstance(engine, ParallelSimulator) and engine.pool.size == 2
    finally:
        engine.close()


def test_cli_workers_flag(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text(load_config(None, ("rounds=1", "data.num_clients=4"), base={}).to_toml())
    assert main(["run", str(cfg), "--workers", "2", "--threads-per-worker", "1", "--out", str(tmp_path / "r"),
                 "--quiet"]) == 0
    saved = (tmp_path / "r" / "config.toml").read_text()
    assert "workers = 2" in saved and "threads_per_worker = 1" in saved
    assert main(["run", str(cfg), "--workers", "lots", "--out", str(tmp_path / "bad")]) == 2
    assert "workers" in capsys.readouterr().err


def test_interrupted_round_stops_busy_workers_and_the_next_round_restarts_them(tmp_path, digits_cfg, one_thread):
    exp, algo, state, victim = _faulty(digits_cfg, tmp_path, "stall", times=1)
    sim = ParallelSimulator(algo, exp.federation, exp.ctx, workers=2)
    try:
        with pytest.raises(KeyboardInterrupt), open_session(sim.pool) as session:
            for task in exp.algorithm.configure_round(state, 1, list(range(8)), exp.ctx):
                session.submit(task)
            session.next_result()  # one client is done; client 1 stalls for a minute
            t0 = time.monotonic()
            raise KeyboardInterrupt
        assert time.monotonic() - t0 < 10  # no waiting for the stalled client
        got, report = sim.run_round(state, 1)  # the victim's stall was used up: a clean round
        assert report.faults["clients_reported"] == 8 and "worker_restarts" not in report.faults
    finally:
        sim.close()
    _assert_equals_in_process_round(exp, state, got)


def _assert_equals_in_process_round(exp, state, got) -> None:
    """A disturbed round (worker restarted, client retried) equals an undisturbed in-process round 1."""
    ref, _ = Simulator(FedAvg(clients_per_round=8), exp.federation, exp.ctx).run_round(state, 1)
    for k, v in ref.models["global"].items():
        assert torch.equal(v, got.models["global"][k]), k


def test_batched_chunks_go_to_different_workers_at_once(digits_cfg, one_thread):
    """Each chunk is one unit of work: the second chunk starts on the second worker while the first trains
    (not after the aggregation has consumed 4 x workers results)."""
    exp = prepare(digits_cfg(*BATCHED))
    par = ParallelSimulator(exp.algorithm, exp.federation, exp.ctx, workers=2, batched=True)
    sent = []
    original = par.pool._send

    def spy(w, job, unit):
        sent.append((w.index, [t.client_id for t in unit], sum(len(x.jobs) for x in par.pool._workers)))
        return original(w, job, unit)

    par.pool._send = spy
    try:
        par.run_round(exp.algorithm.init_state(exp.ctx), 1)
    finally:
        par.close()
    assert [len(c) for c in par.batcher.chunks] == [16, 3]
    assert [(w, len(clients), busy) for w, clients, busy in sent] == [(0, 16, 0), (1, 3, 1)]
