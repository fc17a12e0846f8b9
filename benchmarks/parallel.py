"""hetfl's client-parallel workers against a bare single-process PyTorch loop, in one process.

Two FedAvg workloads (issue #13), every client sampled every round:

* compute-bound: FedAvg CNN on MNIST, 4 clients x 20 local steps, batch 32;
* overhead-bound: 2NN 784-200-200-10 (``mlp``, hidden "200,200") on MNIST, 100 clients x 5 steps, batch 10.

The bare loop trains the clients one after another as plainly as PyTorch allows (the global weights
reloaded into one model per client, SGD on the same seeded batches, a sample-weighted average), once
with torch's default intra-op threads and once with one thread; the faster of the two is the
reference.  It trains contiguous weights; hetfl trains the CNN with channels_last weights (its default
``train.memory_format = "auto"``), so on the compute workload the bare loop also runs once in that layout
and the speedup against it is printed too (the share of the gain that is the layout, not the workers).
hetfl gathers each minibatch's rows from the training split instead of copying a client's data first
(hetfl.data.base.ClientSplit); a third bare loop, one thread, does the same with hetfl's layout, and the
speedup against it is the workers' share alone (``vs the lean-rows bare loop``).
hetfl runs through :func:`hetfl.runner.run` with ``--workers N --threads-per-worker 1`` (default N = 2),
and on the overhead workload also with ``batched = true`` (each worker trains chunks of same-shape clients
as one vmapped model); its round loop is timed as the runner records it (``time_s`` minus evaluation; the
one-time setup, including starting the workers, is excluded as it is for the bare loop).  Each side
is repeated and the minimum is kept; the sides are interleaved.

    python benchmarks/parallel.py                       # both workloads, 3 rounds, 3 repeats
    python benchmarks/parallel.py --rounds 1 --repeats 1 --overhead-clients 10   # a smoke run

Prints per-repeat times, ``speedup_compute=``, ``speedup_overhead=`` (workers, default settings) and
``speedup_overhead_batched=`` (best bare time / hetfl time), and for every hetfl run whether its weights
equal, bit for bit, hetfl's in-process run with the same settings at one thread.
"""

from __future__ import annotations

import argparse

import torch
from overhead import bare_loop, hetfl_layout, hetfl_run  # shared with overhead.py (benchmarks/ is on sys.path)

from hetfl.config import RunConfig
from hetfl.resolve import load_config
from hetfl.runner import prepare


def make_config(args: argparse.Namespace, workload: str) -> RunConfig:
    if workload == "compute":
        clients, steps, batch, model = args.compute_clients, 20, 32, {"name": "cnn"}
    else:
        clients, steps, batch, model = args.overhead_clients, 5, 10, {"name": "mlp", "hidden": "200,200"}
    base = {
        "name": f"parallel-{workload}",
        "rounds": args.rounds,
        "seed": 0,
        "device": args.device,
        "checkpoint_every": 0,
        "workers": 1,
        "data": {"name": args.dataset, "num_clients": clients, "partition": {"name": "iid"}},
        "model": model,
        "algorithm": {"name": "fedavg", "clients_per_round": clients},
        "train": {"steps": steps if not args.steps else args.steps, "batch_size": batch, "lr": 0.05},
        "eval": {"every": 10**6, "local": False},
    }
    return load_config(None, (), base=base)


class threads:
    def __init__(self, n: int) -> None:
        self.n, self.before = n, torch.get_num_threads()

    def __enter__(self) -> None:
        torch.set_num_threads(self.n)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self.before)


def bench(args: argparse.Namespace, workload: str) -> dict[str, float]:
    cfg = make_config(args, workload)
    exp = prepare(cfg)  # loads (and caches) the data once, outside the timings
    sides = {"workers": cfg.with_engine(workers=args.workers, threads_per_worker=1)}
    if workload == "overhead" or args.batched_everywhere:  # batching pays for small models only
        sides["workers+batched"] = sides["workers"].with_engine(batched=True)
    default_threads = torch.get_num_threads()
    t = cfg.train
    cl = hetfl_layout(exp)
    print(f"[{workload}] {args.dataset} {cfg.model.name}{dict(cfg.model.params) or ''}, {cfg.data.num_clients} clients "
          f"x {t.steps} steps, batch {t.batch_size}, {args.rounds} round(s); torch {torch.__version__}, "
          f"{default_threads} default threads, device {args.device}; hetfl trains "
          f"{'channels_last' if cl else 'contiguous'} weights")
    seq = {}
    with threads(1):  # the references for equality: in-process, one thread per client, as in each worker
        for name, side_cfg in sides.items():
            seq[name] = hetfl_run(side_cfg.with_engine(workers=1))
    bare_loop(exp, 1)  # warm-up, untimed: the first round of a process pays one-time kernel set-up
    bare_all, bare_one, bare_cl, bare_lean = [], [], [], []
    times: dict[str, list[float]] = {name: [] for name in sides}
    for rep in range(args.repeats):
        line = []
        for name, side_cfg in sides.items():
            tp, par_w = hetfl_run(side_cfg)
            times[name].append(tp)
            equal = all(torch.equal(seq[name][1][k], par_w[k]) for k in seq[name][1])
            line.append(f"hetfl {name} {tp:.3f}s (= in process: {equal})")
        ta, _ = bare_loop(exp, args.rounds)
        with threads(1):
            t1, _ = bare_loop(exp, args.rounds)
        with threads(1):  # the bare loop with hetfl's data access: each minibatch's rows, no copy per client
            tl, _ = bare_loop(exp, args.rounds, channels_last=cl, lean_rows=True)
        bare_all.append(ta)
        bare_one.append(t1)
        bare_lean.append(tl)
        line.append(f"bare lean rows 1 thread {tl:.3f}s")
        if cl:  # the plain loop with hetfl's layout: how much of the gain is the layout, how much the workers
            tc, _ = bare_loop(exp, args.rounds, channels_last=True)
            bare_cl.append(tc)
            line.append(f"bare channels_last {default_threads} threads {tc:.3f}s")
        print(f"  repeat {rep}: bare {default_threads} threads {ta:.3f}s  bare 1 thread {t1:.3f}s  " + "  ".join(line))
    best_bare = min(min(bare_all), min(bare_one))
    per_round = 1e3 / args.rounds
    print(f"  bare_{default_threads}threads_ms_per_round={min(bare_all) * per_round:.1f} "
          f"bare_1thread_ms_per_round={min(bare_one) * per_round:.1f}"
          + (f" bare_channels_last_ms_per_round={min(bare_cl) * per_round:.1f}" if bare_cl else "")
          + f" bare_lean_rows_1thread_ms_per_round={min(bare_lean) * per_round:.1f}")
    out = {}
    for name in sides:
        key = workload if name == "workers" else f"{workload}_batched"
        out[key] = best_bare / min(times[name])
        # each repeat's sides ran back to back: their ratio is robust to a machine whose speed drifts
        paired = sorted(min(a, b) / h for a, b, h in zip(bare_all, bare_one, times[name]))
        print(f"  paired_speedup_{key}_median={paired[len(paired) // 2]:.3f} (per repeat: "
              + " ".join(f"{r:.2f}" for r in paired) + ")")
        print(f"  hetfl_{name}_ms_per_round={min(times[name]) * per_round:.1f} "
              f"(in process, 1 thread: {seq[name][0] * per_round:.1f})  speedup_{key}={out[key]:.3f}"
              + (f"  vs the channels_last bare loop: {min(bare_cl) / min(times[name]):.3f}" if bare_cl else "")
              + f"  vs the lean-rows bare loop (workers alone): {min(bare_lean) / min(times[name]):.3f}")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", help="mnist (fetched once into hetfl's cache)")
    p.add_argument("--workload", choices=("both", "compute", "overhead"), default="both")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--compute-clients", type=int, default=4)
    p.add_argument("--overhead-clients", type=int, default=100)
    p.add_argument("--steps", type=int, default=0, help="override the local steps (smoke runs)")
    p.add_argument("--device", default="cpu", help="cpu (worker processes train on the CPU)")
    p.add_argument("--batched-everywhere", action="store_true",
                   help="also time workers + batched = true on the compute workload (slower there: vmapped convs)")
    args = p.parse_args()
    if args.device != "cpu":
        raise SystemExit("benchmarks/parallel.py: worker processes train on the CPU; on a CUDA device hetfl trains "
                         "clients in process (see the batched-clients benchmark); use --device cpu")
    results = {}
    for workload in (("compute", "overhead") if args.workload == "both" else (args.workload,)):
        results.update(bench(args, workload))
    print("  ".join(f"speedup_{k}={v:.3f}" for k, v in results.items()))


if __name__ == "__main__":
    main()
