"""Empirical privacy audit of DP-FedAvg runs: the accountants' epsilon (RDP and PLD) next to the canary
audit's lower bound (Steinke et al. 2023, one run, 95 % confidence) and one-shot estimate (Andrew et al.
2024), for FedAvg and HeteroFL (a-b-c-d-e) on Fashion-MNIST at target epsilon 1, 4 and 8 (issue 37)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/privacy_audit.py              # run missing cells, table
    PYTHONPATH=src python benchmarks/privacy_audit.py --table-only

The cells are :mod:`benchmarks.privacy_utility`'s (1 000 IID clients, q = 0.1, a 784-32-10 MLP, C = 0.3,
delta = 1e-5, noise calibrated to the target with the PLD accountant) with ``--canaries`` canary clients
added by :func:`hetfl.privacy.audit.audit_run` (each inserted with probability 1/2, then sampled at q every
round, clipped to C; a third of HeteroFL's on the outer ring only the width-1 clients hold).  Each cell's
result is one JSON file ``OUT/<algorithm>-eps<e>-s<seed>.json``; a cell whose file exists is not re-run.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from privacy_utility import ALGORITHMS, cell  # noqa: E402

from hetfl.privacy.audit import audit_run, gaussian_epsilon  # noqa: E402
from hetfl.resolve import load_config  # noqa: E402


def cell_file(root: Path, algo: str, eps: str, seed: int) -> Path:
    return root / f"{algo.split()[0]}-eps{eps}-s{seed}.json"


def run_cell(args: argparse.Namespace, root: Path, algo: str, eps: str, seed: int) -> None:
    path = cell_file(root, algo, eps, seed)
    if path.exists():
        return
    sets = [*cell(args, algo, eps, seed), f"eval.every={args.rounds}"]
    cfg = load_config(None, sets)
    run_dir = root / "runs" / path.stem
    if run_dir.exists():  # an interrupted cell: start it again (an audit is one whole run)
        import shutil

        shutil.rmtree(run_dir)
    t0 = time.perf_counter()
    out = audit_run(cfg, run_dir, canaries=args.canaries, canary_seed=seed)
    out.update(wall_s=round(time.perf_counter() - t0, 1), sets=sets, canaries_total=args.canaries)
    root.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print(f"{algo} eps={eps} seed={seed}: lb {out['epsilon_lower_bound']:.3f} est {out['epsilon_estimate']:.3f} "
          f"pld {out['epsilon_pld']:.3f} ({out['wall_s']} s)", flush=True)


def _fmt(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.fmean(values):.2f} ({min(values):.2f}–{max(values):.2f})"


def pooled(rec: dict, delta: float) -> float:
    """The estimate with one pooled variance for both fits: the Gaussian mechanism of sensitivity
    (in_mean - out_mean) / sd, less sensitive to the sampling error of two separate variances."""
    sd = math.sqrt(0.5 * (rec["in_std"] ** 2 + rec["out_std"] ** 2))
    return gaussian_epsilon(rec["in_mean"], sd, rec["out_mean"], sd, delta)


def _records(root: Path, args: argparse.Namespace, algo: str, eps: str) -> list[dict]:
    return [json.loads(p.read_text()) for s in args.seeds.split(",")
            if (p := cell_file(root, algo, eps, int(s))).exists()]


def table(root: Path, args: argparse.Namespace) -> str:
    """One row per (algorithm, epsilon): the accountants' epsilon, then the audit's three figures (mean of the
    seeds and their range); below, HeteroFL's canaries by where they live."""
    lines = ["| algorithm | target ε | z (PLD) | ε RDP | ε PLD | audit lower bound, 95 % | audit estimate | "
             "estimate, pooled variance | seeds | test acc. |", "|---|---|---|---|---|---|---|---|---|---|"]
    kinds: dict[tuple[str, str, str], list[dict]] = {}
    for algo in ALGORITHMS:
        for eps in args.epsilons.split(","):
            recs = _records(root, args, algo, eps)
            if not recs:
                continue
            lines.append(
                f"| {algo} | {eps} | {recs[0]['noise_multiplier']:.3f} | {recs[0]['epsilon_rdp']:.3f} | "
                f"{recs[0]['epsilon_pld']:.3f} | {_fmt([r['epsilon_lower_bound'] for r in recs])} | "
                f"{_fmt([r['epsilon_estimate'] for r in recs])} | {_fmt([pooled(r, args.delta) for r in recs])} | "
                f"{len(recs)} | {statistics.fmean(r['test_accuracy'] for r in recs) * 100:.1f} % |")
            for r in recs:
                for name, k in r.get("kinds", {}).items():
                    kinds.setdefault((algo, eps, name), []).append(k)
    if kinds:
        lines += ["", "| algorithm | target ε | canaries on | lower bound | estimate | estimate, pooled variance |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {a} | {e} | {n} | {_fmt([k['epsilon_lower_bound'] for k in ks])} | "
                  f"{_fmt([k['epsilon_estimate'] for k in ks])} | {_fmt([pooled(k, args.delta) for k in ks])} |"
                  for (a, e, n), ks in kinds.items()]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/privacy_audit")
    p.add_argument("--data", default="fashion_mnist")
    p.add_argument("--epsilons", default="8,4,1")
    p.add_argument("--algorithms", default="fedavg,heterofl")
    p.add_argument("--clients", type=int, default=1000)
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--hidden", default="32")
    p.add_argument("--lr", type=float, default=0.2)
    p.add_argument("--clip", type=float, default=0.3)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--canaries", type=int, default=1000)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    args.eval_every = args.rounds
    root = Path(args.out)
    if not args.table_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for algo in [a for a in ALGORITHMS if a.split()[0] in args.algorithms.split(",")]:
                for eps in args.epsilons.split(","):
                    run_cell(args, root, algo, eps, seed)
    print(table(root, args))


if __name__ == "__main__":
    main()
