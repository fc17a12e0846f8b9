"""Memory and round time against fleet size: the cost of a run must follow the clients *sampled*.

One fixed synthetic dataset (``--samples`` training samples, 20 features, 10 classes) is split over
fleets of 1 000, 10 000 and 100 000 clients (quantity skew, at least one sample each); 100 clients are
sampled per round, a tiny MLP trains one epoch on each.  Each fleet size runs in its own child process
through :func:`hetfl.runner.run` (setup, rounds, evaluation, metrics.jsonl, a checkpoint every round),
so its memory figures are its own.  The dataset does not grow with the fleet, so anything that does
grow with it is per-client bookkeeping: partition, fleet, local-evaluation sets, metrics.

    python benchmarks/scale.py                           # 1k, 10k, 100k clients
    python benchmarks/scale.py --fleets 1000 10000 --rounds 3 --device cpu
    python benchmarks/scale.py --algorithm heterofl      # tiers a-b-c-d-e

Columns: ``setup_s`` (data, partition, fleet, model checks, run directory: the wall time of ``run()``
minus its rounds), ``round_ms`` (median ``round_time_s`` of the rounds after the first, evaluation
excluded), ``eval_ms``, ``rss_setup_mb`` (resident memory after setup minus after imports),
``peak_rss_mb`` (the process's peak resident set, VmHWM) and ``py_heap_mb`` (tracemalloc's peak of
Python/numpy allocations during ``run()``, with ``--tracemalloc``).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def rss_mb(field: str = "VmRSS") -> float:
    """A field of /proc/self/status in MiB (VmRSS: now, VmHWM: peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def make_config(args: argparse.Namespace, clients: int):
    from hetfl.resolve import load_config

    base = {
        "name": f"scale-{clients}",
        "rounds": args.rounds,
        "seed": 0,
        "device": args.device,
        "checkpoint_every": 1,
        "data": {"name": "synthetic", "num_clients": clients, "local_test_fraction": args.local_test_fraction,
                 "num_samples": int(args.samples / 0.8) + 1, "num_features": 20, "num_groups": 10,
                 "heterogeneity": 0.0,
                 "partition": {"name": "quantity", "sigma": 0.5, "min_size": 2}},
        "model": {"name": "mlp", "hidden": "32"},
        "algorithm": {"name": args.algorithm, "clients_per_round": args.per_round},
        "train": {"steps": 2, "batch_size": 10, "lr": 0.05},
        "eval": {"every": 1, "local": args.local_test_fraction > 0, "local_clients": args.eval_clients},
    }
    if args.algorithm == "heterofl":
        base["fleet"] = {"source": "tiers", "mix": "a-b-c-d-e"}
        base["model"]["hidden"] = "64"
    return load_config(None, (), base=base)


def child(args: argparse.Namespace) -> None:
    """One fleet size, in this process; prints one JSON line."""
    import torch

    torch.set_num_threads(args.threads)
    import hetfl.runner as runner
    from hetfl.results import read_metrics

    cfg = make_config(args, args.child)
    rss0 = rss_mb()
    seen: dict[str, float] = {}
    prepare = runner.prepare

    def timed_prepare(c):  # setup figures without touching the runner
        t0 = time.perf_counter()
        exp = prepare(c)
        seen["prepare_s"] = time.perf_counter() - t0
        seen["rss_prepared"] = rss_mb()
        return exp

    runner.prepare = timed_prepare
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
    out = Path(tempfile.mkdtemp(prefix="hetfl-scale-"))
    try:
        t0 = time.perf_counter()
        runner.run(cfg, out / "run", quiet=True)
        wall = time.perf_counter() - t0
        rows = read_metrics(out / "run")
        part_bytes = (out / "run" / "partition.json").stat().st_size
    finally:
        shutil.rmtree(out, ignore_errors=True)
    py_peak = None
    if args.tracemalloc:
        py_peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    rounds = [r["round_time_s"] - r.get("eval_time_s", 0.0) for r in rows]
    evals = [r["eval_time_s"] for r in rows if "eval_time_s" in r]
    steady = rounds[1:] or rounds
    print(json.dumps({
        "clients": args.child,
        "setup_s": round(wall - rows[-1]["time_s"], 3),
        "prepare_s": round(seen["prepare_s"], 3),
        "round_ms": round(1000 * statistics.median(steady), 1),
        "eval_ms": round(1000 * statistics.median(evals), 1) if evals else None,
        "rss_setup_mb": round(seen["rss_prepared"] - rss0, 1),
        "peak_rss_mb": round(rss_mb("VmHWM"), 1),
        "rss_end_mb": round(rss_mb(), 1),
        "py_heap_mb": None if py_peak is None else round(py_peak, 1),
        "partition_json_kb": round(part_bytes / 1024, 1),
        "test_accuracy": rows[-1].get("test_accuracy"),
    }))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--fleets", type=int, nargs="+", default=[1000, 10000, 100000])
    p.add_argument("--per-round", type=int, default=100)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--samples", type=int, default=400_000, help="training samples, fixed for every fleet")
    p.add_argument("--algorithm", default="fedavg", choices=("fedavg", "heterofl"))
    p.add_argument("--local-test-fraction", type=float, default=0.25)
    p.add_argument("--eval-clients", type=int, default=1000, help="eval.local_clients (0: every client)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tracemalloc", action="store_true", help="also record the Python/numpy heap peak (slower)")
    p.add_argument("--json", help="write the rows to this file")
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args)
        return
    import torch

    print(f"synthetic, {args.samples} training samples, {args.per_round} clients/round, {args.rounds} rounds, "
          f"{args.algorithm}, device {args.device}, torch {torch.__version__}, {args.threads} thread(s)")
    cols = ["clients", "setup_s", "prepare_s", "round_ms", "eval_ms", "rss_setup_mb", "peak_rss_mb", "py_heap_mb",
            "partition_json_kb"]
    print(" | ".join(cols))
    rows = []
    for n in args.fleets:
        cmd = [sys.executable, __file__, "--child", str(n), "--per-round", str(args.per_round), "--rounds",
               str(args.rounds), "--samples", str(args.samples), "--algorithm", args.algorithm,
               "--local-test-fraction", str(args.local_test_fraction), "--eval-clients", str(args.eval_clients),
               "--device", args.device, "--threads", str(args.threads)] + (["--tracemalloc"] if args.tracemalloc
                                                                          else [])
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(proc.stderr[-3000:], file=sys.stderr)
            raise SystemExit(f"fleet {n}: child failed")
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(" | ".join(str(row.get(c)) for c in cols), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
