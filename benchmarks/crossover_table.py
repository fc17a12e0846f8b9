"""The crossover map: where does sharing across tiers pay?  (docs/study-crossover.md, issue 40 item 3)

    python benchmarks/crossover_table.py sweeps/crossover-g4 sweeps/crossover-g8 sweeps/crossover-g16 \\
        --csv benchmarks/results/crossover_fmnist.csv --figure docs/img/crossover_fmnist.png

Reads ``OUT/results.csv`` of each sweep of the main study (one study file per capacity gap, since FedAvg-smallest's
width and the depth methods' levels depend on it; axes ``method``, ``gap`` (one level), ``mix``; paired seeds)
and applies the success criterion committed in the doc before the runs: *sharing pays at tier t of a setting*
when, for the best sharing method at that tier (the highest mean over seeds), the 95 % t interval of its tier-t deployed
accuracy minus max(exclusive learning's, FedAvg-smallest's) tier-t deployed accuracy (the max taken per seed)
lies above 0.  Tier-t deployed accuracy is ``deployed_tier_acc_<tier>_last5``: the model tier t runs, on the
local test splits of tier t's clients, mean of the last 5 evaluations (``--metric deployed_tier_test`` reads
the global test set instead).  Every sharing method's interval is printed, not only the best one's, with
each tier's forward MFLOPs per sample, and the fleet-weighted deployed accuracy against both baselines.

``--long FILE`` writes the design's 300-round study by its committed rule: the setting where the best sharing
method's weakest-tier deficit to FedAvg-smallest (mean over seeds) is largest, with three methods (that best
method, exclusive learning, FedAvg-smallest), the setting's own base and overrides, 300 rounds, evaluated
from round 260 (the last 5 evaluations at every 10).
"""

from __future__ import annotations

import argparse
import csv
import math
import statistics
import sys
from collections import defaultdict
from pathlib import Path

BASELINES = ("exclusive", "fedavg-smallest")


def interval(d: list[float]) -> tuple[float, float, float]:
    """Mean and 95 % t interval of paired differences (the benchmarks' one helper for it)."""
    from scipy.stats import t as student_t

    m = statistics.fmean(d)
    if len(d) < 2:
        return m, math.nan, math.nan
    half = float(student_t.ppf(0.975, len(d) - 1)) * statistics.stdev(d) / math.sqrt(len(d))
    return m, m - half, m + half


def fmt(d: list[float]) -> str:
    m, lo, hi = interval(d)
    return f"{100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]"


def verdict(d: list[float]) -> str:
    if len(d) < 2:
        return "n < 2"
    _, lo, hi = interval(d)
    return "**pays**" if lo > 0 else ("loses" if hi < 0 else "ties")


def _tiers(row: dict[str, str], metric: str) -> list[str]:
    """The row's tier labels (``w1``, ``w0.5``, ...) strongest first."""
    prefix = f"{metric}_"
    tiers = [k[len(prefix):-len("_last5")] for k in row if k.startswith(prefix) and k.endswith("_last5") and row[k]]
    return sorted(tiers, key=lambda t: -float(t[1:]))


def load(path: Path) -> list[dict[str, str]]:
    if not (path / "results.csv").is_file():
        sys.exit(f"{path / 'results.csv'}: not found (run the study's `hetfl sweep` first)")
    with (path / "results.csv").open() as f:
        return [r for r in csv.DictReader(f) if r.get("status") == "complete"]


def analyse(rows: list[dict[str, str]], metric: str = "deployed_tier_acc") -> dict[tuple[str, str], dict]:
    """Per setting (gap, mix): per tier and method the per-seed accuracy, the baseline max, the differences."""
    acc: dict[tuple[str, str], dict[str, dict[str, dict[int, float]]]] = defaultdict(
        lambda: defaultdict(lambda: defaultdict(dict)))
    fleet: dict[tuple[str, str], dict[str, dict[int, float]]] = defaultdict(lambda: defaultdict(dict))
    flops: dict[tuple[str, str], dict[str, dict[str, float]]] = defaultdict(dict)
    tiers_of: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        setting, method, seed = (r["gap"], r["mix"]), r["method"], int(r["seed"])
        tiers = _tiers(r, metric)
        if not tiers:
            continue
        tiers_of.setdefault(setting, tiers)
        for t in tiers:
            acc[setting][t][method][seed] = float(r[f"{metric}_{t}_last5"])
        if r.get("deployed_acc_last5"):
            fleet[setting][method][seed] = float(r["deployed_acc_last5"])
        flops[setting][method] = {t: _mflops(r, t, i) for i, t in enumerate(tiers)}
    out = {}
    for setting, tiers in tiers_of.items():
        per_tier = {}
        for t in tiers:
            by = acc[setting][t]
            seeds = set.intersection(*(set(by[b]) for b in BASELINES)) if all(b in by for b in BASELINES) else set()
            base = {s: max(by[b][s] for b in BASELINES) for s in seeds}
            diffs = {m: [by[m][s] - base[s] for s in sorted(seeds & set(by[m]))]
                     for m in by if m not in BASELINES}
            best = max(diffs, key=lambda m: statistics.fmean(by[m].values()), default=None)
            per_tier[t] = {"acc": by, "diffs": diffs, "best": best}
        out[setting] = {"tiers": tiers, "per_tier": per_tier, "fleet": fleet[setting], "flops": flops[setting]}
    return out


def long_setting(res: dict[tuple[str, str], dict]) -> tuple[tuple[str, str], str, float]:
    """The committed rule for the 300-round study: per setting, the best sharing method at the weakest tier
    (highest mean) and its mean deficit FedAvg-smallest - method; the setting with the largest deficit."""
    best = None
    for setting, s in res.items():
        weakest = s["tiers"][-1]
        pt = s["per_tier"][weakest]
        method = pt["best"]
        small = pt["acc"].get("fedavg-smallest")
        if method is None or not small:
            continue
        seeds = sorted(set(small) & set(pt["acc"][method]))
        deficit = statistics.fmean(small[x] - pt["acc"][method][x] for x in seeds)
        if best is None or deficit > best[2]:
            best = (setting, method, deficit)
    if best is None:
        sys.exit("no setting with a sharing method and FedAvg-smallest at the weakest tier")
    return best


def write_long(sweeps: list[Path], res: dict[tuple[str, str], dict], path: Path, rounds: int = 300) -> str:
    """Write the 300-round study (see ``--long``) from the chosen setting's own study file; returns its text."""
    from dataclasses import replace

    from hetfl.sweep import load_study

    (gap, mix), method, deficit = long_setting(res)
    for sweep in sweeps:
        study = load_study(sweep)
        if gap in study.axes.get("gap", {}) and mix in study.axes.get("mix", {}):
            break
    else:
        sys.exit(f"no sweep among {', '.join(map(str, sweeps))} has gap {gap} and mix {mix}")
    methods = {m: study.axes["method"][m] for m in (method, *BASELINES)}
    base = {**study.base, "rounds": rounds, "eval": {**study.base.get("eval", {}), "start": rounds - 40}}
    long = replace(study, name=f"{study.name}-{rounds}", base=base,
                   axes={"method": methods, "gap": {gap: study.axes["gap"][gap]}, "mix": {mix: study.axes["mix"][mix]}})
    head = (f"# The crossover study's {rounds}-round setting (docs/study-crossover.md), written by\n"
            f"# benchmarks/crossover_table.py --long from {', '.join(map(str, sweeps))}: gap {gap}, mix {mix},\n"
            f"# the largest FedAvg-smallest minus best sharing method ({method}) at the weakest tier: "
            f"{100 * deficit:+.2f} points.\n")
    text = head + long.to_toml()
    path.write_text(text, encoding="utf-8")
    return text


def _mflops(row: dict[str, str], tier: str, index: int) -> float | None:
    """The forward MFLOPs per sample of the model tier ``tier`` runs: the evaluated model of that width, the
    index-th budget level of a depth method, or the one model of a one-model method."""
    keys = [k for k in row if k.startswith("mflops_") and row[k]]
    if f"mflops_{tier}" in row and row[f"mflops_{tier}"]:
        return float(row[f"mflops_{tier}"])
    if index == 0 and "mflops_global" in keys:
        return float(row["mflops_global"])
    if len(keys) == 1:
        return float(row[keys[0]])
    served = [k for k in keys if "d" in k[len("mflops_w"):] and not k.startswith("mflops_w1d")]  # w<s>d<depth>
    served.sort(key=lambda k: -float(row[k]))
    return float(row[served[index - 1]]) if 0 < index <= len(served) else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("sweeps", type=Path, nargs="+", help="the study's sweep directories (one per gap)")
    ap.add_argument("--metric", default="deployed_tier_acc", choices=("deployed_tier_acc", "deployed_tier_test"))
    ap.add_argument("--csv", type=Path, help="write the per-(setting, tier, method) differences here")
    ap.add_argument("--figure", type=Path, help="draw the map (points, 95 % intervals) here")
    ap.add_argument("--long", type=Path, help="write the 300-round study (the committed rule) to this file")
    args = ap.parse_args(argv)
    res = analyse([r for sweep in args.sweeps for r in load(sweep)], args.metric)
    if not res:
        sys.exit("no complete cell with per-tier accuracy")
    lines = []
    print(f"{args.metric} (mean of the last 5 evaluations) of each sharing method minus max(exclusive, "
          "FedAvg-smallest), points, paired by seed: mean [95 % t interval]; the verdict is the best method's\n")
    print("| gap | mix | tier | MFLOPs (sharing / exclusive / smallest) | " + "method: difference | best | verdict |")
    print("|---|---|---|---|---|---|---|")
    for (gap, mix), s in sorted(res.items()):
        for t in s["tiers"]:
            pt = s["per_tier"][t]
            cells = "; ".join(f"{m}: {fmt(d)}" for m, d in sorted(pt["diffs"].items()) if d)
            best = pt["best"]
            f = s["flops"]
            cost = " / ".join(
                f"{f[m][t]:.2f}" if m in f and f[m].get(t) is not None else "-"
                for m in (best or "", *BASELINES))
            word = verdict(pt["diffs"].get(best, [])) if best else "-"
            print(f"| {gap} | {mix} | {t} | {cost} | {cells} | {best} | {word} |")
            for m, d in pt["diffs"].items():
                if d:
                    mean, lo, hi = interval(d)
                    lines.append({"gap": gap, "mix": mix, "tier": t, "method": m, "n": len(d), "diff_mean": mean,
                                  "diff_lo": lo, "diff_hi": hi, "best": m == best})
    print("\nFleet-weighted deployed accuracy (deployed_acc_last5), each method minus each baseline:\n")
    print("| gap | mix | method | deployed % | - exclusive | - FedAvg-smallest |")
    print("|---|---|---|---:|---|---|")
    for (gap, mix), s in sorted(res.items()):
        fl = s["fleet"]
        for m in sorted(fl):
            if m in BASELINES:
                continue
            cols = []
            for b in BASELINES:
                seeds = sorted(set(fl[m]) & set(fl.get(b, {})))
                cols.append(fmt([fl[m][x] - fl[b][x] for x in seeds]) if seeds else "-")
            print(f"| {gap} | {mix} | {m} | {100 * statistics.fmean(fl[m].values()):.2f} | " + " | ".join(cols) + " |")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(lines[0]) if lines else ["gap"], lineterminator="\n")
            w.writeheader()
            w.writerows(lines)
    if args.figure and lines:
        _figure(lines, args.figure)
    if args.long:
        (gap, mix), method, deficit = long_setting(res)
        write_long(args.sweeps, res, args.long)
        print(f"\n300 rounds: gap {gap}, {mix}, {method} (weakest tier, FedAvg-smallest minus it: "
              f"{100 * deficit:+.2f} points) -> {args.long}")
    return 0


def _figure(lines: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = sorted({(r["gap"], r["mix"]) for r in lines})
    fig, axes = plt.subplots(1, len(settings), figsize=(3.2 * len(settings), 3.2), sharey=True, squeeze=False)
    methods = sorted({r["method"] for r in lines})
    for ax, setting in zip(axes[0], settings):
        rows = [r for r in lines if (r["gap"], r["mix"]) == setting]
        tiers = sorted({r["tier"] for r in rows}, key=lambda t: -float(t[1:]))
        for j, m in enumerate(methods):
            pts = [(tiers.index(r["tier"]), r) for r in rows if r["method"] == m]
            x = [i + 0.12 * (j - (len(methods) - 1) / 2) for i, _ in pts]
            y = [100 * r["diff_mean"] for _, r in pts]
            err = [[100 * (r["diff_mean"] - r["diff_lo"]) for _, r in pts],
                   [100 * (r["diff_hi"] - r["diff_mean"]) for _, r in pts]]
            ax.errorbar(x, y, yerr=err, fmt="o", capsize=2, label=m)
        ax.axhline(0, color="grey", lw=0.8)
        ax.set_xticks(range(len(tiers)), tiers)
        ax.set_title(f"gap {setting[0]}, {setting[1]}", fontsize=9)
    axes[0][0].set_ylabel("tier accuracy - max(exclusive, FedAvg-smallest), points")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    raise SystemExit(main())
