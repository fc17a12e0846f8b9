"""CPU time per client of hetfl's worker pool, per process, against a bare single-process loop.

Wall-clock speed-ups are meaningless on a shared machine; CPU time is not.  This script runs the
overhead-bound workload of issue #13 (MNIST 2NN ``mlp`` 784-200-200-10, FedAvg, ``--clients`` clients
per round x 5 local steps, batch 10) and reports, per client:

* ``bare``: the bare PyTorch loop of ``benchmarks/parallel.py`` at one thread (``time.process_time``);
* ``inproc``: hetfl's in-process engine at one thread (``time.process_time``);
* ``worker``: the CPU time of each worker process of a ``--workers`` pool (``/proc/<pid>/schedstat``,
  nanoseconds on CPU), summed over the workers;
* ``main``: the CPU time of the main process while the pool runs the rounds (``time.process_time``).

The first round of each side is a warm-up and is not counted.  ``--profile`` also prints the main
process's top functions (cProfile, cumulative) during the pooled rounds.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cpu_per_client.py --rounds 4
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time

import torch

from hetfl.engines.simulator import Simulator
from hetfl.engines.workers import ParallelSimulator
from hetfl.resolve import load_config
from hetfl.runner import prepare


def cpu_ns(pid: int) -> int:
    with open(f"/proc/{pid}/schedstat") as f:
        return int(f.read().split()[0])


def _faults(pid: int) -> int:
    """Minor page faults of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[7])


def make_cfg(args: argparse.Namespace):
    base = {
        "name": "cpu-per-client", "rounds": args.rounds + 1, "seed": 0, "device": "cpu", "workers": 1,
        "checkpoint_every": 0,
        "data": {"name": "mnist", "num_clients": args.clients, "partition": {"name": "iid"}},
        "model": {"name": "mlp", "hidden": "200,200"},
        "algorithm": {"name": "fedavg", "clients_per_round": args.clients},
        "train": {"steps": 5, "batch_size": 10, "lr": 0.05},
        "eval": {"every": 10**6, "local": False},
    }
    return load_config(None, (), base=base)


def rounds(engine, state, first: int, n: int):
    for rnd in range(first, first + n):
        state, _ = engine.run_round(state, rnd)
    return state


def _profile_workers() -> None:
    """Wrap the workers' main loop (looked up when each worker starts) in cProfile; each dumps its stats."""
    from hetfl.engines import worker_process

    inner = worker_process.worker_main

    def profiled(*a, **kw):
        prof = cProfile.Profile(time.process_time)
        prof.enable()
        try:
            inner(*a, **kw)
        finally:
            prof.disable()
            prof.dump_stats(f"/tmp/hetfl-worker-{os.getpid()}.prof")

    worker_process.worker_main = profiled


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=4, help="timed rounds (after one warm-up round)")
    p.add_argument("--clients", type=int, default=100)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--profile", action="store_true", help="cProfile the main process during the pooled rounds")
    p.add_argument("--profile-worker", action="store_true",
                   help="cProfile worker 0 for the whole run (its first round included) and print its top functions")
    p.add_argument("--batched", action="store_true", help="hetfl sides with batched = true (chunks of 16 clients)")
    p.add_argument("--skip-bare", action="store_true")
    p.add_argument("--skip-inproc", action="store_true")
    args = p.parse_args()
    torch.set_num_threads(1)
    exp = prepare(make_cfg(args))
    algo, fed, ctx = exp.algorithm, exp.federation, exp.ctx
    n_clients = args.rounds * args.clients
    out = {}

    if not args.skip_bare:
        import benchmarks_parallel as bp  # noqa: F401  (resolved below)
    # ------------------------------------------------------------------ bare loop (1 thread)
    if not args.skip_bare:
        bare = bp.bare_loop
        bare(exp, 1)
        t0 = time.process_time()
        bare(exp, args.rounds)
        out["bare"] = (time.process_time() - t0) / n_clients

    # ------------------------------------------------------------------ hetfl in process (1 thread)
    if not args.skip_inproc:
        sim = Simulator(algo, fed, ctx, "cpu", batched=args.batched)
        state = rounds(sim, algo.init_state(ctx), 1, 1)
        t0 = time.process_time()
        rounds(sim, state, 2, args.rounds)
        out["inproc"] = (time.process_time() - t0) / n_clients

    # ------------------------------------------------------------------ hetfl with workers
    if args.profile_worker:
        _profile_workers()
    par = ParallelSimulator(algo, fed, ctx, "cpu", workers=args.workers, threads_per_worker=1, batched=args.batched)
    try:
        state = rounds(par, algo.init_state(ctx), 1, 1)
        pids = par.pool.pids
        w0 = [cpu_ns(pid) for pid in pids]
        prof = cProfile.Profile(time.process_time) if args.profile else None
        t0 = time.process_time()
        u0 = os.times()
        f0 = _faults(os.getpid())
        if prof is not None:
            prof.enable()
        rounds(par, state, 2, args.rounds)
        if prof is not None:
            prof.disable()
        main_s = time.process_time() - t0
        u1 = os.times()
        faults = (_faults(os.getpid()) - f0) / n_clients
        sys_share = (u1.system - u0.system) / max(main_s, 1e-9)
        w1 = [cpu_ns(pid) for pid in pids]
        out["worker"] = sum(b - a for a, b in zip(w0, w1)) / 1e9 / n_clients
        out["main"] = main_s / n_clients
        per_worker = [(b - a) / 1e9 / args.rounds for a, b in zip(w0, w1)]
    finally:
        par.close()
    print(f"mnist mlp 784-200-200-10, {args.clients} clients x 5 steps x batch 10, {args.rounds} timed rounds, "
          f"{args.workers} workers{', batched' if args.batched else ''}; torch {torch.__version__}")
    print("  ms CPU per client: " + "  ".join(f"{k}={v * 1e3:.3f}" for k, v in out.items()))
    print("  ms CPU per round per worker: " + " ".join(f"{s * 1e3:.0f}" for s in per_worker)
          + f"  main: {out['main'] * args.clients * 1e3:.0f}")
    print(f"  main: {sys_share:.0%} of its CPU time in the kernel, {faults:.1f} page faults per client")
    if "bare" in out:
        print(f"  worker/bare={out['worker'] / out['bare']:.3f}")
    if prof is not None:
        pstats.Stats(prof).sort_stats(os.environ.get("SORT", "tottime")).print_stats(int(os.environ.get("TOP", "25")))
    if args.profile_worker:
        path = f"/tmp/hetfl-worker-{pids[0]}.prof"
        for _ in range(50):
            if os.path.exists(path):
                break
            time.sleep(0.1)
        pstats.Stats(path).sort_stats("tottime").print_stats(30)
        os.unlink(path)


if __name__ == "__main__":
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location("benchmarks_parallel",
                                                  os.path.join(os.path.dirname(__file__), "parallel.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["benchmarks_parallel"] = module
    main()
