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
4. ``--main FILE`` (any tuning sweep with ``method`` and ``lr`` axes, e.g. the footing's or the Shakespeare
   setting's): the main study, every method at its tuned lr, seeds 0-4, plus ``--ablation`` arms; refused
   while a best lr lies at an edge of the grid that no ``--extend`` sweep has moved (the design extends once:
   a best value at the extension's own edge is taken and flagged).
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


def tuned(rows: list[dict[str, str]]) -> dict[str, tuple[str, float, bool, bool]]:
    """Per method: (best lr, its deployed_val_acc, whether the best lies at an edge of the grid, whether it was
    taken there anyway). The design extends a grid once toward an edge: a best value that is itself the
    extension's (a row marked ``_extension``) is taken at the new edge, flagged, not refused again."""
    grid: dict[str, dict[str, float]] = {}
    ext: dict[str, set[str]] = {}
    for r in rows:
        grid.setdefault(r["method"], {})[r["lr"]] = float(r[METRIC])
        if r.get("_extension"):
            ext.setdefault(r["method"], set()).add(r["lr"])
    out = {}
    for method, by_lr in grid.items():
        lrs = sorted(by_lr, key=float)
        best = max(lrs, key=lambda lr: by_lr[lr])
        at_edge = len(lrs) > 2 and best in (lrs[0], lrs[-1])
        taken = at_edge and best in ext.get(method, set())
        out[method] = (best, by_lr[best], at_edge and not taken, taken)
    return out


def print_grid(rows: list[dict[str, str]], best: dict[str, tuple[str, float, bool]]) -> None:
    lrs = sorted({r["lr"] for r in rows}, key=float)
    acc = {(r["method"], r["lr"]): float(r[METRIC]) for r in rows}
    print(f"{METRIC} (validation split, seed 100), percent\n")
    print("| method | " + " | ".join(f"lr {lr}" for lr in lrs) + " | chosen |")
    print("|---|" + "---:|" * (len(lrs) + 1))
    for method in best:
        cells = [f"{100 * acc[(method, lr)]:.2f}" if (method, lr) in acc else "-" for lr in lrs]
        lr, _, edge, taken = best[method]
        note = " (edge of the grid)" if edge else " (edge after one extension: taken)" if taken else ""
        print(f"| {method} | " + " | ".join(cells) + f" | {lr}{note} |")
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


def main_study(tuning: Path, best: dict[str, tuple[str, float, bool, bool]], *, name: str, seeds: tuple[int, ...],
               ablations: list[str], extra: list[str] = ()) -> str:
    """A tuning sweep's main study: every tuned method at its chosen lr (the lr axis gone), the tuning study's
    base and other axes, ``seeds``; each ``NAME=METHOD:OVERRIDE;OVERRIDE`` of ``ablations`` adds an arm with
    METHOD's overrides and lr plus its own (e.g. ``depthfl-kd0=depthfl:algorithm.kd=0.0``), each
    ``NAME=OVERRIDE;OVERRIDE`` of ``extra`` an arm of its own (its lr among its overrides: not tuned here)."""
    study = load_study(tuning)
    methods = study.axes["method"]
    missing = [m for m in methods if m not in best]
    if missing:
        sys.exit(f"{tuning}: no complete tuning cell of {', '.join(missing)}")
    edge = [m for m in methods if best[m][2]]
    if edge:
        sys.exit(f"best lr at an edge of the grid for {', '.join(edge)}: extend the grid (--extend) first")
    arms = {m: (*methods[m], f"train.lr={best[m][0]}") for m in methods}
    for spec in ablations:
        arm, _, rest = spec.partition("=")
        of, _, more = rest.partition(":")
        if not arm or of not in arms or not more:
            sys.exit(f"--ablation {spec!r}: expected NAME=METHOD:OVERRIDE[;OVERRIDE] with METHOD one of "
                     f"{', '.join(arms)}")
        arms[arm] = (*arms[of], *more.split(";"))
    for spec in extra:
        arm, _, overrides = spec.partition("=")
        if not arm or "train.lr=" not in overrides or arm in arms:
            sys.exit(f"--arm {spec!r}: expected a new NAME=OVERRIDE[;OVERRIDE] that sets train.lr")
        arms[arm] = tuple(overrides.split(";"))
    axes = {"method": arms, **{a: lv for a, lv in study.axes.items() if a not in ("method", "lr")}}
    main = replace(study, name=name, seeds=seeds, axes=axes)
    lrs = ", ".join(f"{m} {best[m][0]}" for m in methods)
    taken = [m for m in methods if best[m][3]]
    note = (f"# Taken at the edge of the grid after one extension (the design extends once): {', '.join(taken)}.\n"
            if taken else "")
    return (f"# Written by benchmarks/crossover_pilot.py --main from the tuning sweep {tuning} (validation split\n"
            f"# only): {lrs}.\n" + note + main.to_toml())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("pilot", type=Path, help="the pilot's sweep directory")
    ap.add_argument("--extend", type=Path, action="append", default=[],
                    help="a sweep of further grid values (configs/study_crossover_lr02.toml), read with the pilot's")
    ap.add_argument("--select", type=Path, help="write the selection study file here")
    ap.add_argument("--selected", type=Path, help="the selection sweep's directory: pick the two methods")
    ap.add_argument("--main", type=Path, help="write the main study (tuned lrs, --seeds) to this file")
    ap.add_argument("--name", help="the main study's name (default: the tuning study's without '-lr')")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="the main study's seeds, comma-separated")
    ap.add_argument("--ablation", action="append", default=[], metavar="NAME=METHOD:OVERRIDE[;OVERRIDE]",
                    help="an extra arm of the main study: METHOD at its lr plus these overrides")
    ap.add_argument("--arm", action="append", default=[], metavar="NAME=OVERRIDE[;OVERRIDE]",
                    help="an untuned arm of the main study, its train.lr among its overrides")
    args = ap.parse_args(argv)
    rows = _rows(args.pilot) + [{**r, "_extension": "1"} for extra in args.extend for r in _rows(extra)]
    best = tuned(rows)
    print_grid(rows, best)
    if args.select:
        args.select.write_text(select_study(args.pilot, best), encoding="utf-8")
        print(f"wrote {args.select}")
    if args.main:
        name = args.name or load_study(args.pilot).name.removesuffix("-lr")
        seeds = tuple(int(x) for x in args.seeds.split(","))
        text = main_study(args.pilot, best, name=name, seeds=seeds, ablations=args.ablation, extra=args.arm)
        args.main.write_text(text, encoding="utf-8")
        print(f"wrote {args.main}")
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
