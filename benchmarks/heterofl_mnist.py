"""HeteroFL on MNIST: fixed-assignment mixes, IID and shards non-IID, next to the published figures.

Each cell is an ordinary ``hetfl run`` (resumable: finished cells are skipped, interrupted ones
resumed), so the table can be rebuilt at any time from the run directories::

    python benchmarks/heterofl_mnist.py --rounds 60                    # run missing cells, print table
    python benchmarks/heterofl_mnist.py --rounds 60 --table-only       # table from what has finished

Mixes use HeteroFL's notation (a=1, b=1/2, c=1/4, d=1/8, e=1/16, fixed assignment in contiguous id
blocks).  ``e`` alone means every client trains the 1/16 model (FedAvg on the smallest width); the
extra row ``a-b-c-d-e: FedAvg capable only`` trains the full model with only the clients that can
afford it (the other 80% dropped).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from hetfl.resolve import load_config
from hetfl.results import read_metrics, read_summary
from hetfl.runner import run

# HeteroFL as reproduced in Flower's baseline (dynamic assignment, 5 local epochs, 200/400 rounds, HeteroFL's
# 4-conv CNN): IID accuracy and non-IID global accuracy.  See ../shared/design/algorithms.md 1.1.6.
PUBLISHED = {
    ("iid", "a"): 99.47, ("iid", "a-e"): 99.49, ("iid", "a-b-c-d-e"): 99.23, ("iid", "e"): 98.46,
    ("shards", "a"): 98.87, ("shards", "a-e"): 98.90, ("shards", "a-b-c-d-e"): 98.50, ("shards", "e"): 96.50,
}
BASELINE = "a-b-c-d-e:fedavg-capable"


def cell_overrides(split: str, mix: str, args: argparse.Namespace) -> list[str]:
    part = '{name="iid"}' if split == "iid" else '{name="shards", shards_per_client=2}'
    sets = [f"data.partition={part}", f"rounds={args.rounds}", f"train.epochs={args.epochs}",
            f'model={{name="{args.model}"}}', f"seed={args.seed}", f"eval.every={args.eval_every}"]
    if mix == BASELINE:
        return sets + ['algorithm={name="fedavg", clients_per_round=10, weighted=false, min_width=1.0}',
                       'fleet.mix="a-b-c-d-e"']
    if mix == "e":  # HeteroFL's "e": the global model is the 1/16 model, trained by everyone
        return sets + ['fleet.mix="a"', 'model.width=0.0625', *args.set]
    return sets + [f'fleet.mix="{mix}"', *args.set]


def run_cell(out: Path, split: str, mix: str, args: argparse.Namespace) -> None:
    summary = read_summary(out)
    if summary and summary.get("status") == "complete" and summary.get("rounds_completed", 0) >= args.rounds:
        return
    if (out / "config.toml").exists():
        run(load_config(out / "config.toml", [f"rounds={args.rounds}"]), resume=out, quiet=args.quiet)
    else:
        cfg = load_config(args.config, cell_overrides(split, mix, args))
        run(cfg, out, quiet=args.quiet)


def table(root: Path, splits: list[str], mixes: list[str]) -> str:
    lines = ["| split | mix | rounds | final acc | mean last 5 evals | best | per-width acc (global test) | "
             "published (Flower, dynamic) | wall s |", "|---|---|---|---|---|---|---|---|---|"]
    for split in splits:
        for mix in mixes:
            out = root / f"{split}-{mix.replace(':', '-')}"
            rows = read_metrics(out)
            summary = read_summary(out) or {}
            if not rows:
                continue
            evals = [r for r in rows if r.get("test_accuracy") is not None]
            last = evals[-1]
            widths = ", ".join(f"{k.split('.', 1)[1]}={v * 100:.2f}" for k, v in last.items()
                               if k.startswith("test_accuracy.w"))
            pub = PUBLISHED.get((split, mix))
            lines.append(
                f"| {split} | {mix} | {rows[-1]['round']} | {last['test_accuracy'] * 100:.2f} | "
                f"{sum(r['test_accuracy'] for r in evals[-5:]) / len(evals[-5:]) * 100:.2f} | "
                f"{max(r['test_accuracy'] for r in evals) * 100:.2f} | {widths or '-'} | "
                f"{pub if pub is not None else '-'} | {summary.get('wall_time_s', float('nan')):.0f} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/mnist_heterofl.toml")
    p.add_argument("--model", default="cnn", help="cnn (FedAvg's CNN, CPU-friendly) or heterofl_conv (HeteroFL's)")
    p.add_argument("--rounds", type=int, default=60)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", default="iid,shards")
    p.add_argument("--mixes", default=f"a,a-e,a-b-c-d-e,e,{BASELINE}")
    p.add_argument("--out", default="runs/bench/heterofl_mnist")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every HeteroFL cell (repeatable), e.g. algorithm.scaler=false")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    root = Path(args.out)
    splits, mixes = args.splits.split(","), args.mixes.split(",")
    if not args.table_only:
        for split in splits:
            for mix in mixes:
                run_cell(root / f"{split}-{mix.replace(':', '-')}", split, mix, args)
                print(json.dumps({"split": split, "mix": mix, "done": True}), flush=True)
    print(table(root, splits, mixes))


if __name__ == "__main__":
    main()
