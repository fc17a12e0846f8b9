"""hetfl's in-process simulator against Flower's simulation engine (Ray), same algorithm objects, same seeds.

Two workloads, each run through five sides in one invocation (every side in its own child process,
one after another, so each side's peak RSS is its own and no Ray process can outlive its side):

* ``bare``: a hand-written PyTorch FedAvg loop doing the same SGD steps (reference, as in overhead.py);
* ``hetfl``: :func:`hetfl.runner.run` with the in-process simulator (``workers = 1``);
* ``hetfl-workers``: the same with client-parallel worker processes (one per core, one thread each);
* ``flower-default``: ``--engine flower`` with Flower's default client resources (num_cpus=2 per client);
* ``flower-cpus1``: ``--engine flower`` with num_cpus=1 per client (two actors on a 2-core machine).

Workloads (MNIST ``train_split="train"``: the 50 000-image training split, IID):

1. ``compute``: FedAvg CNN, 20 clients x 2 500 samples, 10 per round, 1 epoch, batch 32, 3 rounds;
2. ``overhead``: MNIST 2NN (784-200-200-10, ``model.name="mlp"``, ``hidden="200,200"``), 1 000 clients x
   50 samples, 100 per round, 1 epoch, batch 10, 5 rounds.

A side's time is the wall time of ``run()`` minus its evaluation time and minus the data preparation
(measured separately in the same child), so Flower's time includes starting Ray, the capability query,
every round and the shutdown.  ``speedup_<workload> = min(Flower sides) / min(hetfl sides)``.  Peak RSS: the
child's own peak (``ru_maxrss``: the driver) and the peak summed RSS of its whole process tree (Ray's
workers included), sampled every 0.2 s.

    python benchmarks/flower_vs_sim.py                      # both workloads, all sides (~15 min on 2 cores)
    python benchmarks/flower_vs_sim.py --workloads overhead --sides hetfl flower-cpus1
    python benchmarks/flower_vs_sim.py --quick              # tiny smoke version of both workloads
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

WORKLOADS = {
    "compute": {
        "rounds": 3,
        "data": {"name": "mnist", "train_split": "train", "num_clients": 20, "partition": {"name": "iid"}},
        "model": {"name": "cnn"},
        "algorithm": {"name": "fedavg", "clients_per_round": 10},
        "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    },
    "overhead": {
        "rounds": 5,
        "data": {"name": "mnist", "train_split": "train", "num_clients": 1000, "partition": {"name": "iid"}},
        "model": {"name": "mlp", "hidden": "200,200"},
        "algorithm": {"name": "fedavg", "clients_per_round": 100},
        "train": {"epochs": 1, "batch_size": 10, "lr": 0.05},
    },
}
QUICK = {"compute": {"rounds": 1, "data.num_clients": 200, "algorithm.clients_per_round": 2},
         "overhead": {"rounds": 2, "algorithm.clients_per_round": 10}}
SIDES = ("bare", "hetfl", "hetfl-workers", "flower-default", "flower-cpus1")


def make_config(workload: str, quick: bool):
    from hetfl.config import load_config

    base = json.loads(json.dumps(WORKLOADS[workload]))
    base.update({"name": f"flower-vs-sim-{workload}", "seed": 0, "checkpoint_every": 0, "workers": 1,  # in process
                 "eval": {"every": 10**6, "local": False}})
    overrides = [f"{k}={v}" for k, v in QUICK[workload].items()] if quick else []
    if os.environ.get("FVS_ROUNDS"):  # --rounds: fewer rounds than the workload's definition
        overrides.append(f"rounds={int(os.environ['FVS_ROUNDS'])}")
    return load_config(None, overrides, base=base)


# ------------------------------------------------------------------------------------ RSS of a tree
def _tree_rss_bytes(root: int) -> int:
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    page = os.sysconf("SC_PAGE_SIZE")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{d}/statm") as f:
                rss[int(d)] = int(f.read().split()[1]) * page
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(int(fields[1]), []).append(int(d))
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += rss.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total


class TreeSampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = 0
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.is_set():
            self.peak = max(self.peak, _tree_rss_bytes(os.getpid()))
            self._halt.wait(0.2)

    def stop(self) -> int:
        self._halt.set()
        self.join()
        return max(self.peak, _tree_rss_bytes(os.getpid()))


# ------------------------------------------------------------------------------------ one side (child)
def run_side(workload: str, side: str, quick: bool) -> dict:
    import torch

    from hetfl.results import read_metrics
    from hetfl.runner import prepare, run
    from hetfl.train import evaluate

    if os.environ.get("FVS_THREADS"):  # --threads: torch threads of the in-process sides (bare, hetfl)
        torch.set_num_threads(int(os.environ["FVS_THREADS"]))
    sampler = TreeSampler()
    sampler.start()
    cfg = make_config(workload, quick)
    t0 = time.perf_counter()
    exp = prepare(cfg)
    prep_s = time.perf_counter() - t0
    out: dict = {"workload": workload, "side": side, "prepare_s": round(prep_s, 3)}
    if side == "bare":
        sys.path.insert(0, str(HERE))
        from overhead import bare_loop

        secs, weights = bare_loop(exp, cfg.rounds)
        model = exp.ctx.model.build(exp.ctx.info)
        model.load_state_dict(weights)
        res = evaluate(model, exp.dataset.test, 1000)
        out.update(time_s=round(secs, 3), rounds_s=round(secs, 3), test_accuracy=res.accuracy)
    else:
        cfg = cfg.replace(engine="simulator" if side.startswith("hetfl") else "flower")
        if side == "hetfl-workers":  # client-parallel worker processes, one thread each (hetfl.engines.workers)
            cfg = cfg.replace(workers=os.cpu_count() or 2, threads_per_worker=1)
        if not side.startswith("hetfl"):
            os.environ["HETFL_FLOWER_NUM_CPUS"] = "1" if side == "flower-cpus1" else "2"
        tmp = Path(tempfile.mkdtemp(prefix="hetfl-fvs-"))
        try:
            t0 = time.perf_counter()
            summary = run(cfg, tmp / "run", quiet=True)
            wall = time.perf_counter() - t0
            rows = read_metrics(tmp / "run")
            eval_s = sum(r.get("eval_time_s", 0.0) for r in rows)
            rounds_s = sum(r.get("round_time_s", 0.0) for r in rows) - eval_s
            out.update(time_s=round(wall - eval_s - prep_s, 3), rounds_s=round(rounds_s, 3),
                       test_accuracy=summary["test_accuracy"], failed=sum(r.get("failed_clients", 0) for r in rows))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["peak_tree_rss_mb"] = round(sampler.stop() / 2**20, 1)
    out["torch_threads"] = torch.get_num_threads()
    return out


# ------------------------------------------------------------------------------------ driver
def leftover_processes(before: set[int]) -> list[str]:
    """Ray/Flower processes that appeared during the benchmark and are still alive."""
    found = []
    for d in os.listdir("/proc"):
        if not d.isdigit() or int(d) in before:
            continue
        try:
            cmd = Path(f"/proc/{d}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue  # exited, not yet reaped by its parent
        except (OSError, IndexError):
            continue
        if any(s in cmd for s in ("ray::", "raylet", "gcs_server", "ray/_private", "flwr", "flower-")):
            found.append(f"{d}: {cmd[:100]}")
    return found


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--sides", nargs="+", default=list(SIDES), choices=list(SIDES))
    p.add_argument("--quick", action="store_true", help="a tiny version of each workload (smoke test)")
    p.add_argument("--json", help="also write all figures to this JSON file")
    p.add_argument("--rounds", type=int, help="override the workloads' rounds (reported; not the definition)")
    p.add_argument("--threads", type=int, help="torch threads of the bare and hetfl sides (default: torch's, "
                   "= cores); Flower's actors get num_cpus threads from Ray")
    p.add_argument("--_child", nargs=2, metavar=("WORKLOAD", "SIDE"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        print("RESULT " + json.dumps(run_side(args._child[0], args._child[1], args.quick)), flush=True)
        return

    import flwr
    import torch

    if args.rounds:
        os.environ["FVS_ROUNDS"] = str(args.rounds)
    if args.threads:
        os.environ["FVS_THREADS"] = str(args.threads)
    before = {int(d) for d in os.listdir("/proc") if d.isdigit()}
    print(f"flwr {flwr.__version__}, torch {torch.__version__}, {os.cpu_count()} CPUs; "
          f"{'QUICK ' if args.quick else ''}workloads {args.workloads}, sides {args.sides}, "
          f"rounds {args.rounds or 'as defined'}, in-process torch threads {args.threads or torch.get_num_threads()}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    results: dict[str, dict[str, dict]] = {}
    for wl in args.workloads:
        for side in args.sides:
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_child", wl, side] + (["--quick"] if args.quick
                                                                                            else [])
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, capture_output=True, text=True)
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                print(f"{wl}/{side} FAILED (rc {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
                continue
            r = json.loads(lines[-1][len("RESULT "):])
            results.setdefault(wl, {})[side] = r
            print(f"{wl:9s} {side:15s} time_s={r['time_s']:9.3f} rounds_s={r['rounds_s']:9.3f} "
                  f"acc={r['test_accuracy']:.4f} peak_rss_mb={r['peak_rss_mb']:8.1f} "
                  f"peak_tree_rss_mb={r['peak_tree_rss_mb']:8.1f} (child {time.perf_counter() - t0:.0f}s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)

    print()
    for wl, res in results.items():
        hetfls = {s: r for s, r in res.items() if s.startswith("hetfl")}
        h_side, h = min(hetfls.items(), key=lambda kv: kv[1]["time_s"]) if hetfls else ("hetfl", None)
        flowers = {s: r for s, r in res.items() if s.startswith("flower")}
        if h is None or not flowers:
            continue
        best_side, best = min(flowers.items(), key=lambda kv: kv[1]["time_s"])
        key = "compute" if wl == "compute" else "overhead"
        print(f"speedup_{key}={best['time_s'] / h['time_s']:.2f}  ({best_side} {best['time_s']:.2f}s / "
              f"{h_side} {h['time_s']:.2f}s; rounds only: {best['rounds_s'] / h['rounds_s']:.2f})")
        for s, r in hetfls.items():
            print(f"  {s}: speedup {best['time_s'] / r['time_s']:.2f}" +
                  (f", {r['time_s'] / res['bare']['time_s']:.2f}x bare" if "bare" in res else ""))
        for s, r in flowers.items():
            print(f"  {s}: {r['time_s'] / h['time_s']:.2f}x {h_side}" +
                  (f", {r['time_s'] / res['bare']['time_s']:.2f}x bare" if "bare" in res else ""))
        accs = ", ".join(f"{s}={r['test_accuracy']:.4f}" for s, r in res.items())
        print(f"  final test accuracy: {accs}")
        rss = ", ".join(f"{s}={r['peak_rss_mb']:.0f}/{r['peak_tree_rss_mb']:.0f}" for s, r in res.items())
        print(f"  peak RSS MB (driver/process tree): {rss}")
        print(f"  peak_rss_hetfl_mb={h['peak_rss_mb']:.0f} (driver; process tree {h['peak_tree_rss_mb']:.0f})")
    left = leftover_processes(before)
    deadline = time.monotonic() + 20  # a process still exiting is not left behind
    while left and time.monotonic() < deadline:
        time.sleep(0.5)
        left = leftover_processes(before)
    print(f"leftover_processes={len(left)}" + ("".join(f"\n  {x}" for x in left) if left else ""))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
