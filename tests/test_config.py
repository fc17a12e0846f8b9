from __future__ import annotations

import pytest

from hetfl.config import RunConfig, parse_override
from hetfl.errors import ConfigError
from hetfl.resolve import config_from_dict, load_config

from .conftest import DIGITS


def test_overrides_and_toml_roundtrip(digits_cfg):
    from hetfl.config import parse_toml

    cfg = digits_cfg("data.partition.alpha=0.3", "rounds=7")
    assert cfg.rounds == 7
    assert cfg.data.partition.kwargs == {"alpha": 0.3}
    assert config_from_dict(parse_toml(cfg.to_toml())) == cfg


def test_shipped_configs_load():
    from pathlib import Path

    for path in sorted(Path(__file__).parents[1].glob("configs/*.toml")):
        if path.name.startswith("study"):
            continue  # sweep specifications (hetfl sweep), not run configs
        cfg = load_config(path)
        assert isinstance(cfg, RunConfig), path


def test_override_parsing():
    assert parse_override("rounds=5") == (["rounds"], 5)
    assert parse_override("data.name=mnist") == (["data", "name"], "mnist")
    assert parse_override('data.name="mnist"') == (["data", "name"], "mnist")
    assert parse_override("train.lr=1e-3") == (["train", "lr"], 0.001)
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("rounds")


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["rounds=-1"], "rounds must be >= 1, got -1"),
        (["rounds=1.5"], "rounds must be int, got float 1.5"),
        (["bogus=1"], "unknown key bogus; allowed top-level keys"),
        (["train.lrr=0.1"], "unknown key train.lrr; allowed keys in [train]: augment, batch_size"),
        (["data.partition.alpha=0"], "data.partition.alpha must be > 0, got 0"),
        (["data.partition.alpha=-2"], "data.partition.alpha must be > 0"),
        (["data.partition.beta=1"], "unknown key data.partition.beta for partitioner 'dirichlet'"),
        (["data.name=imagenet"], "data.name: unknown dataset 'imagenet'; choose one of: "),
        (["model.name=vgg"], "model.name: unknown model 'vgg'; choose one of: "),
        (["model.width=1.5"], "model.width must be in (0, 1], got 1.5"),
        (["model.depth=3"], "unknown key model.depth for model 'mlp'"),
        (["algorithm.name=fedsgd"], "unknown algorithm 'fedsgd'"),
        (["algorithm.clients_per_round=0"], "algorithm.clients_per_round must be >= 1, got 0"),
        (["algorithm.server_momentum=1.0"], "algorithm.server_momentum must be in [0, 1)"),
        (["train.lr=0"], "train.lr must be > 0, got 0.0"),
        (["train.batch_size=true"], "train.batch_size must be int, got bool True"),
        (["train.epochs=0"], "train.epochs and train.steps are both 0"),
        (["eval.every=0"], "eval.every must be >= 1"),
        (['device="tpu"'], "device must be 'cpu' or 'cuda[:N]', got 'tpu'"),
        (["data.num_clients=0"], "data.num_clients must be >= 1 (or 0 with the natural partitioner"),
        (["data.local_test_fraction=1.0"], "data.local_test_fraction must be in [0, 1), got 1.0"),
        (["data=3"], "[data] must be a table"),
    ],
)
def test_bad_config_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config(None, overrides, base=DIGITS)
    assert message in str(err.value)


def test_bad_toml_file(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("rounds = [1,\n")
    with pytest.raises(ConfigError, match="is not valid TOML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
