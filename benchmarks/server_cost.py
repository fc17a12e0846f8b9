"""Server time and server memory per method, for any study file's first seed (issue 27: "server memory and time").

    python benchmarks/server_cost.py configs/study_compare_fmnist.toml --rounds 4 --repeats 3

Runs every cell of the study's first seed for ``--rounds`` rounds (evaluation off, one process, one torch
thread) and reads two columns every round's metrics carry (hetfl.rounds.Round):

- ``server_time_s``: the round's wall time less the time spent inside the stream of client results, i.e.
  sampling, configuring the tasks, aggregating and the server step (FedDF's distillation, FedGen's
  generator, FIARSE's masks, DepthFL's nothing-extra all land here);
- ``server_state_bytes``: every tensor the server keeps between rounds (its models and algorithm buffers).

It prints, per cell, the median server time per round over rounds 2.. (round 1 pays first-touch costs) and
the spread over ``--repeats`` runs, the ratio of server time to FedAvg's measured in the same invocation, the
share of the round the server takes, and the state in MB.  Server time is wall-clock: on a busy machine the
ratios are the figure to quote, with their spread.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from hetfl.results import read_metrics
from hetfl.runner import run
from hetfl.sweep import load_study


def measure(study_path: Path, rounds: int, repeats: int, only: list[str] | None) -> list[dict]:
    study = load_study(study_path)
    seed = study.seeds[0]
    cells = [c for c in study.cells() if c.seed == seed and (not only or c.name.split("__")[0] in only)]
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        for cell in cells:
            cfg = study.config(cell)
            cfg = replace(cfg, rounds=rounds, checkpoint_every=0,
                          eval=replace(cfg.eval, every=rounds + 1, local=False)).with_engine(workers=1)
            times, shares, state = [], [], 0
            for rep in range(repeats):
                run_dir = Path(tmp) / f"{cell.name}-{rep}"
                run(cfg, run_dir, quiet=True)
                rows = read_metrics(run_dir)[1:] or read_metrics(run_dir)
                times.append(statistics.median(r["server_time_s"] for r in rows))
                shares.append(statistics.median(r["server_time_s"] / r["round_time_s"] for r in rows))
                state = rows[-1]["server_state_bytes"]
            label = "__".join(level for _, level in cell.levels)
            out.append({"cell": label, "times": times, "share": statistics.median(shares), "state_mb": state / 1e6})
            print(f"  {label}: server {1e3 * statistics.median(times):.1f} ms/round", flush=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("study", type=Path)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--only", nargs="*", help="the first axis's levels to run (default: all)")
    p.add_argument("--reference", default=None, help="the level whose server time is 1.0 (default: the first)")
    args = p.parse_args()
    torch.set_num_threads(1)
    rows = measure(args.study, args.rounds, args.repeats, args.only)
    ref = next((r for r in rows if r["cell"].split("__")[0] == args.reference), rows[0])
    print(f"\nserver time per round (median over rounds 2-{args.rounds}; median [min-max] of {args.repeats} runs), "
          f"ratio to {ref['cell']} (median of per-repeat ratios), the server's share of the round, server state:\n")
    print("| cell | server ms / round | ratio to reference | share of round | server state MB |")
    print("|---|---|---|---|---|")
    for r in rows:
        ms = [1e3 * t for t in r["times"]]
        ratios = [t / rt for t, rt in zip(r["times"], ref["times"])]
        print(f"| {r['cell']} | {statistics.median(ms):.1f} [{min(ms):.1f}-{max(ms):.1f}] | "
              f"{statistics.median(ratios):.2f} [{min(ratios):.2f}-{max(ratios):.2f}] | "
              f"{100 * r['share']:.1f} % | {r['state_mb']:.2f} |")


if __name__ == "__main__":
    main()
