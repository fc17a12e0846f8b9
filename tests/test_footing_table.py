"""benchmarks/footing_table.py: each method per tier against exclusive learning and FedAvg-smallest, paired by
seed across sweeps of one setting, with the prefix score of rolling / random methods labelled."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.bench_scripts import load

NOISE = [0.0, 0.01, -0.01, 0.005, -0.005]


def _script():
    return load("footing_table")


def _write(path: Path, acc: dict[str, tuple[float, float]], mix: str = "balanced", prefix: bool = False) -> Path:
    path.mkdir()
    fields = ["method", "gap", "mix", "seed", "status", "deployed_acc_last5", "mflops_global",
              "deployed_tier_acc_w1_last5", "deployed_tier_acc_w0.125_last5", "acc_w0.125_last5",
              "prefix_acc_w0.125_last5"]
    with (path / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for method, (strong, weak) in acc.items():
            for seed, n in enumerate(NOISE):
                w.writerow({"method": method, "gap": "1/8", "mix": mix, "seed": seed, "status": "complete",
                            "deployed_acc_last5": (strong + weak) / 2 + n, "mflops_global": 5.0,
                            "deployed_tier_acc_w1_last5": strong + n, "deployed_tier_acc_w0.125_last5": weak + n,
                            "acc_w0.125_last5": weak + n, "prefix_acc_w0.125_last5": 0.2 if prefix else ""})
    return path


def test_each_method_against_both_baselines_across_two_sweeps(tmp_path, capsys):
    crossover = _write(tmp_path / "g8", {"exclusive": (0.80, 0.70), "fedavg-smallest": (0.70, 0.72),
                                         "heterofl": (0.83, 0.72)})
    _write(tmp_path / "g8w", {"exclusive": (0.1, 0.1), "fedavg-smallest": (0.1, 0.1)}, mix="weak70")
    footing = _write(tmp_path / "footing", {"fedrolex": (0.81, 0.60)}, prefix=True)
    mod = _script()
    out_csv = tmp_path / "footing.csv"
    assert mod.main([str(crossover), str(tmp_path / "g8w"), str(footing), "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    # HeteroFL's strong tier: +3 over exclusive on every seed (beats), +13 over FedAvg-smallest; weak tier 0 / 0
    assert "| heterofl | 5 | 5.000 | 83.00 | +3.00 [+3.00, +3.00] beats | +13.00 [+13.00, +13.00] beats |" in text
    assert "| fedrolex | 5 | 5.000 | 60.00 | -10.00 [-10.00, -10.00] loses | -12.00 [-12.00, -12.00] loses |" in text
    assert "| fedrolex | w0.125 | 20.00 | 60.00 |" in text  # prefix beside the trained window, labelled
    rows = {(r["tier"], r["method"]): r for r in csv.DictReader(out_csv.open())}
    assert float(rows[("w1", "heterofl")]["d_excl_mean"]) == pytest.approx(0.03)
    assert rows[("w1", "exclusive")]["d_excl_mean"] == ""  # a baseline against itself: nothing
    assert len(rows) == 8  # the weak70 rows were left out, not averaged in


def test_a_missing_baseline_is_named(tmp_path):
    sweep = _write(tmp_path / "s", {"exclusive": (0.8, 0.7), "heterofl": (0.8, 0.7)})
    with pytest.raises(SystemExit, match="baseline 'fedavg-smallest'"):
        _script().main([str(sweep)])
