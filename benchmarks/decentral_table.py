"""Tables of the decentralized-distillation study (issue 27, part 3) from a finished or partial sweep.

    hetfl sweep configs/study_decentral_fmnist.toml --out sweeps/decentral-fmnist
    python benchmarks/decentral_table.py sweeps/decentral-fmnist --csv benchmarks/results/decentral_fmnist.csv

Per (models, labels) setting and variant: the mean global-test accuracy of the strongest and of the weakest
tier's nodes (each a mean of the last 5 evaluations; mean ± sample std over seeds), the paired difference of
the weakest tier to D-PSGD of the smallest model (seed s minus seed s), and the bytes sent and training
FLOPs per weakest-tier node and round (means over the run).

With ``--goal`` it applies the committed criterion of issue 41's study (docs/decentralized.md, "Stage 1"):
per (models, labels) setting, variant and tier, the tier's accuracy minus D-PSGD-smallest's and minus today's
`dkd`'s, paired by seed, with the 95 % t interval; a variant *meets the goal* in a setting when its interval
against D-PSGD-smallest lies above 0 at every tier. MB sent and MFLOPs per node and round are each tier's.

    python benchmarks/decentral_table.py sweeps/decentral2-fmnist --goal --csv benchmarks/results/decentral2_fmnist.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
from collections import defaultdict
from pathlib import Path

from crossover_table import interval  # one 95 % t interval for every study script

BASELINE = "dpsgd-smallest"
TODAY = "dkd"


def _last5(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals[-5:]) if vals else None


def _mean(rows: list[dict], key: str) -> float | None:
    vals = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(vals) if vals else None


def _ms(vals: list[float], scale: float = 100.0, signed: bool = False) -> str:
    if not vals:
        return "–"
    m = statistics.fmean(vals) * scale
    f = "+.2f" if signed else ".2f"
    return f"{m:{f}}" + (f" ± {statistics.stdev(vals) * scale:.2f}" if len(vals) > 1 else "")


def cell(run_dir: Path) -> dict[str, float | None]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    tiers = sorted({k.split(".", 1)[1] for r in rows for k in r if k.startswith("test_accuracy.w")},
                   key=lambda w: -float(w[1:]))
    strong, weak = (tiers[0], tiers[-1]) if tiers else ("", "")
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    out = {"acc_all": _last5(evals, "test_accuracy"),
           "acc_strong": _last5(evals, f"test_accuracy.{strong}") if strong else _last5(evals, "test_accuracy"),
           "acc_weak": _last5(evals, f"test_accuracy.{weak}") if weak else _last5(evals, "test_accuracy"),
           "bytes_weak": _mean(rows, f"bytes_sent.{weak}") if weak else None,
           "flops_weak": _mean(rows, f"flops.{weak}") if weak else None}
    for t in tiers:  # every tier, for --goal
        out[f"acc_{t}"] = _last5(evals, f"test_accuracy.{t}")
        out[f"mb_{t}"] = None if _mean(rows, f"bytes_sent.{t}") is None else _mean(rows, f"bytes_sent.{t}") / 1e6
        out[f"mflops_{t}"] = None if _mean(rows, f"flops.{t}") is None else _mean(rows, f"flops.{t}") / 1e6
    return out


def _ci(d: list[float]) -> str:
    m, lo, hi = interval(d)
    return f"{100 * m:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]" if len(d) > 1 else "–"


def goal(by: dict) -> list[str]:
    """The committed criterion: every tier's paired difference to D-PSGD-smallest, 95 % t interval above 0."""
    lines = ["| models, labels | variant | tier | accuracy (%) | vs D-PSGD-smallest | vs dkd | MB / node / round "
             "| MFLOPs / node / round |", "|---|---|---|---:|---|---|---:|---:|"]
    verdicts = []
    for setting, cells in by.items():
        variants = list(dict.fromkeys(v for v, _ in cells))
        tiers = sorted({k[4:] for c in cells.values() for k in c if re.match(r"acc_w\d", k)},
                       key=lambda w: -float(w[1:]))
        met = []
        for variant in variants:
            seeds = sorted(s for v, s in cells if v == variant)
            above = []
            for t in tiers:
                key = f"acc_{t}"
                vals = [cells[(variant, s)].get(key) for s in seeds]
                if any(v is None for v in vals):
                    continue
                diffs = {}
                for base in (BASELINE, TODAY):
                    pairs = [s for s in seeds if (base, s) in cells and cells[(base, s)].get(key) is not None]
                    diffs[base] = [cells[(variant, s)][key] - cells[(base, s)][key] for s in pairs]
                d = diffs[BASELINE]
                if variant != BASELINE:
                    above.append(len(d) > 1 and interval(d)[1] > 0)
                mb = [cells[(variant, s)][f"mb_{t}"] for s in seeds if cells[(variant, s)].get(f"mb_{t}") is not None]
                mf = [cells[(variant, s)][f"mflops_{t}"] for s in seeds
                      if cells[(variant, s)].get(f"mflops_{t}") is not None]
                lines.append(f"| {', '.join(setting)} | {variant} | {t} | {100 * statistics.fmean(vals):.2f} | "
                             f"{_ci(d) if variant != BASELINE else '–'} | "
                             f"{_ci(diffs[TODAY]) if variant != TODAY else '–'} | "
                             f"{statistics.fmean(mb):.3f} | {statistics.fmean(mf):.1f} |" if mb and mf else
                             f"| {', '.join(setting)} | {variant} | {t} | {100 * statistics.fmean(vals):.2f} | "
                             f"{_ci(d) if variant != BASELINE else '–'} | "
                             f"{_ci(diffs[TODAY]) if variant != TODAY else '–'} | – | – |")
            if above and len(above) == len(tiers) and all(above):
                met.append(variant)
        verdicts.append(f"{', '.join(setting)}: goal met by {', '.join(met)}" if met else
                        f"{', '.join(setting)}: no variant beats D-PSGD-smallest at every tier")
    return lines + [""] + verdicts


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--csv", type=Path)
    ap.add_argument("--goal", action="store_true", help="every tier against D-PSGD-smallest and dkd, 95 %% "
                    "intervals, and the committed goal (issue 41)")
    args = ap.parse_args(argv)
    with open(args.sweep / "results.csv", newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if r.get("status") == "complete"]
    if not rows:
        raise SystemExit(f"{args.sweep}/results.csv has no complete cells yet")
    data = []
    for r in rows:
        data.append({"variant": r["variant"], "models": r["models"], "labels": r["labels"], "seed": r["seed"],
                     **cell(Path(r["run_dir"]))})
    by = defaultdict(dict)
    for d in data:
        by[(d["models"], d["labels"])][(d["variant"], d["seed"])] = d
    if args.goal:
        print("\n".join(goal(by)))
        _write_csv(args.csv, data)
        return 0
    print("| models, labels | variant | strongest tier (%) | weakest tier (%) | weakest vs D-PSGD-smallest "
          "(points) | MB sent / weak node / round | MFLOPs / weak node / round |")
    print("|---|---|---|---|---|---|---|")
    for setting, cells in by.items():
        for variant in dict.fromkeys(v for v, _ in cells):
            seeds = sorted(s for v, s in cells if v == variant)
            cs = [cells[(variant, s)] for s in seeds]
            diff = [cells[(variant, s)]["acc_weak"] - cells[(BASELINE, s)]["acc_weak"] for s in seeds
                    if (BASELINE, s) in cells and variant != BASELINE]
            mb = [c["bytes_weak"] / 1e6 for c in cs if c["bytes_weak"] is not None]
            mf = [c["flops_weak"] / 1e6 for c in cs if c["flops_weak"] is not None]
            print(f"| {', '.join(setting)} | {variant} | {_ms([c['acc_strong'] for c in cs])} | "
                  f"{_ms([c['acc_weak'] for c in cs])} | {_ms(diff, signed=True) if diff else '–'} | "
                  f"{statistics.fmean(mb):.3f} | {statistics.fmean(mf):.1f} |" if mb and mf else
                  f"| {', '.join(setting)} | {variant} | {_ms([c['acc_strong'] for c in cs])} | "
                  f"{_ms([c['acc_weak'] for c in cs])} | {_ms(diff, signed=True) if diff else '–'} | – | – |")
    print("\nSoft targets minus hard labels, paired by seed (points; the distillation term's own effect):\n")
    print("| models, labels | strongest tier | weakest tier | seeds where soft < hard (weakest) |")
    print("|---|---|---|---|")
    for setting, cells in by.items():
        seeds = sorted(s for v, s in cells if v == "soft" and ("hard", s) in cells)
        if not seeds:
            continue
        d = {t: [cells[("soft", s)][f"acc_{t}"] - cells[("hard", s)][f"acc_{t}"] for s in seeds]
             for t in ("strong", "weak")}
        print(f"| {', '.join(setting)} | {_ms(d['strong'], signed=True)} | {_ms(d['weak'], signed=True)} | "
              f"{sum(x < 0 for x in d['weak'])} of {len(seeds)} |")
    old = [{k: v for k, v in d.items() if not re.match(r"(acc|mb|mflops)_w\d", k)} for d in data]
    _write_csv(args.csv, old)  # the first study's columns, as its CSV was written
    return 0


def _write_csv(path: Path | None, data: list[dict]) -> None:
    if path:
        fields = list(dict.fromkeys(k for d in data for k in d))
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(data)


if __name__ == "__main__":
    raise SystemExit(main())
