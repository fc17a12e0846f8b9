"""Tables of the controlled comparison (issue 27, part 1) from a finished or partial ``hetfl sweep``.

    hetfl sweep configs/study_compare_fmnist.toml --out sweeps/compare-fmnist
    python benchmarks/compare_table.py sweeps/compare-fmnist --csv benchmarks/results/compare_fmnist.csv

Reads ``OUT/results.csv`` (one row per cell) and every cell's ``metrics.jsonl`` and prints markdown:

1. accuracy per method, mean ± sample std over the seeds that finished, each a mean of the last 5
   evaluations (rounds 60-100 at ``eval.every = 10``): deployed accuracy (every client scored with the
   model its tier runs, on the global test set), the full model, the weakest tier's model, the worst 10 %
   of clients (local test splits, each client with its tier's model); and the paired difference to the
   baseline method (seed s minus seed s of the baseline: same partition, fleet and initial model);
2. per tier: local accuracy of the tier's model (where the method has one model per tier), training
   GFLOPs and upload MB per client and round (means over the run), and the wall time of a cell.

``--csv`` writes the per-cell numbers it used (small; benchmarks/results/ keeps them).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

TIERS = ("w1", "w0.5", "w0.25", "w0.125")
#: the eval label of the model each tier runs, per algorithm (the first is the global target)
TIER_MODELS = {
    "heterofl": ("global", "w0.5", "w0.25", "w0.125"),
    "fedrolex": ("global", "w0.5", "w0.25", "w0.125"),
    "feddropout": ("global", "w0.5", "w0.25", "w0.125"),
    "fjord": ("global", "w0.5", "w0.25", "w0.125"),
    "fiarse": ("global", "r0.25", "r0.0625", "r0.015625"),
    "depthfl": ("global", "w1d0.75", "w1d0.5", "w1d0.25"),
    "scalefl": ("global", "w0.75d0.75", "w0.7d0.5", "w0.7d0.25"),
}
HEADLINE = (("deployed_acc_last5", "deployed"), ("test_accuracy_last5", "full model"),
            ("acc_narrowest_last5", "weakest tier's model"), ("worst10_acc_last5", "worst 10 % clients"))


def _f(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def _ms(vals: list[float], scale: float = 100.0, digits: int = 1) -> str:
    if not vals:
        return "–"
    m = statistics.fmean(vals) * scale
    if len(vals) == 1:
        return f"{m:.{digits}f}"
    return f"{m:.{digits}f} ± {statistics.stdev(vals) * scale:.{digits}f}"


def _last5(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals[-5:]) if vals else None


def cell_extras(run_dir: Path, algorithm: str) -> dict[str, float]:
    """Per tier: local accuracy of its model (last-5 mean), GFLOPs and MB uploaded per client and round."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    out: dict[str, float] = {}
    for t, tier in enumerate(TIERS):
        if algorithm in TIER_MODELS:
            label = TIER_MODELS[algorithm][t]
            v = _last5(evals, f"tier_acc.{label}")
        else:  # one model for everyone: its mean local accuracy is every tier's
            v = _last5(evals, "client_acc_mean")
        if v is not None:
            out[f"local_{tier}"] = v
        flops = [r[f"tier.{tier}.flops"] / r[f"tier.{tier}.clients"] for r in rows
                 if r.get(f"tier.{tier}.clients")]
        up = [r[f"tier.{tier}.bytes_up"] / r[f"tier.{tier}.clients"] for r in rows if r.get(f"tier.{tier}.clients")]
        if flops:
            out[f"gflops_{tier}"] = statistics.fmean(flops) / 1e9
            out[f"mb_up_{tier}"] = statistics.fmean(up) / 1e6
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--baseline", default="heterofl")
    p.add_argument("--csv", type=Path, help="write the per-cell numbers used here")
    args = p.parse_args()
    with open(args.sweep / "results.csv", newline="") as f:
        cells = [r for r in csv.DictReader(f) if r.get("status") == "complete"]
    methods = list(dict.fromkeys(r["method"] for r in cells))
    for r in cells:
        r.update({k: str(v) for k, v in cell_extras(Path(r["run_dir"]), r["algorithm"]).items()})
    by = {(r["method"], int(r["seed"])): r for r in cells}
    seeds = sorted({int(r["seed"]) for r in cells})

    print("Seeds finished per method: " + ", ".join(
        f"{m} {sum((m, s) in by for s in seeds)}" for m in methods) + "\n")
    head = " | ".join(name for _, name in HEADLINE)
    print(f"| method | {head} | deployed − {args.baseline} (paired) | weakest − {args.baseline} (paired) |")
    print("|---" * (3 + len(HEADLINE)) + "|")
    for m in methods:
        cols = []
        for key, _ in HEADLINE:
            cols.append(_ms([v for s in seeds if (m, s) in by and (v := _f(by[m, s].get(key))) is not None]))
        diffs = []
        for key in ("deployed_acc_last5", "acc_narrowest_last5"):
            d = [_f(by[m, s][key]) - _f(by[args.baseline, s][key]) for s in seeds
                 if (m, s) in by and (args.baseline, s) in by and by[m, s].get(key) and by[args.baseline, s].get(key)]
            diffs.append("–" if m == args.baseline else _ms(d))
        print(f"| {m} | {' | '.join(cols)} | {' | '.join(diffs)} |")

    print("\nPer tier (a = width 1 ... d = width 1/8 for width methods; each method's own level otherwise): local "
          "accuracy of the tier's model, training GFLOPs and MB uploaded per client and round, wall time per cell:\n")
    print("| method | local acc. a / b / c / d | GFLOPs a / b / c / d | MB up a / b / c / d | wall s |")
    print("|---|---|---|---|---|")
    for m in methods:
        rows = [by[m, s] for s in seeds if (m, s) in by]

        def per_tier(prefix: str, scale: float, digits: int, rows: list[dict] = rows) -> str:
            return " / ".join(_ms([_f(r[f"{prefix}_{t}"]) for r in rows if r.get(f"{prefix}_{t}")], scale, digits)
                              .split(" ± ")[0] for t in TIERS)

        wall = statistics.fmean(_f(r["wall_time_s"]) for r in rows)
        print(f"| {m} | {per_tier('local', 100, 1)} | {per_tier('gflops', 1, 2)} | {per_tier('mb_up', 1, 3)} | "
              f"{wall:.0f} |")
    if args.csv:
        keys = ["method", "seed", "algorithm", *(k for k, _ in HEADLINE), "wall_time_s",
                *(f"{p}_{t}" for p in ("local", "gflops", "mb_up") for t in TIERS)]
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in cells:
                w.writerow({k: r.get(k, "") for k in keys})
        print(f"\nwrote {args.csv}")


if __name__ == "__main__":
    main()
