"""Tables of the decentralized-distillation study (issue 27, part 3) from a finished or partial sweep.

    hetfl sweep configs/study_decentral_fmnist.toml --out sweeps/decentral-fmnist
    python benchmarks/decentral_table.py sweeps/decentral-fmnist --csv benchmarks/results/decentral_fmnist.csv

Per (models, labels) setting and variant: the mean global-test accuracy of the strongest and of the weakest
tier's nodes (each a mean of the last 5 evaluations; mean ± sample std over seeds), the paired difference of
the weakest tier to D-PSGD of the smallest model (seed s minus seed s), and the bytes sent and training
FLOPs per weakest-tier node and round (means over the run).
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

BASELINE = "dpsgd-smallest"


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
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("sweep", type=Path)
    ap.add_argument("--csv", type=Path)
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
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(data[0]))
            w.writeheader()
            w.writerows(data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
