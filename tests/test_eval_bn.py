"""``eval.bn``: one BatchNorm rule at evaluation for every method (default "method": each method's own)."""

from __future__ import annotations

import json

import pytest

from hetfl.errors import ConfigError
from hetfl.experiment import prepare
from hetfl.runner import run

BN = ('data.num_clients=6', 'fleet.source="tiers"', 'fleet.mix="a-b"', "rounds=1",
      'model={name="heterofl_conv", hidden="4,4,4,4"}')
# every server method that trains a BatchNorm model; True: recalibrates under eval.bn = "method" (static BN)
METHODS = {
    "fedavg": False, "exclusive": False, "heterofl": True, "fedrolex": True, "fjord": True, "feddropout": False,
    "fiarse": False, "depthfl": False, "scalefl": False, "inclusivefl": False,
}


def _row(digits_cfg, tmp_path, algo: str, rule: str) -> dict:
    cfg = digits_cfg(*BN, f'algorithm={{name="{algo}", clients_per_round=6}}', f'eval.bn="{rule}"')
    run(cfg, tmp_path / f"{algo}-{rule}", quiet=True)
    lines = (tmp_path / f"{algo}-{rule}" / "metrics.jsonl").read_text().splitlines()
    return json.loads(lines[-1])


@pytest.mark.parametrize("algo", sorted(METHODS))
def test_every_method_honours_the_rule(digits_cfg, tmp_path, algo):
    assert _row(digits_cfg, tmp_path, algo, "recalibrate").get("bn_calibration_samples", 0) > 0
    assert ("bn_calibration_samples" in _row(digits_cfg, tmp_path, algo, "method")) is METHODS[algo]
    if not METHODS[algo]:
        assert "bn_calibration_samples" not in _row(digits_cfg, tmp_path, algo, "running")


def test_running_is_refused_where_the_method_averages_no_statistics(digits_cfg):
    with pytest.raises(ConfigError, match='eval.bn = "running": algorithm HeteroFL keeps BatchNorm statistics out '
                                          'of the average .*set algorithm.static_bn = false'):
        prepare(digits_cfg(*BN, 'algorithm={name="heterofl"}', 'eval.bn="running"'))
    prepare(digits_cfg(*BN, 'algorithm={name="heterofl", static_bn=false}', 'eval.bn="running"'))


def test_bad_rule(digits_cfg):
    with pytest.raises(ConfigError, match="eval.bn must be one of 'method', 'recalibrate', 'running', got 'static'"):
        digits_cfg('eval.bn="static"')
