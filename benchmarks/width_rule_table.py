"""Tables and figure of the width-sampling rule study (issue 27, part 2) from a finished or partial sweep.

    hetfl sweep configs/study_width_fmnist.toml --out sweeps/width-fmnist
    python benchmarks/width_rule_table.py sweeps/width-fmnist \\
        --predicted benchmarks/results/width_fmnist_predicted.csv --csv benchmarks/results/width_fmnist.csv \\
        --figure docs/img/study/fmnist_deployed_vs_q.png

Reads ``OUT/results.csv`` (one row per cell of a study with a ``q`` axis of ``mixture(q)`` schedules) and the
predictions ``predict_width_q.py`` wrote before the sweep ran, and prints markdown:

1. per setting (every axis but ``q`` and the seed): deployed accuracy at every ``q`` (mean ± sample std over
   the seeds, each a mean of the last 5 evaluations), and the paired difference to ``q = 0`` (HeteroFL's
   ``max``; seed s minus seed s: same partition, fleet and initial model);
2. the rule checked: per setting the measured best ``q`` (highest mean deployed accuracy), the predicted
   ``q`` of each candidate rule, and the deployed accuracy lost by using the prediction instead of the
   measured best (paired over seeds; 0 when the prediction is the best);
3. the full-width and the narrowest width's accuracy at every ``q`` (what stepping down costs and buys).

``--csv`` writes the per-cell numbers used (small; benchmarks/results/ keeps them); ``--figure`` draws
deployed accuracy against ``q`` per setting with the predictions marked.
"""

from __future__ import annotations

import argparse
import csv
import statistics
from collections import defaultdict
from pathlib import Path

KEYS = ("deployed_acc_last5", "test_accuracy_last5", "acc_narrowest_last5")
RULES = (("predicted_q", "coverage q (primary)"), ("fit_equal", "fit to equal"), ("fit_deploy", "fit to deploy"))
KEEP = ("cell", "q", "seed", "status", "rounds_completed", "wall_time_s", *KEYS, "width_q")


def _f(v: str | None) -> float | None:
    return float(v) if v not in (None, "") else None


def _ms(vals: list[float], scale: float = 100.0, signed: bool = False) -> str:
    if not vals:
        return "–"
    m = statistics.fmean(vals) * scale
    fmt = "+.2f" if signed else ".2f"
    if len(vals) == 1:
        return f"{m:{fmt}}"
    return f"{m:{fmt}} ± {statistics.stdev(vals) * scale:.2f}"


def load(sweep: Path) -> tuple[list[str], list[dict]]:
    with open(sweep / "results.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "complete"]
    if not rows:
        raise SystemExit(f"{sweep}/results.csv has no complete cells yet")
    fixed = {"cell", "q", "seed", "algorithm", "width_schedule", "status", "rounds", "rounds_completed",
             "wall_time_s", "run_dir", "deploy_shares"}
    first = list(rows[0])
    axes = [k for k in first[:first.index("seed")] if k not in fixed]
    return axes, rows


def setting_of(row: dict, axes: list[str]) -> tuple[str, ...]:
    return tuple(row[a] for a in axes)


def table(axes: list[str], rows: list[dict], key: str, qs: list[str], paired: bool) -> list[str]:
    by = defaultdict(dict)  # setting -> (q, seed) -> value
    for r in rows:
        if _f(r.get(key)) is not None:
            by[setting_of(r, axes)][(r["q"], r["seed"])] = _f(r[key])
    names = [f"q = {q} (%)" if paired and q == "0" else f"q = {q}" for q in qs]
    out = ["| " + " / ".join(axes) + " | " + " | ".join(names) + " |",
           "|---|" + "---|" * len(qs)]
    for setting, vals in by.items():
        cells = []
        for q in qs:
            seeds = sorted(s for (qq, s) in vals if qq == q)
            if paired and q != "0":
                d = [vals[(q, s)] - vals[("0", s)] for s in seeds if ("0", s) in vals]
                cells.append(_ms(d, signed=True))
            else:
                cells.append(_ms([vals[(q, s)] for s in seeds]))
        out.append(f"| {', '.join(setting)} | " + " | ".join(cells) + " |")
    return out


def predictions(path: Path, axes: list[str]) -> dict[tuple[str, ...], dict[str, dict[str, float]]]:
    """setting -> seed -> rule -> predicted q."""
    out: dict = defaultdict(dict)
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            out[tuple(r[a] for a in axes)][r["seed"]] = {k: float(r[k]) for k, _ in RULES} | \
                {"coverage_q": float(r["coverage_q"])}
    return out


def rule_check(axes: list[str], rows: list[dict], pred, qs: list[str]) -> list[str]:
    dep = defaultdict(dict)
    for r in rows:
        if _f(r.get("deployed_acc_last5")) is not None:
            dep[setting_of(r, axes)][(float(r["q"]), r["seed"])] = _f(r["deployed_acc_last5"])
    grid = [float(q) for q in qs]
    head = ("| " + " / ".join(axes) + " | coverage q | measured best q (seeds' best) | "
            + " | ".join(f"{label}: q, loss vs best" for _, label in RULES) + " | gain of primary over q = 0 |")
    out = [head, "|---|---|---|" + "---|" * len(RULES) + "---|"]
    totals = defaultdict(list)
    for setting, vals in dep.items():
        seeds = sorted({s for (_, s) in vals if all((q, s) in vals for q in grid)})
        if not seeds:
            continue
        means = {q: statistics.fmean(vals[(q, s)] for s in seeds) for q in grid}
        best = max(grid, key=lambda q: means[q])
        seed_best = [max(grid, key=lambda q, s=s: vals[(q, s)]) for s in seeds]
        cells = []
        for rule, _ in RULES:
            qp = [pred[setting][s][rule] for s in seeds]
            loss = [vals[(best, s)] - vals[(q, s)] for q, s in zip(qp, seeds)]
            totals[rule].extend(loss)
            qtxt = f"{qp[0]:g}" if len(set(qp)) == 1 else "/".join(f"{q:g}" for q in qp)
            cells.append(f"{qtxt}, {_ms(loss, signed=True)}")
        gain = [vals[(pred[setting][s]['predicted_q'], s)] - vals[(0.0, s)] for s in seeds]
        totals["gain"].extend(gain)
        cq = statistics.fmean(pred[setting][s]["coverage_q"] for s in seeds)
        out.append(f"| {', '.join(setting)} | {cq:.2f} | **{best:g}** ({', '.join(f'{q:g}' for q in seed_best)}) | "
                   + " | ".join(cells) + f" | {_ms(gain, signed=True)} |")
    out.append("| **all settings** | | | " + " | ".join(_ms(totals[r], signed=True) for r, _ in RULES)
               + f" | {_ms(totals['gain'], signed=True)} |")
    return out


def figure(axes: list[str], rows: list[dict], pred, qs: list[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if _f(r.get("deployed_acc_last5")) is not None:
            by[setting_of(r, axes)][float(r["q"])].append(100 * _f(r["deployed_acc_last5"]))
    settings = list(by)
    fig, axs = plt.subplots(1, len(settings), figsize=(3.0 * len(settings), 3.0), squeeze=False)
    for ax, setting in zip(axs[0], settings):
        xs = sorted(by[setting])
        m = [statistics.fmean(by[setting][x]) for x in xs]
        s = [statistics.stdev(by[setting][x]) if len(by[setting][x]) > 1 else 0 for x in xs]
        ax.errorbar(xs, m, yerr=s, marker="o", capsize=3)
        qp = statistics.fmean(p["predicted_q"] for p in pred[setting].values())
        ax.axvline(qp, color="tab:red", ls="--", label="predicted")
        ax.set_title(", ".join(setting), fontsize=9)
        ax.set_xlabel("q (step-down rate)")
    axs[0][0].set_ylabel("deployed accuracy (%)")
    axs[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--predicted", type=Path, required=True, help="the CSV predict_width_q.py wrote")
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--figure", type=Path)
    args = ap.parse_args(argv)
    axes, rows = load(args.sweep)
    qs = sorted({r["q"] for r in rows}, key=float)
    pred = predictions(args.predicted, axes)
    print("### Deployed accuracy (%) at every q\n")
    print("\n".join(table(axes, rows, "deployed_acc_last5", qs, paired=False)))
    print("\n### Deployed accuracy, paired difference to q = 0 (points)\n")
    print("\n".join(table(axes, rows, "deployed_acc_last5", qs, paired=True)))
    print("\n### The rule: predicted vs measured best q, and the deployed accuracy lost by the prediction\n")
    print("\n".join(rule_check(axes, rows, pred, qs)))
    print("\n### Full-width model (%)\n")
    print("\n".join(table(axes, rows, "test_accuracy_last5", qs, paired=False)))
    print("\n### Narrowest level (%)\n")
    print("\n".join(table(axes, rows, "acc_narrowest_last5", qs, paired=False)))
    walls = [_f(r["wall_time_s"]) for r in rows if _f(r.get("wall_time_s"))]
    print(f"\n{len(rows)} complete cells; wall time per cell: median {statistics.median(walls):.0f} s, "
          f"total {sum(walls) / 3600:.2f} h")
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=[*axes, *KEEP], extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
    if args.figure:
        figure(axes, rows, pred, qs, args.figure)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
