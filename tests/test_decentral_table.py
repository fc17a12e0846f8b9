"""benchmarks/decentral_table.py --goal applies issue 41's committed criterion: a variant meets the goal in a
setting only when its paired 95 % t interval against D-PSGD-smallest lies above 0 at every tier."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from tests.bench_scripts import load

TIERS = ("w1", "w0.25", "w0.0625")


def _script():
    return load("decentral_table")


def _sweep(path: Path, acc: dict[str, dict[str, float]]) -> Path:
    """Variant -> tier -> accuracy; seed s adds a small seed effect shared by every variant (pairing)."""
    path.mkdir()
    rows = []
    for variant, tiers in acc.items():
        for seed in range(5):
            run = path / f"{variant}__s{seed}"
            run.mkdir()
            wobble = [0.0, 0.004, -0.004, 0.002, -0.002][seed]
            evals = []
            for rnd in range(60, 101, 10):
                r = {"round": rnd, "test_accuracy": 0.5}
                for i, t in enumerate(TIERS):
                    r[f"test_accuracy.{t}"] = tiers[t] + wobble + (0.001 * seed if variant == "noisy" else 0.0)
                    r[f"bytes_sent.{t}"] = 1e6 * (i + 1)
                    r[f"flops.{t}"] = 1e6 * (3 - i)
                evals.append(json.dumps(r))
            (run / "metrics.jsonl").write_text("\n".join(evals) + "\n")
            rows.append({"variant": variant, "models": "slices", "labels": "dirichlet-0.1", "seed": seed,
                         "status": "complete", "run_dir": str(run)})
    with (path / "results.csv").open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return path


def test_goal_needs_every_tier_above_dpsgd_smallest(tmp_path, capsys):
    base = {"w1": 0.60, "w0.25": 0.60, "w0.0625": 0.60}
    sweep = _sweep(tmp_path / "s", {
        "dpsgd-smallest": base,
        "dkd": {"w1": 0.50, "w0.25": 0.58, "w0.0625": 0.59},
        "all": {"w1": 0.70, "w0.25": 0.66, "w0.0625": 0.61},      # above at every tier: meets the goal
        "mutual": {"w1": 0.75, "w0.25": 0.70, "w0.0625": 0.60},   # the weakest tier ties: does not
    })
    assert _script().main([str(sweep), "--goal", "--csv", str(tmp_path / "g.csv")]) == 0
    out = capsys.readouterr().out
    assert "slices, dirichlet-0.1: goal met by all" in out and "mutual" not in out.split("goal met by")[1]
    assert "| slices, dirichlet-0.1 | all | w0.0625 | 61.00 | +1.00 [+1.00, +1.00] | +2.00 [+2.00, +2.00] | 3.000 " \
           "| 1.0 |" in out
    assert "| slices, dirichlet-0.1 | mutual | w0.0625 | 60.00 | +0.00 [+0.00, +0.00] |" in out
    with (tmp_path / "g.csv").open() as f:
        row = next(csv.DictReader(f))
    assert float(row["acc_w0.0625"]) == 0.60 and float(row["mb_w1"]) == 1.0


def test_no_variant_meets_the_goal_is_said(tmp_path, capsys):
    sweep = _sweep(tmp_path / "s", {"dpsgd-smallest": {t: 0.6 for t in TIERS}, "dkd": {t: 0.55 for t in TIERS}})
    _script().main([str(sweep), "--goal"])
    assert "slices, dirichlet-0.1: no variant beats D-PSGD-smallest at every tier" in capsys.readouterr().out


def test_the_first_studys_csv_keeps_its_columns(tmp_path):
    sweep = _sweep(tmp_path / "s", {"dpsgd-smallest": {t: 0.6 for t in TIERS}, "dkd": {t: 0.55 for t in TIERS}})
    _script().main([str(sweep), "--csv", str(tmp_path / "old.csv")])
    with (tmp_path / "old.csv").open() as f:
        assert next(csv.reader(f)) == ["variant", "models", "labels", "seed", "acc_all", "acc_strong", "acc_weak",
                                       "bytes_weak", "flops_weak"]
