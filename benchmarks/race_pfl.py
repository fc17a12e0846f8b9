"""hetfl against pfl-research (Apple's ``pfl``): the same FedAvg workload, side by side, in one invocation.

Workloads (synthetic tensors of the real shapes, uniform random pixels and labels, the same arrays on
every side; speed does not depend on the pixel values):

* ``cifar``: pfl's CIFAR-10 benchmark shape (``benchmarks/image_classification`` of pfl-research,
  ``configs/baseline.yaml``): 1 000 users x 50 points of 32x32x3, cohort 50, its simple CNN (two unpadded
  3x3 convs 32/64, a 2x2 pool, dropout, fc 128; 1.63 M parameters; hetfl's ``simple_cnn``), 1 local epoch
  of batch 10, local lr 0.1, central lr 1.0 (plain averaging), every user weighted equally;
* ``2nn``: the overhead-bound FedAvg 2NN (784-200-200-10), 1 000 clients x 50 MNIST-shaped samples,
  100 per round, 1 local epoch of batch 10, lr 0.1.

Each is run with 1 process and with 2 (hetfl ``--workers 2``; pfl's own multi-process mode, ``torchrun
--nproc_per_node 2`` with its gloo backend, which splits the cohort between the processes and all-reduces
the update), every process at one torch thread.  Sides alternate (which goes first flips every repeat).
hetfl runs through its CLI (``python -m hetfl run``) on a config written to a temporary directory, from
the ``hetfl`` that this Python imports (``PYTHONPATH=$PWD/src`` for a worktree); pfl runs in its own
interpreter (``--pfl-python``: a virtual environment with ``pfl==0.6.0``, see benchmarks/README.md), from
a side of this same file that imports nothing of hetfl.  A plain PyTorch loop (one process: per-user
tensors, ``torch.optim.SGD``, ``load_state_dict``, a float32 running sum of the state dicts) is the floor.

Reported per side: **seconds per round**, the steady rounds (2..R) from each side's own clock, minus
hetfl's evaluation (pfl evaluates nothing here; the floor neither); and the **fixed cost**: the process's
wall time (launch to exit, measured here) minus R x seconds per round -- start-up (imports, data,
processes), the first round's warm-up and the teardown; and the **CPU seconds** of the whole run (user +
system time of every process it started, start-up included), which a shared machine's load does not
inflate as it does wall time.  Median and [min-max] over the repeats, and ``ratio = pfl / hetfl`` of the
medians of seconds per round (> 1: hetfl is faster).

    python benchmarks/race_pfl.py --pfl-python /work/venvs/pfl/bin/python                 # the race (~30 min loaded)
    python benchmarks/race_pfl.py --pfl-python /work/venvs/pfl/bin/python --workloads 2nn --procs 1
    python benchmarks/race_pfl.py --pfl-python /work/venvs/pfl/bin/python --hetfl-set train.precision=bf16 \\
        --pfl-amp bf16                                                                     # both in bf16
    python benchmarks/race_pfl.py --smoke            # tiny run of hetfl and the floor, no pfl needed
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKLOADS = {
    # shape is (H, W, C) as pfl's benchmark feeds it; hetfl's npz loader turns it into (C, H, W)
    "cifar": {"shape": (32, 32, 3), "model": "simple_cnn", "users": 1000, "points": 50, "cohort": 50,
              "batch": 10, "epochs": 1, "lr": 0.1, "rounds": 4},
    "2nn": {"shape": (28, 28, 1), "model": "mlp", "users": 1000, "points": 50, "cohort": 100,
            "batch": 10, "epochs": 1, "lr": 0.1, "rounds": 11},
}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


# --------------------------------------------------------------------------------------------- the data

def write_data(path: Path, w: dict, seed: int = 0) -> None:
    """Users' rows, ``points + 1`` each (hetfl holds one of each user's rows out as its test set; pfl and the
    floor train on the first ``points``), uint8 pixels, labels 0..9, the user of each row in ``client``."""
    import numpy as np

    rng = np.random.default_rng(seed)
    n = w["users"] * (w["points"] + 1)
    x = rng.integers(0, 256, size=(n, *w["shape"]), dtype=np.uint8)
    y = rng.integers(0, 10, size=n).astype(np.int64)
    y[:10] = np.arange(10)  # every class present: hetfl reads the class count from the labels
    client = np.repeat(np.arange(w["users"], dtype=np.int64), w["points"] + 1)
    np.savez(path, x=x, y=y, client=client)


def user_tensors(path: Path, w: dict, channels_first: bool):
    """The users' training tensors, one contiguous (x, y) pair per user, float32 in [0, 1]."""
    import numpy as np
    import torch

    with np.load(path) as z:
        x, y = z["x"], z["y"]
    x = torch.from_numpy(x).float().div_(255.0)
    if channels_first:
        x = x.permute(0, 3, 1, 2).contiguous()
    y = torch.from_numpy(y)
    p = w["points"] + 1
    return [(x[u * p:u * p + w["points"]].clone(), y[u * p:u * p + w["points"]].clone()) for u in range(w["users"])]


def plain_model(name: str, shape: tuple[int, int, int], nhwc: bool):
    """The workload's network in plain PyTorch (pfl's side and the floor); ``nhwc``: it takes (N, H, W, C)
    rows and permutes them first, as pfl's benchmark model does."""
    import torch
    from torch import nn

    h, w, c = shape

    class ToNCHW(nn.Module):
        def forward(self, x):
            return x.permute(0, 3, 1, 2)

    if name == "mlp":
        layers = [nn.Flatten(), nn.Linear(h * w * c, 200), nn.ReLU(), nn.Linear(200, 200), nn.ReLU(),
                  nn.Linear(200, 10)]
    else:
        flat = ((h - 4) // 2) * ((w - 4) // 2) * 64
        layers = [nn.Conv2d(c, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                  nn.Dropout(0.25), nn.Flatten(), nn.Linear(flat, 128), nn.ReLU(), nn.Dropout(0.5),
                  nn.Linear(128, 10)]
        if nhwc:
            layers.insert(0, ToNCHW())
    model = nn.Sequential(*layers)
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            torch.nn.init.xavier_uniform_(m.weight)
    return model


# ---------------------------------------------------------------------------------------------- pfl side

def pfl_side(args: argparse.Namespace) -> None:
    """pfl's FedAvg on the workload, timed per central iteration (runs under pfl's interpreter)."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    from pfl.aggregate.simulate import SimulatedBackend
    from pfl.aggregate.weighting import WeightByUser
    from pfl.algorithm import FederatedAveraging, NNAlgorithmParams
    from pfl.callback.base import TrainingProcessCallback
    from pfl.data.federated_dataset import FederatedDataset
    from pfl.data.sampling import get_user_sampler
    from pfl.hyperparam import NNEvalHyperParams, NNTrainHyperParams
    from pfl.internal.ops import get_ops
    from pfl.metrics import Metrics, Weighted
    from pfl.model.pytorch import PyTorchModel

    w = dict(WORKLOADS[args.workload], **json.loads(args.overrides))
    torch.manual_seed(0)
    np.random.seed(0)
    users = user_tensors(Path(args.data), w, channels_first=False)
    dataset = FederatedDataset.from_slices(dict(enumerate(users)), get_user_sampler("random", range(len(users))))
    net = plain_model(w["model"], w["shape"], nhwc=True)

    def loss(self, x, y, eval=False):  # noqa: A002  (pfl's signature)
        self.eval() if eval else self.train()
        return F.cross_entropy(self(x), y)

    @torch.no_grad()
    def metrics(self, x, y, eval=True):  # noqa: A002
        self.eval() if eval else self.train()
        logits = self(x)
        return {"loss": Weighted(F.cross_entropy(logits, y, reduction="sum").item(), len(x))}

    net.loss = loss.__get__(net)
    net.metrics = metrics.__get__(net)
    params = [p for p in net.parameters() if p.requires_grad]
    amp = {"bf16": torch.bfloat16}.get(args.pfl_amp)
    model = PyTorchModel(model=net, local_optimizer_create=torch.optim.SGD,
                         central_optimizer=torch.optim.SGD(params, 1.0), amp_dtype=amp)
    backend = SimulatedBackend(training_data=dataset, val_data=None, postprocessors=[WeightByUser()])
    stamps: list[float] = []

    class Stamp(TrainingProcessCallback):
        def after_central_iteration(self, aggregate_metrics, model, *, central_iteration):
            stamps.append(time.perf_counter())
            return False, Metrics()

    FederatedAveraging().run(
        algorithm_params=NNAlgorithmParams(central_num_iterations=args.rounds, evaluation_frequency=10**9,
                                           train_cohort_size=w["cohort"], val_cohort_size=0),
        backend=backend, model=model,
        model_train_params=NNTrainHyperParams(local_learning_rate=w["lr"], local_num_epochs=w["epochs"],
                                              local_batch_size=w["batch"]),
        model_eval_params=NNEvalHyperParams(local_batch_size=10000), callbacks=[Stamp()])
    if get_ops().distributed.global_rank == 0:
        Path(args.result).write_text(json.dumps({"stamps": stamps, "world": get_ops().distributed.world_size}))


# -------------------------------------------------------------------------------------------- floor side

def floor_side(args: argparse.Namespace) -> None:
    """The same rounds as plainly as PyTorch allows, in one process at one thread."""
    import numpy as np
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    w = dict(WORKLOADS[args.workload], **json.loads(args.overrides))
    torch.manual_seed(0)
    users = user_tensors(Path(args.data), w, channels_first=True)
    model = plain_model(w["model"], w["shape"], nhwc=False)
    global_w = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    stamps = []
    for _ in range(args.rounds):
        sums = {k: torch.zeros_like(v) for k, v in global_w.items()}
        cohort = rng.choice(len(users), size=w["cohort"], replace=False)
        for u in cohort:
            x, y = users[u]
            model.load_state_dict(global_w)
            model.train()
            opt = torch.optim.SGD(model.parameters(), lr=w["lr"])
            for _ in range(w["epochs"]):
                perm = torch.randperm(len(y))
                for s in range(0, len(y), w["batch"]):
                    idx = perm[s:s + w["batch"]]
                    loss = F.cross_entropy(model(x[idx]), y[idx])
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            for k, v in model.state_dict().items():
                sums[k] += v
        global_w = {k: v / len(cohort) for k, v in sums.items()}
        stamps.append(time.perf_counter())
    Path(args.result).write_text(json.dumps({"stamps": stamps}))


# -------------------------------------------------------------------------------------------- hetfl side

def hetfl_config(w: dict, data: Path, rounds: int) -> str:
    return f"""name = "race"
rounds = {rounds}
seed = 0
checkpoint_every = 0

[data]
name = "npz"
data_dir = "{data}"
test_fraction = {1.0 / (w["points"] + 1)!r}
num_clients = 0

[data.partition]
name = "natural"

[model]
name = "{w["model"]}"

[algorithm]
name = "fedavg"
clients_per_round = {w["cohort"]}

[train]
epochs = {w["epochs"]}
batch_size = {w["batch"]}
lr = {w["lr"]}

[eval]
every = 1000000
local = false
"""


def _timed(cmd: list[str], **kw) -> tuple[float, float]:
    """Run ``cmd`` to its end: (wall seconds, CPU seconds of its whole process tree, user + system)."""
    r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **ONE_THREAD}, stdout=subprocess.DEVNULL, **kw)
    wall = time.perf_counter() - t0
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (r1.ru_utime - r0.ru_utime) + (r1.ru_stime - r0.ru_stime)


def run_hetfl(w: dict, data: Path, rounds: int, procs: int, sets: list[str], tmp: Path
              ) -> tuple[float, float, float]:
    cfg = tmp / "hetfl.toml"
    cfg.write_text(hetfl_config(w, data, rounds))
    out = tmp / f"hetfl-run-{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "hetfl", "run", str(cfg), "--out", str(out), "--quiet", "--workers", str(procs),
           "--threads-per-worker", "1"]
    for s in sets:
        cmd += ["--set", s]
    wall, cpu = _timed(cmd)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    # time_s: the run's clock at the end of each round; evaluation (the last round's) is not training
    ends = [r["time_s"] - sum(q.get("eval_time_s", 0.0) for q in rows[:i + 1]) for i, r in enumerate(rows)]
    per_round = (ends[-1] - ends[0]) / (len(ends) - 1)
    return per_round, wall - rounds * per_round, cpu


def run_stamped(cmd: list[str], result: Path, rounds: int) -> tuple[float, float, float]:
    wall, cpu = _timed(cmd, stderr=subprocess.PIPE)
    stamps = json.loads(result.read_text())["stamps"]
    assert len(stamps) == rounds, f"{cmd}: {len(stamps)} rounds timed, expected {rounds}"
    per_round = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    return per_round, wall - rounds * per_round, cpu


def side_args(workload: str, data: Path, rounds: int, result: Path, overrides: dict, amp: str) -> list[str]:
    return [str(Path(__file__).resolve()), "--workload", workload, "--data", str(data), "--rounds", str(rounds),
            "--result", str(result), "--overrides", json.dumps(overrides), "--pfl-amp", amp]


def run_pfl(python: str, workload, data, rounds, procs, result, overrides, amp) -> tuple[float, float, float]:
    env_cmd = [python]
    if procs > 1:  # pfl's multi-process simulation: one rank per process, gloo all-reduce of the update
        env_cmd += ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
    cmd = [*env_cmd, *side_args(workload, data, rounds, result, overrides, amp), "--side", "pfl"]
    return run_stamped(cmd, result, rounds)


def run_floor(workload, data, rounds, result, overrides) -> tuple[float, float, float]:
    cmd = [sys.executable, *side_args(workload, data, rounds, result, overrides, "none"), "--side", "floor"]
    return run_stamped(cmd, result, rounds)


def fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.3f} [{min(xs):.3f}-{max(xs):.3f}]"


def race(args: argparse.Namespace) -> None:
    import torch

    overrides = json.loads(args.overrides)
    workloads = args.workloads.split(",")
    procs_list = [int(p) for p in args.procs.split(",")]
    sides = ["hetfl", "floor"] + ([] if args.smoke else ["pfl"])
    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, one torch thread per process "
          f"(OMP_NUM_THREADS=1), {args.repeats} repeat(s); pfl: {args.pfl_python or 'not run'}"
          f"{', amp ' + args.pfl_amp if args.pfl_amp != 'none' else ''}; hetfl --set {args.hetfl_set or 'none'}")
    with tempfile.TemporaryDirectory(prefix="hetfl-race-") as d:
        tmp = Path(d)
        times: dict = {}
        for name in workloads:
            w = dict(WORKLOADS[name], **overrides)
            rounds = args.rounds or w["rounds"]
            data = tmp / f"{name}.npz"
            write_data(data, w)
            print(f"\n{name}: {w['users']} users x {w['points']} points {w['shape']}, cohort {w['cohort']}, "
                  f"model {w['model']}, {w['epochs']} epoch(s) of batch {w['batch']}, lr {w['lr']}, {rounds} rounds")
            for rep in range(args.repeats):
                for procs in procs_list:
                    order = [s for s in sides if s != "floor" or procs == 1]
                    if rep % 2:
                        order = order[::-1]
                    for side in order:
                        result = tmp / "result.json"
                        result.unlink(missing_ok=True)
                        if side == "hetfl":
                            t = run_hetfl(w, data, rounds, procs, args.hetfl_set, tmp)
                        elif side == "pfl":
                            t = run_pfl(args.pfl_python, name, data, rounds, procs, result, overrides, args.pfl_amp)
                        else:
                            t = run_floor(name, data, rounds, result, overrides)
                        times.setdefault((name, procs, side), []).append(t)
                        print(f"  repeat {rep} {procs} proc {side:5s}: {t[0]:.3f} s/round, fixed {t[1]:.2f} s, "
                              f"CPU {t[2]:.1f} s in all, load {os.getloadavg()[0]:.1f}", flush=True)
        print("\n| workload | processes | pfl s/round | hetfl s/round | pfl / hetfl | plain loop s/round "
              "| pfl fixed s | hetfl fixed s | pfl CPU s | hetfl CPU s |\n|---|" + "---:|" * 9)
        ratios = []
        for name in workloads:
            floor = [t[0] for t in times.get((name, 1, "floor"), [])]
            for procs in procs_list:
                h = [t[0] for t in times[(name, procs, "hetfl")]]
                p = [t[0] for t in times.get((name, procs, "pfl"), [])]
                ratio = statistics.median(p) / statistics.median(h) if p else float("nan")
                print(f"| {name} | {procs} | {fmt(p) if p else '-'} | {fmt(h)} | {ratio:.2f} | "
                      f"{fmt(floor) if procs == 1 and floor else '-'} | "
                      f"{fmt([t[1] for t in times[(name, procs, 'pfl')]]) if p else '-'} | "
                      f"{fmt([t[1] for t in times[(name, procs, 'hetfl')]])} | "
                      f"{fmt([t[2] for t in times[(name, procs, 'pfl')]]) if p else '-'} | "
                      f"{fmt([t[2] for t in times[(name, procs, 'hetfl')]])} |")
                ratios.append(f"ratio_{name}_p{procs}={ratio:.3f}")
        print(" ".join(ratios))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pfl-python", default="", help="python of an environment with pfl==0.6.0 installed")
    p.add_argument("--workloads", default="cifar,2nn")
    p.add_argument("--procs", default="1,2", help="process counts to race, comma-separated")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=0, help="rounds per run (0: the workload's default)")
    p.add_argument("--hetfl-set", action="append", default=[], metavar="KEY=VALUE",
                   help="hetfl config override, passed to `hetfl run --set` (repeatable)")
    p.add_argument("--pfl-amp", default="none", choices=("none", "bf16"), help="pfl's PyTorch autocast dtype")
    p.add_argument("--overrides", default="{}", help="JSON changes to the workload (users, cohort, ...)")
    p.add_argument("--smoke", action="store_true", help="a tiny run without pfl (hetfl and the floor)")
    # internal: one side of the race, in its own process
    p.add_argument("--side", choices=("pfl", "floor"), help=argparse.SUPPRESS)
    p.add_argument("--workload", help=argparse.SUPPRESS)
    p.add_argument("--data", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.side == "pfl":
        return pfl_side(args)
    if args.side == "floor":
        return floor_side(args)
    if args.smoke:
        args.overrides = json.dumps({"users": 20, "cohort": 4, **json.loads(args.overrides)})
        args.rounds, args.repeats = args.rounds or 3, 1
    elif not args.pfl_python:
        p.error("--pfl-python is required (or --smoke): the python of an environment with pfl==0.6.0")
    race(args)


if __name__ == "__main__":
    main()
