"""How far is each width from its capacity? The table of the architectures study's central runs (issue 28).

    hetfl sweep configs/study_arch_capacity.toml --out sweeps/arch-capacity
    python benchmarks/capacity_table.py sweeps/arch-capacity --csv benchmarks/results/arch_capacity.csv

Every cell of that study trains one width of one architecture alone, centrally (one client holding every
training window), one pass of the data per round.  Per architecture and width this prints the test
accuracy after each evaluated pass, the best, and the last gain (best of the last evaluation minus the one
before, in points): a gain near zero means the curve has flattened and the best is the width's capacity on
this data; a large one that it is still climbing (rerun the sweep with a larger ``rounds`` to resume).

``--fl SWEEP=ARCH`` (repeatable) adds, per width, the federated accuracy of that width in a finished
architectures sweep (``benchmarks/compare_table.py``'s per-tier global accuracy: FedAvg of the full and of
the 1/8 model, and every width method's level of that width, mean of the last 5 evaluations over seeds)
next to the capacity, so the gap FL leaves is read off one table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from pathlib import Path

from compare_table import TIERS, _complete, _deployed_curve, _f, cell_extras

#: methods whose tiers run prefix widths of one model (a width's FL model is their tier's)
WIDTH_METHODS = ("heterofl", "fedrolex", "fjord", "feddropout")


def _fl_by_width(sweep: Path) -> dict[str, dict[float, list[float]]]:
    """method -> width -> accuracies over seeds of the model of that width (global test set, last-5 means)."""
    widths = {t: float(t[1:]) for t in TIERS}
    out: dict[str, dict[float, list[float]]] = {}
    for r in _complete(sweep):
        extras = cell_extras(Path(r["run_dir"]), r["algorithm"])
        method = r["method"]
        if r["algorithm"] in WIDTH_METHODS:
            for t in TIERS:
                if f"global_{t}" in extras:
                    out.setdefault(method, {}).setdefault(widths[t], []).append(extras[f"global_{t}"])
        elif r["algorithm"] == "fedavg":
            w = 0.125 if method.endswith("smallest") else 1.0
            v = _f(r.get("test_accuracy_last5"))
            if v is not None:
                out.setdefault(method, {}).setdefault(w, []).append(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--csv", type=Path, help="write the per-cell curve here")
    ap.add_argument("--fl", action="append", default=[], metavar="SWEEP=ARCH",
                    help="a finished architectures sweep and the arch level of the capacity study it used")
    args = ap.parse_args()

    cells = _complete(args.sweep)
    if not cells:
        raise SystemExit(f"{args.sweep}: no complete cells in results.csv")
    curves = {(r["arch"], float(r["width"])): sorted(_deployed_curve(Path(r["run_dir"]), "test_accuracy").items())
              for r in cells}
    rounds = sorted({rnd for c in curves.values() for rnd, _ in c})
    print("Central training, test accuracy (%) after each evaluated pass over the data; best; gain of the last "
          "evaluation over the one before (points):\n")
    print(f"| arch | width | {' | '.join(f'pass {r}' for r in rounds)} | best | last gain |")
    print("|---" * (4 + len(rounds)) + "|")
    table = []
    for (arch, width), curve in sorted(curves.items(), key=lambda kv: (kv[0][0], -kv[0][1])):
        acc = dict(curve)
        best = max(acc.values()) if acc else None
        gain = (curve[-1][1] - curve[-2][1]) * 100 if len(curve) > 1 else None
        cols = " | ".join(f"{acc[r] * 100:.1f}" if r in acc else "–" for r in rounds)
        print(f"| {arch} | {width:g} | {cols} | {best * 100:.1f} | {gain:+.1f} |" if best is not None
              else f"| {arch} | {width:g} | {cols} | – | – |")
        table.append({"arch": arch, "width": width, "best": best, "last_gain": gain,
                      **{f"acc_pass{r}": acc.get(r) for r in rounds}})

    for spec in args.fl:
        sweep, _, arch = spec.partition("=")
        if not arch:
            raise SystemExit(f"--fl must be SWEEP=ARCH (e.g. sweeps/arch-lstm=lstm), got {spec!r}")
        fl = _fl_by_width(Path(sweep))
        methods = list(fl)
        print(f"\n{arch}: capacity (central best) vs the federated model of each width in {sweep} "
              "(global test accuracy %, mean of the last 5 evaluations, mean over seeds):\n")
        print(f"| width | capacity | {' | '.join(methods)} |")
        print("|---" * (2 + len(methods)) + "|")
        for width in (1.0, 0.5, 0.25, 0.125):
            best = next((t["best"] for t in table if t["arch"] == arch and t["width"] == width), None)
            cols = " | ".join(f"{statistics.fmean(fl[m][width]) * 100:.1f}" if width in fl[m] else "–"
                              for m in methods)
            cap = f"{best * 100:.1f}" if best is not None else "–"
            print(f"| {width:g} | {cap} | {cols} |")

    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        keys = list(dict.fromkeys(k for row in table for k in row))
        tmp = args.csv.with_suffix(".tmp")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(table)
        tmp.replace(args.csv)
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
