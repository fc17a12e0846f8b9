"""What a new user trips over (issue 20): each case pinned by a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetfl.cli import main
from hetfl.config import load_config
from hetfl.errors import ConfigError

ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------ --set SECTION.name drops the old entry's keys
def test_switching_the_partitioner_drops_the_old_partitioners_parameters():
    notes: list[str] = []
    cfg = load_config(ROOT / "configs/mnist_fedavg.toml",
                      ["data.partition.name=dirichlet", "data.partition.alpha=0.3"], notes=notes)
    assert cfg.data.partition.name == "dirichlet" and cfg.data.partition.kwargs == {"alpha": 0.3}
    assert notes == ["data.partition.name=dirichlet drops shards_per_client (it does not apply to 'dirichlet')"]


def test_switching_algorithm_keeps_the_shared_parameters_and_model_drops_its_own(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nname = "digits"\n[model]\nname = "mlp"\nhidden = "32"\n'
                    '[algorithm]\nname = "fedavg"\nclients_per_round = 4\nserver_lr = 0.5\n')
    notes: list[str] = []
    cfg = load_config(path, ["algorithm.name=heterofl", "model.name=cnn"], notes=notes)
    assert cfg.algorithm.name == "heterofl" and dict(cfg.algorithm.params) == {"clients_per_round": 4}
    assert cfg.model.name == "cnn" and cfg.model.params == ()
    assert sorted(notes) == ["algorithm.name=heterofl drops server_lr (it does not apply to 'heterofl')",
                             "model.name=cnn drops hidden (it does not apply to 'cnn')"]
    assert load_config(path, ["algorithm.name=fedavg"]).algorithm.params == load_config(path).algorithm.params


def test_a_key_given_explicitly_is_not_dropped_silently():
    with pytest.raises(ConfigError, match="unknown key data.partition.shards_per_client for partitioner 'dirichlet'"):
        load_config(ROOT / "configs/mnist_fedavg.toml",
                    ["data.partition.shards_per_client=3", "data.partition.name=dirichlet"])


def test_the_switch_is_said_in_one_line_on_the_console(tmp_path, capsys):
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", 'data.partition={name="shards"}',
                 "--set", "data.partition.shards_per_client=2", "--set", "data.partition.name=dirichlet",
                 "--set", "rounds=1", "--out", str(tmp_path / "r"), "--quiet"]) == 2  # explicit key: an error
    assert "unknown key data.partition.shards_per_client" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text((ROOT / "configs/digits_fedavg.toml").read_text() + "\n")
    cfg.write_text(load_config(cfg, ['data.partition={name="shards", shards_per_client=2}']).to_toml())
    assert main(["run", str(cfg), "--set", "data.partition.name=iid", "--set", "rounds=1",
                 "--out", str(tmp_path / "r2"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("data.partition.name=iid drops shards_per_client") == 1


# ------------------------------------------------------------------ a config names its dataset, model, algorithm
@pytest.mark.parametrize("text", ["", "# nothing\n", "rounds = 2\n", '[data]\nname = "digits"\n'])
def test_an_empty_or_sectionless_config_is_a_clear_error(tmp_path, capsys, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "names at least its dataset, model and algorithm" in err
    assert not (tmp_path / "r").exists()


def test_names_may_come_from_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("rounds = 1\n")
    cfg = load_config(path, ["data.name=digits", "model.name=mlp", "algorithm.name=fedavg"])
    assert (cfg.data.name, cfg.model.name, cfg.algorithm.name) == ("digits", "mlp", "fedavg")
