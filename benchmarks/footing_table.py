"""docs/comparison.md on one footing (issue 40 item 1): every method, per tier, against the two baselines.

    python benchmarks/footing_table.py sweeps/crossover-g8 sweeps/footing-q \\
        --csv benchmarks/results/footing_fmnist.csv

Reads ``OUT/results.csv`` of every sweep given (the crossover study's gap-1/8 file supplies exclusive learning,
FedAvg-smallest, HeteroFL, in-place distillation and DepthFL + FedDyn; the footing study every other method:
one setting, the same base) and keeps one setting (``--mix``, default the balanced fleet).  Seeds are paired:
for every tier t (``deployed_tier_acc_<t>_last5``: the model tier t runs, on its clients' local test splits,
mean of the last 5 evaluations; ``--metric deployed_tier_test`` for the global test set) it prints each
method's mean, its difference to **exclusive learning** and to **FedAvg-smallest** (per seed, then the mean
and 95 % t interval) and the forward MFLOPs per sample of the model that tier runs.  A difference "beats"
or "loses" when its interval lies above or below 0, else the interval holds 0 and nothing is claimed.
Rolling and random methods scored with the window they trained also show their prefix score (global test set,
labelled).  The fleet-weighted deployed accuracy closes the table.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from crossover_table import _mflops, _tiers, fmt, interval, load

BASELINES = ("exclusive", "fedavg-smallest")


def word(d: list[float]) -> str:
    if len(d) < 2:
        return "n < 2"
    _, lo, hi = interval(d)
    return "beats" if lo > 0 else ("loses" if hi < 0 else "holds 0")


def analyse(rows: list[dict[str, str]], metric: str) -> dict:
    """Per tier and method: per-seed accuracy, MFLOPs; the fleet-weighted deployed accuracy and prefix scores."""
    acc: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    flops: dict[str, dict[str, float | None]] = defaultdict(dict)
    fleet: dict[str, dict[int, float]] = defaultdict(dict)
    prefix: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    trained: dict[str, dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    tiers: list[str] = []
    for r in rows:
        method, seed, ts = r["method"], int(r["seed"]), _tiers(r, metric)
        if not ts:
            continue
        tiers = tiers or ts
        if ts != tiers:
            sys.exit(f"{method} seed {seed}: tiers {ts}, other rows {tiers}: one setting at a time (--mix)")
        for i, t in enumerate(ts):
            acc[t][method][seed] = float(r[f"{metric}_{t}_last5"])
            flops[t][method] = _mflops(r, t, i)
        if r.get("deployed_acc_last5"):
            fleet[method][seed] = float(r["deployed_acc_last5"])
        for t in ts:
            if r.get(f"prefix_acc_{t}_last5"):
                prefix[t][method][seed] = float(r[f"prefix_acc_{t}_last5"])
                if r.get(f"acc_{t}_last5"):
                    trained[t][method][seed] = float(r[f"acc_{t}_last5"])
    return {"tiers": tiers, "acc": acc, "flops": flops, "fleet": fleet, "prefix": prefix,
            "trained": trained}


def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
    return [a[s] - b[s] for s in sorted(set(a) & set(b))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", type=Path, nargs="+", help="sweep directories of the one setting")
    ap.add_argument("--mix", default="balanced", help="the fleet mix to keep (rows without a mix column are kept)")
    ap.add_argument("--metric", default="deployed_tier_acc", choices=("deployed_tier_acc", "deployed_tier_test"))
    ap.add_argument("--csv", type=Path, help="write one row per (tier, method) here")
    args = ap.parse_args(argv)
    rows = [r for sweep in args.sweeps for r in load(sweep) if r.get("mix", args.mix) == args.mix]
    res = analyse(rows, args.metric)
    if not res["tiers"]:
        sys.exit("no complete cell with per-tier accuracy")
    for b in BASELINES:
        if not any(b in res["acc"][t] for t in res["tiers"]):
            sys.exit(f"no complete cell of the baseline {b!r} in {', '.join(map(str, args.sweeps))}")
    print(f"{args.metric} (mean of the last 5 evaluations), percent; differences in points, paired by seed: "
          "mean [95 % t interval]\n")
    out = []
    for t in res["tiers"]:
        by = res["acc"][t]
        print(f"\n**Tier {t}**\n")
        print("| method | seeds | MFLOPs | accuracy % | - exclusive | - FedAvg-smallest |")
        print("|---|---:|---:|---:|---|---|")
        order = sorted(by, key=lambda m: (m not in BASELINES, -statistics.fmean(by[m].values())))
        for m in order:
            mf = res["flops"][t].get(m)
            cols, line = [], {"tier": t, "method": m, "n": len(by[m]),
                              "acc_mean": statistics.fmean(by[m].values()), "mflops": mf}
            for b in BASELINES:
                d = paired(by[m], by.get(b, {})) if m != b else []
                cols.append(f"{fmt(d)} {word(d)}" if d else "-")
                mean, lo, hi = interval(d) if d else (None, None, None)
                key = "excl" if b == "exclusive" else "small"
                line.update({f"d_{key}_mean": mean, f"d_{key}_lo": lo, f"d_{key}_hi": hi})
            out.append(line)
            print(f"| {m} | {len(by[m])} | {'-' if mf is None else f'{mf:.3f}'} | "
                  f"{100 * line['acc_mean']:.2f} | " + " | ".join(cols) + " |")
    if any(res["prefix"][t] for t in res["tiers"]):
        print("\nScored at the prefix instead of the window the tier trained (global test set, labelled: no client "
              "deploys it):\n")
        print("| method | tier | prefix % | trained window % (global test) |")
        print("|---|---|---:|---:|")
        for t in res["tiers"]:
            for m, by_seed in sorted(res["prefix"][t].items()):
                win = res["trained"][t].get(m)
                shown = f"{100 * statistics.fmean(win.values()):.2f}" if win else "-"
                print(f"| {m} | {t} | {100 * statistics.fmean(by_seed.values()):.2f} | {shown} |")
    print("\nFleet-weighted deployed accuracy (deployed_acc_last5):\n")
    print("| method | deployed % | - exclusive | - FedAvg-smallest |")
    print("|---|---:|---|---|")
    fl = res["fleet"]
    for m in sorted(fl, key=lambda m: -statistics.fmean(fl[m].values())):
        cols = [fmt(d) if (d := paired(fl[m], fl.get(b, {}))) and m != b else "-" for b in BASELINES]
        print(f"| {m} | {100 * statistics.fmean(fl[m].values()):.2f} | " + " | ".join(cols) + " |")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(out[0]), lineterminator="\n")
            w.writeheader()
            w.writerows(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
