"""What a researcher sees of heterogeneous runs (issue 39): plot legends and per-tier curves, the summary's
deployed / smallest / per-tier / epsilon / fleet columns, run names that follow --set, labelled progress."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetfl.cli import main
from hetfl.progress import round_status

ROOT = Path(__file__).parents[1]
CONFIG = str(ROOT / "configs/digits_heterofl_tiers.toml")
FAST = ["--set", "rounds=2", "--set", "eval.every=1", "--set", "data.num_clients=6",
        "--set", "algorithm.clients_per_round=3", "--quiet"]


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A HeteroFL and a FjORD run of one small tiered config (two rounds each)."""
    root = tmp_path_factory.mktemp("runs")
    assert main(["run", CONFIG, "--out", str(root / "heterofl"), *FAST]) == 0
    assert main(["run", CONFIG, "--set", "algorithm.name=fjord", "--out", str(root / "fjord"), *FAST]) == 0
    return root / "heterofl", root / "fjord"


def _figures(monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    return figures


def test_plot_legends_tell_heterofl_and_fjord_apart_with_per_tier_curves(two_runs, tmp_path, monkeypatch, capsys):
    # hetfl plot runs/heterofl runs/fjord --out plots/
    figures = _figures(monkeypatch)
    assert main(["plot", *map(str, two_runs), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert [Path(p).name for p in printed] == ["accuracy.png", "loss.png", "tiers.png"]
    accuracy, loss, tiers = figures
    legend = [t.get_text() for t in accuracy.axes[0].get_legend().get_texts()]
    assert legend == ["heterofl: global model", "heterofl: deployed", "fjord: global model", "fjord: deployed"]
    assert [ax.get_xlabel() for ax in accuracy.axes] == [
        "round", "cumulative bytes up + down (MiB)", "cumulative client training FLOPs (GFLOP)",
        "virtual time (s simulated on the fleet: compute + transfer)"]
    assert accuracy._suptitle.get_text().startswith("digits · mlp · dirichlet partition · α=0.5 · 6 clients · "
                                                    "fleet tiers a-b-c: test accuracy")
    assert [ax.get_title() for ax in loss.axes] == ["train loss (clients' local training, mean)",
                                                    "test loss (global model, common test set)"]
    panels = {ax.get_title(): [t.get_text() for t in ax.get_legend().get_texts()] for ax in tiers.axes}
    assert panels["heterofl"] == ["width 1 (global model)", "width 0.5", "width 0.25",
                                  "deployed (each client's own model)", "smallest model"]
    assert panels["fjord: each tier's model on its clients' data"] == [
        "tier of width 1", "tier of width 0.5", "tier of width 0.25"]
    for name in printed:
        assert Path(name).stat().st_size > 1000


def test_plot_legend_names_the_seed_and_set_keys_that_differ(two_runs, tmp_path, monkeypatch):
    from hetfl.runinfo import legends, load_runs

    other = tmp_path / "seed1"
    assert main(["run", CONFIG, "--seed", "1", "--set", "train.lr=0.1", "--out", str(other), *FAST]) == 0
    assert legends(load_runs([two_runs[0], other])) == ["seed 0, train.lr=0.05", "seed 1, train.lr=0.1"]
    assert legends(load_runs([two_runs[0]])) == ["digits-heterofl-a-b-c"]


def test_plot_writes_to_plots_by_default_never_into_a_run(two_runs, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in two_runs[0].iterdir())
    assert main(["plot", str(two_runs[0])]) == 0
    assert (tmp_path / "plots" / "accuracy.png").is_file()
    assert sorted(p.name for p in two_runs[0].iterdir()) == before


def test_summary_shows_fleet_deployed_smallest_and_per_tier(two_runs, capsys):
    # hetfl summary runs/heterofl runs/fjord
    assert main(["summary", *map(str, two_runs)]) == 0
    lines = capsys.readouterr().out.splitlines()
    head = lines[0].split()
    for column in ("fleet", "deployed", "smallest", "per_tier(local)", "test_acc"):
        assert column in head, column
    assert "epsilon" not in head  # no private run: no column
    assert "tiers a-b-c" in lines[1] and "w1:" in lines[1] and "w0.25:" in lines[2]


def test_summary_and_final_line_show_epsilon_of_a_private_run(tmp_path, capsys):
    pytest.importorskip("dp_accounting")
    out = tmp_path / "dp"
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", "rounds=2", "--set", "privacy.clip=1.0",
                 "--set", "privacy.noise_multiplier=1.0", "--set", "data.num_clients=20",
                 "--set", "algorithm.clients_per_round=4", "--out", str(out), "--quiet"]) == 0
    final = capsys.readouterr().out.strip().splitlines()[-1]
    assert "  epsilon=" in final and "(delta=1e-05)" in final
    assert main(["summary", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert "epsilon" in table[0].split()


def test_run_names_follow_the_resolved_config(tmp_path, monkeypatch, capsys):
    # hetfl run configs/mnist_heterofl.toml --set algorithm.name=fedrolex --set fleet.source=phones
    assert main(["run", str(ROOT / "configs/mnist_heterofl.toml"), "--set", "algorithm.name=fedrolex",
                 "--set", "fleet.source=phones", "--dry-run"]) == 0
    assert 'name = "mnist-fedrolex-heterofl_conv-iid-phones"' in capsys.readouterr().out
    # hetfl run configs/mnist_fedavg.toml --set data.partition.name=dirichlet
    assert main(["run", str(ROOT / "configs/mnist_fedavg.toml"), "--set", "data.partition.name=dirichlet",
                 "--dry-run"]) == 0
    assert 'name = "mnist-fedavg-cnn-dirichlet"' in capsys.readouterr().out
    # overrides that change nothing a name says keep the config's name; an explicit name wins
    assert main(["run", str(ROOT / "configs/mnist_fedavg.toml"), "--set", "rounds=3", "--dry-run"]) == 0
    assert 'name = "mnist-fedavg-cnn-shards"' in capsys.readouterr().out
    assert main(["run", str(ROOT / "configs/mnist_heterofl.toml"), "--set", "algorithm.name=fedrolex",
                 "--set", 'name="mine"', "--dry-run"]) == 0
    assert 'name = "mine"' in capsys.readouterr().out
    monkeypatch.chdir(tmp_path)
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", "rounds=1", "--set", "data.num_clients=3",
                 "--set", "data.partition.name=iid", "--quiet"]) == 0
    made = [p.name for p in (tmp_path / "runs").iterdir()]
    assert len(made) == 1 and made[0].startswith("digits-fedavg-mlp-iid-")
    assert json.loads((tmp_path / "runs" / made[0] / "summary.json").read_text())["name"] == "digits-fedavg-mlp-iid"


def test_progress_labels_say_test_or_train_and_epsilon():
    assert round_status({"test_accuracy": 0.2109, "test_loss": 2.37, "train_loss": 0.5091}) == \
        "test acc 0.2109  test loss 2.3700  train loss 0.5091"
    assert round_status({"train_loss": 0.5}) == "train loss 0.5000"
    assert round_status({"test_accuracy": 0.5, "deployed_accuracy": 0.4, "train_loss": 1.0,
                         "privacy.epsilon": 3.21}) == "test acc 0.5000  deployed 0.4000  train loss 1.0000  ε 3.21"
    assert round_status({"train_loss": 1.0, "privacy.epsilon": None}).endswith("ε ∞")
