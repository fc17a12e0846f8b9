from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

from hetfl.data import fetch
from hetfl.resolve import load_config

DIGITS = {
    "name": "t",
    "rounds": 3,
    "seed": 0,
    "data": {"name": "digits", "num_clients": 5, "local_test_fraction": 0.2,
             "partition": {"name": "dirichlet", "alpha": 0.5}},
    "model": {"name": "mlp", "hidden": "32"},
    "algorithm": {"name": "fedavg", "clients_per_round": 3},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.1},
    "eval": {"every": 1},
}


@pytest.fixture
def digits_cfg():
    """A tiny, fast digits FedAvg config; pass --set style overrides to customise it."""

    def make(*overrides: str):
        return load_config(None, overrides, base=DIGITS)

    return make


@pytest.fixture
def one_thread():
    """The in-process side of an equality check trains with one thread, as each worker does."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> Path:
    """A private dataset cache, and pip (the network) off unless a test is marked `network`: the dataset
    modules use it for every test (``pytestmark = pytest.mark.usefixtures("isolated")``)."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("HETFL_CACHE", str(cache))
    if request.node.get_closest_marker("network") is None:

        def no_network(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
            raise AssertionError(f"test tried to run pip: {args}")

        monkeypatch.setattr(fetch, "_run_pip", no_network)
    return cache
