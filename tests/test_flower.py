"""hetfl on Flower: records round-trip, simulator == Flower engine, failures, a real localhost deployment.

Every test that starts Flower checks afterwards that no Ray/Flower process it started is left.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hetfl.algorithms import ALGORITHMS
from hetfl.algorithms.base import ClientResult, ClientTask
from hetfl.config import TrainConfig
from hetfl.engines import SERVER_ENGINES
from hetfl.engines.simulator import Simulator
from hetfl.errors import HetflError
from hetfl.models import ModelRef
from hetfl.results import read_metrics
from hetfl.runner import prepare

try:
    import flwr  # noqa: F401
    import ray  # noqa: F401

    HAVE_FLWR = True
except ImportError:  # pragma: no cover - depends on the environment
    HAVE_FLWR = False

needs_flwr = pytest.mark.skipif(not HAVE_FLWR, reason="Flower is not installed: pip install 'hetfl[flower]'")
ROOT = Path(__file__).resolve().parents[1]

# FedAvg and HeteroFL on digits: 4 clients, 3 rounds, full participation, fixed seed.
CONFORMANCE = {
    "fedavg": ['algorithm={name="fedavg", clients_per_round=4}', 'model={name="mlp", hidden="32"}'],
    "heterofl": ['algorithm={name="heterofl", clients_per_round=4}', 'model={name="heterofl_conv", hidden="8,16"}',
                 'fleet.source="tiers"', 'fleet.mix="a-b-c-e"'],
    "depthfl": ['algorithm={name="depthfl", clients_per_round=4, kd_rampup=1}', 'model={name="mlp", hidden="16,16,16"}',
                'fleet.source="tiers"', 'fleet.mix="a-b-c-e"'],
    "fiarse": ['algorithm={name="fiarse", clients_per_round=4}', 'model={name="mlp", hidden="32"}',
               'fleet.source="tiers"', 'fleet.mix="a-b-c-e"'],
}
COMMON = ["data.num_clients=4", 'data.partition={name="iid"}', "rounds=3", "seed=3", "train.momentum=0.5"]


def _ray_like() -> set[int]:
    """Live (non-zombie) Ray/Flower processes on this machine, whoever their parent is now."""
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            state = Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if state != "Z" and any(s in cmd for s in ("ray::", "raylet", "gcs_server", "flwr-", "flower-")):
            out.add(int(d))
    return out


@pytest.fixture
def no_leftovers():
    """Fails the test if a Ray/Flower process it started is still alive 20 s after it ended."""
    before = _ray_like()
    yield
    deadline = time.monotonic() + 20
    left = _ray_like() - before
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = _ray_like() - before
    assert not left, f"processes left behind: {sorted(left)}"


def _final(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]


# ------------------------------------------------------------------------------------- no Ray needed
def test_engine_without_flower_names_the_extra(monkeypatch, digits_cfg):
    monkeypatch.setitem(sys.modules, "flwr", None)  # import flwr -> ImportError
    with pytest.raises(HetflError, match=r"pip install 'hetfl\[flower\]'"):
        SERVER_ENGINES.get("flower")(None, None, None, "cpu", digits_cfg())


@needs_flwr
def test_task_and_result_round_trip_through_records():
    from hetfl.flower import codec
    from hetfl.flower.codec import decode_extra, encode_extra

    extra = {"labels": torch.tensor([True, False, True]), "idx": np.arange(4, dtype=np.int32), "blob": b"\x00\x01",
             "nested": {"a": [1, 2.5, "x", None], "t": (torch.ones(2, 3, dtype=torch.float64), 7)},
             "nan": float("nan"), "flag": True}
    arrays, config = encode_extra(extra)
    back = decode_extra(arrays, config)
    assert torch.equal(back["labels"], extra["labels"]) and back["labels"].dtype == torch.bool
    assert np.array_equal(back["idx"], extra["idx"]) and back["idx"].dtype == np.int32
    assert back["blob"] == b"\x00\x01" and back["flag"] is True and math.isnan(back["nan"])
    assert back["nested"]["a"] == [1, 2.5, "x", None]
    assert isinstance(back["nested"]["t"], tuple) and torch.equal(back["nested"]["t"][0], torch.ones(2, 3).double())
    with pytest.raises(TypeError, match="only tensors"):
        encode_extra({"bad": object()})

    algo = ALGORITHMS.get("fedavg")(clients_per_round=3, server_lr=0.5)
    w = {"a.weight": torch.randn(3, 2), "bn.num_batches_tracked": torch.tensor(5)}
    task = ClientTask(7, ModelRef("mlp", 0.5, (("hidden", "32"), ("dropout", 0.0))), w,
                      TrainConfig(epochs=2, lr=0.1, momentum=0.9), seed=2**62 + 5, extra={"labels": torch.ones(3)})
    content = codec.encode_task(task, algo, codec.run_record("rounds = 1\n"))
    got, name, params = codec.decode_task(content)
    assert (got.client_id, got.model, got.train, got.seed) == (7, task.model, task.train, task.seed)
    assert all(torch.equal(got.weights[k], w[k]) and got.weights[k].dtype == w[k].dtype for k in w)
    assert list(got.weights) == list(w)
    assert codec.build_algorithm(name, params) == algo
    res = ClientResult(7, 42, w, {"train_loss": 0.25, "steps": 3}, {"labels": torch.tensor([True])})
    back_res, t = codec.decode_result(codec.encode_result(res, 1.5))
    assert (back_res.client_id, back_res.num_samples, back_res.metrics, t) == (7, 42, res.metrics, 1.5)
    assert torch.equal(back_res.extra["labels"], res.extra["labels"])


@needs_flwr
def test_node_reports_become_the_fleet(digits_cfg):
    """The query round's answers, not the server's fleet config, decide each client's capability."""
    from hetfl.flower.strategy import HetflStrategy

    cfg = digits_cfg("data.num_clients=4", 'fleet.source="tiers"', 'fleet.mix="a-b"')
    exp = prepare(cfg)
    strat = HetflStrategy(exp.algorithm, exp.ctx, grid=None, config_toml=cfg.to_toml())  # type: ignore[arg-type]
    strat.capabilities = {0: {"max-width": 0.25, "num-examples": 11}, 1: {"max-width": 1.0}, 3: {"speed": 0.1}}
    ctx = strat._context_from_reports()
    assert list(ctx.fleet.max_width) == [0.25, 1.0, exp.ctx.fleet.max_width[2], exp.ctx.fleet.max_width[3]]
    assert ctx.fleet.levels == (1.0, 0.5, 0.25)  # a reported width the mix lacks becomes a level
    assert math.isclose(ctx.fleet.proportions.sum(), 1.0)
    assert ctx.fleet.speed[3] == 0.1 and ctx.client_sizes[0] == 11
    assert ctx.client_sizes[1] == exp.ctx.client_sizes[1]


# ------------------------------------------------------------------------------------- Flower's simulation
@needs_flwr
@pytest.mark.parametrize("algo", list(CONFORMANCE))
def test_simulator_and_flower_give_the_same_model(tmp_path, digits_cfg, algo, no_leftovers):
    if algo not in ALGORITHMS:
        pytest.skip(f"algorithm {algo!r} is not in hetfl.algorithms.ALGORITHMS yet (conformance runs once it lands)")
    from hetfl.cli import main
    from hetfl.runner import run

    cfg = digits_cfg(*COMMON, *CONFORMANCE[algo])
    run(cfg, tmp_path / "sim", quiet=True)
    overrides = [a for item in [*COMMON, *CONFORMANCE[algo]] for a in ("--set", item)]
    config = tmp_path / "base.toml"
    config.write_text(digits_cfg().to_toml())
    assert main(["run", str(config), *overrides, "--engine", "flower", "--out", str(tmp_path / "flower"),
                 "--quiet"]) == 0

    sim, flw = _final(tmp_path / "sim"), _final(tmp_path / "flower")
    assert sim.keys() == flw.keys()
    for k in sim:
        assert sim[k].dtype == flw[k].dtype and sim[k].shape == flw[k].shape, k
        assert torch.allclose(sim[k].double(), flw[k].double(), rtol=0, atol=1e-6), k
    # the same run directory, metrics equal except timings and Flower's own extra columns
    assert {p.name for p in (tmp_path / "sim").iterdir()} == {p.name for p in (tmp_path / "flower").iterdir()}
    ms, mf = read_metrics(tmp_path / "sim"), read_metrics(tmp_path / "flower")
    assert len(ms) == len(mf) == 3
    for a, b in zip(ms, mf):
        assert b["failed_clients"] == 0
        for key in ("clients", "samples", "bytes_down", "bytes_up"):
            assert a[key] == b[key], key
        for key in ("train_loss", "test_accuracy", "test_loss"):
            assert math.isclose(a[key], b[key], rel_tol=1e-6, abs_tol=1e-9), key
    assert json.loads((tmp_path / "flower" / "summary.json").read_text())["status"] == "complete"


# ClientApps for the failure test: module-level, so Ray's workers import them by name.
def _faulty_train(msg, context):
    from hetfl.flower import client

    cid = int(context.node_config["partition-id"])
    rnd = int(msg.metadata.group_id)
    if cid == 1 and rnd in (1, 4):
        raise RuntimeError("simulated ClientApp crash")
    if cid == 2 and rnd == 2:
        time.sleep(25)  # far longer than round_timeout_s: this node has "disappeared"
    return client.handle_train(msg, context)


def _faulty_app():
    from flwr.clientapp import ClientApp

    from hetfl.flower import client

    app = ClientApp()
    app.query()(client.handle_query)
    app.train()(_faulty_train)
    return app


@needs_flwr
def test_failed_and_lost_clients_are_reported_and_the_others_aggregated(digits_cfg, no_leftovers):
    import dataclasses

    from hetfl.algorithms.fedavg import average_weights
    from hetfl.flower import FlowerOptions, FlowerSimulation

    cfg = digits_cfg("data.num_clients=4", 'data.partition={name="iid"}', "rounds=4",
                     'algorithm={name="fedavg", clients_per_round=4}', 'model={name="mlp", hidden="16"}')
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx, exp.device)
    # the timeout must exceed the healthy clients' time even on a busy machine; close() ends the hung ClientApp
    opts = FlowerOptions(round_timeout_s=12.0, num_cpus=1)
    engine = FlowerSimulation(exp.algorithm, exp.federation, exp.ctx, exp.device, cfg, options=opts,
                              client_app=_faulty_app())
    try:
        assert sorted(engine.capabilities) == [0, 1, 2, 3]
        state = exp.algorithm.init_state(exp.ctx)
        for rnd, bad, why in ((1, 1, "simulated ClientApp crash"), (2, 2, "no reply within round_timeout_s")):
            new, report = engine.run_round(state, rnd)
            assert sorted(report.clients) == sorted({0, 1, 2, 3} - {bad})
            assert list(report.failed) == [bad] and why in report.failed[bad]
            assert report.as_metrics()["failed_clients"] == 1
            # the round is the algorithm's aggregation of exactly the clients that replied
            tasks = exp.algorithm.configure_round(state, rnd, [0, 1, 2, 3], exp.ctx)
            expected, _, _ = average_weights(sim.run_client(t) for t in tasks if t.client_id != bad)
            for k, v in expected.items():
                assert torch.allclose(new.models["global"][k], v, atol=1e-6), k
            state = new
        state, report = engine.run_round(state, 3)
        assert not report.failed and len(report.clients) == 4
        strategy = engine.strategy  # faults.min_success_fraction = 1: one lost client stops the run
        strategy.ctx = dataclasses.replace(strategy.ctx, faults=dataclasses.replace(strategy.ctx.faults,
                                                                                      min_success_fraction=1.0))
        with pytest.raises(HetflError, match="only 3 of 4 clients replied"):
            engine.run_round(state, 4)
    finally:
        engine.close()


# ------------------------------------------------------------------------------------- a real deployment
@needs_flwr
def test_localhost_deployment_matches_the_simulator(tmp_path, digits_cfg, no_leftovers):
    """SuperLink + 2 SuperNodes + `flwr run`, through examples/flower_localhost.py; same model as the simulator.

    Started with a PATH that holds no Flower (not this interpreter's scripts directory, no pyenv shims): the
    SuperLink and SuperNodes start flower-superexec, flwr-serverapp, flwr-clientapp by name, and must find this
    interpreter's (a venv not activated, python called by its full path)."""
    from hetfl.runner import run

    overrides = ["rounds=2", "seed=1", 'data.partition={name="iid"}', "data.local_test_fraction=0.0",
                 'algorithm={name="fedavg", clients_per_round=2}', 'model={name="mlp", hidden="32"}']
    config = tmp_path / "base.toml"
    config.write_text(digits_cfg().to_toml())
    cmd = [sys.executable, str(ROOT / "examples" / "flower_localhost.py"), "--nodes", "2", "--config", str(config),
           "--out", str(tmp_path / "deploy"), "--timeout", "300", *[a for o in overrides for a in ("--set", o)]]
    env = {**os.environ, "PATH": _path_without_flower()}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=420, env=env)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "process groups left: 0" in proc.stdout
    run(digits_cfg(*overrides, "data.num_clients=2"), tmp_path / "sim", quiet=True)
    sim, dep = _final(tmp_path / "sim"), _final(tmp_path / "deploy")
    for k in sim:
        assert torch.allclose(sim[k], dep[k], atol=1e-6), k
    assert [r["clients"] for r in read_metrics(tmp_path / "deploy")] == [2, 2]


def _path_without_flower() -> str:
    """PATH without this interpreter's scripts directory and without any other folder holding Flower (pyenv shims)."""
    import sysconfig

    own = {os.path.realpath(sysconfig.get_path("scripts")), os.path.realpath(os.path.dirname(sys.executable))}
    keep = [d for d in os.environ.get("PATH", "").split(os.pathsep)
            if d and os.path.realpath(d) not in own and not os.path.exists(os.path.join(d, "flower-superexec"))]
    return os.pathsep.join(keep or ["/usr/bin", "/bin"])


def _example():
    import importlib.util

    spec = importlib.util.spec_from_file_location("flower_localhost", ROOT / "examples" / "flower_localhost.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_missing_flower_executable_is_one_message_naming_it_and_the_extra():
    example = _example()
    with pytest.raises(FileNotFoundError, match=r"flower-nothing is not installed .* pip install 'hetfl\[flower\]'"):
        example.flower_executable("flower-nothing")
    env = example.child_env({"PATH": "/usr/bin:/bin"})
    assert env["PATH"].split(os.pathsep)[0] == str(example.interpreter_bin_dirs()[0])
