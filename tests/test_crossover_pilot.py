"""benchmarks/crossover_pilot.py applies the pilot's committed rule: lr by validation accuracy, then the two
candidates with the highest mean validation accuracy over seeds 100-102."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from hetfl.sweep import load_study
from tests.bench_scripts import load

ROOT = Path(__file__).parents[1]


def _script():
    return load("crossover_pilot")


def _sweep(path: Path, rows: list[dict], study: Path | None = None) -> Path:
    path.mkdir(parents=True)
    if study is not None:
        shutil.copy(study, path / "study.toml")
    with (path / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["method", "lr", "seed", "status", "deployed_val_acc_last5",
                                          "deployed_acc_last5"])
        w.writeheader()
        for r in rows:
            w.writerow({"status": "complete", "deployed_acc_last5": 0.99, **r})
    return path


def test_rule_reads_validation_only_and_picks_two(tmp_path, capsys):
    mod = _script()
    val = {"exclusive": (0.70, 0.72, 0.71), "fedavg-smallest": (0.60, 0.61, 0.65), "heterofl": (0.7, 0.7, 0.7),
           "inplace": (0.74, 0.73, 0.70), "nefl": (0.69, 0.75, 0.70), "depthfl-dyn": (0.71, 0.72, 0.73)}
    rows = [{"method": m, "lr": lr, "seed": 100, "deployed_val_acc_last5": a}
            for m, accs in val.items() for lr, a in zip(("0.02", "0.05", "0.1"), accs)]
    pilot = _sweep(tmp_path / "pilot", rows, ROOT / "configs" / "study_crossover_pilot.toml")
    best = mod.tuned(mod._rows(pilot))
    assert best["inplace"][0] == "0.02" and best["inplace"][2]  # at the grid's edge: flagged
    assert best["nefl"][0] == "0.05" and not best["nefl"][2]
    assert best["fedavg-smallest"][0] == "0.1"
    select = tmp_path / "select.toml"
    assert mod.main([str(pilot), "--select", str(select)]) == 0
    study = load_study(select)
    cells = study.cells()
    assert sorted({c.seed for c in cells}) == [101, 102]
    assert {c.name.split("__")[0] for c in cells} == {"inplace", "nefl", "depthfl-dyn"}
    lrs = {c.name.split("__")[0]: study.config(c).train.lr for c in cells}
    assert lrs == {"inplace": 0.02, "nefl": 0.05, "depthfl-dyn": 0.1}
    # the selection: test accuracy (0.99 everywhere) plays no part
    sel = _sweep(tmp_path / "select", [
        {"method": "inplace", "lr": "0.02", "seed": s, "deployed_val_acc_last5": a}
        for s, a in ((101, 0.70), (102, 0.70))] + [
        {"method": "nefl", "lr": "0.05", "seed": s, "deployed_val_acc_last5": a}
        for s, a in ((101, 0.8), (102, 0.8))] + [
        {"method": "depthfl-dyn", "lr": "0.1", "seed": s, "deployed_val_acc_last5": a}
        for s, a in ((101, 0.6), (102, 0.6))])
    capsys.readouterr()
    assert mod.main([str(pilot), "--selected", str(sel)]) == 0
    out = capsys.readouterr().out
    assert "the main study's sharing methods: nefl, inplace" in out  # (.75+.8+.8)/3 > (.74+.7+.7)/3 > (.73+.6+.6)/3


def test_missing_sweep_says_what_to_run(tmp_path):
    with pytest.raises(SystemExit, match="run `hetfl sweep"):
        _script().main([str(tmp_path)])


def test_extended_grid_joins_the_choice(tmp_path):
    mod = _script()
    rows = [{"method": "heterofl", "lr": lr, "seed": 100, "deployed_val_acc_last5": a}
            for lr, a in (("0.02", 0.7), ("0.05", 0.75), ("0.1", 0.78))]
    pilot = _sweep(tmp_path / "pilot", rows, ROOT / "configs" / "study_crossover_pilot.toml")
    assert mod.tuned(mod._rows(pilot))["heterofl"][::2] == ("0.1", True)
    ext = _sweep(tmp_path / "ext", [{"method": "heterofl", "lr": "0.2", "seed": 100, "deployed_val_acc_last5": 0.77}])
    best = mod.tuned(mod._rows(pilot) + mod._rows(ext))
    assert best["heterofl"][::2] == ("0.1", False)  # bracketed now: 0.05 < 0.1 > 0.2


def test_main_study_takes_each_tuned_lr_and_refuses_an_edge(tmp_path):
    mod = _script()
    tuning = ROOT / "configs" / "study_footing_q_lr.toml"
    methods = list(load_study(tuning).axes["method"])
    rows = [{"method": m, "lr": lr, "seed": 100, "deployed_val_acc_last5": acc}
            for m in methods for lr, acc in (("0.05", 0.70), ("0.1", 0.75), ("0.2", 0.72))]
    sweep = _sweep(tmp_path / "tune", rows, study=tuning)
    out = tmp_path / "main.toml"
    nefl = 'nefl=algorithm={name="nefl", clients_per_round=10};train.lr=0.1'
    assert mod.main([str(sweep), "--main", str(out), "--ablation", "depthfl-kd0=depthfl:algorithm.kd=0.0",
                     "--arm", nefl]) == 0
    main = load_study(out)
    assert main.name == "footing-q" and main.seeds == (0, 1, 2, 3, 4) and "lr" not in main.axes
    assert main.base == load_study(tuning).base
    assert main.axes["method"]["fjord"][-1] == "train.lr=0.1"
    assert main.axes["method"]["depthfl-kd0"][-2:] == ("train.lr=0.1", "algorithm.kd=0.0")
    assert main.axes["method"]["nefl"] == ('algorithm={name="nefl", clients_per_round=10}', "train.lr=0.1")
    assert len(main.cells()) == 5 * (len(methods) + 2)
    with pytest.raises(SystemExit, match="that sets train.lr"):
        mod.main([str(sweep), "--main", str(out), "--arm", 'nefl=algorithm={name="nefl"}'])
    edge = _sweep(tmp_path / "edge", [{**r, "deployed_val_acc_last5": float(r["lr"])} for r in rows], study=tuning)
    with pytest.raises(SystemExit, match="edge of the grid for fedavg-full"):
        mod.main([str(edge), "--main", str(tmp_path / "no.toml")])
    assert not (tmp_path / "no.toml").exists()


def test_an_edge_the_extension_reached_is_taken_once(tmp_path):
    """The design extends a grid once toward an edge: a best value at the extension's own edge is taken (and said
    in the file); a best value at an edge of the original grid is still refused."""
    mod = _script()
    tuning = ROOT / "configs" / "study_crossover_shakespeare_lr.toml"
    methods = list(load_study(tuning).axes["method"])
    grid = {m: (0.30, 0.33, 0.35) for m in methods} | {"depthfl-dyn": (0.32, 0.31, 0.17)}
    rows = [{"method": m, "lr": lr, "seed": 100, "deployed_val_acc_last5": acc}
            for m in methods for lr, acc in zip(("0.8", "1.5", "3"), grid[m])]
    sweep = _sweep(tmp_path / "tune", rows, study=tuning)
    up = _sweep(tmp_path / "up", [{"method": m, "lr": "6", "seed": 100,
                                   "deployed_val_acc_last5": 0.36 if m == "heterofl" else 0.30}
                                  for m in methods if m != "depthfl-dyn"])
    with pytest.raises(SystemExit, match="edge of the grid for depthfl-dyn"):  # 0.8: the original grid's edge
        mod.main([str(sweep), "--extend", str(up), "--main", str(tmp_path / "no.toml")])
    down = _sweep(tmp_path / "down", [{"method": "depthfl-dyn", "lr": "0.4", "seed": 100,
                                       "deployed_val_acc_last5": 0.2}])
    out = tmp_path / "main.toml"
    assert mod.main([str(sweep), "--extend", str(up), "--extend", str(down), "--main", str(out)]) == 0
    arms = load_study(out).axes["method"]
    assert arms["heterofl"][-1] == "train.lr=6" and arms["exclusive"][-1] == "train.lr=3"
    assert arms["depthfl-dyn"][-1] == "train.lr=0.8"
    assert "after one extension (the design extends once): heterofl.\n" in out.read_text()
