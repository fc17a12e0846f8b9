"""What one HeteroFL CIFAR-10 round with PreResNet-18 costs on this CPU (random tensors of CIFAR's shape).

Times ``--steps`` local SGD steps (batch 10, momentum 0.9, weight decay 5e-4, crop + flip augmentation,
as configs/cifar10_heterofl.toml) of the ``resnet`` (depth 18) submodel at each width of the a-b-c-d-e
fleet (1, 1/2, 1/4, 1/8, 1/16), after one untimed warm-up step, and scales it to the config: a client
holds 500 images (50 000 / 100 clients), trains 5 epochs = 250 steps; a round trains 10 clients, 2 per
level.  Prints seconds per step and per client for each width, then per round and for 800 rounds.
Both wall and CPU time are printed: on a shared machine the CPU time is the steadier figure.

    OMP_NUM_THREADS=1 PYTHONPATH=src python benchmarks/cifar_round_cost.py --steps 5
"""

from __future__ import annotations

import argparse
import time

import torch

from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo, Split
from hetfl.models import build_model, count_parameters
from hetfl.train import local_sgd

WIDTHS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=5, help="timed SGD steps per width")
    ap.add_argument("--samples", type=int, default=500, help="images per client (CIFAR-10 / 100 clients)")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch", type=int, default=10)
    ap.add_argument("--clients-per-level", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=800)
    args = ap.parse_args()
    info = DataInfo((3, 32, 32), 10)
    gen = torch.Generator().manual_seed(0)
    data = Split(torch.randn(args.steps * args.batch, 3, 32, 32, generator=gen),
                 torch.randint(0, 10, (args.steps * args.batch,), generator=gen))
    warm = Split(data.x[: args.batch], data.y[: args.batch])
    cfg = TrainConfig(epochs=1, batch_size=args.batch, lr=0.1, momentum=0.9, weight_decay=5e-4, augment="crop_flip")
    steps_per_client = args.epochs * -(-args.samples // args.batch)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {steps_per_client} steps per client")
    print(f"{'level':<6} {'width':>7} {'params':>10} {'s/step wall':>12} {'s/step cpu':>11} {'s/client cpu':>13}")
    round_cpu = round_wall = 0.0
    for level, width in WIDTHS.items():
        model = build_model("resnet", info, width=width, depth=18)
        local_sgd(model, warm, cfg, seed=0)  # warm-up
        t0, c0 = time.perf_counter(), time.process_time()
        local_sgd(model, data, cfg, seed=1)
        wall = (time.perf_counter() - t0) / args.steps
        cpu = (time.process_time() - c0) / args.steps
        round_wall += wall * steps_per_client * args.clients_per_level
        round_cpu += cpu * steps_per_client * args.clients_per_level
        print(f"{level:<6} {width:>7.4f} {count_parameters(model):>10,} {wall:>12.3f} {cpu:>11.3f} "
              f"{cpu * steps_per_client:>13.1f}")
    print(f"one round ({args.clients_per_level} clients per level, training only): {round_cpu:.0f} s CPU "
          f"({round_wall:.0f} s wall); {args.rounds} rounds: {round_cpu * args.rounds / 3600:.0f} CPU hours")


if __name__ == "__main__":
    main()
