"""Where a round's time goes: explicit timers around every phase of hetfl's real round loop.

Runs :func:`hetfl.runner.run` on a config (default: the HeteroFL and the FedAvg MNIST configs) for a
few rounds with timers wrapped around the phases, without changing the runner or the engine:

* ``sample``: ``algorithm.sample_clients``;
* ``configure``: ``algorithm.configure_round`` (for HeteroFL this is where submodels are extracted);
* ``plan``: the fault plan of the round (``RoundGuard.begin``: simulated times, dropouts);
* ``load``: loading a task's weights into the cached module (``ModelCache.loaded``);
* ``gather``: gathering a client's samples (``Federation.client_train``);
* ``train``: the rest of a client's run (``algorithm.local_update``: local SGD, copying the weights out);
* ``validate``: checking a result before it is aggregated (``RoundBook.accept``);
* ``aggregate``: ``algorithm.aggregate`` minus the client work it pulls through the result stream
  (the stream's bookkeeping, byte counts and loss sums, is counted here);
* ``server_step``, ``evaluate`` (``Evaluator.__call__``), ``metrics`` (metrics.jsonl), ``checkpoint``;
* ``other``: the rest of the round loop (round bookkeeping, progress, summary rows).

Times are exclusive: a phase called inside another (loading weights inside evaluation) is counted once,
as itself.

    python benchmarks/profile_round.py                                  # both MNIST configs, 2 rounds
    python benchmarks/profile_round.py --rounds 3 --set train.steps=20  # shorter local updates
    python benchmarks/profile_round.py configs/mnist_fedavg.toml --device cuda

The first round pays one-time costs (imports, building modules); ``--skip-first`` (default 1) leaves
it out of the table.  Prints one table per config: total ms over the timed rounds, ms per round, %.
"""

from __future__ import annotations

import argparse
import functools
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

PHASES = ("sample", "configure", "plan", "load", "gather", "train", "validate", "aggregate", "server_step",
          "evaluate", "metrics", "checkpoint", "other")


class Timers:
    """Exclusive phase times: a phase's time excludes the timed phases it calls (a stack of timers)."""

    def __init__(self) -> None:
        self.total: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.round = 0
        self.skip = 0
        self.device: torch.device | None = None
        self._stack: list[float] = []  # time spent in timed children of each open phase

    def sync(self) -> None:
        if self.device is not None and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def call(self, phase: str, fn, *args, **kwargs):
        self.sync()
        self._stack.append(0.0)
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            self.sync()
            elapsed = time.perf_counter() - t0
            children = self._stack.pop()
            if self._stack:
                self._stack[-1] += elapsed
            if self.round > self.skip:
                self.total[phase] += elapsed - children
                self.calls[phase] += 1


def wrap(owner: object, name: str, phase: str, timers: Timers, patched: list) -> None:
    """Replace ``owner.name`` by a timed version (restored by the caller from ``patched``)."""
    original = getattr(owner, name)

    @functools.wraps(original)
    def timed(*args, **kwargs):
        return timers.call(phase, original, *args, **kwargs)

    patched.append((owner, name, original))
    setattr(owner, name, timed)


class TimedAlgorithm:
    """Delegates to an algorithm, timing its server-side calls."""

    def __init__(self, algo, timers: Timers) -> None:
        self._algo = algo
        self._t = timers

    def __getattr__(self, name):
        return getattr(self._algo, name)

    def sample_clients(self, *args):
        self._t.round += 1  # the round loop starts with sampling
        return self._t.call("sample", self._algo.sample_clients, *args)

    def configure_round(self, *args):
        return self._t.call("configure", self._algo.configure_round, *args)

    def server_step(self, *args):
        return self._t.call("server_step", self._algo.server_step, *args)

    def aggregate(self, *args):  # the clients it pulls through the result stream are timed phases
        return self._t.call("aggregate", self._algo.aggregate, *args)


def profile(config: str, args: argparse.Namespace) -> tuple[dict[str, float], float, int]:
    import hetfl.runner as runner
    from hetfl.data.federation import Federation
    from hetfl.engines.simulator import Simulator
    from hetfl.evaluation import Evaluator
    from hetfl.model_cache import ModelCache
    from hetfl.reliability.guard import RoundBook, RoundGuard
    from hetfl.resolve import load_config
    from hetfl.results import RunDir, read_metrics

    overrides = [f"rounds={args.rounds}", f"device={args.device}", "checkpoint_every=1", *args.set]
    cfg = load_config(config, overrides)
    timers = Timers()
    timers.skip = args.skip_first
    timers.device = torch.device(args.device) if args.device.startswith("cuda") else None
    patched: list = []
    for owner, name, phase in [(RoundGuard, "begin", "plan"), (Simulator, "run_client", "train"),
                               (ModelCache, "loaded", "load"),
                               (Federation, "client_train", "gather"), (RoundBook, "accept", "validate"),
                               (Evaluator, "__call__", "evaluate"), (RunDir, "append_metrics", "metrics"),
                               (RunDir, "save_checkpoint", "checkpoint")]:
        wrap(owner, name, phase, timers, patched)
    prepare = runner.prepare

    def timed_prepare(c):
        exp = prepare(c)
        exp.algorithm = TimedAlgorithm(exp.algorithm, timers)
        return exp

    runner.prepare = timed_prepare
    out = Path(tempfile.mkdtemp(prefix="hetfl-profile-"))
    try:
        runner.run(cfg, out / "run", quiet=True)
        rows = read_metrics(out / "run")
    finally:
        runner.prepare = prepare
        for owner, name, original in reversed(patched):
            setattr(owner, name, original)
        shutil.rmtree(out, ignore_errors=True)
    timed = rows[args.skip_first:]
    # the runner's round_time_s covers the round and its evaluation; the metrics row and the checkpoint
    # are written after it is taken
    loop = sum(r["round_time_s"] for r in timed) + timers.total["metrics"] + timers.total["checkpoint"]
    timers.total["other"] = max(0.0, loop - sum(v for k, v in timers.total.items() if k != "other"))
    return timers, loop, len(timed)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("configs", nargs="*", default=["configs/mnist_heterofl.toml", "configs/mnist_fedavg.toml"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--skip-first", type=int, default=1, help="rounds left out of the table (one-time costs)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override (repeatable)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    args = p.parse_args()
    if args.rounds <= args.skip_first:
        p.error("--rounds must exceed --skip-first")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), device {args.device}, "
          f"{args.rounds} rounds (first {args.skip_first} not counted), overrides {args.set or 'none'}")
    for config in args.configs:
        timers, loop, n = profile(config, args)
        print(f"\n{config}: {n} round(s) timed, {1000 * loop / n:.1f} ms per round (evaluation included)")
        print("| phase | calls | ms | ms/call | ms/round | % |\n|---|---:|---:|---:|---:|---:|")
        for phase in PHASES:
            v, c = timers.total.get(phase, 0.0), timers.calls.get(phase, 0)
            per_call = f"{1000 * v / c:.2f}" if c else ""
            print(f"| {phase} | {c or ''} | {1000 * v:.1f} | {per_call} | {1000 * v / n:.1f} | "
                  f"{100 * v / loop if loop else 0:.1f} |")


if __name__ == "__main__":
    main()
