"""Time-to-accuracy table and figure of the FedBuff study (issue 38; docs/async.md, "The study").

    hetfl sweep configs/study_async_fmnist.toml --out sweeps/async-fmnist
    python benchmarks/async_table.py sweeps/async-fmnist --csv benchmarks/results/async_fmnist.csv \
        --figure docs/img/async_fmnist.png

Reads every complete cell's ``metrics.jsonl`` and applies the pre-registered analysis of docs/async.md
(written, with this script, before any cell finished):

* **accuracy of a run** at an evaluation: ``deployed_accuracy`` (each client's tier model, what the clients
  really run) where the run reports it, else ``test_accuracy`` (FedAvg: one model for everyone, the same
  thing);
* **target**: 95 % of the synchronous FedAvg-smallest arm's final accuracy (mean of its last 3 evaluations,
  mean over seeds);
* **time to target**: the first ``virtual_time_s`` at which an evaluation reaches the target (None = never);
* **P1**: paired per seed, log(time sync FedAvg-smallest / time FedBuff FedAvg-smallest), mean and 95 %
  t interval; holds when the interval's lower end is above log 1.5;
* **P2**: the same speed-up for HeteroFL (sync HeteroFL / FedBuff HeteroFL), and its paired difference to P1's;
* **P3**: accuracy at the synchronous FedAvg-smallest arm's median virtual time of round 50 (the last
  evaluation at or before it), FedBuff HeteroFL minus FedBuff FedAvg-smallest, paired; holds when the
  interval's upper end is at least -1 point.

Prints markdown; ``--csv`` keeps the per-cell numbers, ``--figure`` draws mean accuracy vs virtual time per arm.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from pathlib import Path

ARMS = ("sync-fedavg-small", "sync-heterofl", "fedbuff-fedavg-small", "fedbuff-heterofl")
BASE = "sync-fedavg-small"
#: two-sided 95 % Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def interval(diffs: list[float]) -> tuple[float, float, float, int]:
    """Mean and 95 % t interval of paired differences: (mean, low, high, n)."""
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan, 0
    m = statistics.fmean(diffs)
    if n == 1:
        return m, math.nan, math.nan, 1
    half = T95.get(n - 1, 1.96) * statistics.stdev(diffs) / math.sqrt(n)
    return m, m - half, m + half, n


def time_of_round(run_dir: Path, rnd: int) -> float:
    """virtual_time_s at the end of round (FedBuff: step) ``rnd``."""
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if int(r["round"]) == rnd:
            return float(r["virtual_time_s"])
    raise SystemExit(f"{run_dir}: no round {rnd}")


def curve(run_dir: Path) -> list[tuple[int, float, float]]:
    """(round, virtual_time_s, accuracy) of every evaluation of one run."""
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        acc = r.get("deployed_accuracy", r.get("test_accuracy"))
        if acc is not None:
            out.append((int(r["round"]), float(r["virtual_time_s"]), float(acc)))
    return out


def cells(sweep: Path) -> dict[str, dict[int, list[tuple[int, float, float]]]]:
    by: dict[str, dict[int, list]] = {a: {} for a in ARMS}
    for d in sorted((sweep / "cells").iterdir()):
        summary = d / "summary.json"
        if not summary.exists() or json.loads(summary.read_text()).get("status") != "complete":
            continue  # not complete
        arm, seed = d.name.rsplit("__s", 1)
        by.setdefault(arm, {})[int(seed)] = curve(d)
    return by


def time_to(c: list[tuple[int, float, float]], target: float) -> float | None:
    return next((t for _, t, a in c if a >= target), None)


def acc_at(c: list[tuple[int, float, float]], when: float) -> float | None:
    before = [a for _, t, a in c if t <= when]
    return before[-1] if before else None


def final(c: list[tuple[int, float, float]]) -> float:
    return statistics.fmean(a for _, _, a in c[-3:])


def _pct(m: float, lo: float, hi: float, n: int) -> str:
    return f"{100 * m:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}] (n={n})"


def _ratio(m: float, lo: float, hi: float, n: int) -> str:
    return f"{math.exp(m):.2f}x [{math.exp(lo):.2f}, {math.exp(hi):.2f}] (n={n})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--figure", type=Path)
    args = ap.parse_args(argv)
    by = cells(args.sweep)
    if not by[BASE]:
        raise SystemExit(f"{args.sweep}: no complete {BASE} cell yet")
    target = 0.95 * statistics.fmean(final(c) for c in by[BASE].values())
    r50 = statistics.median(time_of_round(args.sweep / "cells" / f"{BASE}__s{s}", 50) for s in by[BASE])
    rows = []
    for arm in ARMS:
        for seed, c in sorted(by[arm].items()):
            rows.append({"arm": arm, "seed": seed, "final_acc": final(c), "time_to_target_s": time_to(c, target),
                         "acc_at_budget": acc_at(c, r50), "virtual_time_end_s": c[-1][1]})
    print(f"target accuracy {100 * target:.2f} % (95 % of {BASE}'s final); budget = {BASE}'s median virtual "
          f"time of round 50 = {r50:.0f} s\n")
    print("| arm | seeds | final accuracy % | time to target (s) | accuracy at budget % "
          "| virtual time of the run (s) |")
    print("|---|---:|---:|---:|---:|---:|")
    for arm in ARMS:
        rs = [r for r in rows if r["arm"] == arm]
        if not rs:
            continue
        tt = [r["time_to_target_s"] for r in rs]
        reached = [t for t in tt if t is not None]
        ab = [r["acc_at_budget"] for r in rs if r["acc_at_budget"] is not None]
        tt_s = (f"{statistics.median(reached):.0f} (median; {len(reached)}/{len(rs)} reached)" if reached
                else f"never (0/{len(rs)})")
        print(f"| {arm} | {len(rs)} | {100 * statistics.fmean(r['final_acc'] for r in rs):.2f} ± "
              f"{100 * (statistics.stdev([r['final_acc'] for r in rs]) if len(rs) > 1 else 0):.2f} | {tt_s} | "
              f"{100 * statistics.fmean(ab):.2f} | {statistics.median(r['virtual_time_end_s'] for r in rs):.0f} |"
              if ab else f"| {arm} | {len(rs)} | - | {tt_s} | - | - |")

    def per_seed(arm: str, key: str) -> dict[int, float]:
        return {r["seed"]: r[key] for r in rows if r["arm"] == arm and r[key] is not None}

    def speedup(sync: str, buff: str) -> dict[int, float]:
        a, b = per_seed(sync, "time_to_target_s"), per_seed(buff, "time_to_target_s")
        return {s: math.log(a[s] / b[s]) for s in sorted(set(a) & set(b))}

    p1, p2 = speedup(BASE, "fedbuff-fedavg-small"), speedup("sync-heterofl", "fedbuff-heterofl")
    print("\nPaired, mean and 95 % t interval over seeds:\n")
    if p1:
        m, lo, hi, n = interval(list(p1.values()))
        print(f"- P1 FedBuff FedAvg-smallest speed-up to target: {_ratio(m, lo, hi, n)}; "
              f"{'holds' if lo > math.log(1.5) else 'does not hold'} (needs the lower end > 1.50x)")
    if p2:
        m, lo, hi, n = interval(list(p2.values()))
        print(f"- P2 FedBuff HeteroFL speed-up to target: {_ratio(m, lo, hi, n)}")
        both = sorted(set(p1) & set(p2))
        if both:
            m, lo, hi, n = interval([p2[s] - p1[s] for s in both])
            print(f"  HeteroFL's speed-up / FedAvg-smallest's: {_ratio(m, lo, hi, n)}; P2 "
                  f"{'holds' if hi < 0 and math.exp(interval(list(p2.values()))[1]) > 1 else 'does not hold'} "
                  "(needs the ratio's upper end < 1 and HeteroFL's speed-up's lower end > 1)")
    a, b = per_seed("fedbuff-heterofl", "acc_at_budget"), per_seed("fedbuff-fedavg-small", "acc_at_budget")
    both = sorted(set(a) & set(b))
    if both:
        m, lo, hi, n = interval([a[s] - b[s] for s in both])
        print(f"- P3 accuracy at the budget, FedBuff HeteroFL minus FedBuff FedAvg-smallest (points): "
              f"{_pct(m, lo, hi, n)}; {'holds' if hi >= -0.01 else 'does not hold'} (needs the upper end >= -1)")
    for sync, buff, what in ((BASE, "fedbuff-fedavg-small", "FedBuff FedAvg-smallest minus sync FedAvg-smallest"),
                             ("sync-heterofl", "fedbuff-heterofl", "FedBuff HeteroFL minus sync HeteroFL"),
                             (BASE, "sync-heterofl", "sync HeteroFL minus sync FedAvg-smallest"),
                             ("fedbuff-fedavg-small", "fedbuff-heterofl",
                              "FedBuff HeteroFL minus FedBuff FedAvg-smallest")):
        x, y = per_seed(buff, "final_acc"), per_seed(sync, "final_acc")
        both = sorted(set(x) & set(y))
        if both:
            print(f"- final accuracy, {what} (points): {_pct(*interval([x[s] - y[s] for s in both]))}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    if args.figure:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.2))
        for arm in ARMS:
            runs = list(by[arm].values())
            if not runs:
                continue
            k = min(len(c) for c in runs)
            ts = [statistics.fmean(c[i][1] for c in runs) for i in range(k)]
            accs = [100 * statistics.fmean(c[i][2] for c in runs) for i in range(k)]
            ax.plot(ts, accs, marker="o", ms=3, label=f"{arm} ({len(runs)} seeds)",
                    ls="--" if arm.startswith("sync") else "-")
        ax.axhline(100 * target, color="grey", lw=0.8, ls=":", label="target")
        ax.set_xlabel("virtual time (s; mean over seeds)")
        ax.set_ylabel("accuracy % (deployed models)")
        ax.set_title("Fashion-MNIST, 320 measured phones: synchronous vs FedBuff")
        ax.legend(fontsize=8)
        fig.tight_layout()
        args.figure.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.figure, dpi=120)
        print(f"\nfigure: {args.figure}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
