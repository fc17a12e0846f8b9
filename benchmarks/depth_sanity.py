"""Sanity figure of issue 24: does each method's smallest level beat FedAvg of that smallest model alone?

Fashion-MNIST, 100 clients, Dirichlet 0.3, 10 clients per round, fleet tiers a-b-c-d (25 % each: 1, 1/4,
1/16, 1/64 of the parameters for width methods), the shipped ``configs/fmnist_<method>.toml``.  For each
method, the baseline is plain FedAvg in which *every* client trains the method's smallest model (what a
fleet bound by its weakest device would run), on the same data, partition and seed:

* ``depthfl`` and ``inclusivefl`` (smallest level: full width, depth 1/4 = the first conv block and its
  exit): ``depthfl`` with the single level ``1x0.25`` and ``kd = 0``, which is FedAvg of that model;
* ``scalefl`` (width 0.7, depth 1/4): ``scalefl`` with the single level ``0.7x0.25`` and ``kd_gamma = 0``;
* ``fiarse`` (capacity 1/64 of the elements, one global threshold as in FIARSE's default code),
  ``fiarse-tensor`` (the same with one threshold per tensor, ``algorithm.threshold = "tensor"``) and
  ``heterofl`` (width 1/8, 1/64 of the parameters):
  ``fedavg`` with ``model.width = 0.125``.

Every cell is an ordinary resumable ``hetfl run``::

    python benchmarks/depth_sanity.py                     # run the missing cells, print the table
    python benchmarks/depth_sanity.py --cells depthfl,fedavg-d   # only some cells (two processes may split them)
    python benchmarks/depth_sanity.py --table-only        # the table from what has finished

``--hidden`` sets the conv net's channels for every cell (default ``32,64,128,256``, half of HeteroFL's
``64,128,256,512``, so the 16 cells fit a 2-core CPU); ``--hidden 64,128,256,512`` runs the configs as
shipped.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from hetfl.resolve import load_config
from hetfl.runner import run_or_resume

# cell name -> (config, overrides, metric of the smallest level / of the baseline model)
CELLS: dict[str, tuple[str, list[str], str]] = {
    "heterofl": ("fmnist_depthfl", ['algorithm={name="heterofl", clients_per_round=10}'], "test_accuracy.w0.125"),
    "depthfl": ("fmnist_depthfl", [], "test_accuracy.w1d0.25"),
    "inclusivefl": ("fmnist_inclusivefl", [], "test_accuracy.w1d0.25"),
    "scalefl": ("fmnist_scalefl", [], "test_accuracy.w0.7d0.25"),
    "fiarse": ("fmnist_fiarse", [], "test_accuracy.r0.015625"),
    "fiarse-tensor": ("fmnist_fiarse", ['algorithm.threshold="tensor"'], "test_accuracy.r0.015625"),
    "fedavg-d": ("fmnist_depthfl", ['algorithm.levels="1x0.25"', "algorithm.kd=0.0"], "test_accuracy.w1d0.25"),
    "fedavg-0.7d": ("fmnist_scalefl", ['algorithm.levels="0.7x0.25"', "algorithm.kd_gamma=0.0"],
                    "test_accuracy.w0.7d0.25"),
    "fedavg-w": ("fmnist_depthfl", ['algorithm={name="fedavg", clients_per_round=10}', "model.width=0.125"],
                 "test_accuracy"),
}
BASELINE = {"heterofl": "fedavg-w", "depthfl": "fedavg-d", "inclusivefl": "fedavg-d", "scalefl": "fedavg-0.7d",
            "fiarse": "fedavg-w", "fiarse-tensor": "fedavg-w"}
SMALLEST = {"heterofl": "width 1/8", "depthfl": "depth 1/4", "inclusivefl": "depth 1/4",
            "scalefl": "width 0.7 x depth 1/4", "fiarse": "capacity 1/64",
            "fiarse-tensor": "capacity 1/64 of each tensor"}


def overrides(args: argparse.Namespace, name: str, seed: int) -> list[str]:
    _, extra, _ = CELLS[name]
    return [f"rounds={args.rounds}", f"seed={seed}", f'model.hidden="{args.hidden}"', f"eval.every={args.eval_every}",
            "eval.local=false", *extra]


def evals(out: Path, rounds: int) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if r["round"] <= rounds and r.get("test_accuracy") is not None]


def last_mean(rows: list[dict], key: str, k: int) -> float | None:
    """Mean of ``key`` over the last ``k`` evaluations (one evaluation is noisy under label skew)."""
    vals = [r[key] for r in rows if key in r][-k:]
    return statistics.fmean(vals) if vals else None


def table(root: Path, args: argparse.Namespace) -> str:
    seeds = [int(s) for s in args.seeds.split(",")]
    lines = [f"Accuracy on the 10 000 test images, mean of the last {args.last} evaluations up to round "
             f"{args.rounds}, per seed (s0 / s1 ...):", "",
             "| method | smallest level | method: smallest level | FedAvg of that model alone | difference | "
             "method: global prediction |", "|---|---|---|---|---|---|"]
    for method, base in BASELINE.items():
        mine, theirs, glob = [], [], []
        for seed in seeds:
            rows = evals(root / f"{method}-s{seed}", args.rounds)
            brows = evals(root / f"{base}-s{seed}", args.rounds)
            if not rows or rows[-1]["round"] < args.rounds or not brows or brows[-1]["round"] < args.rounds:
                continue
            mine.append(last_mean(rows, CELLS[method][2], args.last))
            theirs.append(last_mean(brows, CELLS[base][2], args.last))
            glob.append(last_mean(rows, "test_accuracy", args.last))
        if not mine or None in mine or None in theirs:
            continue
        fmt = " / ".join
        lines.append(f"| {method} | {SMALLEST[method]} | {fmt(f'{v * 100:.1f}' for v in mine)} | "
                     f"{fmt(f'{v * 100:.1f}' for v in theirs)} | "
                     f"{fmt(f'{(a - b) * 100:+.1f}' for a, b in zip(mine, theirs, strict=True))} | "
                     f"{fmt(f'{v * 100:.1f}' for v in glob)} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/depth_sanity")
    p.add_argument("--cells", default=",".join(CELLS), help=f"which cells to run, of {', '.join(CELLS)}")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--hidden", default="32,64,128,256")
    p.add_argument("--eval-every", type=int, default=20)
    p.add_argument("--last", type=int, default=2, help="evaluations averaged in the table")
    p.add_argument("--table-only", action="store_true")
    args = p.parse_args()
    unknown = sorted(set(args.cells.split(",")) - set(CELLS))
    if unknown:
        p.error(f"--cells: unknown {', '.join(unknown)}; choose from {', '.join(CELLS)}")
    root = Path(args.out)
    config_dir = Path(__file__).resolve().parent.parent / "configs"
    if not args.table_only:
        for seed in (int(s) for s in args.seeds.split(",")):
            for name in args.cells.split(","):
                cfg = load_config(config_dir / f"{CELLS[name][0]}.toml", overrides(args, name, seed))
                state = run_or_resume(cfg, root / f"{name}-s{seed}")
                print(f"{name} seed {seed}: {state}", flush=True)
    print(table(root, args))


if __name__ == "__main__":
    main()
