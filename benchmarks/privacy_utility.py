"""Privacy-utility of DP-FedAvg on MNIST: FedAvg and HeteroFL (a-b-c-d-e) at epsilon 1, 2, 4, 8 and infinity.

Every cell is an ordinary resumable ``hetfl run`` with a ``[privacy]`` section; the noise multiplier of a
finite epsilon is derived from ``privacy.target_epsilon`` before round 1 (delta = 1e-5, Poisson sampling at
q = clients_per_round / num_clients, RDP accountant).  "inf" keeps the same pipeline (Poisson sampling,
clipping, fixed denominators) with no noise, so the table isolates the cost of the noise::

    python benchmarks/privacy_mnist.py                 # run the missing cells, print the table
    python benchmarks/privacy_mnist.py --table-only    # the table from what has finished

Defaults: 600 clients of 100 samples (IID), 40 expected per round (q = 1/15), 15 rounds, a 784-32-10 MLP,
C = 0.3.  What was actually run on the shared 2-core machine (10 rounds, epsilon in {inf, 8, 1}) and why is
in benchmarks/README.md; ``--rounds 10`` with ``--table-only`` reads a longer run of a cell at round 10.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from hetfl.resolve import load_config
from hetfl.results import read_metrics, read_summary
from hetfl.runner import run_or_resume

ALGORITHMS = {
    "fedavg": ['algorithm={name="fedavg"}'],
    "heterofl a-b-c-d-e": ['algorithm={name="heterofl"}', 'fleet.source="tiers"', 'fleet.mix="a-b-c-d-e"'],
}


def cell(args: argparse.Namespace, algo: str, eps: str) -> list[str]:
    sets = [f"rounds={args.rounds}", f"seed={args.seed}", 'data.name="mnist"', f"data.num_clients={args.clients}",
            'data.partition={name="iid"}', 'model={name="mlp", hidden="32"}', *ALGORITHMS[algo],
            f"algorithm.clients_per_round={args.per_round}", "train.epochs=1", "train.batch_size=20",
            f"train.lr={args.lr}", f"eval.every={args.eval_every}", "eval.local=false", "workers=1",
            f"privacy.clip={args.clip}", f"privacy.delta={args.delta}"]
    if eps != "inf":
        sets.append(f"privacy.target_epsilon={float(eps)}")
    return sets


def table(root: Path, args: argparse.Namespace) -> str:
    """One row per cell, read at round ``args.rounds`` (a longer run of the same cell is cut there: runs are
    deterministic per round, so its first rounds are those of the shorter run)."""
    lines = ["| algorithm | target ε | ε after the last round | noise multiplier z | accuracy per eval round | "
             "per-width acc (global test) | noise std on the mean per width | wall s |",
             "|---|---|---|---|---|---|---|---|"]
    for algo in ALGORITHMS:
        for eps in args.epsilons.split(","):
            out = root / f"{algo.split()[0]}-eps{eps}"
            rows = [r for r in read_metrics(out) if r["round"] <= args.rounds]
            summary = read_summary(out) or {}
            evals = [r for r in rows if r.get("test_accuracy") is not None]
            if not evals or rows[-1]["round"] < args.rounds:
                continue
            priv = summary.get("privacy") or {}
            reached = rows[-1].get("privacy.epsilon")
            widths = ", ".join(f"{k.split('.', 1)[1]}={v * 100:.1f}" for k, v in evals[-1].items()
                               if k.startswith("test_accuracy.w"))
            noise = ", ".join(f"{k[len('privacy.noise_std.'):] or 'all'}={v:.3g}"
                              for k, v in rows[-1].items() if k.startswith("privacy.noise_std"))
            accs = ", ".join(f"r{r['round']}: {r['test_accuracy'] * 100:.2f}" for r in evals)
            wall = rows[-1].get("time_s", summary.get("wall_time_s", math.nan))
            lines.append(
                f"| {algo} | {eps if eps != 'inf' else '∞'} | {'∞' if reached is None else f'{reached:.3f}'} | "
                f"{priv.get('noise_multiplier', 0.0):.3f} | {accs} | {widths or '-'} | {noise or '-'} | {wall:.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/privacy_mnist")
    p.add_argument("--epsilons", default="inf,8,4,2,1")
    p.add_argument("--algorithms", default="fedavg,heterofl", help="which rows to run (two processes may split them)")
    p.add_argument("--clients", type=int, default=600)
    p.add_argument("--per-round", type=int, default=40)
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--clip", type=float, default=0.3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    root = Path(args.out)
    if not args.table_only:
        for algo in [a for a in ALGORITHMS if a.split()[0] in args.algorithms.split(",")]:
            for eps in args.epsilons.split(","):
                out = root / f"{algo.split()[0]}-eps{eps}"
                state = run_or_resume(load_config(None, cell(args, algo, eps)), out)
                print(f"{algo} eps={eps}: {state}", flush=True)
    print(table(root, args))


if __name__ == "__main__":
    main()
