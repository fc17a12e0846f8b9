"""Accuracy per round of finished (or still running) hetfl runs: final, best, first round at a target.

Reads each run's ``metrics.jsonl``; prints one line per run and, with ``--every N``, the test accuracy
every N rounds.

    PYTHONPATH=src python benchmarks/accuracy_table.py runs/bench/fmnist_iid runs/bench/fmnist_dir03 --target 0.88
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--target", type=float, default=0.88)
    ap.add_argument("--every", type=int, default=10)
    args = ap.parse_args()
    print(f"{'run':<28} {'rounds':>6} {'final':>7} {'best':>7} {'at round':>8} {'first >= ' + str(args.target):>14}")
    curves = {}
    for run in args.runs:
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
        rows = [r for r in rows if r.get("test_accuracy") is not None]
        if not rows:
            print(f"{run.name:<28} no evaluated round yet")
            continue
        best = max(rows, key=lambda r: r["test_accuracy"])
        first = next((r["round"] for r in rows if r["test_accuracy"] >= args.target), None)
        print(f"{run.name:<28} {rows[-1]['round']:>6} {rows[-1]['test_accuracy']:>7.4f} {best['test_accuracy']:>7.4f} "
              f"{best['round']:>8} {first if first is not None else 'not reached':>14}")
        curves[run.name] = {r["round"]: r["test_accuracy"] for r in rows}
    if args.every and curves:
        last = max(max(c) for c in curves.values())
        marks = [r for r in range(args.every, last + 1, args.every)]
        print("\nround  " + "  ".join(f"{name[:14]:>14}" for name in curves))
        for r in marks:
            print(f"{r:>5}  " + "  ".join(f"{c[r]:>14.4f}" if r in c else f"{'':>14}" for c in curves.values()))


if __name__ == "__main__":
    main()
