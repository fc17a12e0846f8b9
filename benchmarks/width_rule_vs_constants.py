"""The width-sampling rule against constant step-down rates, as pre-registered (issue 40 item 4).

    hetfl sweep configs/study_width_rule_fmnist.toml --out sweeps/width-rule-fmnist
    python benchmarks/width_rule_vs_constants.py sweeps/width-rule-fmnist \\
        --csv benchmarks/results/width_rule_fmnist.csv

Reads ``OUT/results.csv`` (one row per cell; axes ``q`` in {rule, 0.35, 0.5}, ``fleet``, ``corr``; seeds 4-8)
and prints markdown: per setting and pooled over all (setting, seed) pairs, the paired difference in deployed
accuracy (mean of the last 5 evaluations) of the rule minus each constant, mean and 95 % t interval, with
wins/losses; then the verdict of the success criterion committed in docs/study-width-sampling.md: the rule
beats a constant only if the pooled interval of (rule - constant) lies above 0, and "beats the constants" only
if it does so against both.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

from crossover_table import interval  # one 95 % t interval for every study script

CONSTANTS = ("0.35", "0.5")

def fmt(d: list[float]) -> str:
    m, lo, hi = interval(d)
    wins, losses = sum(x > 0 for x in d), sum(x < 0 for x in d)
    return f"{100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}] ({wins} W / {losses} L, n={len(d)})"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--metric", default="deployed_acc_last5")
    ap.add_argument("--csv", type=Path, help="write the cells used here")
    args = ap.parse_args(argv)
    with (args.sweep / "results.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r["status"] == "complete" and r.get(args.metric)]
    acc: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        acc[(r["fleet"], r["corr"])][r["q"]][int(r["seed"])] = float(r[args.metric])
    print(f"{args.metric}: rule (coverage(target=equal)) minus each constant, points, paired by seed; "
          "mean [95 % t interval]\n")
    print("| fleet / corr | rule % | " + " | ".join(f"rule - q={c}" for c in CONSTANTS) + " |")
    print("|---|---:|" + "---:|" * len(CONSTANTS))
    pooled: dict[str, list[float]] = {c: [] for c in CONSTANTS}
    for setting in sorted(acc):
        by = acc[setting]
        rule = by.get("rule", {})
        cols = []
        for c in CONSTANTS:
            seeds = sorted(set(rule) & set(by.get(c, {})))
            d = [rule[s] - by[c][s] for s in seeds]
            pooled[c] += d
            cols.append(fmt(d) if d else "-")
        mean = f"{100 * statistics.fmean(rule.values()):.2f}" if rule else "-"
        print(f"| {setting[0]}, {setting[1]} | {mean} | " + " | ".join(cols) + " |")
    print("| **all settings** | | " + " | ".join(fmt(pooled[c]) if pooled[c] else "-" for c in CONSTANTS) + " |")
    print()
    verdicts = []
    for c in CONSTANTS:
        if len(pooled[c]) < 2:
            continue
        _, lo, hi = interval(pooled[c])
        verdicts.append(lo > 0)
        word = "beats" if lo > 0 else ("loses to" if hi < 0 else "ties (the interval holds 0)")
        print(f"- rule vs q = {c}: {word}")
    if verdicts:
        met = all(verdicts) and len(verdicts) == 2
        print(f"- success criterion (beats both constants): {'met' if met else 'not met'}")
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        with args.csv.open("w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["fleet", "corr", "q", "seed", args.metric])
            for (fleet, corr), by in sorted(acc.items()):
                for q, seeds in sorted(by.items()):
                    for s, v in sorted(seeds.items()):
                        w.writerow([fleet, corr, q, s, v])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
