"""The command line contract: run / list / plot / summary, exit codes and messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from hetfl.cli import main

ROOT = Path(__file__).parents[1]
FAST = ["--set", "rounds=2", "--set", "data.num_clients=4", "--quiet"]


def test_run_summary_plot_end_to_end(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--out", str(out), "--seed", "3", *FAST]) == 0
    for name in ("config.toml", "metrics.jsonl", "summary.json", "checkpoint.pt", "partition.json"):
        assert (out / name).is_file(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "complete" and summary["rounds_completed"] == 2 and summary["seed"] == 3
    assert "seed = 3" in (out / "config.toml").read_text()
    capsys.readouterr()

    assert main(["summary", str(out)]) == 0
    assert "complete" in capsys.readouterr().out
    assert main(["plot", str(out), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "accuracy.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "loss.png").is_file()

    assert main(["run", "--resume", str(out), "--set", "rounds=3", "--quiet"]) == 0
    assert json.loads((out / "summary.json").read_text())["rounds_completed"] == 3


def test_list_names_every_registry(capsys):
    assert main(["list"]) == 0
    text = capsys.readouterr().out
    for word in ("datasets:", "partitioners:", "models:", "algorithms:", "digits", "mnist", "shakespeare",
                 "synthetic", "dirichlet", "shards", "cnn", "transformer", "fedavg"):
        assert word in text


def test_user_error_exit_code_and_message(tmp_path, capsys):
    code = main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", "rounds=-3", "--out", str(tmp_path / "x")])
    assert code == 2
    err = capsys.readouterr().err
    assert "rounds must be >= 1, got -3" in err and "Traceback" not in err
    assert not (tmp_path / "x").exists()
    assert main(["run"]) == 2
    assert "needs a CONFIG" in capsys.readouterr().err
    assert main(["run", "--resume", str(tmp_path / "nothing")]) == 2
    assert "not a hetfl run directory" in capsys.readouterr().err


def test_console_entry_point_subprocess(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    proc = subprocess.run([sys.executable, "-m", "hetfl", "run", str(ROOT / "configs/digits_fedavg.toml"),
                           "--set", "train.lr=-1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    assert "train.lr must be > 0" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "hetfl", "--debug", "run", str(ROOT / "configs/digits_fedavg.toml"),
                           "--set", "train.lr=-1"], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert proc.returncode != 0 and "Traceback" in proc.stderr
