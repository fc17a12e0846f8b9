from __future__ import annotations

import pytest

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
