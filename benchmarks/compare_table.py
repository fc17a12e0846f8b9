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

The same tables serve any study whose first axis is ``method`` over tiers w1 ... w0.125 (the architectures
study, docs/study-architectures.md, uses ``--baseline fedavg-smallest``).  ``--tier-models
METHOD=LABEL,LABEL,LABEL,LABEL`` names the evaluated model each tier runs for a method whose levels differ
from the defaults below (e.g. DepthFL with two levels); a third table gives every such model's accuracy
on the global test set.

``--lr-sweep DIR`` adds the learning-rate check (configs/study_compare_fmnist_lr.toml): per method, the
deployed and full-model accuracy at each learning rate on the seeds both sweeps ran (seed 0), the main
grid's rate included, and the ranking each method would get at its own best rate; ``--lr-csv`` keeps
those cells.

    hetfl sweep configs/study_compare_fmnist_lr.toml --out sweeps/compare-fmnist-lr
    python benchmarks/compare_table.py sweeps/compare-fmnist --lr-sweep sweeps/compare-fmnist-lr \
        --lr-csv benchmarks/results/compare_fmnist_lr.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from pathlib import Path

from hetfl.config import read_toml

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


def cell_extras(run_dir: Path, algorithm: str, tier_models: dict[str, tuple[str, ...]] | None = None
                ) -> dict[str, float]:
    """Per tier: local and global-test accuracy of its model (last-5 means), GFLOPs and MB uploaded per client
    and round.  ``tier_models`` maps a method (or algorithm) to the eval label of each tier's model."""
    models = tier_models if tier_models is not None else TIER_MODELS
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    out: dict[str, float] = {}
    for t, tier in enumerate(TIERS):
        if algorithm in models:
            label = models[algorithm][t]
            v = _last5(evals, f"tier_acc.{label}")
            g = _last5(evals, "test_accuracy" if label == "global" else f"test_accuracy.{label}")
        else:  # one model for everyone: its mean local accuracy is every tier's
            v = _last5(evals, "client_acc_mean")
            g = _last5(evals, "test_accuracy")
        if v is not None:
            out[f"local_{tier}"] = v
        if g is not None:
            out[f"global_{tier}"] = g
        flops = [r[f"tier.{tier}.flops"] / r[f"tier.{tier}.clients"] for r in rows
                 if r.get(f"tier.{tier}.clients")]
        up = [r[f"tier.{tier}.bytes_up"] / r[f"tier.{tier}.clients"] for r in rows if r.get(f"tier.{tier}.clients")]
        if flops:
            out[f"gflops_{tier}"] = statistics.fmean(flops) / 1e9
            out[f"mb_up_{tier}"] = statistics.fmean(up) / 1e6
    return out


def _train_lr(run_dir: Path) -> float:
    return float(read_toml(run_dir / "config.toml")["train"]["lr"])


def _complete(sweep: Path) -> list[dict]:
    with open(sweep / "results.csv", newline="") as f:
        return [r for r in csv.DictReader(f) if r.get("status") == "complete"]


def lr_check(main_cells: list[dict], lr_sweep: Path, out_csv: Path | None) -> None:
    """Accuracy per method and learning rate on the seeds the lr sweep ran, and the ranking at each best lr."""
    cells = _complete(lr_sweep)
    seeds = sorted({r["seed"] for r in cells})
    pool = cells + [r for r in main_cells if r["seed"] in seeds]
    for r in pool:
        r["lr"] = _train_lr(Path(r["run_dir"]))
    lrs = sorted({r["lr"] for r in pool})
    methods = list(dict.fromkeys(r["method"] for r in main_cells))
    main_lr = {r["lr"] for r in pool if r in main_cells}
    acc = {(r["method"], r["lr"], r["seed"]): r for r in pool}
    print(f"\nLearning-rate check, seed(s) {', '.join(seeds)} (deployed / full model, mean of the last 5 "
          f"evaluations; the main grid runs lr {', '.join(f'{x:g}' for x in sorted(main_lr))}):\n")
    print(f"| method | {' | '.join(f'lr {x:g}' for x in lrs)} | best lr | best − main lr (deployed, pp) |")
    print("|---" * (3 + len(lrs)) + "|")
    best_of: dict[str, float] = {}
    main_of: dict[str, float] = {}
    for m in methods:
        dep = {x: statistics.fmean(_f(acc[m, x, s]["deployed_acc_last5"]) for s in seeds)
               for x in lrs if all((m, x, s) in acc for s in seeds)}
        if not dep:
            continue
        full = {x: statistics.fmean(_f(acc[m, x, s]["test_accuracy_last5"]) for s in seeds) for x in dep}
        best = max(dep, key=dep.get)
        best_of[m] = dep[best]
        main_of[m] = next((dep[x] for x in sorted(main_lr) if x in dep), float("nan"))
        cols = [f"{100 * dep[x]:.1f} / {100 * full[x]:.1f}" if x in dep else "–" for x in lrs]
        print(f"| {m} | {' | '.join(cols)} | {best:g} | {100 * (dep[best] - main_of[m]):+.1f} |")
    rank_main = sorted(main_of, key=main_of.get, reverse=True)
    rank_best = sorted(best_of, key=best_of.get, reverse=True)
    print(f"\nRanking by deployed accuracy at the main lr: {' > '.join(rank_main)}")
    print(f"Ranking by deployed accuracy at each method's best lr: {' > '.join(rank_best)}")
    if out_csv:
        keys = ["method", "seed", "lr", "deployed_acc_last5", "test_accuracy_last5", "acc_narrowest_last5",
                "wall_time_s"]
        out_csv.parent.mkdir(parents=True, exist_ok=True)
        with open(out_csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in sorted(pool, key=lambda r: (methods.index(r["method"]), r["lr"], r["seed"])):
                w.writerow({k: r.get(k, "") for k in keys})
        print(f"\nwrote {out_csv}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("sweep", type=Path)
    p.add_argument("--baseline", default="heterofl")
    p.add_argument("--csv", type=Path, help="write the per-cell numbers used here")
    p.add_argument("--lr-sweep", type=Path, help="the learning-rate check's sweep directory")
    p.add_argument("--lr-csv", type=Path, help="write the learning-rate check's cells")
    p.add_argument("--tier-models", nargs="*", default=[], metavar="METHOD=L1,L2,L3,L4",
                   help="the eval label of the model each tier runs, for a method (overrides the defaults)")
    p.add_argument("--by-round", action="store_true",
                   help="also the paired deployed-accuracy difference to the baseline at every evaluated round")
    p.add_argument("--plot", type=Path, metavar="PNG",
                   help="draw deployed accuracy vs round per method (mean over seeds, band = min-max)")
    args = p.parse_args()
    overrides = {}
    for item in args.tier_models:
        method, _, labels = item.partition("=")
        parts = tuple(labels.split(","))
        if not method or len(parts) != len(TIERS):
            p.error(f"--tier-models {item!r}: expected METHOD=L1,L2,L3,L4 (one eval label per tier, "
                    f"{len(TIERS)} tiers: {', '.join(TIERS)})")
        overrides[method] = parts
    cells = _complete(args.sweep)
    methods = list(dict.fromkeys(r["method"] for r in cells))
    for r in cells:
        key = r["method"] if r["method"] in overrides else r["algorithm"]
        extras = cell_extras(Path(r["run_dir"]), key, {**TIER_MODELS, **overrides})
        r.update({k: str(v) for k, v in extras.items()})
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

    print("\nGlobal test accuracy of the model each tier runs (a / b / c / d), mean ± std over seeds:\n")
    print("| method | a | b | c | d |")
    print("|---|---|---|---|---|")
    for m in methods:
        rows = [by[m, s] for s in seeds if (m, s) in by]
        cols = [_ms([_f(r[f"global_{t}"]) for r in rows if r.get(f"global_{t}")]) for t in TIERS]
        print(f"| {m} | {' | '.join(cols)} |")
    if args.csv:
        keys = ["method", "seed", "algorithm", *(k for k, _ in HEADLINE), "wall_time_s",
                *(f"{p}_{t}" for p in ("local", "global", "gflops", "mb_up") for t in TIERS)]
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            for r in cells:
                w.writerow({k: r.get(k, "") for k in keys})
        print(f"\nwrote {args.csv}")
    if args.by_round:
        by_round(cells, by, methods, seeds, args.baseline)
    if args.plot:
        plot_curves(cells, methods, seeds, args.plot)
    if args.lr_sweep:
        lr_check(cells, args.lr_sweep, args.lr_csv)


def _deployed_curve(run_dir: Path, key: str = "deployed_accuracy") -> dict[int, float]:
    """round -> ``key`` at every evaluated round of a run (empty when the run has no metrics yet)."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return {int(r["round"]): float(r[key]) for r in rows if r.get(key) is not None}


def plot_curves(cells: list[dict], methods: list[str], seeds: list[int], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {(r["method"], int(r["seed"])): _deployed_curve(Path(r["run_dir"])) for r in cells}
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for m in methods:
        runs = [curves[m, s] for s in seeds if (m, s) in curves]
        rounds = sorted(set.intersection(*(set(c) for c in runs))) if runs else []
        if not rounds:
            continue
        mean = [statistics.fmean(c[x] for c in runs) * 100 for x in rounds]
        ax.plot(rounds, mean, marker="o", markersize=3, label=f"{m} ({len(runs)} seeds)")
        ax.fill_between(rounds, [min(c[x] for c in runs) * 100 for x in rounds],
                        [max(c[x] for c in runs) * 100 for x in rounds], alpha=0.15)
    ax.set_xlabel("round")
    ax.set_ylabel("deployed accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"\nwrote {out}")


def by_round(cells: list[dict], by: dict, methods: list[str], seeds: list[int], baseline: str) -> None:
    """Does the gap to the baseline grow with training? Paired deployed-accuracy differences per eval round."""
    curves = {(r["method"], int(r["seed"])): _deployed_curve(Path(r["run_dir"])) for r in cells}
    rounds = sorted({rnd for (m, _), c in curves.items() if m == baseline for rnd in c})
    print(f"\nDeployed accuracy − {baseline}'s at each evaluated round (points, paired by seed, mean ± std; "
          f"the {baseline} row is its own accuracy, %):\n")
    print(f"| method | {' | '.join(f'r{rnd}' for rnd in rounds)} |")
    print("|---" * (1 + len(rounds)) + "|")
    for m in methods:
        cols = []
        for rnd in rounds:
            if m == baseline:
                cols.append(_ms([curves[m, s][rnd] for s in seeds if (m, s) in curves and rnd in curves[m, s]]))
                continue
            d = [curves[m, s][rnd] - curves[baseline, s][rnd] for s in seeds
                 if (m, s) in curves and (baseline, s) in curves and rnd in curves[m, s] and rnd in curves[baseline, s]]
            cols.append(_ms(d))
        print(f"| {m} | {' | '.join(cols)} |")


if __name__ == "__main__":
    main()
