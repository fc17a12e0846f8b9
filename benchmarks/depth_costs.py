"""What each depth / width x depth / element-mask method trains on each fleet tier, and what it costs.

Static numbers (no training): for the Fashion-MNIST configs (``configs/fmnist_*.toml``: HeteroFL's conv
net 64-128-256-512 on 1x28x28 inputs, fleet tiers a-b-c-d), per tier the submodel's parameters, the bytes
a client receives (float32), and its forward FLOPs per sample.  FIARSE's masks are drawn on the initial
global model; its FLOPs are the dense model's (the masked tensors are multiplied whole).

    PYTHONPATH=src python benchmarks/depth_costs.py
"""

from __future__ import annotations

import torch

from hetfl.accounting import example_input, model_cost
from hetfl.algorithms import ALGORITHMS
from hetfl.algorithms.base import Context
from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo
from hetfl.fleet import FleetConfig, build_fleet
from hetfl.hetero.importance import sparse_bytes
from hetfl.models import ModelRef

INFO = DataInfo((1, 28, 28), 10)


def main() -> None:
    fleet = build_fleet(FleetConfig(source="tiers", mix="a-b-c-d"), 8, 0)
    ctx = Context(INFO, ModelRef("heterofl_conv"), TrainConfig(), torch.full((8,), 100).numpy(), 0, 100, fleet)
    x = example_input(INFO)
    print("| method | tier | trains | parameters (FIARSE: elements kept) | bytes down | forward MFLOPs |")
    print("|---|---|---|---|---|---|")
    for name in ("heterofl", "depthfl", "scalefl", "inclusivefl", "fiarse"):
        # the levels of configs/fmnist_*.toml (InclusiveFL's own default has 3 levels for 4/8/12 layers)
        algo = ALGORITHMS.get(name)(**({"levels": "1x1,1x0.75,1x0.5,1x0.25"} if name == "inclusivefl" else {}))
        state = algo.init_state(ctx)
        glob = state.models["global"]
        for tier, width in enumerate(fleet.levels):
            client = next(c for c in range(8) if fleet.max_width[c] == width)
            task = algo.configure_round(state, 1, [client], ctx)[0]
            cost = model_cost(task.model.build(INFO), x)
            nbytes = sum(v.numel() * v.element_size() for v in task.weights.values())
            if name == "fiarse":
                r = task.extra["capacity"]
                params, sparse = sparse_bytes(glob, algo.taus(glob, ctx, r))
                what = "all elements" if r == 1 else f"top {r:g} of the maskable elements by magnitude"
                down = f"{nbytes:,} dense ({sparse:,} sparse)"
            elif name == "heterofl":
                params, what, down = cost.params, f"width {width:g}", f"{nbytes:,}"
            else:
                w, d = task.extra["level"]
                exits = task.model.params[3][1] or "-"
                params, what, down = cost.params, f"width {w:g}, depth {d:g} (extra exits at {exits})", f"{nbytes:,}"
            print(f"| {name} | {'abcd'[tier]} | {what} | {params:,} | {down} | {cost.forward_flops / 1e6:.1f} |")


if __name__ == "__main__":
    main()
