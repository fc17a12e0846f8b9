"""CPU per client of the main process and of the workers with ``--workers 2``, on the race's 2NN.

The race's 2NN workload (benchmarks/race_pfl.py: 1 000 clients x 50 MNIST-shaped samples, 100 per round,
1 epoch of batch 10, FedAvg) on :class:`hetfl.engines.workers.ParallelSimulator` with 2 workers at one
thread; round 1 warms up, then ``--rounds`` rounds are measured: the main process's CPU time
(``time.process_time``) and each worker's (user + system from ``/proc/<pid>/stat``), per client.  Which
hetfl is measured is the one this Python imports (``PYTHONPATH=src`` for a worktree)::

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/handoff_cpu.py --rounds 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from race_pfl import WORKLOADS, hetfl_config, write_data  # noqa: E402


def proc_cpu(pid: int) -> float:
    """User + system CPU seconds of process ``pid``."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (after one warm-up round)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    import torch

    import hetfl
    from hetfl.engines.workers import ParallelSimulator
    from hetfl.resolve import load_config
    from hetfl.runner import prepare

    torch.set_num_threads(1)
    w = WORKLOADS["2nn"]
    with tempfile.TemporaryDirectory(prefix="hetfl-handoff-") as d:
        data = Path(d) / "2nn.npz"
        write_data(data, w)
        cfg_path = Path(d) / "hetfl.toml"
        cfg_path.write_text(hetfl_config(w, data, args.rounds + 1))
        exp = prepare(load_config(cfg_path))
        sim = ParallelSimulator(exp.algorithm, exp.federation, exp.ctx, workers=args.workers)
        try:
            state, _ = sim.run_round(exp.algorithm.init_state(exp.ctx), 1)
            pids = sim.pool.pids
            main0, workers0, t0 = time.process_time(), sum(proc_cpu(q) for q in pids), time.perf_counter()
            clients = 0
            for rnd in range(2, args.rounds + 2):
                state, report = sim.run_round(state, rnd)
                clients += len(report.clients)
            main1, workers1, t1 = time.process_time(), sum(proc_cpu(q) for q in pids), time.perf_counter()
            assert sim.pool.pids == pids, "a worker was restarted: the measurement is void"
        finally:
            sim.close()
    print(f"hetfl at {Path(hetfl.__file__).parent}: {args.rounds} rounds, {clients} clients, "
          f"{args.workers} workers: main {1e3 * (main1 - main0) / clients:.3f} ms CPU per client, "
          f"workers {1e3 * (workers1 - workers0) / clients:.3f} ms, wall {(t1 - t0) / args.rounds:.3f} s/round, "
          f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
