"""benchmarks/race_pfl.py: both sides train the same network on the same federation (pfl itself not needed)."""

import importlib.util
import sys
from pathlib import Path

import pytest

from hetfl.data.base import DataInfo
from hetfl.models import build_model, count_parameters
from hetfl.resolve import load_config
from hetfl.runner import prepare

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def race():
    spec = importlib.util.spec_from_file_location("race_pfl", ROOT / "benchmarks" / "race_pfl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("workload", ["cifar", "2nn"])
def test_plain_model_is_hetfls_model(race, workload):
    w = race.WORKLOADS[workload]
    h, wd, c = w["shape"]
    hetfl_model = build_model(w["model"], DataInfo((c, h, wd), 10))
    for nhwc in (True, False):  # pfl's side (NHWC rows, permuted first) and the floor
        plain = race.plain_model(w["model"], w["shape"], nhwc=nhwc)
        assert count_parameters(plain) == count_parameters(hetfl_model)
        shapes = [tuple(p.shape) for p in plain.parameters()]
        assert shapes == [tuple(p.shape) for p in hetfl_model.parameters()]
    if workload == "cifar":
        assert count_parameters(hetfl_model) == 1_626_442  # pfl's simple CNN on 32x32x3


def test_hetfl_side_sees_the_users_and_their_points(race, tmp_path):
    w = dict(race.WORKLOADS["2nn"], users=6, points=4, cohort=3)
    data = tmp_path / "d.npz"
    race.write_data(data, w)
    cfg = load_config(None, (), base=tomllib.loads(race.hetfl_config(w, data, rounds=2)))
    exp = prepare(cfg)
    fed = exp.federation
    assert fed.num_clients == 6
    assert [len(fed.client_train(c)) for c in range(6)] == [4] * 6
    assert exp.algorithm.clients_for(6) == 3
    users = race.user_tensors(data, w, channels_first=True)  # pfl's and the floor's users: the same sizes
    assert [len(y) for _, y in users] == [4] * 6 and users[0][0].shape == (4, 1, 28, 28)
