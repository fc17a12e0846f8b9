"""Decentralized heterogeneous learning on MNIST (issue #6): distillation into weaker neighbours vs baselines.

20 nodes, Dirichlet alpha = 0.3, three capability tiers (widths 1, 1/4, 1/16 of the 200-200 MLP), a random
4-regular graph (configs/mnist_dkd.toml).  Arms, all on the same data, partition, fleet, initial weights and
local training:

* ``dkd``: local training, distillation of each weaker neighbour's model on the stronger node's data,
  gossip among equal models;
* ``dkd_overlap``: the same, gossiping with every neighbour over the overlapping slices (HeteroFL's rule);
* ``isolated``: local training only;
* ``dpsgd_smallest``: D-PSGD with every node on the 1/16 model;
* ``dpsgd_slices``: D-PSGD on the width-slices, overlaps averaged among neighbours (HeteroFL's rule);
* ``dkd_capability`` / ``dpsgd_smallest_capability``: ``dkd`` and ``dpsgd_smallest`` on the capability-aware
  graph instead (a ring inside every tier, every node linked to 2 random more capable nodes);
* ``heterofl``: centralized HeteroFL, every client every round, with HeteroFL's Scaler forced on
  (``scaler = true``, hetfl's default when these figures were recorded); ``heterofl_noscaler``: the same
  without the Scaler, which is what hetfl's default ``scaler = "auto"`` gives on this norm-free MLP (the
  forced Scaler leaves the narrow submodels unusable at evaluation, see docs/decentralized.md);
* ``fedavg_smallest``: centralized FedAvg of the 1/16 model, every client every round.

More arms, run with ``--arms`` (docs/decentralized.md, "Making the gain robust"): ``dkd`` with its options
``kd_return="mean"`` (``*_relay*``: a teacher returns the mean of its same-model students' distilled copies),
``teacher="ensemble"`` (``*_ens*``), ``gossip="narrower"`` / ``"wider"``, ``gossip_weights="subgraph"``,
``kd_steps=100`` (``*_kd100*``), ``alpha=0`` (``*_a0``); ``dpsgd_smallest_steps100`` (D-PSGD-smallest with 4x
the local steps: the reference for the longer distillation's compute); and any ``--arm NAME=KEY=VALUE;...``.

Every cell is an ordinary ``hetfl run`` (finished cells are skipped, interrupted ones resumed)::

    python benchmarks/decentralized_mnist.py --rounds 50 --seeds 0 1 2 --jobs 2 --out runs/dec_mnist
    python benchmarks/decentralized_mnist.py --out runs/dec_mnist --table-only --plot docs/img/decentralized_mnist.png
    python benchmarks/decentralized_mnist.py --rounds 50 --seeds 0 1 2 --out runs/probe --arms dpsgd_smallest dkd \
        dkd_relay dkd_relay_kd100 dkd_relay_kd100_narrower dkd_relay_kd100_ens_narrower dpsgd_smallest_steps100
"""

from __future__ import annotations

import argparse
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

CONFIG = Path(__file__).parents[1] / "configs" / "mnist_dkd.toml"
WEAK, MID, STRONG = "w0.0625", "w0.25", "w1"
ARMS: dict[str, list[str]] = {
    "dkd": [],
    "dkd_overlap": ['algorithm.gossip="overlap"'],
    "isolated": ['algorithm={name="isolated"}'],
    "dpsgd_smallest": ['algorithm={name="dpsgd", models="smallest"}'],
    "dpsgd_slices": ['algorithm={name="dpsgd"}'],
    "dkd_capability": ['graph={name="capability", k=2}'],
    "dpsgd_smallest_capability": ['algorithm={name="dpsgd", models="smallest"}', 'graph={name="capability", k=2}'],
    "heterofl": ['algorithm={name="heterofl", clients_per_round=20, scaler=true}'],  # forced: see the docstring
    "heterofl_noscaler": ['algorithm={name="heterofl", clients_per_round=20, scaler=false}'],
    "fedavg_smallest": ['algorithm={name="fedavg", clients_per_round=20}', "model.width=0.0625",
                        'fleet.source="uniform"'],
}
CENTRAL = ("heterofl", "heterofl_noscaler", "fedavg_smallest")
DEFAULT_ARMS = list(ARMS)  # the 50-round table of docs/decentralized.md
_RELAY, _KD100, _NARROWER = 'algorithm.kd_return="mean"', "algorithm.kd_steps=100", 'algorithm.gossip="narrower"'
#: dkd's options for a robust weak-tier gain (docs/decentralized.md, "Making the gain robust"); run with --arms
ARMS.update({
    "dkd_relay": [_RELAY],
    "dkd_ensemble": ['algorithm.teacher="ensemble"'],
    "dkd_narrower": [_NARROWER],
    "dkd_wider": ['algorithm.gossip="wider"'],
    "dkd_subgraph": ['algorithm.gossip_weights="subgraph"'],
    "dkd_kd100": [_KD100],
    "dkd_relay_kd100": [_RELAY, _KD100],
    "dkd_relay_narrower": [_RELAY, _NARROWER],
    "dkd_relay_kd100_ens": [_RELAY, _KD100, 'algorithm.teacher="ensemble"'],
    "dkd_relay_kd100_narrower": [_RELAY, _KD100, _NARROWER],
    "dkd_relay_kd100_ens_narrower": [_RELAY, _KD100, _NARROWER, 'algorithm.teacher="ensemble"'],
    "dkd_relay_kd100_a0": [_RELAY, _KD100, "algorithm.alpha=0.0"],  # no KD term: CE on the teacher's data only
    # reference: D-PSGD-smallest with 4x the local steps (the weak nodes' own compute of a distilled model above)
    "dpsgd_smallest_steps100": ['algorithm={name="dpsgd", models="smallest"}', "train.steps=100"],
})


def run_cell(job: tuple[str, int, int, str, int, tuple[str, ...], tuple[str, ...]]) -> str:
    arm, seed, rounds, out, eval_every, arm_sets, extra = job
    import torch

    torch.set_num_threads(1)
    from hetfl.resolve import load_config
    from hetfl.results import read_summary
    from hetfl.runner import run

    path = Path(out) / f"{arm}-s{seed}"
    summary = read_summary(path)
    if summary and summary.get("status") == "complete" and summary.get("rounds_completed", 0) >= rounds:
        return f"{path} (done)"
    if (path / "config.toml").exists():
        run(load_config(path / "config.toml", [f"rounds={rounds}"]), resume=path, quiet=True)
    else:
        sets = [f"seed={seed}", f"rounds={rounds}", f"eval.every={eval_every}", f'name="{arm}-s{seed}"', *arm_sets,
                *extra]
        run(load_config(CONFIG, sets), path, quiet=True)
    return str(path)


# ---------------------------------------------------------------------------------------------------- report


def _weak_model_costs(rounds: int) -> dict[str, float]:
    """Per weak client of a centralized arm: bytes (download + upload of the 1/16 model) and training FLOPs."""
    import torch

    from hetfl.accounting import model_cost
    from hetfl.algorithms.base import nbytes, weights_of
    from hetfl.data.base import DataInfo
    from hetfl.models import ModelRef
    from hetfl.resolve import load_config

    cfg = load_config(CONFIG)
    info = DataInfo((1, 28, 28), 10)
    out = {}
    for label, width in ((WEAK, 0.0625), (MID, 0.25), (STRONG, 1.0)):
        model = ModelRef("mlp", width).build(info)
        fwd = model_cost(model, torch.zeros(1, 1, 28, 28)).forward_flops
        out[f"bytes.{label}"] = 2 * nbytes(weights_of(model)) * rounds
        out[f"flops.{label}"] = 3 * fwd * cfg.train.steps * cfg.train.batch_size * rounds
    return out


def collect(root: Path, seeds: list[int], arms: list[str] | None = None) -> dict[str, dict]:
    from hetfl.results import read_metrics, read_summary

    data: dict[str, dict] = {}
    for arm in arms or ARMS:
        runs = []
        for seed in seeds:
            path = root / f"{arm}-s{seed}"
            summary = read_summary(path)
            if summary and summary.get("status") == "complete":
                runs.append((summary, read_metrics(path)))
        if runs:
            data[arm] = {"summaries": [s for s, _ in runs], "rows": [r for _, r in runs]}
    return data


def _key(arm: str, label: str, local: bool) -> str:
    """The metrics.jsonl key of a tier's accuracy in an arm (global test set, or the tier's local splits)."""
    if arm == "fedavg_smallest":  # one global model: the 1/16 model everyone trains
        return "client_acc_mean" if local else "test_accuracy"
    if arm.startswith("heterofl") and label == STRONG:  # the full global model
        return "tier_acc.global" if local else "test_accuracy"
    return f"{'tier_acc' if local else 'test_accuracy'}.{label}"


def _acc(arm: str, rows: list[dict], label: str, local: bool = False, at: int | None = None) -> float | None:
    """The value at round ``at`` (None: the last evaluated round; runs longer than ``at`` count at ``at``)."""
    key = _key(arm, label, local)
    vals = [r[key] for r in rows if r.get(key) is not None and (at is None or r["round"] == at)]
    return vals[-1] if vals else None


def _final(arm: str, rows: list[dict], label: str, rounds: int, local: bool = False) -> float | None:
    """The value at round ``rounds``, or at the last evaluated round of a shorter run."""
    v = _acc(arm, rows, label, local, at=rounds)
    return v if v is not None else _acc(arm, rows, label, local)


def _fmt(vals: list[float | None], scale: float = 100.0, digits: int = 2) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "n/a"
    a = np.asarray(vals) * scale
    return f"{a.mean():.{digits}f} ± {a.std():.{digits}f}" if len(a) > 1 else f"{a.mean():.{digits}f}"


def table(data: dict[str, dict], rounds: int, checkpoints: tuple[int, ...] = (10, 20, 30)) -> str:
    central = _weak_model_costs(rounds)
    at = [c for c in checkpoints if c < rounds]
    lines = ["| arm | " + " | ".join(f"weak 1/16 @{c}" for c in at) + f" | weak 1/16 @{rounds} | weak: local acc | "
             "mid 1/4 | strong 1 | MB per weak node | MB per strong node | GFLOP per weak node | "
             "GFLOP per strong node | seeds |", "|---" * (len(at) + 10) + "|"]
    for arm, d in data.items():
        ss, rs = d["summaries"], d["rows"]
        row = [arm] + [_fmt([_acc(arm, r, WEAK, at=c) for r in rs]) for c in at]
        row += [_fmt([_final(arm, r, WEAK, rounds) for r in rs]),
                _fmt([_final(arm, r, WEAK, rounds, local=True) for r in rs])]
        if arm == "fedavg_smallest":
            row += ["(1/16 model)", "(1/16 model)"]
        else:
            row += [_fmt([_final(arm, r, MID, rounds) for r in rs]), _fmt([_final(arm, r, STRONG, rounds) for r in rs])]
        for kind, scale in (("bytes", 2**-20), ("flops", 1e-9)):
            for label in (WEAK, STRONG):
                if arm in CENTRAL:
                    lab = WEAK if arm == "fedavg_smallest" else label
                    row.append(f"{central[f'{kind}.{lab}'] * scale:.1f}")
                else:
                    keys = ((f"bytes_sent.{label}.total_per_node", f"bytes_recv.{label}.total_per_node")
                            if kind == "bytes" else (f"flops.{label}.total_per_node",))
                    vals = [sum(s.get(k, 0.0) for k in keys) for s in ss]
                    row.append(f"{np.mean(vals) * scale:.1f}")
        row.append(str(len(ss)))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def gains(data: dict[str, dict], rounds: int, ref: str = "dpsgd_smallest",
          checkpoints: tuple[int, ...] = (10, 20, 30)) -> str:
    """Weak-tier gain (points) of every arm over ``ref`` at equal rounds, paired by seed: mean ± std [per seed]."""
    if ref not in data:
        return f"(no {ref} runs: no gains)"
    at = [c for c in checkpoints if c < rounds] + [rounds]
    lines = [f"| weak-tier gain over {ref} | " + " | ".join(f"@{c}" for c in at) + " |", "|---" * (len(at) + 1) + "|"]
    ref_rows = dict(zip([s["seed"] for s in data[ref]["summaries"]], data[ref]["rows"]))
    for arm, d in data.items():
        if arm == ref or arm in CENTRAL:
            continue
        cells = []
        for c in at:
            g = [(_acc(arm, rows, WEAK, at=c) or np.nan) - (_acc(ref, ref_rows[s["seed"]], WEAK, at=c) or np.nan)
                 for s, rows in zip(d["summaries"], d["rows"]) if s["seed"] in ref_rows]
            g = [x * 100 for x in g if np.isfinite(x)]
            cells.append(f"{np.mean(g):+.2f} ± {np.std(g):.2f} [{' '.join(f'{x:+.1f}' for x in g)}]" if g else "n/a")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _curve(arm: str, rows: list[dict]) -> dict[int, float]:
    key = _key(arm, WEAK, local=False)
    return {r["round"]: r[key] * 100 for r in rows if r.get(key) is not None}


def plot(data: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, gx, bx) = plt.subplots(1, 3, figsize=(17, 4.4), gridspec_kw={"width_ratios": [1.1, 1, 1.1]})
    for arm, d in data.items():
        curves = [_curve(arm, rows) for rows in d["rows"]]
        xs = sorted(set.intersection(*(set(c) for c in curves)))
        ys = np.array([[c[x] for x in xs] for c in curves])
        style = "--" if arm in CENTRAL else "-"
        ax.plot(xs, ys.mean(0), style, label=arm, lw=2.2 if arm.startswith("dkd") else 1.3)
        ax.fill_between(xs, ys.min(0), ys.max(0), alpha=0.12)
    ax.set_ylim(40, 95)
    ax.set_xlabel("round")
    ax.set_ylabel("weak tier (1/16) test accuracy, %")
    ax.set_title("weak tier, mean of seeds (band: min-max)" +
                 ("\nheterofl (with Scaler) stays at ~10 %, off scale" if "heterofl" in data else ""),
                 fontsize="medium")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="x-small", ncol=2)
    gain_pairs = [(a, "dpsgd_smallest_capability" if a.endswith("_capability") else "dpsgd_smallest")
                  for a in data if a.startswith("dkd") or a == "dpsgd_smallest_steps100"]
    for arm, ref in gain_pairs:
        if arm not in data or ref not in data:
            continue
        pairs = [(_curve(arm, a), _curve(ref, b)) for a, b in zip(data[arm]["rows"], data[ref]["rows"])]
        xs = sorted(set.intersection(*(set(a) & set(b) for a, b in pairs)))
        gain = np.array([[a[x] - b[x] for x in xs] for a, b in pairs])
        gx.plot(xs, gain.mean(0), label=f"{arm} − {ref}")
        gx.fill_between(xs, gain.min(0), gain.max(0), alpha=0.15)
    gx.axhline(3.0, color="grey", ls=":", lw=1)
    gx.axhline(0.0, color="black", lw=0.6)
    gx.set_xlabel("round")
    gx.set_ylabel("weak-tier gain, points")
    gx.set_title("gain over D-PSGD with every node on the 1/16 model\n(same seed paired; dotted: the +3 target)",
                 fontsize="medium")
    gx.grid(alpha=0.3)
    gx.legend(fontsize="x-small")
    arms = [a for a in data if a != "fedavg_smallest"]
    width = 0.8 / 3
    for k, label in enumerate((STRONG, MID, WEAK)):
        vals = [np.mean([v for v in (_acc(a, r, label) for r in data[a]["rows"]) if v is not None]) * 100
                for a in arms]
        bx.bar(np.arange(len(arms)) + (k - 1) * width, vals, width, label=f"tier {label}")
    bx.set_xticks(np.arange(len(arms)))
    bx.set_xticklabels(arms, rotation=30, ha="right", fontsize="x-small")
    bx.set_ylabel("final test accuracy, %")
    bx.set_ylim(50, 97)
    bx.set_title("every tier, final round (mean of seeds)", fontsize="medium")
    bx.grid(axis="y", alpha=0.3)
    bx.legend(fontsize="x-small")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=50)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--arms", nargs="+", default=None, metavar="ARM",
                   help=f"arms to run (default: {', '.join(DEFAULT_ARMS)}); more: "
                        f"{', '.join(a for a in ARMS if a not in DEFAULT_ARMS)}, and every --arm")
    p.add_argument("--arm", action="append", default=[], metavar="NAME=KEY=VALUE[;KEY=VALUE...]",
                   help="define an extra arm from dkd's config, e.g. 'dkd_kd50=algorithm.kd_steps=50' (repeatable)")
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--out", default="runs/decentralized_mnist")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every arm (repeatable), e.g. 'model.hidden=\"800,800\"'")
    p.add_argument("--table-only", action="store_true")
    p.add_argument("--plot", help="write the figure here (PNG)")
    args = p.parse_args()
    root = Path(args.out)
    for spec in args.arm:
        name, _, sets = spec.partition("=")
        if not name or not sets:
            p.error(f"--arm wants NAME=KEY=VALUE[;KEY=VALUE...], got {spec!r}")
        ARMS[name] = [x for x in sets.split(";") if x]
    arms = args.arms or DEFAULT_ARMS + [spec.partition("=")[0] for spec in args.arm]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; known: {', '.join(ARMS)} (define more with --arm)")
    if not args.table_only:
        jobs = [(arm, seed, args.rounds, str(root), args.eval_every, tuple(ARMS[arm]), tuple(args.set))
                for seed in args.seeds for arm in arms]
        os.environ.setdefault("OMP_NUM_THREADS", "1")
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            for done in pool.map(run_cell, jobs):
                print(done, flush=True)
    data = collect(root, args.seeds, args.arms and sorted(set(arms) | {"dpsgd_smallest"}, key=list(ARMS).index))
    print(table(data, args.rounds))
    print(gains(data, args.rounds))
    if args.plot:
        plot(data, Path(args.plot))
        print(args.plot)


if __name__ == "__main__":
    main()
