"""FedGen vs FedAvg on MNIST, Dirichlet alpha = 0.1, 20 clients (FedGen's setup), plus the label-count options.

Every arm runs configs/mnist_fedgen.toml or configs/mnist_fedavg_dir01.toml (identical data, partition, model,
local training and rounds) through :func:`hetfl.runner.run`, for each seed; runs are kept under ``--out`` and
a finished run is reused (an interrupted one is resumed), so the script can be re-run to extend or reprint.

    python benchmarks/fedgen_mnist.py --rounds 200 --seeds 0 1 2 --arms fedavg fedgen --jobs 2
    python benchmarks/fedgen_mnist.py --rounds 100 --seeds 0 --arms fedgen_batches fedgen_lap_once fedgen_lap_round \
        fedgen_lap_tiny
    python benchmarks/fedgen_mnist.py --table-only --seeds 0 --at-round 100 --arms fedgen fedgen_batches ...

Prints one markdown row per arm: the final-round accuracy, FedGen's reference metric (mean of the 5 best
evaluated rounds, selected on the test set) and the mean of the last 5 rounds, each as mean ± std over seeds;
the label leakage (mean total-variation distance between a client's label distribution and the server's
estimate from its counts) and the label-count ε per client in total (worst client).
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
FEDGEN = ROOT / "configs" / "mnist_fedgen.toml"
FEDAVG = ROOT / "configs" / "mnist_fedavg_dir01.toml"

ARMS: dict[str, tuple[Path, tuple[str, ...], str]] = {
    "fedavg": (FEDAVG, (), "FedAvg"),
    "fedgen": (FEDGEN, (), "FedGen, raw label histograms"),
    "fedgen_batches": (FEDGEN, ("algorithm.label_counts='batches'",),
                       "FedGen, raw per-round batch counts (FedGen's code)"),
    "fedgen_lap_once": (FEDGEN, ("algorithm.label_noise='laplace'", "algorithm.label_epsilon=0.1"),
                        "FedGen, Laplace counts, ε=0.1 released once"),
    "fedgen_lap_round": (FEDGEN, ("algorithm.label_noise='laplace'", "algorithm.label_epsilon=0.1",
                                  "algorithm.label_release='every_round'"),
                         "FedGen, Laplace counts, ε=0.1 fresh every round"),
    "fedgen_lap_tiny": (FEDGEN, ("algorithm.label_noise='laplace'", "algorithm.label_epsilon=0.01"),
                        "FedGen, Laplace counts, ε=0.01 released once"),
}


def run_one(job: tuple[str, int, int, str]) -> str:
    arm, seed, rounds, out = job
    import torch

    torch.set_num_threads(1)
    from hetfl.resolve import load_config
    from hetfl.runner import run_or_resume

    path, overrides, _ = ARMS[arm]
    run_dir = Path(out) / f"{arm}-s{seed}"
    cfg = load_config(path, [*overrides, f"rounds={rounds}", f"seed={seed}", "checkpoint_every=10"])
    return f"{run_dir}: {run_or_resume(cfg, run_dir)}"


def _ms(values: list[float]) -> str:
    v = 100.0 * np.asarray(values, dtype=float)
    return f"{v.mean():.2f} ± {v.std():.2f}" if len(v) > 1 else f"{v[0]:.2f}"


def stats(run_dir: Path, at_round: int) -> dict[str, float] | None:
    """Metrics of a run at round ``at_round`` (rounds do not depend on the total: a prefix of a longer run is
    the shorter run), computed from metrics.jsonl."""
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return None
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r["round"] <= at_round]
    if not rows or rows[-1]["round"] != at_round:
        return None
    acc = [r["test_accuracy"] for r in rows if r.get("test_accuracy") is not None]
    tv = [r["label_leak_tv_mean"] for r in rows if "label_leak_tv_mean" in r]
    eps = [r["label_dp_eps_total_max"] for r in rows if "label_dp_eps_total_max" in r]
    return {"final": acc[-1], "best5": float(np.mean(sorted(acc)[-5:])), "last5": float(np.mean(acc[-5:])),
            "tv": float(np.mean(tv)) if tv else None, "eps": eps[-1] if eps else None,
            "sec": rows[-1]["time_s"] / len(rows)}


def table(out: Path, arms: list[str], seeds: list[int], rounds: int) -> str:
    lines = [f"| arm (at round {rounds}) | seeds | final acc % | best-5 mean % (FedGen's metric) | last-5 mean % | "
             "label leak TV | label ε total (worst client) | s/round |",
             "|---|---|---|---|---|---|---|---|"]
    for arm in arms:
        got = [st for s in seeds if (st := stats(out / f"{arm}-s{s}", rounds)) is not None]
        if not got:
            continue
        tv = [g["tv"] for g in got if g["tv"] is not None]
        eps = [g["eps"] for g in got if g["eps"] is not None]
        tv_txt = f"{np.mean(tv):.4f}" if tv else "-"
        eps_txt = f"{max(eps):g}" if eps else ("∞ (raw counts)" if arm.startswith("fedgen") else "-")
        lines.append(f"| {ARMS[arm][2]} | {len(got)} | {_ms([g['final'] for g in got])} | "
                     f"{_ms([g['best5'] for g in got])} | {_ms([g['last5'] for g in got])} | {tv_txt} | {eps_txt} | "
                     f"{np.mean([g['sec'] for g in got]):.2f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--arms", nargs="+", default=["fedavg", "fedgen"], choices=sorted(ARMS))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_fedgen"))
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each uses one thread)")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--at-round", type=int, default=0, help="tabulate at this round (default: --rounds)")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.table_only:
        jobs = [(arm, seed, args.rounds, str(args.out)) for seed in args.seeds for arm in args.arms]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for msg in pool.map(run_one, jobs):
                print(msg, flush=True)
    at = args.at_round or args.rounds
    print(f"MNIST, Dirichlet alpha=0.1, 20 clients, 10 per round, round {at}")
    print(table(args.out, args.arms, args.seeds, at))


if __name__ == "__main__":
    main()
