"""Every engine and algorithm family on one device, fp32 and bf16, plus the figures issue 42 asks of a GPU.

Run through ``benchmarks/gpu_check.sh`` (which adds the demo runs); ``--device cpu`` is the dry run CI
does (digits, 2 rounds, tiny models and sizes: every code path of the CUDA run, in well under a minute).

Checks (each prints ``ok``/``FAIL``/``skip`` with its numbers; the exit status is 1 if any failed):

* every algorithm family (FedAvg, HeteroFL width, DepthFL, FIARSE, FedDF, FedGen, decentralized DKD) on
  the simulator, fp32 and bf16: the run completes, its losses are finite, bf16's final accuracy is
  within 0.15 of fp32's, and the run's summary records the precision it trained with;
* a checkpoint written on the device and resumed on the CPU gives the uninterrupted run's accuracy;
* worker processes (CPU: they refuse CUDA) and Flower's simulation engine (if flwr is installed),
  fp32 and bf16: the same accuracy as the simulator;
* the batched (vmap) path against sequential clients, fp32 and bf16.

Figures (``--figures``, on by default): the overhead-bound 2NN's client updates per second, sequential vs
batched (1 000 clients x 50 samples, 100 per round, synthetic MNIST-shaped features); HeteroFL a-b-c-d-e
(2NN, width slicing) round time and peak device memory at 100 / 1 000 / 10 000 clients per round; and one
CIFAR-shaped PreResNet-18 HeteroFL round (5 timed steps per width, scaled to 250 steps x 2 clients per
level as configs/cifar10_heterofl.toml), fp32 and bf16.  The dry run uses tiny sizes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hetfl.resolve import load_config  # noqa: E402
from hetfl.runner import run  # noqa: E402

BASE = {
    "name": "gpu-check", "rounds": 2, "seed": 0,
    "data": {"name": "digits", "num_clients": 6, "local_test_fraction": 0.2, "partition": {"name": "iid"}},
    "model": {"name": "cnn", "conv1": 4, "conv2": 8, "fc": 16},
    "algorithm": {"name": "fedavg", "clients_per_round": 4},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "eval": {"every": 1},
}
TIERS = ['fleet.source="tiers"', 'fleet.mix="a-b-e"']
CONV = 'model={name="heterofl_conv", hidden="8,16"}'
FAMILIES = {
    "fedavg": [],
    "heterofl": ['algorithm={name="heterofl", clients_per_round=4}', CONV, *TIERS],
    "depthfl": ['algorithm={name="depthfl", clients_per_round=4, levels="1x1,1x0.5", kd_rampup=1}', CONV,
                'fleet.source="tiers"', 'fleet.mix="a-c"'],
    "fiarse": ['algorithm={name="fiarse", clients_per_round=4}', CONV, *TIERS],
    "feddf": ['algorithm={name="feddf", clients_per_round=4, families="cnn, cnn@0.5", server_data_size=120, '
              'server_val_size=40, distill_steps=4, distill_batch=32}', *TIERS],
    "fedgen": ['algorithm={name="fedgen", clients_per_round=4}'],
    "dkd": ['algorithm={name="dkd"}', 'model={name="mlp", hidden="32"}', *TIERS, 'graph={name="capability", k=2}',
            "train.steps=4"],
}

RESULTS: list[dict] = []


def report(name: str, ok: bool | None, detail: str = "", **numbers) -> None:
    status = "skip" if ok is None else ("ok" if ok else "FAIL")
    print(f"[{status:4}] {name}: {detail}", flush=True)
    RESULTS.append({"check": name, "status": status, "detail": detail, **numbers})


def check(name: str, fn) -> None:
    t0 = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - every check reports, the script goes on
        traceback.print_exc()
        report(name, False, f"{type(exc).__name__}: {exc} ({time.perf_counter() - t0:.1f} s)")


def cfg_for(device: str, overrides: list[str], precision: str, dry: bool):
    base = dict(BASE, device=device)
    return load_config(None, [*overrides, f'train.precision="{precision}"'], base=base)


def _finite(path: Path) -> bool:
    rows = [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]
    return all(math.isfinite(r.get("train_loss", 0.0) or 0.0) for r in rows)


def families(device: str, tmp: Path, dry: bool) -> None:
    for fam, overrides in FAMILIES.items():
        def one(fam=fam, overrides=overrides) -> None:
            acc, t = {}, {}
            for prec in ("fp32", "bf16"):
                t0 = time.perf_counter()
                s = run(cfg_for(device, overrides, prec, dry), tmp / f"{fam}-{prec}", quiet=True)
                t[prec] = time.perf_counter() - t0
                acc[prec] = s["test_accuracy"]
                assert s["status"] == "complete" and s["precision"] == prec, (s["status"], s.get("precision"))
                assert _finite(tmp / f"{fam}-{prec}"), "a training loss is not finite"
            ok = abs(acc["bf16"] - acc["fp32"]) <= 0.15
            report(f"simulator {fam}", ok, f"acc fp32 {acc['fp32']:.3f} / bf16 {acc['bf16']:.3f}, "
                   f"{t['fp32']:.1f} s / {t['bf16']:.1f} s", acc_fp32=acc["fp32"], acc_bf16=acc["bf16"])
        check(f"simulator {fam}", one)


def resume_on_cpu(device: str, tmp: Path, dry: bool) -> None:
    def one() -> None:
        full = run(cfg_for(device, [], "fp32", dry), tmp / "resume-full", quiet=True)
        run(cfg_for(device, ["rounds=1"], "fp32", dry), tmp / "resume-part", quiet=True)
        resumed = run(cfg_for("cpu", [], "fp32", dry), resume=tmp / "resume-part", quiet=True)
        diff = abs(full["test_accuracy"] - resumed["test_accuracy"])
        report("checkpoint on the device, resumed on the CPU", diff <= 0.02,
               f"acc uninterrupted {full['test_accuracy']:.4f} / resumed {resumed['test_accuracy']:.4f}")
    check("checkpoint on the device, resumed on the CPU", one)


def engines(device: str, tmp: Path, dry: bool) -> None:
    def workers() -> None:  # worker processes train on the CPU, whatever the run's device
        for prec in ("fp32", "bf16"):
            cfg = cfg_for("cpu", ["workers=2", "threads_per_worker=1"], prec, dry)
            seq = run(cfg.with_engine(workers=1), tmp / f"seq-{prec}", quiet=True)
            par = run(cfg, tmp / f"workers-{prec}", quiet=True)
            ok = abs(seq["test_accuracy"] - par["test_accuracy"]) <= 0.02 and par["precision"] == prec
            report(f"workers (CPU) {prec}", ok, f"acc in process {seq['test_accuracy']:.4f} / workers "
                   f"{par['test_accuracy']:.4f}")
    check("workers", workers)

    def flower() -> None:
        try:
            import flwr  # noqa: F401
        except ImportError:
            report("flower", None, "flwr is not installed (pip install 'hetfl[flower]')")
            return
        for prec in ("bf16",) if dry else ("fp32", "bf16"):  # fp32 identity: tests/test_flower.py
            cfg = cfg_for(device, [], prec, dry)
            sim = run(cfg, tmp / f"fl-sim-{prec}", quiet=True)
            flw = run(cfg.with_engine(name="flower"), tmp / f"fl-flower-{prec}", quiet=True)
            ok = abs(sim["test_accuracy"] - flw["test_accuracy"]) <= 0.02 and flw["precision"] == prec
            report(f"flower {prec}", ok,
                   f"acc simulator {sim['test_accuracy']:.4f} / flower {flw['test_accuracy']:.4f}")
    check("flower", flower)

    def batched() -> None:
        over = ["batched=true", "train.steps=3", 'model={name="mlp", hidden="32"}', "algorithm.clients_per_round=6"]
        for prec in ("fp32", "bf16"):
            seq = run(cfg_for(device, [*over[1:]], prec, dry), tmp / f"b-seq-{prec}", quiet=True)
            bat = run(cfg_for(device, over, prec, dry), tmp / f"b-bat-{prec}", quiet=True)
            ok = abs(seq["test_accuracy"] - bat["test_accuracy"]) <= 0.03
            report(f"batched {prec}", ok, f"acc sequential {seq['test_accuracy']:.4f} / batched "
                   f"{bat['test_accuracy']:.4f}")
    check("batched", batched)


# ------------------------------------------------------------------------------------------ figures
def _synthetic(device: str, clients: int, per_client: int, per_round: int, features: int, extra: list[str],
               prec: str, rounds: int):
    base = {"name": "gpu-fig", "rounds": rounds, "seed": 0, "device": device, "workers": 1,
            "data": {"name": "synthetic", "num_samples": int(clients * per_client / 0.8), "num_features": features,
                     "num_clients": clients, "partition": {"name": "iid"}},
            "model": {"name": "mlp", "hidden": "200,200"},
            "algorithm": {"name": "fedavg", "clients_per_round": per_round},
            "train": {"epochs": 1, "batch_size": 10, "lr": 0.05, "precision": prec},
            "eval": {"every": rounds, "local": False}}
    return load_config(None, extra, base=base)


def _rounds(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _peak_mb(device: str) -> float:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:  # the process's peak resident set (monotone: an upper bound)
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024


def figures(device: str, tmp: Path, dry: bool) -> None:
    clients, per_round, features = (40, 8, 64) if dry else (1000, 100, 784)

    def updates() -> None:
        for prec in ("fp32", "bf16"):
            line = {}
            for batched in (False, True):
                cfg = _synthetic(device, clients, 50, per_round, features, [f"batched={str(batched).lower()}"],
                                 prec, 3)
                run(cfg, tmp / f"upd-{prec}-{batched}", quiet=True)
                rows = _rounds(tmp / f"upd-{prec}-{batched}")[1:]  # round 1 warms up
                secs = sorted(r["train_time_s"] for r in rows)[len(rows) // 2]
                line[batched] = per_round / secs
            report(f"2NN client updates/s {prec}", True,
                   f"sequential {line[False]:.0f}/s, batched {line[True]:.0f}/s ({line[True] / line[False]:.1f}x)",
                   sequential=line[False], batched=line[True])
    check("2NN updates/s", updates)

    def heterofl_scale() -> None:
        sizes = (8, 16, 32) if dry else (100, 1000, 10000)
        for prec in ("fp32", "bf16"):
            for k in sizes:
                if device.startswith("cuda"):
                    torch.cuda.reset_peak_memory_stats()
                extra = [f'algorithm={{name="heterofl", clients_per_round={k}}}', 'fleet.source="tiers"',
                         'fleet.mix="a-b-c-d-e"', "batched=true"]
                cfg = _synthetic(device, k, 20, k, features, extra, prec, 2)
                run(cfg, tmp / f"hscale-{prec}-{k}", quiet=True)
                rows = _rounds(tmp / f"hscale-{prec}-{k}")
                report(f"HeteroFL a-b-c-d-e {prec}, {k} clients/round", True,
                       f"round {rows[-1]['train_time_s']:.2f} s (train), peak memory {_peak_mb(device):.0f} MiB",
                       round_s=rows[-1]["train_time_s"], peak_mb=_peak_mb(device))
    check("HeteroFL scale", heterofl_scale)

    def resnet_round() -> None:
        from hetfl.config import TrainConfig
        from hetfl.data.base import DataInfo, Split
        from hetfl.models import ModelRef
        from hetfl.train import local_sgd

        info = DataInfo((3, 32, 32), 10)
        widths = (0.125, 0.0625) if dry else (1.0, 0.5, 0.25, 0.125, 0.0625)
        steps, batch = (1, 4) if dry else (5, 10)
        for prec in ("fp32", "bf16"):
            per_step = {}
            for w in widths:
                model = ModelRef("resnet", w).build(info).to(device)
                x = torch.randn((steps + 1) * batch, 3, 32, 32, device=device)
                y = torch.randint(10, ((steps + 1) * batch,), device=device)
                cfg = TrainConfig(steps=1, batch_size=batch, lr=0.01, momentum=0.9, weight_decay=5e-4,
                                  precision=prec, memory_format="auto")
                local_sgd(model, Split(x[:batch], y[:batch]), cfg, seed=0, device=device)  # warm-up
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                local_sgd(model, Split(x[batch:], y[batch:]), TrainConfig(**{**cfg.__dict__, "steps": steps}),
                          seed=1, device=device)
                if device.startswith("cuda"):
                    torch.cuda.synchronize()
                per_step[w] = (time.perf_counter() - t0) / steps
            round_s = sum(2 * 250 * s for s in per_step.values())
            report(f"PreResNet-18 HeteroFL round {prec}", True,
                   "step ms " + ", ".join(f"w{w:g} {1e3 * s:.1f}" for w, s in per_step.items())
                   + f"; a round (2 clients x 250 steps per level) ~{round_s:.1f} s, "
                   f"800 rounds ~{round_s * 800 / 3600:.1f} h",
                   round_s=round_s)
    check("PreResNet-18 round", resnet_round)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--no-figures", action="store_true")
    ap.add_argument("--json", help="write every check's result here")
    args = ap.parse_args(argv)
    dry = args.device == "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"no CUDA device (torch {torch.__version__}); use --device cpu for the dry run")
        return 2
    if dry:
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu (dry run)"
    print(f"gpu_check on {name}, torch {torch.__version__}", flush=True)
    with tempfile.TemporaryDirectory(prefix="hetfl-gpu-check-") as d:
        tmp = Path(d)
        families(args.device, tmp, dry)
        resume_on_cpu(args.device, tmp, dry)
        engines(args.device, tmp, dry)
        if not args.no_figures:
            figures(args.device, tmp, dry)
    failed = [r["check"] for r in RESULTS if r["status"] == "FAIL"]
    print(f"gpu_check: {len(RESULTS)} checks, {len(failed)} failed, {time.perf_counter() - t0:.0f} s"
          + (f": {', '.join(failed)}" if failed else ""), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"device": name, "results": RESULTS}, indent=1))
    return 1 if failed else 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONHASHSEED", "0")
    raise SystemExit(main())
