"""``eval.start``: rounds before it are not evaluated, and since evaluation has no effect on training (BN
recalibration, model builds and local test sets draw nothing from the run's random streams), every evaluated
round's numbers are the same as with evaluation from the start."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetfl.errors import ConfigError
from hetfl.resolve import load_config
from hetfl.runner import run

SETTING = ('data.num_clients=8', 'data.local_test_fraction=0.2', 'fleet.source="tiers"', 'fleet.mix="a-b-c"',
           'model={name="heterofl_conv", hidden="8,8,8,8"}', 'eval.bn="recalibrate"', 'eval.local_clients=4',
           "rounds=4", "eval.every=1")
HETEROFL = 'algorithm={name="heterofl", clients_per_round=4}'

ROOT = Path(__file__).parents[1]
TIMING = ("time", "_s", "elapsed")


def _rows(path):
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return {r["round"]: {k: v for k, v in r.items() if not any(t in k for t in TIMING)} for r in rows}


@pytest.mark.parametrize("algorithm", [
    HETEROFL,
    'algorithm={name="heterofl", clients_per_round=4, inplace_kd=1.0}',
    'algorithm={name="exclusive", clients_per_round=4}',
    'algorithm={name="fedrolex", clients_per_round=4, eval_window="trained"}',
    'algorithm={name="depthfl", clients_per_round=4, levels="1x1,0.5x0.5,0.25x0.25", kd=1.0, dyn=0.1}',
])
def test_a_later_start_changes_no_evaluated_number(digits_cfg, tmp_path, algorithm):
    run(digits_cfg(*SETTING, algorithm), tmp_path / "all", quiet=True)
    run(digits_cfg(*SETTING, algorithm, "eval.start=3"), tmp_path / "late", quiet=True)
    every, late = _rows(tmp_path / "all"), _rows(tmp_path / "late")
    assert "test_accuracy" in every[1] and "test_accuracy" not in late[1] and "test_accuracy" not in late[2]
    assert late[3] == every[3] and late[4] == every[4]  # bit for bit, every metric of the evaluated rounds
    a = torch.load(tmp_path / "all" / "checkpoint.pt", weights_only=False)["state"]["models"]
    b = torch.load(tmp_path / "late" / "checkpoint.pt", weights_only=False)["state"]["models"]
    assert a.keys() == b.keys()
    assert all(torch.equal(a[m][k], b[m][k]) for m in a for k in a[m])


def test_the_last_round_is_evaluated_whatever_the_start(digits_cfg, tmp_path):
    run(digits_cfg(*SETTING, HETEROFL, "eval.start=10", "eval.every=3"), tmp_path, quiet=True)
    rows = _rows(tmp_path)
    assert [r for r in rows if "test_accuracy" in rows[r]] == [4]


def test_a_negative_start_is_refused(digits_cfg):
    with pytest.raises(ConfigError, match=r"eval.start must be >= 0 \(0 = from the first eval.every\), got -1"):
        load_config(None, ["eval.start=-1"])


@pytest.mark.parametrize("extra", [[], ['algorithm.families="mlp(hidden=64,16), mlp(hidden=16)"']])
def test_decentralized_nodes_are_evaluated_without_side_effects(tmp_path, extra):
    """The decentralized study (configs/study_decentral2_*.toml) evaluates from round 60 on this guarantee: every
    channel of ``dkd`` (both directions, overlap gossip, prototypes), slices and families."""
    setting = [str(ROOT / "configs" / "digits_dkd_mutual.toml"), "rounds=4", "eval.every=1",
               'algorithm.gossip="overlap"', "algorithm.prototypes=1.0", *extra]
    runs = {}
    for name, more in (("all", []), ("late", ["eval.start=3"])):
        runs[name] = tmp_path / name
        run(load_config(setting[0], [*setting[1:], *more]), runs[name], quiet=True)
    every, late = _rows(runs["all"]), _rows(runs["late"])
    assert "test_accuracy" not in late[2] and late[3] == every[3] and late[4] == every[4]
