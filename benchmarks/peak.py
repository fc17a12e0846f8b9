"""Fraction of peak: this machine's matmul peak (fp32, bf16; 1 and 2 threads) and what a client's
training step achieves against it, per model, fp32 and bf16 (issue 36, item 3).

    OMP_NUM_THREADS=1 python benchmarks/peak.py                     # ~2 minutes on the 2-core CPU
    python benchmarks/peak.py --quick                               # tiny sizes, a few seconds (CI)
    python benchmarks/peak.py --device cuda                         # the same on a GPU

Peak: the best of several large square matmuls (``2 n^3`` FLOPs each; n = 2048 on the CPU, 8192 on a
GPU) in float32 and bfloat16.  Achieved: one SGD step of the model on a random minibatch (forward under
``torch.autocast`` for bf16, as ``train.precision = "bf16"`` runs it), fastest of the repeats (load on a
shared machine only adds time), FLOPs from hetfl's own accounting (``3 x forward`` FLOPs per sample,
:mod:`hetfl.accounting`), cross-checked once per model against ``torch.utils.flop_counter.FlopCounterMode``
on one forward + backward.  Model steps run on one thread (what a worker process or a sweep cell uses)
and are compared with the one-thread peak.
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from hetfl.accounting import model_cost  # noqa: E402
from hetfl.data.base import DataInfo  # noqa: E402
from hetfl.models import ModelRef  # noqa: E402
from hetfl.precision import autocast, bf16_hardware  # noqa: E402

#: (label, model ref, input shape, batch size): the models of the issue, at their configs' batch sizes
MODELS = [
    ("MNIST CNN (FedAvg)", ModelRef("cnn"), (1, 28, 28), 10),
    ("HeteroFL conv, half width", ModelRef("heterofl_conv", 1.0, (("hidden", "32,64,128,256"),)), (1, 28, 28), 32),
    ("2NN MLP", ModelRef("mlp"), (1, 28, 28), 10),
    ("PreResNet-18, 32x32", ModelRef("resnet"), (3, 32, 32), 64),
]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def best_time(fn, device: torch.device, repeats: int, budget_s: float = 4.0) -> float:
    fn()
    sync(device)
    best, t_end = float("inf"), time.perf_counter() + budget_s
    for i in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
        if i >= 2 and time.perf_counter() > t_end:
            break
    return best


def matmul_peak(n: int, dtype: torch.dtype, device: torch.device, repeats: int) -> float:
    """FLOP/s of an n x n x n matmul, best of ``repeats``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    t = best_time(lambda: torch.mm(a, b, out=out), device, repeats)
    return 2 * n ** 3 / t


def step_flops(ref: ModelRef, shape: tuple[int, ...], batch: int) -> tuple[float, float]:
    """(hetfl's count, FlopCounterMode's count) of one training step's FLOPs on ``batch`` samples."""
    info = DataInfo(shape, 10)
    model = ref.build(info)
    hetfl_flops = 3 * model_cost(model, torch.zeros(1, *shape)).forward_flops * batch
    x, y = torch.randn(batch, *shape), torch.randint(10, (batch,))
    counter = FlopCounterMode(display=False)
    with counter:
        F.cross_entropy(model(x), y).backward()
    return float(hetfl_flops), float(counter.get_total_flops())


def step_time(ref: ModelRef, shape: tuple[int, ...], batch: int, precision: str, device: torch.device,
              repeats: int) -> tuple[float, str]:
    """Fastest seconds of one SGD step, and the layout used (the faster of contiguous / channels_last
    for models with 4-D weights)."""
    info = DataInfo(shape, 10)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(10, (batch,), device=device)
    best = (float("inf"), "contiguous")
    torch.manual_seed(0)
    model = ref.build(info).to(device).train()
    layouts = ["contiguous", "channels_last"] if any(p.dim() == 4 for p in model.parameters()) else ["contiguous"]
    for layout in layouts:
        model.to(memory_format=torch.channels_last if layout == "channels_last" else torch.contiguous_format)

        def step() -> None:
            with autocast(precision, device):
                loss = F.cross_entropy(model(x).float(), y)
            model.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in model.parameters():
                    p.add_(p.grad, alpha=-1e-4)

        t = best_time(step, device, repeats)
        best = min(best, (t, layout))
    return best


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="tiny matmul, 2NN and CNN only, few repeats (a smoke test)")
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--csv", help="write the per-model rows here")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    repeats = 3 if args.quick else args.repeats
    have, why = bf16_hardware(device)
    print(f"device {device}; bf16 hardware: {have} ({why}); torch {torch.__version__}")
    n = 256 if args.quick else (8192 if device.type == "cuda" else 2048)
    threads = [1] if device.type == "cuda" else sorted({1, min(2, torch.get_num_threads() or 1),
                                                         min(2, len(__import__("os").sched_getaffinity(0)))})
    peaks: dict[tuple[str, int], float] = {}
    before = torch.get_num_threads()
    print(f"\n### Peak: {n} x {n} x {n} matmul, best of {repeats}\n")
    print("| threads | fp32 GFLOP/s | bf16 GFLOP/s | bf16 / fp32 |")
    print("|---:|---:|---:|---:|")
    for t in threads:
        torch.set_num_threads(t)
        p32 = matmul_peak(n, torch.float32, device, repeats)
        p16 = matmul_peak(n, torch.bfloat16, device, repeats)
        peaks[("fp32", t)], peaks[("bf16", t)] = p32, p16
        print(f"| {t} | {p32 / 1e9:.1f} | {p16 / 1e9:.1f} | {p16 / p32:.2f} |")
    torch.set_num_threads(1)
    models = [m for m in MODELS if not args.quick or m[0] in ("MNIST CNN (FedAvg)", "2NN MLP")]
    rows = []
    print("\n### Client step, 1 thread: achieved FLOP/s (hetfl's accounting) and fraction of the 1-thread "
          "peak of the same precision\n")
    print("| model | batch | MFLOP/step hetfl | FlopCounterMode | fp32 ms | fp32 GFLOP/s | fp32 % peak | "
          "bf16 ms | bf16 GFLOP/s | bf16 % peak | bf16 speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, ref, shape, batch in models:
        ours, theirs = step_flops(ref, shape, batch)
        res = {}
        for prec in ("fp32", "bf16"):
            t, layout = step_time(ref, shape, batch, prec, device, max(3, repeats // (10 if "ResNet" in label else 1)))
            res[prec] = (t, layout, ours / t)
        row = {"model": label, "batch": batch, "mflop_step_hetfl": ours / 1e6, "mflop_step_flopcounter": theirs / 1e6}
        for prec, (t, layout, fps) in res.items():
            row.update({f"{prec}_ms": t * 1e3, f"{prec}_layout": layout, f"{prec}_gflops": fps / 1e9,
                        f"{prec}_frac_peak": fps / peaks[(prec, 1)]})
        row["bf16_speedup"] = res["fp32"][0] / res["bf16"][0]
        rows.append(row)
        print(f"| {label} | {batch} | {ours / 1e6:.1f} | {theirs / 1e6:.1f} | "
              f"{row['fp32_ms']:.2f} ({res['fp32'][1]}) | {row['fp32_gflops']:.1f} | "
              f"{100 * row['fp32_frac_peak']:.0f} % | {row['bf16_ms']:.2f} ({res['bf16'][1]}) | "
              f"{row['bf16_gflops']:.1f} | {100 * row['bf16_frac_peak']:.0f} % | "
              f"{row['bf16_speedup']:.2f}x |", flush=True)
    torch.set_num_threads(before)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]))
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in r.items()})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
