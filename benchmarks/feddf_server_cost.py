"""FedDF's server cost: streaming teacher logits vs resident teacher models, vs clients per round and families.

Each measurement runs in a fresh process (spawned) that builds a FedDF server for MNIST-shaped inputs, then
times and measures one server round: :meth:`FedDF.aggregate` over a *stream* of K client results (created
lazily, one at a time, as a network would deliver them) and :meth:`FedDF.server_step` (distillation of every
family, a fixed step budget, no early stopping).  Memory is the process's peak resident set size above its
level at the start of the round (Linux ``VmHWM``, reset through ``/proc/self/clear_refs``; on CUDA the
allocator's peak), next to the bytes FedDF accounts for (``server_peak_bytes``: teachers + running averages
+ student, best copy and Adam moments; ``server_teacher_bytes``: teachers only).

    python benchmarks/feddf_server_cost.py                        # configs/mnist_feddf.toml's families
    python benchmarks/feddf_server_cost.py --preset fedavg_cnn --clients 10 40 --families 1 --steps 5 --server-size 500

Presets: ``small`` = configs/mnist_feddf.toml's families (CNN 16-32 conv + fc 128, its half width, a 32-unit
MLP; 2 000 + 500 server images); ``fedavg_cnn`` = FedAvg's MNIST CNN (32-64 conv, fc 512, 1.66 M parameters),
its half width and the 200-200 MLP.

Times are CPU seconds of the (single-threaded) process, not wall-clock, so a busy shared machine does not
inflate them; ``teacher`` is the aggregation (streaming: every client model over the server set; resident:
building the K modules and the validation ensemble) and ``distill`` the server step (resident: the K teacher
forwards of every distillation batch are in here).  Client weights are the family's initial weights plus
seeded noise: the cost does not depend on their values.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import multiprocessing as mp
import os
import time

PRESETS = {
    "small": ((("conv1", 16), ("conv2", 32), ("fc", 128)), ["cnn", "cnn@0.5", "mlp(hidden=32)"]),
    "fedavg_cnn": ((), ["cnn", "cnn@0.5", "mlp"]),
}


def measure(args: tuple[str, int, int, int, int, str, str]) -> dict[str, float]:
    mode, k, n_fam, steps, server_size, device, preset = args
    import torch

    torch.set_num_threads(1)
    from hetfl.algorithms.base import ClientResult, Context, round_seed
    from hetfl.algorithms.feddf import FedDF
    from hetfl.config import TrainConfig
    from hetfl.data.base import DataInfo, Split
    from hetfl.data.server import ServerData
    from hetfl.distill import PeakMemory, nbytes_of
    from hetfl.fleet import FleetConfig, build_fleet
    from hetfl.models import ModelRef

    info = DataInfo((1, 28, 28), 10)
    dev = torch.device(device)
    g = torch.Generator().manual_seed(0)
    sd = ServerData(torch.rand(server_size, 1, 28, 28, generator=g),
                    Split(torch.rand(500, 1, 28, 28, generator=g), torch.randint(0, 10, (500,), generator=g)),
                    "noise").to(dev)
    mix = "-".join("abc"[:n_fam])
    fleet = build_fleet(FleetConfig(source="tiers", mix=mix), k, 0)
    params, families = PRESETS[preset]
    ctx = Context(info=info, model=ModelRef("cnn", 1.0, params), train=TrainConfig(),
                  client_sizes=torch.full((k,), 100).numpy(), seed=0, rounds=1, fleet=fleet, server_data=sd)
    algo = FedDF(clients_per_round=k, families=", ".join(families[:n_fam]), teachers=mode, distill_steps=steps,
                 val_every=10**6, patience=10**6, server_data_size=server_size)
    state = algo.init_state(ctx)
    tasks = algo.configure_round(state, 1, list(range(k)), ctx)
    model_bytes = {f.key: nbytes_of(state.models[f.key]) for f in algo.family_list(ctx)}

    def results(tasks=tasks):
        for t in tasks:
            gen = torch.Generator().manual_seed(round_seed(0, 1, t.client_id))
            w = {n: (v + 0.01 * torch.randn(v.shape, generator=gen)).to(dev) if v.is_floating_point() else v.to(dev)
                 for n, v in t.weights.items()}
            yield ClientResult(t.client_id, 100, w)

    # warm-up: one small round, so that lazily loaded library code and kernel caches are not counted; then hand
    # freed heap memory back to the OS, so that the measured round's allocations show in the resident set
    warm = FedDF(clients_per_round=k, families=algo.families, teachers=mode, distill_steps=2, val_every=1,
                 server_data_size=server_size)
    warm.server_step(state, warm.aggregate(state, 1, results(tasks[:n_fam * 2]), ctx), ctx)
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    t0 = time.process_time()
    with PeakMemory(dev) as pm:
        upd = algo.aggregate(state, 1, results(), ctx)
        t1 = time.process_time()
        out = algo.server_step(state, upd, ctx)
    t2 = time.process_time()
    m = algo.round_metrics(out)
    return {"mode": mode, "clients": k, "families": n_fam, "steps": steps,
            "teacher_s": round(t1 - t0, 2), "distill_s": round(t2 - t1, 2),
            "peak_rss_mb": None if pm.peak_bytes is None else round(pm.peak_bytes / 2**20, 1),
            "accounted_peak_mb": round(m["server_peak_bytes"] / 2**20, 1),
            "teacher_mb": round(m["server_teacher_bytes"] / 2**20, 2),
            "models_mb": round(sum(model_bytes.values()) / 2**20, 2)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, nargs="+", default=[5, 10, 20, 40])
    ap.add_argument("--families", type=int, nargs="+", default=[1, 3], choices=[1, 2, 3])
    ap.add_argument("--modes", nargs="+", default=["streaming", "resident"], choices=["streaming", "resident"])
    ap.add_argument("--steps", type=int, default=50, help="distillation steps per family (batch 128)")
    ap.add_argument("--server-size", type=int, default=2000, help="unlabeled server inputs")
    ap.add_argument("--preset", default="small", choices=sorted(PRESETS))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    # tensors of 64 KiB and more get their own mappings, returned to the OS when freed: the resident set then
    # follows the live tensors instead of the allocator's high-water mark (the children inherit this)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    ctx = mp.get_context("spawn")
    grid = [(mode, k, f, args.steps, args.server_size, args.device, args.preset)
            for f in args.families for k in args.clients for mode in args.modes]
    print(f"families: {', '.join(PRESETS[args.preset][1])} (first n used); server set {args.server_size} + 500 "
          f"validation; {args.steps} distillation steps of 128 per family; one process per row")
    print("| families | clients K | teachers | teacher CPU s | distill CPU s | peak RSS MiB (measured) | "
          "accounted peak MiB | teacher state MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for point in grid:
        with ctx.Pool(1) as pool:
            r = pool.apply(measure, (point,))
        print(f"| {r['families']} | {r['clients']} | {r['mode']} | {r['teacher_s']} | {r['distill_s']} | "
              f"{r['peak_rss_mb']} | {r['accounted_peak_mb']} | {r['teacher_mb']} |", flush=True)


if __name__ == "__main__":
    main()
