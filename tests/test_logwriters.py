"""[log] writers: a run's metrics read back with TensorBoard's own event reader and from MLflow's local file
store (issue 39); off by default; a writer whose package is missing fails before anything is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetfl.cli import main

ROOT = Path(__file__).parents[1]
FAST = ["--set", "rounds=3", "--set", "data.num_clients=4", "--quiet"]


def _run(out: Path, *sets: str) -> dict:
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--out", str(out), *FAST,
                 *[x for s in sets for x in ("--set", s)]]) == 0
    return json.loads((out / "summary.json").read_text())


def _accuracy(out: Path) -> list[float]:
    return [r["test_accuracy"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def test_off_by_default(tmp_path):
    _run(tmp_path / "run")
    assert not (tmp_path / "run" / "tensorboard").exists() and not (tmp_path / "run" / "mlruns").exists()


def test_tensorboard_event_reader_reads_back_the_accuracy(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "run"
    summary = _run(out, 'log.to="tensorboard"')
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert "test_accuracy" in scalars and "train_loss" in scalars and "tier/w1/flops" in scalars
    read = events.Scalars("test_accuracy")
    assert [e.step for e in read] == [1, 2, 3]
    assert [e.value for e in read] == pytest.approx(_accuracy(out), abs=1e-6)
    assert events.Scalars("final/test_accuracy")[0].value == pytest.approx(summary["test_accuracy"], abs=1e-6)
    assert "config/text_summary" in events.Tags()["tensors"]  # the resolved config, as text


def test_mlflow_file_store_reads_back_the_accuracy_and_the_config(tmp_path):
    pytest.importorskip("mlflow")
    import os

    from mlflow.tracking import MlflowClient

    out = tmp_path / "run"
    _run(out, 'log.to="mlflow"', "rounds=2")
    assert main(["run", "--resume", str(out), "--set", "rounds=3", "--quiet"]) == 0  # continues the same MLflow run
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    client = MlflowClient(tracking_uri=(out / "mlruns").resolve().as_uri())
    run_id = (out / "mlflow_run_id.txt").read_text().strip()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "digits-fedavg"
    assert run.data.params["algorithm.name"] == "fedavg" and run.data.params["rounds"] == "2"  # as it started
    assert run.data.tags["hetfl.rounds"] == "3"  # extended by the resume
    history = sorted(client.get_metric_history(run_id, "test_accuracy"), key=lambda m: m.step)
    assert [m.step for m in history] == [1, 2, 3]
    assert [m.value for m in history] == pytest.approx(_accuracy(out), abs=1e-9)


def test_unknown_writer_and_missing_package_are_clear(tmp_path, capsys, monkeypatch):
    # hetfl run CONFIG --set log.to=wandb
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", 'log.to="wandb"', "--dry-run"]) == 2
    assert "log.to: unknown writer 'wandb' in 'wandb'; allowed: tensorboard, mlflow" in capsys.readouterr().err
    import importlib.util

    find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else find(name, *a))
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", 'log.to="mlflow"',
                 "--out", str(tmp_path / "r")]) == 2
    assert "needs mlflow, which is not installed: pip install 'hetfl[mlflow]'" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
