"""Privacy-utility of DP-FedAvg: FedAvg and HeteroFL (a-b-c-d-e) at epsilon 1, 2, 4, 8 and infinity.

Every cell is an ordinary resumable ``hetfl run`` with a ``[privacy]`` section; the noise multiplier of a
finite epsilon is derived from ``privacy.target_epsilon`` before round 1 (delta = 1e-5, Poisson sampling at
q = clients_per_round / num_clients, calibrated with the run's accountant: PLD since issue 37, RDP before).
"inf" keeps the same pipeline (Poisson sampling, clipping, fixed denominators) with no noise, so the table
isolates the cost of the noise::

    python benchmarks/privacy_utility.py                 # run the missing cells, print the table
    python benchmarks/privacy_utility.py --table-only --figure docs/img/privacy_fmnist.png

Defaults (issue 25): Fashion-MNIST, 1 000 clients of 60 samples (IID), 100 expected per round (q = 0.1),
50 rounds, a 784-32-10 MLP, C = 0.3, seeds 0 and 1.  ``--data mnist --clients 600 --per-round 40`` is the
earlier MNIST table.  Cells live in ``OUT/<algorithm>-eps<e>-s<seed>``; ``--rounds N`` with
``--table-only`` reads a longer run of a cell at round N (rounds are deterministic).
"""

from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

from hetfl.resolve import load_config
from hetfl.results import read_metrics, read_summary
from hetfl.runner import run_or_resume

ALGORITHMS = {
    "fedavg": ['algorithm={name="fedavg"}'],
    "heterofl a-b-c-d-e": ['algorithm={name="heterofl"}', 'fleet.source="tiers"', 'fleet.mix="a-b-c-d-e"'],
}


def cell(args: argparse.Namespace, algo: str, eps: str, seed: int) -> list[str]:
    sets = [f"rounds={args.rounds}", f"seed={seed}", f'data.name="{args.data}"', f"data.num_clients={args.clients}",
            'data.partition={name="iid"}', f'model={{name="mlp", hidden="{args.hidden}"}}', *ALGORITHMS[algo],
            f"algorithm.clients_per_round={args.per_round}", "train.epochs=1", "train.batch_size=20",
            f"train.lr={args.lr}", f"eval.every={args.eval_every}", "eval.local=false", "workers=1",
            f"privacy.clip={args.clip}", f"privacy.delta={args.delta}"]
    if eps != "inf":
        sets.append(f"privacy.target_epsilon={float(eps)}")
    return sets


def cell_dir(root: Path, algo: str, eps: str, seed: int) -> Path:
    return root / f"{algo.split()[0]}-eps{eps}-s{seed}"


def results(root: Path, args: argparse.Namespace) -> dict[tuple[str, str], list[dict]]:
    """(algorithm, epsilon) -> one record per finished seed: the last evaluation at or before ``args.rounds``,
    the epsilon spent, the noise multiplier and the wall time."""
    out: dict[tuple[str, str], list[dict]] = {}
    for algo in ALGORITHMS:
        for eps in args.epsilons.split(","):
            for seed in (int(s) for s in args.seeds.split(",")):
                d = cell_dir(root, algo, eps, seed)
                rows = [r for r in read_metrics(d) if r["round"] <= args.rounds]
                evals = [r for r in rows if r.get("test_accuracy") is not None]
                if not evals or rows[-1]["round"] < args.rounds:
                    continue
                priv = (read_summary(d) or {}).get("privacy") or {}
                out.setdefault((algo, eps), []).append({
                    "seed": seed, "eval": evals[-1], "epsilon": rows[-1].get("privacy.epsilon"),
                    "z": priv.get("noise_multiplier", 0.0), "wall": rows[-1].get("time_s", math.nan),
                    "noise": {k[len("privacy.noise_std."):] or "all": v for k, v in rows[-1].items()
                              if k.startswith("privacy.noise_std")}})
    return out


def _widths(record: dict) -> dict[str, float]:
    return {k.split(".", 1)[1]: v for k, v in record["eval"].items() if k.startswith("test_accuracy.w")}


def table(root: Path, args: argparse.Namespace) -> str:
    """One row per (algorithm, epsilon): accuracy at round ``args.rounds`` per seed, and per width (mean of
    the seeds)."""
    lines = [f"| algorithm | target ε | ε after round {args.rounds} | noise multiplier z | accuracy per seed | "
             "mean | per-width acc, mean of seeds (global test) | noise std on the mean per width | wall s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for (algo, eps), recs in results(root, args).items():
        accs = [r["eval"]["test_accuracy"] for r in recs]
        per_seed = " / ".join(f"{a * 100:.1f}" for a in accs)
        widths = {}
        for r in recs:
            for w, v in _widths(r).items():
                widths.setdefault(w, []).append(v)
        wtxt = ", ".join(f"{w}={statistics.fmean(v) * 100:.1f}" for w, v in widths.items()) or "-"
        noise = ", ".join(f"{w}={v:.3g}" for w, v in recs[0]["noise"].items()) or "-"
        reached = recs[0]["epsilon"]
        lines.append(
            f"| {algo} | {eps if eps != 'inf' else '∞'} | {'∞' if reached is None else f'{reached:.3f}'} | "
            f"{recs[0]['z']:.3f} | {per_seed} | {statistics.fmean(accs) * 100:.1f} | {wtxt} | {noise} | "
            f"{statistics.fmean(r['wall'] for r in recs):.0f} |")
    return "\n".join(lines)


def figure(root: Path, args: argparse.Namespace, path: Path) -> None:
    """Accuracy against epsilon: FedAvg, HeteroFL's global model and each of its widths; the markers are the
    mean of the seeds, the bars their range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res = results(root, args)
    epsilons = args.epsilons.split(",")
    order = sorted(epsilons, key=lambda e: math.inf if e == "inf" else float(e))
    xs = range(len(order))
    curves: dict[str, list[list[float]]] = {}
    for algo in ALGORITHMS:
        for i, eps in enumerate(order):
            for r in res.get((algo, eps), []):
                name = "FedAvg" if algo == "fedavg" else "HeteroFL global"
                curves.setdefault(name, [[] for _ in order])[i].append(r["eval"]["test_accuracy"])
                if algo != "fedavg":
                    for w, v in _widths(r).items():
                        curves.setdefault(f"HeteroFL width {w[1:]}", [[] for _ in order])[i].append(v)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, per_eps in curves.items():
        pts = [(x, v) for x, v in zip(xs, per_eps, strict=True) if v]
        if not pts:
            continue
        mean = [statistics.fmean(v) * 100 for _, v in pts]
        lo = [m - min(v) * 100 for m, (_, v) in zip(mean, pts, strict=True)]
        hi = [max(v) * 100 - m for m, (_, v) in zip(mean, pts, strict=True)]
        style = "-o" if not name.startswith("HeteroFL width") else "--."
        ax.errorbar([x for x, _ in pts], mean, yerr=[lo, hi], fmt=style, capsize=3, label=name)
    ax.set_xticks(list(xs), ["∞" if e == "inf" else e for e in order])
    ax.set_xlabel(f"target ε (δ = {args.delta:g})")
    ax.set_ylabel(f"test accuracy at round {args.rounds} (%)")
    ax.set_title(f"DP-FedAvg on {args.data}: {args.clients} clients, {args.per_round} per round, seeds {args.seeds}",
                 fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/privacy_utility")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--epsilons", default="inf,8,4,2,1")
    p.add_argument("--algorithms", default="fedavg,heterofl", help="which rows to run (two processes may split them)")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--hidden", default="32")
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--clip", type=float, default=0.3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--figure", type=Path, help="also draw accuracy against epsilon into this PNG")
    args = p.parse_args()
    root = Path(args.out)
    if not args.table_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for algo in [a for a in ALGORITHMS if a.split()[0] in args.algorithms.split(",")]:
                for eps in args.epsilons.split(","):
                    cfg = load_config(None, cell(args, algo, eps, seed))
                    state = run_or_resume(cfg, cell_dir(root, algo, eps, seed))
                    print(f"{algo} eps={eps} seed={seed}: {state}", flush=True)
    print(table(root, args))
    if args.figure:
        figure(root, args, args.figure)


if __name__ == "__main__":
    main()
