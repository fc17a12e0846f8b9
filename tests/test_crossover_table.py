"""benchmarks/crossover_table.py applies the crossover study's committed criterion: the best sharing method's
tier accuracy minus max(exclusive, FedAvg-smallest) per seed, 95 % t interval above 0."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from tests.bench_scripts import load

ROOT = Path(__file__).parents[1]


def _script():
    return load("crossover_table")


def _write(path: Path, acc: dict[str, dict[str, list[float]]]) -> Path:
    path.mkdir()
    fields = ["method", "gap", "mix", "seed", "status", "deployed_acc_last5", "mflops_global",
              "deployed_tier_acc_w1_last5", "deployed_tier_acc_w0.125_last5"]
    with (path / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for method, tiers in acc.items():
            for seed in range(5):
                w.writerow({"method": method, "gap": "1/8", "mix": "balanced", "seed": seed, "status": "complete",
                            "deployed_acc_last5": tiers["w1"][seed] / 2 + tiers["w0.125"][seed] / 2,
                            "mflops_global": 5.0 if method != "fedavg-smallest" else 0.1,
                            "deployed_tier_acc_w1_last5": tiers["w1"][seed],
                            "deployed_tier_acc_w0.125_last5": tiers["w0.125"][seed]})
    return path


def test_pays_only_above_both_baselines_per_seed(tmp_path, capsys):
    noise = [0.0, 0.01, -0.01, 0.005, -0.005]
    acc = {
        "exclusive": {"w1": [0.80 + n for n in noise], "w0.125": [0.70 + n for n in noise]},
        "fedavg-smallest": {"w1": [0.70 + n for n in noise], "w0.125": [0.71 + n for n in noise]},
        # beats exclusive by 3 points at the strong tier on every seed; at the weak tier it beats exclusive but
        # not FedAvg-smallest, whose seeds are the max there: no pay
        "nefl": {"w1": [0.83 + n for n in noise], "w0.125": [0.705 + n + (0.01 if i % 2 else -0.01)
                                                           for i, n in enumerate(noise)]},
        "heterofl": {"w1": [0.79 + n for n in noise], "w0.125": [0.69 + n for n in noise]},
    }
    sweep = _write(tmp_path / "sweep", acc)
    mod = _script()
    res = mod.analyse(mod.load(sweep))
    tiers = res[("1/8", "balanced")]["per_tier"]
    assert tiers["w1"]["best"] == "nefl"
    assert mod.verdict(tiers["w1"]["diffs"]["nefl"]) == "**pays**"
    assert tiers["w1"]["diffs"]["nefl"] == pytest.approx([0.03] * 5)
    assert mod.verdict(tiers["w0.125"]["diffs"]["nefl"]) == "ties"
    assert mod.verdict(tiers["w1"]["diffs"]["heterofl"]) == "loses"
    out_csv = tmp_path / "map.csv"
    assert mod.main([str(sweep), "--csv", str(out_csv)]) == 0
    text = capsys.readouterr().out
    assert "| 1/8 | balanced | w1 | 5.00 / 5.00 / 0.10 |" in text
    rows = list(csv.DictReader(out_csv.open()))
    assert {(r["tier"], r["method"]) for r in rows} == {(t, m) for t in ("w1", "w0.125") for m in ("nefl", "heterofl")}


def test_the_long_study_is_written_where_the_weak_tier_trails_most(tmp_path):
    from hetfl.sweep import load_study

    study = load_study(ROOT / "configs" / "study_crossover_g8.toml")
    sweep = tmp_path / "g8"
    sweep.mkdir()
    (sweep / "study.toml").write_text(study.to_toml())
    fields = ["method", "gap", "mix", "seed", "status", "deployed_tier_acc_w1_last5", "deployed_tier_acc_w0.125_last5"]
    weak = {("balanced", "fedavg-smallest"): 0.74, ("balanced", "inplace"): 0.735, ("balanced", "heterofl"): 0.72,
            ("weak70", "fedavg-smallest"): 0.74, ("weak70", "inplace"): 0.70, ("weak70", "heterofl"): 0.725}
    with (sweep / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for (mix, method), acc in [*weak.items(), (("balanced", "exclusive"), 0.74), (("weak70", "exclusive"), 0.74)]:
            for seed in range(5):
                w.writerow({"method": method, "gap": "1/8", "mix": mix, "seed": seed, "status": "complete",
                            "deployed_tier_acc_w1_last5": 0.8, "deployed_tier_acc_w0.125_last5": acc + seed / 1000})
    mod = _script()
    res = mod.analyse(mod.load(sweep))
    # balanced: the best (inplace) trails by 0.5 points; weak70: the best (heterofl) by 1.5 -> weak70
    assert mod.long_setting(res) == (("1/8", "weak70"), "heterofl", pytest.approx(0.015))
    mod.write_long([sweep], res, tmp_path / "long.toml")
    long = load_study(tmp_path / "long.toml")
    assert long.name == "crossover-g8-300" and long.base["rounds"] == 300 and long.base["eval"]["start"] == 260
    assert list(long.axes["method"]) == ["heterofl", "exclusive", "fedavg-smallest"]
    assert long.axes["method"]["heterofl"] == study.axes["method"]["heterofl"]  # its tuned lr kept
    assert list(long.axes["mix"]) == ["weak70"] and len(long.cells()) == 15
