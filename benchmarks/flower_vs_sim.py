"""hetfl's in-process simulator against Flower's simulation engine (Ray), same algorithm objects, same seeds.

Two workloads, each run through seven sides in one invocation (every side in its own child process,
one after another, so each side's peak RSS is its own and no Ray process can outlive its side):

* ``bare``: a hand-written PyTorch FedAvg loop doing the same SGD steps (reference, as in overhead.py);
* ``hetfl``: :func:`hetfl.runner.run` with the in-process simulator (``workers = 1``);
* ``hetfl-workers``: the same with client-parallel worker processes (one per core, one thread each);
* ``hetfl-workers-batched``: workers with ``batched = true`` (opt-in on a CPU: each worker trains chunks of
  16 same-shape clients as one vmapped model; pays for small models such as the 2NN, not for the CNN);
* ``flower-default``: ``--engine flower`` with Flower's default client resources (num_cpus=2 per client);
* ``flower-cpus1``: ``--engine flower`` with num_cpus=1 per client (two actors on a 2-core machine);
* ``flower-app-default`` / ``flower-app-cpus1``: a plain Flower app written as Flower's docs write one
  (``flower_native_app.py``: built-in ``FedAvg``, a ``Net``, a ``DataLoader`` per client call; the same
  partitions and samples), in Flower's simulation engine with default resources / num_cpus=1: issue #10's
  Flower baseline.

The ``flower-*`` sides are *hetfl on Flower* (hetfl's own lean Flower app); the ``flower-app-*`` sides are
*a plain Flower app*.  The two are reported as separate baselines.

Workloads (MNIST ``train_split="train"``: the 50 000-image training split, IID):

1. ``compute``: FedAvg CNN, 20 clients x 2 500 samples, 10 per round, 1 epoch, batch 32, 3 rounds;
2. ``overhead``: MNIST 2NN (784-200-200-10, ``model.name="mlp"``, ``hidden="200,200"``), 1 000 clients x
   50 samples, 100 per round, 1 epoch, batch 10, 5 rounds.

A side's time is the wall time of ``run()`` minus its evaluation time and minus the data preparation
(measured separately in the same child), so Flower's time includes starting Ray, the capability query,
every round and the shutdown.  A ``flower-app-*`` side's time is ``run_simulation`` plus Ray's shutdown (its
driver-side data preparation and the one evaluation of the final model come after or before it); its
"rounds only" is FedAvg's rounds, the first of which includes every actor's one-time import and data load.
``speedup_<workload> = min(hetfl-on-Flower sides) / min(hetfl sides)`` and
``speedup_<workload>_vs_flower_app = min(flower-app sides) / min(hetfl sides)``.  Peak RSS: the
child's own peak (``ru_maxrss``: the driver) and the peak summed RSS of its whole process tree (Ray's
workers included), sampled every 0.2 s.

    python benchmarks/flower_vs_sim.py                      # both workloads, all sides (~15 min on 2 cores)
    python benchmarks/flower_vs_sim.py --workloads overhead --sides hetfl flower-cpus1
    python benchmarks/flower_vs_sim.py --quick              # tiny smoke version of both workloads
    python benchmarks/flower_vs_sim.py --workloads overhead --sides hetfl-workers flower-app-cpus1
"""

from __future__ import annotations

import argparse
import json
import logging
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
SIDES = ("bare", "hetfl", "hetfl-workers", "hetfl-workers-batched", "flower-default", "flower-cpus1",
         "flower-app-default", "flower-app-cpus1")
HETFL_ON_FLOWER = ("flower-default", "flower-cpus1")  # hetfl's own Flower app (--engine flower)
FLOWER_APP = ("flower-app-default", "flower-app-cpus1")  # a plain Flower app (flower_native_app.py)


class FlowerReplyCounter(logging.Handler):
    """Counts from FedAvg's log: "configure_train: Sampled N nodes (out of M)" and "aggregate_train: Received N
    results and M failures" (Flower's own counts; the strategy reports them nowhere else)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.ok = self.failed = 0
        self.sampled: list[int] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg, args = str(record.msg), record.args or ()
        if msg.startswith("configure_train: Sampled") and args:
            self.sampled.append(int(args[0]))
        elif "results and" in msg and args and str(args[0]) == "aggregate_train":
            self.ok += int(args[1])
            self.failed += int(args[2])


def make_config(workload: str, quick: bool):
    from hetfl.resolve import load_config

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
    elif side in FLOWER_APP:
        out.update(flower_app_side(exp, cfg, side))
    else:
        cfg = cfg.with_engine(name="simulator" if side.startswith("hetfl") else "flower")
        if side.startswith("hetfl-workers"):  # client-parallel worker processes, 1 thread each (hetfl.engines.workers)
            cfg = cfg.with_engine(workers=os.cpu_count() or 2, threads_per_worker=1)
        if side == "hetfl-workers-batched":  # and chunks of same-shape clients as one vmapped model (opt-in)
            cfg = cfg.with_engine(batched=True)
        if not side.startswith("hetfl"):
            cfg = cfg.with_engine(flower_num_cpus=1.0 if side == "flower-cpus1" else 2.0)
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
    out["rounds"] = cfg.rounds
    out["client_rounds"] = cfg.rounds * exp.algorithm.clients_for(exp.federation.num_clients)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["peak_tree_rss_mb"] = round(sampler.stop() / 2**20, 1)
    out["torch_threads"] = torch.get_num_threads()
    return out


def flower_app_side(exp, cfg, side: str) -> dict:
    """Run ``flower_native_app`` (a plain Flower app) through Flower's simulation engine; evaluate afterwards.

    time_s: ``run_simulation`` (Ray's start, every round, the ClientApps' first data loading) and Ray's
    shutdown; the driver's data preparation and the evaluation are outside it.  rounds_s: from FedAvg's start
    to the end of its last round; rounds_after_first_s: the same without round 1 (in which every actor imports
    the app and loads its data once).
    """
    import torch

    from hetfl.algorithms.base import round_seed
    from hetfl.train import evaluate

    sys.path.insert(0, str(HERE))
    import flower_native_app as app

    n, k = exp.federation.num_clients, exp.algorithm.clients_for(exp.federation.num_clients)
    rc = {"model": cfg.model.name, "num-server-rounds": cfg.rounds, "fraction-train": k / n,
          "local-epochs": cfg.train.epochs, "batch-size": cfg.train.batch_size, "lr": cfg.train.lr,
          "init-seed": round_seed(cfg.seed, 0), "seed": cfg.seed, "hetfl-config": cfg.to_toml(),
          "min-available-nodes": n, "min-train-nodes": k}  # else round 1 may sample fewer (flower_native_app)
    if int(n * rc["fraction-train"]) != k:
        raise SystemExit(f"FedAvg would sample int({n} * {k / n}) != {k} nodes per round")
    if cfg.model.name not in ("mlp", "cnn") or dict(cfg.model.params).get("hidden", "200,200") != "200,200":
        raise SystemExit(f"flower_native_app has no Net for model {cfg.model}")
    # default: Flower's client resources (num_cpus=2); cpus1: one CPU per virtual client
    backend = {} if side == "flower-app-default" else {"client_resources": {"num_cpus": 1.0, "num_gpus": 0.0}}
    counter = FlowerReplyCounter()
    logging.getLogger("flwr").addHandler(counter)
    t0 = time.perf_counter()
    result = app.run(rc, num_supernodes=n, backend_config=backend)
    wall = time.perf_counter() - t0
    ends = result["round_ends"]
    model = exp.ctx.model.build(exp.ctx.info)  # hetfl's architecture: the Net's weights must load strictly
    model.load_state_dict(result["arrays"].to_torch_state_dict())
    res = evaluate(model, exp.dataset.test, 1000)
    torch.manual_seed(round_seed(cfg.seed, 0))
    net = app.Net(cfg.model.name)
    torch.manual_seed(round_seed(cfg.seed, 0))
    ref = exp.ctx.model.build(exp.ctx.info)  # hetfl's initial global model (as in the bare loop)
    same_init = all(torch.equal(a, b) for a, b in zip(net.state_dict().values(), ref.state_dict().values()))
    return {"time_s": round(wall, 3), "rounds_s": round(ends[-1] - ends[0], 3),
            "rounds_after_first_s": round(ends[-1] - ends[1], 3) if len(ends) > 2 else None,
            "test_accuracy": res.accuracy, "failed": counter.failed, "replies": counter.ok,
            "sampled_per_round": counter.sampled,
            "same_initial_model_as_hetfl": same_init}


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
            print(f"{wl:9s} {side:18s} time_s={r['time_s']:9.3f} rounds_s={r['rounds_s']:9.3f} "
                  f"acc={r['test_accuracy']:.4f} peak_rss_mb={r['peak_rss_mb']:8.1f} "
                  f"peak_tree_rss_mb={r['peak_tree_rss_mb']:8.1f}" +
                  (f" failed={r['failed']}" if r.get("failed") else "") +
                  (f" REPLIES={r['replies']}/{r['client_rounds']}" if r.get("replies", r["client_rounds"]) !=
                   r["client_rounds"] else "") +
                  (f" rounds_after_first_s={r['rounds_after_first_s']:.3f}" if r.get("rounds_after_first_s") else "") +
                  f" (child {time.perf_counter() - t0:.0f}s, "
                  f"load {os.getloadavg()[0]:.1f})", flush=True)

    print()
    for wl, res in results.items():
        hetfls = {s: r for s, r in res.items() if s.startswith("hetfl")}
        h_side, h = min(hetfls.items(), key=lambda kv: kv[1]["time_s"]) if hetfls else ("hetfl", None)
        on_flower = {s: r for s, r in res.items() if s in HETFL_ON_FLOWER}
        apps = {s: r for s, r in res.items() if s in FLOWER_APP}
        if h is None or not (on_flower or apps):
            continue
        key = "compute" if wl == "compute" else "overhead"
        baselines = {}  # label -> (side, result): the faster side of each Flower baseline
        for name, label, sides in (("_vs_flower_app", "a plain Flower app (flower_native_app.py; issue #10's baseline)",
                                    apps),
                                   ("", "hetfl on Flower (--engine flower: hetfl's own Flower app)", on_flower)):
            if not sides:
                continue
            b_side, b = min(sides.items(), key=lambda kv: kv[1]["time_s"])
            baselines[name] = (b_side, b)
            print(f"speedup_{key}{name}={b['time_s'] / h['time_s']:.2f}  vs {label}: {b_side} {b['time_s']:.2f}s / "
                  f"{h_side} {h['time_s']:.2f}s; rounds only: {b['rounds_s'] / h['rounds_s']:.2f}" +
                  (" (the app's round 1 includes its actors' start-up)" if name else ""))
        for s, r in hetfls.items():
            vs = ", ".join(f"speedup {b['time_s'] / r['time_s']:.2f} vs {b_side}" for b_side, b in baselines.values())
            print(f"  {s}: {vs}" + (f", {r['time_s'] / res['bare']['time_s']:.2f}x bare" if "bare" in res else ""))
        for s, r in {**on_flower, **apps}.items():
            n = r.get("client_rounds")
            per = (f"; s per client-round: {r['rounds_s'] / n:.4f} in the rounds, {r['time_s'] / n:.4f} in all"
                   if n else "")
            if n and r.get("rounds_after_first_s") and r.get("rounds", 1) > 1:  # flower-app: without actor start-up
                per += f", {r['rounds_after_first_s'] / (n - n // r['rounds']):.4f} in rounds 2+"
            print(f"  {s}: {r['time_s'] / h['time_s']:.2f}x {h_side}" +
                  (f", {r['time_s'] / res['bare']['time_s']:.2f}x bare" if "bare" in res else "") + per)
        accs = ", ".join(f"{s}={r['test_accuracy']:.4f}" for s, r in res.items())
        print(f"  final test accuracy: {accs}" + ("  (flower-app-*: Flower's own client sampling)" if apps else ""))
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
