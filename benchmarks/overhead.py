"""hetfl's orchestration overhead against a bare hand-written PyTorch loop, in one process.

Both sides run the same FedAvg workload (default: MNIST, FedAvg CNN, 100 clients with 2 label
shards, 10 clients per round, 1 local epoch, batch 10, lr 0.05): the same clients, the same batches
in the same order, the same SGD steps.  hetfl runs through :func:`hetfl.runner.run` (sampling, task
configuration, weight loading, streaming aggregation, metrics.jsonl, a checkpoint each round); its
evaluation time is subtracted because the bare loop does not evaluate.  The bare loop loads the
global weights into one model per client, trains, and averages the state dicts.

    python benchmarks/overhead.py                 # MNIST (fetched once into hetfl's cache)
    python benchmarks/overhead.py --dataset digits --model mlp --rounds 20
    python benchmarks/overhead.py --algorithm heterofl --mix a-b-c-d-e

``--algorithm heterofl``: HeteroFL with fixed prefix slices, the fleet's tiers in contiguous client
blocks (``--mix``, default a-b-c-d-e: widths 1, 1/2, 1/4, 1/8, 1/16), unweighted overlap averaging,
and HeteroFL's per-model hooks (Scaler, masked cross-entropy, classifier rule) off, as a hand-written
loop would not have them.  The bare side slices the global weights with plain tensor indexing
(``w[:rows, :cols]``, the prefix of every dimension the submodel is narrower in), trains each client's
submodel, and averages the overlaps by hand with float64 sums and counts.

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
from hetfl.resolve import load_config
from hetfl.results import read_metrics
from hetfl.rounds import round_rng
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
    if args.algorithm == "heterofl":
        base["algorithm"] = {"name": "heterofl", "clients_per_round": args.clients, "scaler": False,
                             "masked_ce": False, "classifier_rule": False, "eval_widths": False}
        base["fleet"] = {"source": "tiers", "mix": args.mix, "assignment": "fixed"}
    return load_config(None, (), base=base)


LEVELS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}


def client_data(x_all, y_all, idx_c, lean_rows: bool):
    """``(x, y, rows)`` for train_client: a copy of the client's data (plain), or the whole split and the
    client's rows in it (``lean_rows``)."""
    return (x_all, y_all, idx_c) if lean_rows else (x_all[idx_c], y_all[idx_c], None)


def train_client(model, x, y, rows, cfg, rnd: int, c: int, channels_last: bool = False) -> None:
    """One client's local SGD, written plainly: the same batches and seeds as hetfl's local_sgd.

    ``channels_last``: train with channels_last 4-D weights, as hetfl does for models that ask for it on
    the CPU (``train.memory_format = "auto"``), so that both sides do the same arithmetic.
    ``rows``: ``x``/``y`` are the whole training split and ``rows`` the client's indices into it; each
    minibatch is gathered from there (as hetfl's ClientSplit does) instead of from a copy of the client's
    data made first."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=cfg.train.lr)
    gen = torch.Generator().manual_seed(round_seed(cfg.seed, rnd, c))
    # seeds torch's CPU generator as torch.manual_seed does, without its per-call cost of queueing
    # lazy seeds for absent accelerators (hetfl's local_sgd does the same)
    torch.random.default_generator.manual_seed(round_seed(cfg.seed, rnd, c))
    model.train()
    n = len(y) if rows is None else len(rows)
    for idx in batch_indices(n, cfg.train.batch_size, cfg.train.epochs, cfg.train.steps, gen):
        if rows is not None:
            idx = rows[idx]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    if channels_last:
        model.to(memory_format=torch.contiguous_format)


def bare_loop_heterofl(exp, rounds: int, mix: str, lean_rows: bool = False) -> tuple[float, dict[str, torch.Tensor]]:
    """HeteroFL's rounds by hand: prefix-slice, train the submodel, average every element over its owners
    (``lean_rows``: see bare_loop)."""
    from hetfl.models import build_model

    cfg, fed, ctx, algo = exp.cfg, exp.federation, exp.ctx, exp.algorithm
    levels = [LEVELS[t] for t in mix.split("-")]  # one letter per tier, equal shares, widest first
    n = fed.num_clients
    counts = [n // len(levels)] * len(levels)
    counts[-1] += n - sum(counts)  # leftover clients take the last (narrowest) tier
    rate_of = np.repeat(levels, counts)  # tiers in contiguous blocks of client ids
    torch.manual_seed(round_seed(cfg.seed, 0))
    full = build_model(cfg.model.name, ctx.info, **dict(cfg.model.params)).to(exp.device)
    global_w = {k: v.clone() for k, v in full.state_dict().items()}
    models = {r: build_model(cfg.model.name, ctx.info, width=r, **dict(cfg.model.params)).to(exp.device)
              for r in levels}
    # the prefix of every dimension: channels stay contiguous when a conv output is flattened (NCHW)
    slices = {r: {k: tuple(slice(0, d) for d in v.shape) for k, v in m.state_dict().items()}
              for r, m in models.items()}
    x_all, y_all = fed.train.x, fed.train.y
    channels_last = hetfl_layout(exp)  # the same arithmetic as hetfl's submodels
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        rng = round_rng(cfg.seed, rnd)  # the sampling stream of hetfl.rounds
        clients = rng.choice(n, size=algo.clients_for(n), replace=False)
        clients.sort()
        sums = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_w.items()}
        counts = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in global_w.items()}
        for c in clients:
            rate = float(rate_of[c])
            model, sl = models[rate], slices[rate]
            idx_c = torch.as_tensor(fed.train_idx[c], device=x_all.device)
            model.load_state_dict({k: global_w[k][sl[k]] for k in sl})
            train_client(model, *client_data(x_all, y_all, idx_c, lean_rows), cfg, rnd, int(c), channels_last)
            for k, v in model.state_dict().items():
                sums[k][sl[k]] += v.detach().double()
                counts[k][sl[k]] += 1.0
        global_w = {k: torch.where(counts[k] > 0, sums[k] / counts[k].clamp_min(1.0), g.double()).to(g.dtype)
                    for k, g in global_w.items()}
    return time.perf_counter() - t0, global_w


def hetfl_layout(exp) -> bool:
    """Whether hetfl trains this run's model with channels_last weights (hetfl.train.training_memory_format)."""
    from hetfl.train import training_memory_format

    model = exp.ctx.model.build(exp.ctx.info)
    return training_memory_format(exp.cfg.train.memory_format, model, exp.device) is torch.channels_last


def bare_loop(exp, rounds: int, channels_last: bool = False, lean_rows: bool = False,
              ) -> tuple[float, dict[str, torch.Tensor]]:
    """The same FedAvg rounds written as plainly as PyTorch allows (``channels_last``: see train_client).

    Plainly, a client's data is gathered (copied out of the training split) before it trains;
    ``lean_rows`` gathers only each minibatch's rows instead, as hetfl does (see train_client's ``rows``)."""
    cfg, fed, ctx, algo = exp.cfg, exp.federation, exp.ctx, exp.algorithm
    torch.manual_seed(round_seed(cfg.seed, 0))
    model = ctx.model.build(ctx.info).to(exp.device)
    global_w = {k: v.clone() for k, v in model.state_dict().items()}
    x_all, y_all = fed.train.x, fed.train.y
    t0 = time.perf_counter()
    for rnd in range(1, rounds + 1):
        rng = round_rng(cfg.seed, rnd)  # the sampling stream of hetfl.rounds
        clients = rng.choice(fed.num_clients, size=algo.clients_for(fed.num_clients), replace=False)
        clients.sort()
        sums, total = None, 0
        for c in clients:
            idx_c = torch.as_tensor(fed.train_idx[c], device=x_all.device)
            model.load_state_dict(global_w)
            train_client(model, *client_data(x_all, y_all, idx_c, lean_rows), cfg, rnd, int(c), channels_last)
            n = len(idx_c)
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
    p.add_argument("--algorithm", default="fedavg", choices=("fedavg", "heterofl"))
    p.add_argument("--mix", default="a-b-c-d-e", help="heterofl: tiers, one letter each (a=1 ... e=1/16)")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    p.add_argument("--plain-gather", action="store_true",
                   help="the bare loop copies each client's data before training it (default: it gathers each "
                        "minibatch's rows, as hetfl does, so the ratio is orchestration alone)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = make_config(args)
    exp = prepare(cfg)  # loads (and caches) the data once, outside the timings
    print(f"workload: {args.algorithm}{' ' + args.mix if args.algorithm == 'heterofl' else ''}, "
          f"{args.dataset} {args.model}, {args.clients} clients/round x 1 epoch, batch {args.batch_size}, "
          f"{args.rounds} rounds; torch {torch.__version__}, {torch.get_num_threads()} threads, device {args.device}")
    h_times, b_times = [], []
    for rep in range(args.repeats):
        th, wh = hetfl_run(cfg)
        # orchestration only: the same arithmetic (layout) and the same data access (minibatch rows) as hetfl
        lean = not args.plain_gather
        tb, wb = bare_loop_heterofl(exp, args.rounds, args.mix, lean_rows=lean) if args.algorithm == "heterofl" \
            else bare_loop(exp, args.rounds, channels_last=hetfl_layout(exp), lean_rows=lean)
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
