"""End to end, ``train.precision = "auto"`` against fp32 on the same config, side by side (issue 36).

    OMP_NUM_THREADS=1 python benchmarks/precision_speed.py                          # both demos, full length
    python benchmarks/precision_speed.py --rounds 5 --repeats 3                     # a reduced-rounds variant
    python benchmarks/precision_speed.py --configs configs/digits_fedavg.toml --rounds 2 --repeats 1  # smoke

Every run is a fresh ``hetfl run CONFIG --set train.precision=P`` process (start-up, data loading, the
``auto`` measurement, every round and evaluation: what a user waits for), timed from outside; the two
sides alternate (fp32, auto, fp32, auto, ...) so load on a shared machine hits both alike.  Prints each
run's wall time, the precision and layout ``auto`` chose (from summary.json), the median and spread per
side and ``ratio=`` (median fp32 / median auto) per config.  Each config's data set is loaded once before
any timing (MNIST is fetched into hetfl's cache on first use).  ``--set`` passes further overrides to
every run (e.g. ``--set workers=1``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hetfl.resolve import load_config  # noqa: E402


def one_run(config: str, precision: str, rounds: int | None, sets: list[str], out: Path) -> dict:
    cmd = [sys.executable, "-m", "hetfl.cli", "run", config, "--set", f'train.precision="{precision}"',
           "--out", str(out), "--quiet"]
    for s in sets + ([f"rounds={rounds}"] if rounds else []):
        cmd += ["--set", s]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    s = json.loads((out / "summary.json").read_text())
    return {"wall_s": wall, "precision": s["precision"], "memory_format": s["memory_format"],
            "accuracy": s["test_accuracy"], "reason": s.get("precision_reason", "")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["configs/mnist_fedavg.toml", "configs/fmnist_fedavg.toml"])
    ap.add_argument("--rounds", type=int, default=None, help="override the configs' rounds (default: theirs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--csv", help="append one row per run here")
    args = ap.parse_args(argv)
    rows = []
    for config in args.configs:
        cfg = load_config(config, args.sets)
        from hetfl.experiment import load_data  # warm the data cache (a first MNIST use downloads it)

        load_data(cfg)
        print(f"== {config} ({args.rounds or cfg.rounds} rounds, {args.repeats} repeats, alternating)", flush=True)
        walls: dict[str, list[float]] = {"fp32": [], "auto": []}
        with tempfile.TemporaryDirectory(prefix="hetfl-precision-") as d:
            for rep in range(args.repeats):
                for prec in ("fp32", "auto") if rep % 2 == 0 else ("auto", "fp32"):
                    r = one_run(config, prec, args.rounds, args.sets, Path(d) / f"{prec}-{rep}")
                    walls[prec].append(r["wall_s"])
                    rows.append({"config": config, "rounds": args.rounds or cfg.rounds, "repeat": rep,
                                 "setting": prec, **r})
                    print(f"  {prec:4} repeat {rep}: {r['wall_s']:7.1f} s  trained {r['precision']}/"
                          f"{r['memory_format']}  acc {r['accuracy']:.4f}  ({r['reason']})", flush=True)
        med = {k: statistics.median(v) for k, v in walls.items()}
        spread = {k: f"{min(v):.1f}-{max(v):.1f}" for k, v in walls.items()}
        print(f"  median fp32 {med['fp32']:.1f} s ({spread['fp32']}), auto {med['auto']:.1f} s ({spread['auto']}): "
              f"ratio={med['fp32'] / med['auto']:.2f}", flush=True)
    if args.csv:
        new = not Path(args.csv).exists()
        with open(args.csv, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            if new:
                w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
