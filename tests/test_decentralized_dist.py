"""Decentralized rounds across OS processes (torch.distributed, gloo, 127.0.0.1) equal the in-process rounds."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from hetfl.decentralized.torchrun import free_port
from hetfl.errors import HetflError
from hetfl.resolve import load_config
from hetfl.results import read_metrics, strip_timing
from hetfl.runner import run

pytest.importorskip("torch.distributed")
if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():  # pragma: no cover
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

BASE = {
    "name": "dist",
    "rounds": 2,
    "seed": 0,
    "data": {"name": "digits", "num_clients": 3, "local_test_fraction": 0.2,
             "partition": {"name": "dirichlet", "alpha": 0.5}},
    "model": {"name": "mlp", "hidden": "32"},
    "algorithm": {"name": "dkd"},
    "train": {"steps": 4, "batch_size": 16, "lr": 0.1},
    "fleet": {"source": "tiers", "mix": "a-c-e"},
    "graph": {"name": "complete", "timeout_s": 60.0},
}
DIST_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _cfg(*overrides: str):
    return load_config(None, overrides, base=BASE)


def _same_run(a, b) -> None:
    rows_a, rows_b = strip_timing(read_metrics(a)), strip_timing(read_metrics(b))
    assert len(rows_a) == len(rows_b) == 2
    for ra, rb in zip(rows_a, rows_b):
        rb.pop("processes")
        assert ra.keys() == rb.keys()
        for k, v in ra.items():
            assert v == pytest.approx(rb[k], rel=1e-6, abs=1e-9), k
    ma = torch.load(a / "checkpoint.pt", weights_only=True)["state"]["models"]
    mb = torch.load(b / "checkpoint.pt", weights_only=True)["state"]["models"]
    for node, w in ma.items():
        for k, v in w.items():
            assert torch.allclose(v, mb[node][k], rtol=1e-5, atol=1e-6), (node, k)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist") / "inproc"
    run(_cfg(), path, quiet=True)
    return path


def test_spawned_processes_equal_in_process(tmp_path, reference):
    """hetfl starts the worker itself; 3 nodes multiplexed on 2 processes (nodes 0 and 2 on rank 0)."""
    summary = run(_cfg('engine="torchrun"', "graph.processes=2"), tmp_path / "spawned", quiet=True)
    assert summary["status"] == "complete"
    _same_run(reference, tmp_path / "spawned")


def test_teacher_options_across_processes_equal_in_process(tmp_path):
    """Relay, ensemble teachers and one-way narrower gossip (which reuses the distillation message) use models
    received in the distillation phase: 3 nodes on 3 processes give the in-process run."""
    opts = ('algorithm.kd_return="mean"', 'algorithm.teacher="ensemble"', 'algorithm.gossip="narrower"',
            'fleet.mix="a-e"')
    run(_cfg(*opts), tmp_path / "inproc", quiet=True)
    summary = run(_cfg(*opts, 'engine="torchrun"', "graph.processes=3"), tmp_path / "spawned", quiet=True)
    assert summary["status"] == "complete"
    _same_run(tmp_path / "inproc", tmp_path / "spawned")


def test_cross_tier_channels_across_processes_equal_in_process(tmp_path):
    """Distillation both ways, overlap gossip and prototype messages (fixed-shape tensors, not models; from round
    2) on 3 processes give the in-process run."""
    opts = ('algorithm.direction="both"', 'algorithm.gossip="overlap"', "algorithm.prototypes=0.5")
    run(_cfg(*opts), tmp_path / "inproc", quiet=True)
    summary = run(_cfg(*opts, 'engine="torchrun"', "graph.processes=3"), tmp_path / "spawned", quiet=True)
    assert summary["status"] == "complete"
    _same_run(tmp_path / "inproc", tmp_path / "spawned")


def test_torchrun_style_launch_equals_in_process(tmp_path, reference, monkeypatch):
    """Every rank runs `hetfl run CONFIG --engine torchrun` with torchrun's variables; rank 0 writes the run."""
    cfg_path = tmp_path / "dist.toml"
    cfg_path.write_text(_cfg().to_toml())
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k not in DIST_ENV}
    env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="3")
    procs = [subprocess.Popen([sys.executable, "-m", "hetfl", "run", str(cfg_path), "--engine", "torchrun", "--quiet"],
                              env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in (1, 2)]
    try:
        for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port)), ("WORLD_SIZE", "3"), ("RANK", "0")):
            monkeypatch.setenv(k, v)
        summary = run(_cfg('engine="torchrun"'), tmp_path / "launched", quiet=True)
        outputs = [p.communicate(timeout=120)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert summary["status"] == "complete"
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert all("rank 0 writes the run directory" in out for out in outputs)
    _same_run(reference, tmp_path / "launched")


def test_missing_workers_fail_within_the_timeout(tmp_path, monkeypatch):
    for k, v in (("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(free_port())), ("WORLD_SIZE", "2"), ("RANK", "0")):
        monkeypatch.setenv(k, v)
    t0 = time.monotonic()
    with pytest.raises(HetflError, match="did not all join"):
        run(_cfg('engine="torchrun"', "graph.timeout_s=2.0"), tmp_path / "alone", quiet=True)
    assert time.monotonic() - t0 < 30
    assert not torch.distributed.is_initialized()
