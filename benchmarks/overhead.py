"""hetfl's orchestration overhead against a bare hand-written PyTorch loop, in one process.

Both sides run the same FedAvg workload (default: MNIST, FedAvg CNN, 100 clients with 2 label
shards, 10 clients per round, 1 local epoch, batch 10, lr 0.05): the same clients, the same batches
in the same order, the same SGD steps.  hetfl runs through :func:`hetfl.runner.run` (sampling, task
configuration, weight loading, streaming aggregation, metrics.jsonl, a checkpoint each round); its
evaluation time is subtracted because the bare loop does not evaluate.  The bare loop loads the
global weights into one model per client, trains, and averages the state dicts.

    python benchmarks/overhead.py                 # MNIST (fetched once into hetfl's cache)
    python benchmarks/overhead.py --dataset digits --model mlp --rounds 20

Prints per-repeat times and ``overhead_ratio=<hetfl time / bare time>`` (min over repeats, the
two sides interleaved).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from hetfl.algorithms.base import round_seed
from hetfl.config import load_config
from hetfl.results import read_metrics
from hetfl.runner import prepare, run
from hetfl.train import batch_indices


def make_config(args: argparse.Namespace):
    base = {
        "name": "overhead",
        "rounds": args.rounds,
        "seed": 0,
        "device": args.device,
        "checkpoint_every": 1,
        "workers": 1,  # sequential mode: the clients in this process, like the bare loop (parallel: parallel.py)
        "data": {"name": args.dataset, "num_clients": 100, "partition": {"name": "shards", "shards_per_client": 2}},
        "model": {"name": args.model},
        "algorithm": {"name": "fedavg", "clients_per_round": args.clients},
        "train": {"epochs": 1, "batch_size": args.batch_size, "lr": 0.05},
        "eval": {"every": 10**6, "local": False},
    }
    return load_config(None, (), base=base)


def bare_loop(exp, rounds: int) -> tuple[float, dict[str, torch.Tensor]]:
    """The same FedAvg rounds written as plainly as PyTorch allows."""
    cfg, fed, ctx, algo = exp.cfg, exp.federation, exp.ctx, exp.algorithm
    torch.manual_seed(round_seed(cfg.seed, 0))
    model = ctx.model.build(ctx.info).to(exp.device)
    global_w = {k: v.clone() for k, v in model.state_dict().items()}
    x_all, y_all = fed.train.x, fed.train.y
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        rng = np.random.default_rng([cfg.seed, rnd, 0x73616D70])
        clients = rng.choice(fed.num_clients, size=algo.clients_for(fed.num_clients), replace=False)
        clients.sort()
        sums, total = None, 0
        for c in clients:
            idx_c = torch.as_tensor(fed.train_idx[c], device=x_all.device)
            x, y = x_all[idx_c], y_all[idx_c]
            model.load_state_dict(global_w)
            opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
            gen = torch.Generator().manual_seed(round_seed(cfg.seed, rnd, int(c)))
            torch.manual_seed(round_seed(cfg.seed, rnd, int(c)))
            model.train()
            for idx in batch_indices(len(y), cfg.train.batch_size, cfg.train.epochs, 0, gen):
                loss = F.cross_entropy(model(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
            n = len(y)
            state = model.state_dict()
            if sums is None:
                sums = {k: v.detach().double() * n for k, v in state.items()}
            else:
                for k, v in state.items():
                    sums[k] += v.detach().double() * n
            total += n
        global_w = {k: (v / total).to(global_w[k].dtype) for k, v in sums.items()}
    return time.perf_counter() - t0, global_w


def hetfl_run(cfg) -> tuple[float, dict[str, torch.Tensor]]:
    out = Path(tempfile.mkdtemp(prefix="hetfl-overhead-"))
    try:
        run(cfg, out / "run", quiet=True)
        rows = read_metrics(out / "run")
        # the round loop as the runner timed it (sampling, tasks, training, aggregation, metrics.jsonl and
        # checkpoint writes of earlier rounds), minus evaluation; the one-time setup (loading the cached
        # dataset, partitioning) is excluded as it is for the bare loop, which reuses the prepared data
        loop_s = rows[-1]["time_s"] - sum(r.get("eval_time_s", 0.0) for r in rows)
        w = torch.load(out / "run" / "checkpoint.pt", weights_only=True)["state"]["models"]["global"]
        return loop_s, w
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--model", default="cnn")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    cfg = make_config(args)
    exp = prepare(cfg)  # loads (and caches) the data once, outside the timings
    print(f"workload: {args.dataset} {args.model}, {args.clients} clients/round x 1 epoch, batch {args.batch_size}, "
          f"{args.rounds} rounds; torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    h_times, b_times = [], []
    for rep in range(args.repeats):
        th, wh = hetfl_run(cfg)
        tb, wb = bare_loop(exp, args.rounds)
        h_times.append(th)
        b_times.append(tb)
        same = all(torch.allclose(wh[k].float(), wb[k].float(), atol=1e-5) for k in wb)
        print(f"repeat {rep}: hetfl {th:.3f}s  bare {tb:.3f}s  ratio {th / tb:.3f}  same_weights={same}")
    ratio = min(h_times) / min(b_times)
    paired = sorted(h / b for h, b in zip(h_times, b_times))
    print(f"hetfl_s={min(h_times):.3f} bare_s={min(b_times):.3f}")
    print(f"paired_ratio_median={paired[len(paired) // 2]:.3f}  (each repeat's two sides ran back to back)")
    print(f"overhead_ratio={ratio:.3f}")


if __name__ == "__main__":
    main()
