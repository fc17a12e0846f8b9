"""FedDF on MNIST with three architecture families vs per-family FedAvg vs FedAvg on the smallest architecture.

Every arm runs configs/mnist_feddf.toml (30 clients, Dirichlet alpha = 0.5, tiers a-b-c training a CNN, a
half-width CNN and a 32-unit MLP) through :func:`hetfl.runner.run`:

* ``feddf``: distillation on 2 000 held-out MNIST training images (removed from the clients' pool);
* ``feddf_noise`` / ``feddf_digits``: the same, with uniform-noise images / scikit-learn's digits resized to
  28x28 (all 1 797) as the transfer set: how much the server data matters;
* ``perfamily``: ``distill_steps = 0``: each family is FedAvg'd from its own clients only;
* ``smallest``: every client trains the MLP (``families = "mlp(hidden=32)"``, no distillation): what plain
  FedAvg offers when the weakest device sets the model.

The baselines run through ``feddf`` with distillation off, so they train on exactly FedDF's client pool (the
server's held-out images removed) with the same uniform averaging.  Finished runs under ``--out`` are reused.

    python benchmarks/feddf_mnist.py --rounds 20 --seeds 0 --jobs 1
"""

from __future__ import annotations

import argparse
import json
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "mnist_feddf.toml"
FAMILIES = ["cnn", "cnn@0.5", "mlp(hidden=32)"]

ARMS: dict[str, tuple[tuple[str, ...], str]] = {
    "feddf": ((), "FedDF, held-out MNIST transfer set (2 000)"),
    "feddf_digits": (("algorithm.server_data='digits'", "algorithm.server_data_size=1797"),
                     "FedDF, digits 8x8 resized (1 797)"),
    "feddf_noise": (("algorithm.server_data='noise'",), "FedDF, uniform noise (2 000)"),
    "perfamily": (("algorithm.distill_steps=0",), "per-family FedAvg"),
    "smallest": (("algorithm.distill_steps=0", "algorithm.families='mlp(hidden=32)'"),
                 "FedAvg, every client on the MLP"),
}


def run_one(job: tuple[str, int, int, str]) -> str:
    arm, seed, rounds, out = job
    import torch

    torch.set_num_threads(1)
    from hetfl.resolve import load_config
    from hetfl.runner import run_or_resume

    run_dir = Path(out) / f"{arm}-s{seed}"
    cfg = load_config(CONFIG, [*ARMS[arm][0], f"rounds={rounds}", f"seed={seed}"])
    return f"{run_dir}: {run_or_resume(cfg, run_dir)}"


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def table(out: Path, arms: list[str], seeds: list[int], rounds: int) -> str:
    head = " | ".join(f"{f} final (± std) / last-5" for f in FAMILIES)
    lines = [f"| arm | seeds | {head} | distill s/round | teacher s/round | s/round |",
             "|---|---|" + "---|" * (len(FAMILIES) + 3)]
    for arm in arms:
        runs = [_rows(out / f"{arm}-s{s}" / "metrics.jsonl") for s in seeds
                if (out / f"{arm}-s{s}" / "summary.json").exists()]
        runs = [r for r in runs if r and r[-1]["round"] == rounds]
        if not runs:
            continue
        cells = []
        for i, fam in enumerate(FAMILIES):
            key = "test_accuracy" if i == 0 or arm == "smallest" else f"test_accuracy.{fam}"
            if arm == "smallest" and fam != FAMILIES[-1]:
                cells.append("-")
                continue
            final = [r[-1][key] for r in runs]
            last5 = [np.mean([row[key] for row in r[-5:]]) for r in runs]
            sd = f" ± {100 * np.std(final):.2f}" if len(final) > 1 else ""  # spread of the final accuracy
            cells.append(f"{100 * np.mean(final):.2f}{sd} / {100 * np.mean(last5):.2f}")
        distill = np.mean([np.mean([row.get("server_distill_s", 0.0) for row in r]) for r in runs])
        teacher = np.mean([np.mean([row.get("server_teacher_s", 0.0) for row in r]) for r in runs])
        per_round = np.mean([r[-1]["time_s"] / len(r) for r in runs])
        lines.append(f"| {ARMS[arm][1]} | {len(runs)} | {' | '.join(cells)} | {distill:.1f} | {teacher:.1f} | "
                     f"{per_round:.1f} |")
    return "\n".join(lines)


def gain_table(out: Path, arms: list[str], seeds: list[int], rounds: int) -> str:
    """What distillation itself does, per family: validation accuracy of the averaged model before distillation
    and of the kept student, mean over rounds (and seeds), and the ensemble's validation accuracy."""
    lines = [f"| arm | ensemble val % | {' | '.join(f'{f} val % before → after' for f in FAMILIES)} |",
             "|---|---|" + "---|" * len(FAMILIES)]
    for arm in arms:
        runs = [_rows(out / f"{arm}-s{s}" / "metrics.jsonl") for s in seeds
                if (out / f"{arm}-s{s}" / "metrics.jsonl").exists()]
        rows = [row for r in runs if r and r[-1]["round"] == rounds for row in r]
        if not rows or "ensemble_val_acc" not in rows[0]:
            continue
        cells = []
        for f in FAMILIES:
            before = np.mean([row[f"distill_val_acc0.{f}"] for row in rows])
            after = np.mean([row[f"distill_val_acc.{f}"] for row in rows])
            cells.append(f"{100 * before:.1f} → {100 * after:.1f}")
        ens = np.mean([row["ensemble_val_acc"] for row in rows])
        lines.append(f"| {ARMS[arm][1]} | {100 * ens:.1f} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    ap.add_argument("--out", type=Path, default=Path("runs/bench_feddf"))
    ap.add_argument("--jobs", type=int, default=1, help="runs in parallel (each uses one thread)")
    ap.add_argument("--table-only", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not args.table_only:
        jobs = [(arm, seed, args.rounds, str(args.out)) for seed in args.seeds for arm in args.arms]
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for msg in pool.map(run_one, jobs):
                print(msg, flush=True)
    print(f"MNIST, Dirichlet alpha=0.5, 30 clients on tiers a-b-c, 10 per round, {args.rounds} rounds; "
          f"test accuracy % per family (final round / mean of the last 5)")
    print(table(args.out, args.arms, args.seeds, args.rounds))
    print("\nDistillation per round (validation split, mean over rounds)")
    print(gain_table(args.out, args.arms, args.seeds, args.rounds))


if __name__ == "__main__":
    main()
