"""``data.validation_fraction``: a validation split held out of the clients' training data, scored every eval."""

from __future__ import annotations

import json

import numpy as np
import pytest

from hetfl.errors import ConfigError
from hetfl.experiment import prepare
from hetfl.runner import run


def test_held_out_of_training_and_scored(digits_cfg, tmp_path):
    base = prepare(digits_cfg())
    exp = prepare(digits_cfg("data.validation_fraction=0.1"))
    n = len(base.dataset.train)
    assert len(exp.dataset.val) == round(0.1 * n) and len(exp.dataset.train) == n - len(exp.dataset.val)
    assert len(exp.dataset.test) == len(base.dataset.test)  # the test set is untouched
    cfg = digits_cfg("rounds=1", "data.validation_fraction=0.1", "data.num_clients=8", 'fleet.source="tiers"',
                     'fleet.mix="a-b"', 'algorithm={name="heterofl", clients_per_round=4}')
    run(cfg, tmp_path, quiet=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    for key in ("val_accuracy", "val_loss", "val_accuracy.w0.5", "deployed_val_accuracy", "smallest_val_accuracy"):
        assert np.isfinite(row[key]), key
    assert row["smallest_val_accuracy"] == row["val_accuracy.w0.5"]


def test_default_has_no_validation(digits_cfg, tmp_path):
    run(digits_cfg("rounds=1"), tmp_path, quiet=True)
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert not any(k.startswith("val_") or "_val_" in k for k in row)


def test_bad_fraction(digits_cfg):
    with pytest.raises(ConfigError, match=r"data.validation_fraction must be in \[0, 1\) .*got 1.0"):
        digits_cfg("data.validation_fraction=1.0")
    with pytest.raises(ConfigError, match="holds out 0: it must leave at least one sample on each side"):
        prepare(digits_cfg("data.validation_fraction=0.0001"))
