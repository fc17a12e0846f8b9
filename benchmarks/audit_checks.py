"""Two facts behind the comparison's explanations (issue 40 item 6), printed in a few seconds, no data set.

    python benchmarks/audit_checks.py

1. FIARSE's masks on the comparison's initial global model (``heterofl_conv`` 32-64-128-256 on 28x28x1
   inputs, the round-0 model of seeds 0-2): kept / total weights of every conv and the classifier, for the
   global and the per-tensor threshold at capacities 1/16 and 1/64 (docs/submodels.md).
2. The labels every HeteroFL tier holds under the shards split (MNIST's class counts, 100 clients, 2 shards
   each, mix a-b-c-d-e fixed in id blocks, the partition stream a run draws): the shards are dealt by a random
   permutation, so a tier is not a block of labels (benchmarks/README.md).
"""

from __future__ import annotations

import numpy as np
import torch

from hetfl.algorithms.base import round_seed
from hetfl.data.base import DataInfo
from hetfl.data.partition import partition
from hetfl.fleet import FleetConfig, build_fleet
from hetfl.hetero.importance import maskable_keys, masks, thresholds
from hetfl.models import ModelRef

MNIST_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def fiarse_masks(seeds=(0, 1, 2)) -> None:
    info = DataInfo((1, 28, 28), 10)
    ref = ModelRef("heterofl_conv", 1.0, (("hidden", "32,64,128,256"),))
    for seed in seeds:
        torch.manual_seed(round_seed(seed, 0))  # the initial model every server algorithm starts from
        model = ref.build(info)
        w = {k: v.detach() for k, v in model.state_dict().items()}
        keys = maskable_keys(model)
        for r in (1 / 16, 1 / 64):
            for mode in ("global", "tensor"):
                kept = masks(w, thresholds(w, keys, r, mode))
                cells = ", ".join(f"{k.removesuffix('.weight')} {int(v.sum())}/{v.numel()}"
                                  for k, v in kept.items() if v.dim() > 1)
                print(f"seed {seed} r={r:g} {mode:6}: {cells}")


def shard_labels(seeds=(0, 1, 2)) -> None:
    labels = np.repeat(np.arange(10), MNIST_COUNTS)
    for seed in seeds:
        rng = np.random.default_rng([seed, 0x70617274])  # the partition stream of hetfl.experiment.prepare
        parts = partition({"name": "shards", "shards_per_client": 2}, labels, 100, rng)
        tiers = build_fleet(FleetConfig(source="tiers", mix="a-b-c-d-e"), 100, seed, sizes=np.ones(100)).tiers()
        cells = []
        for t in range(5):
            ys = np.concatenate([labels[parts[c]] for c in np.flatnonzero(tiers == t)])
            share = np.bincount(ys, minlength=10) / len(ys)
            cells.append(f"tier {t}: {int((share > 0).sum())} labels (rarest {share.min():.3f})")
        print(f"seed {seed} shards: " + "; ".join(cells))


if __name__ == "__main__":
    fiarse_masks()
    shard_labels()
