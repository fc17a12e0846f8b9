"""The crossover study's pilot: each method's learning rate, and the two sharing methods of the main study.

The rule was committed in docs/study-crossover.md before the pilot ran; this script applies it and reads
validation accuracy only (``deployed_val_acc``, mean of the last 5 evaluations), never a test column:

    hetfl sweep configs/study_crossover_pilot.toml --out sweeps/crossover-pilot
    python benchmarks/crossover_pilot.py sweeps/crossover-pilot --select configs/study_crossover_select.toml
    hetfl sweep configs/study_crossover_select.toml --out sweeps/crossover-select
    python benchmarks/crossover_pilot.py sweeps/crossover-pilot --selected sweeps/crossover-select

1. **Learning rate** per method: the grid value with the highest ``deployed_val_acc`` on seed 100; a best
   value at an edge of the grid is flagged (the grid does not bracket it).  ``--extend DIR`` adds the cells of
   a further grid (the upward extension, ``configs/study_crossover_lr02.toml``) to the choice.
2. ``--select FILE`` writes the selection study: the candidate sharing methods at their tuned learning rate on
   seeds 101-102 (seed 100 is the pilot's own cell).
3. ``--selected DIR``: per candidate the mean ``deployed_val_acc`` over seeds 100-102; the two highest are
   the main study's sharing methods.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import replace
from pathlib import Path

from hetfl.sweep import load_study

CANDIDATES = ("inplace", "nefl", "depthfl-dyn")  # SLT cannot reach the full model at gap 1/8 (see the doc)
METRIC = "deployed_val_acc_last5"
SELECT_SEEDS = (101, 102)


def _rows(sweep: Path) -> list[dict[str, str]]:
    path = sweep / "results.csv"
    if not path.is_file():
        sys.exit(f"{path}: no results.csv (run `hetfl sweep ... --out {sweep}` first)")
    with path.open() as f:
        return [r for r in csv.DictReader(f) if r.get("status") == "complete" and r.get(METRIC)]


def tuned(rows: list[dict[str, str]]) -> dict[str, tuple[str, float, bool]]:
    """Per method: (best lr, its deployed_val_acc, whether the best lies at an edge of the grid)."""
    grid: dict[str, dict[str, float]] = {}
    for r in rows:
        grid.setdefault(r["method"], {})[r["lr"]] = float(r[METRIC])
    out = {}
    for method, by_lr in grid.items():
        lrs = sorted(by_lr, key=float)
        best = max(lrs, key=lambda lr: by_lr[lr])
        out[method] = (best, by_lr[best], len(lrs) > 2 and best in (lrs[0], lrs[-1]))
    return out


def print_grid(rows: list[dict[str, str]], best: dict[str, tuple[str, float, bool]]) -> None:
    lrs = sorted({r["lr"] for r in rows}, key=float)
    acc = {(r["method"], r["lr"]): float(r[METRIC]) for r in rows}
    print(f"{METRIC} (validation split, seed 100), percent\n")
    print("| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |")
    print("|---|" + "---:|" * (len(lrs) + 1))
    for method in best:
        cells = [f"{100 * acc[(method, lr)]:.2f}" if (method, lr) in acc else "-" for lr in lrs]
        lr, _, edge = best[method]
        print(f"| {method} | " + " | ".join(cells) + f" | {lr}{' (edge of the grid)' if edge else ''} |")
    print()


def select_study(pilot: Path, best: dict[str, tuple[str, float, bool]]) -> str:
    """The selection study: the pilot's study with its method axis cut to the candidates at their tuned
    learning rate, the lr axis gone and seeds 101-102."""
    study = load_study(pilot)
    methods = study.axes["method"]
    missing = [m for m in CANDIDATES if m not in best or m not in methods]
    if missing:
        sys.exit(f"the pilot has no complete cell of {', '.join(missing)}")
    axes = {"method": {m: (*methods[m], f"train.lr={best[m][0]}") for m in CANDIDATES}}
    report = {**study.report, "baseline": CANDIDATES[0]}
    select = replace(study, name="crossover-select", seeds=SELECT_SEEDS, axes=axes, report=report)
    return ("# Written by benchmarks/crossover_pilot.py from the pilot's tuned learning rates "
            "(docs/study-crossover.md).\n" + select.to_toml())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pilot", type=Path, help="the pilot's sweep directory")
    ap.add_argument("--extend", type=Path, action="append", default=[],
                    help="a sweep of further grid values (configs/study_crossover_lr02.toml), read with the pilot's")
    ap.add_argument("--select", type=Path, help="write the selection study file here")
    ap.add_argument("--selected", type=Path, help="the selection sweep's directory: pick the two methods")
    args = ap.parse_args(argv)
    rows = _rows(args.pilot) + [r for extra in args.extend for r in _rows(extra)]
    best = tuned(rows)
    print_grid(rows, best)
    if args.select:
        args.select.write_text(select_study(args.pilot, best), encoding="utf-8")
        print(f"wrote {args.select}")
    if args.selected:
        seed100 = {r["method"]: float(r[METRIC]) for r in rows if r["lr"] == best.get(r["method"], ("",))[0]}
        by: dict[str, list[float]] = {m: [seed100[m]] for m in CANDIDATES if m in seed100}
        for r in _rows(args.selected):
            by.setdefault(r["method"], []).append(float(r[METRIC]))
        ranked = sorted(by, key=lambda m: statistics.fmean(by[m]), reverse=True)
        print("| candidate | lr | seeds | mean deployed_val_acc % |")
        print("|---|---:|---:|---:|")
        for m in ranked:
            print(f"| {m} | {best[m][0]} | {len(by[m])} | {100 * statistics.fmean(by[m]):.2f} |")
        short = [m for m in ranked if len(by[m]) < 1 + len(SELECT_SEEDS)]
        if short:
            print(f"\nnot every seed is complete yet: {', '.join(short)}")
        print(f"\nthe main study's sharing methods: {ranked[0]}, {ranked[1]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
