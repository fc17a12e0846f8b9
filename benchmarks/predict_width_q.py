"""Predict, before any training, which ``mixture(q)`` a width-sampling study's settings want (issue 27, part 2).

    python benchmarks/predict_width_q.py configs/study_width_fmnist.toml \
        --csv benchmarks/results/width_fmnist_predicted.csv

For every (fleet, correlation, seed) of the study, the fleet and the clients' training-set sizes are rebuilt
exactly as the runs build them (``hetfl.experiment.prepare``: same partition, same fleet draw; no model is
trained) and three candidate rules give a step-down rate:

``coverage_q``  the shipped ``coverage(target=equal)`` schedule's expected share of training samples trained
                below the client's maximum width (its ``width_q``): strong clients step down only as far as
                needed for every width to get an equal share of the samples;
``fit_equal``   the ``q`` of the study's grid whose ``mixture(q)`` per-width sample shares are closest (L1)
                to equal shares;
``fit_deploy``  the same, closest to the deployment shares (the share of devices that run each width).

The primary prediction (``predicted_q``) is ``coverage_q`` snapped to the nearest grid value; the others are
reported beside it.  Everything here is a function of the fleet's capability distribution and the clients'
data sizes only.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from collections import defaultdict

import numpy as np

from hetfl.experiment import prepare
from hetfl.hetero.sampling import CoverageWidth, MixtureWidth, parse_target, plan_round
from hetfl.sweep import load_study

Q_AXIS = "q"


def _plan(schedule, fleet, sizes, epochs: int, seed: int):
    return plan_round(schedule, levels=fleet.levels, max_width=fleet.max_width, fixed_max_width=fleet.max_width,
                      samples=np.asarray(sizes, dtype=np.float64) * max(epochs, 1), buffers={}, seed=seed, rnd=1)


def predict(cfg, grid: list[float]) -> dict[str, float]:
    """The three candidate step-down rates of one run's config (see the module docstring)."""
    exp = prepare(cfg)
    fleet, sizes, epochs = exp.ctx.fleet, exp.federation.sizes, cfg.train.epochs
    cov = _plan(CoverageWidth("equal"), fleet, sizes, epochs, cfg.seed)
    out = {"coverage_q": cov.expected_q()}
    deploy = cov.inputs.deploy
    for name, target in (("fit_equal", parse_target("equal", fleet.levels, deploy)),
                         ("fit_deploy", parse_target("deploy", fleet.levels, deploy))):
        dist = [np.abs(_plan(MixtureWidth(q), fleet, sizes, epochs, cfg.seed).expected_shares() - target).sum()
                for q in grid]
        out[name] = grid[int(np.argmin(dist))]
    shares = cov.inputs.tier_samples / cov.inputs.tier_samples.sum()
    out["tier_sample_shares"] = "/".join(f"{s:.2f}" for s in shares)
    out["deploy_shares"] = "/".join(f"{s:.2f}" for s in deploy)
    return out


def snap(q: float, grid: list[float]) -> float:
    return min(grid, key=lambda g: (abs(g - q), g))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("study", help="a width-sampling study TOML with a 'q' axis of mixture(q) schedules")
    ap.add_argument("--csv", help="write one row per (setting, seed) here")
    args = ap.parse_args(argv)
    study = load_study(args.study)
    if Q_AXIS not in study.axes:
        ap.error(f"{args.study}: the study has no '{Q_AXIS}' axis (axes: {', '.join(study.axes)})")
    grid = sorted(float(k) for k in study.axes[Q_AXIS])
    rows, seen = [], set()
    for cell in study.cells():
        key = tuple((a, v) for a, v in cell.levels if a != Q_AXIS) + (("seed", cell.seed),)
        if key in seen:
            continue
        seen.add(key)
        p = predict(study.config(cell), grid)
        rows.append({**dict(key), **p, "predicted_q": snap(p["coverage_q"], grid)})
        print(f"  {dict(key)}: coverage q {p['coverage_q']:.3f}", file=sys.stderr)
    by_setting = defaultdict(list)
    for r in rows:
        by_setting[tuple((k, v) for k, v in r.items() if k not in {"seed", "coverage_q", "fit_equal", "fit_deploy",
                                                                     "predicted_q", "tier_sample_shares",
                                                                     "deploy_shares"})].append(r)
    print("| setting | coverage q (mean over seeds) | predicted q (snapped) | fit to equal | fit to deploy |")
    print("|---|---|---|---|---|")
    for setting, rs in by_setting.items():
        cq = statistics.fmean(r["coverage_q"] for r in rs)
        print(f"| {', '.join(str(v) for _, v in setting)} | {cq:.3f} | {snap(cq, grid):g} | "
              f"{statistics.median(r['fit_equal'] for r in rs):g} | "
              f"{statistics.median(r['fit_deploy'] for r in rs):g} |")
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
