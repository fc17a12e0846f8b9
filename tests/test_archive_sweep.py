"""benchmarks/archive_sweep.py: a sweep's complete cells packed on one machine resume on the next (skipped, the
same results table), incomplete cells left out, nothing overwritten."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from hetfl.sweep import CELLS, RESULTS_CSV, run_sweep, study_from_dict
from tests.bench_scripts import load

ROOT = Path(__file__).parents[1]
STUDY = {"name": "tiny", "seeds": [0], "base": {
    "rounds": 1, "data": {"name": "digits", "num_clients": 6}, "model": {"name": "mlp", "hidden": "8"},
    "algorithm": {"name": "fedavg", "clients_per_round": 3}, "train": {"epochs": 1, "batch_size": 16}},
    "axes": {"lr": {"a": ["train.lr=0.1"], "b": ["train.lr=0.05"]}}}


def _script():
    return load("archive_sweep")


def test_packed_cells_are_skipped_on_another_machine(tmp_path):
    mod = _script()
    study = study_from_dict(STUDY, "tiny.toml")
    out = tmp_path / "one" / "tiny"
    run_sweep(study, out, workers=0, log=None)
    before = (out / RESULTS_CSV).read_text()
    (out / CELLS / "b__s0" / "summary.json").write_text('{"status": "running"}')  # as if still running
    archive = tmp_path / "tiny.tar.gz"
    assert mod.pack(out, archive) == 1
    assert mod.unpack(archive, tmp_path / "two") == 1
    again = tmp_path / "two" / "tiny"
    assert not (again / CELLS / "b__s0").exists()  # incomplete: left out, reruns from the start
    res = run_sweep(study, again, workers=0, log=None)
    assert res["skipped"] == ["a__s0"] and res["ran"] == 1
    assert (again / RESULTS_CSV).read_text().splitlines()[1].split(",")[:5] == before.splitlines()[1].split(",")[:5]
    with pytest.raises(SystemExit, match="already exist"):
        mod.unpack(archive, tmp_path / "two")
    shutil.rmtree(tmp_path / "one")
