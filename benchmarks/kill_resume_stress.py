"""Crash-safety stress: kill -9 `hetfl run` at random moments until it completes, then compare with an
uninterrupted run (docs/reliability.md quotes its output).

Each attempt starts the run (or `--resume`s it) in a subprocess and kills it with SIGKILL either at a
random moment of its first seconds (start-up, directory creation, metrics truncation; 15 % of attempts)
or after 1-4 more logged rounds plus a random fraction of a round (training, evaluation, the metrics
append or the checkpoint write).  After every kill metrics.jsonl must end with a newline and parse line
by line, and summary.json must not say "complete" unless the run had finished.  The final weights must
be ``torch.equal`` and the metrics (timings aside) identical to an uninterrupted run's.

    python benchmarks/kill_resume_stress.py --seeds 11 12 13 --out /tmp/kill-stress
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from hetfl.resolve import load_config  # noqa: E402
from hetfl.results import read_metrics, strip_timing  # noqa: E402
from hetfl.runner import run  # noqa: E402

CONFIG = str(ROOT / "configs/digits_fedavg.toml")
SETS = ["rounds=20", "checkpoint_every=1", "faults.dropout=0.2", "data.num_clients=4", "train.batch_size=32",
        "algorithm.clients_per_round=4"]


def stress(base: Path, seed: int) -> str:
    rng = random.Random(seed)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    cut = base / f"cut{seed}"
    shutil.rmtree(cut, ignore_errors=True)

    def rows() -> list[dict]:
        return read_metrics(cut) if (cut / "metrics.jsonl").exists() else []

    log: list[str] = []
    for _ in range(200):
        resume = (cut / "config.toml").is_file()
        cmd = ["run", "--resume", str(cut)] if resume else \
            ["run", CONFIG, *[x for s in SETS for x in ("--set", s)], "--out", str(cut)]
        proc = subprocess.Popen([sys.executable, "-m", "hetfl", *cmd, "--quiet"], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        if rng.random() < 0.15:
            where = "startup"
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=rng.uniform(0.2, 6.0))
        else:
            target = min((len(rows()) if resume else 0) + rng.randint(1, 4), 20)
            while proc.poll() is None and len(rows()) < target:
                time.sleep(0.002)
            done = rows()
            per_round = (done[-1]["time_s"] - done[0]["time_s"]) / (len(done) - 1) if len(done) > 1 else 0.1
            time.sleep(rng.uniform(0, per_round))
            where = f"row{len(done)}+{per_round:.2f}s"
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        _, err = proc.communicate()
        if proc.returncode != -signal.SIGKILL:
            assert proc.returncode == 0, err.decode()[-3000:]
            break
        text = (cut / "metrics.jsonl").read_text() if (cut / "metrics.jsonl").exists() else ""
        assert not text or text.endswith("\n"), "torn metrics line"
        for line in text.splitlines():
            json.loads(line)
        log.append(where)
        summary = cut / "summary.json"
        if summary.exists() and json.loads(summary.read_text())["status"] == "complete":
            log.append("(killed while exiting, after completing)")
            break
    assert json.loads((cut / "summary.json").read_text())["status"] == "complete"
    ref = base / f"ref{seed}"
    shutil.rmtree(ref, ignore_errors=True)
    run(load_config(CONFIG, SETS), ref, quiet=True)
    a = torch.load(cut / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
    b = torch.load(ref / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
    same_w = all(torch.equal(a[k], b[k]) for k in a)
    same_m = strip_timing(read_metrics(cut)) == strip_timing(read_metrics(ref))
    kills = sum(not entry.startswith("(") for entry in log)
    return f"seed {seed}: {kills} kills ({' '.join(log)}); weights equal {same_w}; metrics equal {same_m}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[11, 12, 13])
    ap.add_argument("--out", default="runs/kill-stress")
    args = ap.parse_args()
    torch.set_num_threads(1)
    base = Path(args.out)
    base.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:
        print(stress(base, seed), flush=True)


if __name__ == "__main__":
    main()
