"""Plots and tables over run directories (``hetfl plot`` and ``hetfl summary``).

``hetfl plot`` writes, into ``--out`` (default ``plots/`` in the current directory; never into a run directory
unless asked):

* ``accuracy.png``: the global model's test accuracy (solid) and, for heterogeneous runs, the accuracy of the
  models the clients deploy (dashed), against rounds, cumulative bytes, cumulative training FLOPs and the
  simulated (virtual) time of the devices, where the run has it;
* ``loss.png``: the clients' train loss and the global model's test loss against rounds, each labelled;
* ``tiers.png`` (runs with widths or tiers): per run, the global model cut to every width, the deployed and the
  smallest model's accuracy, and every tier's model on its own clients' data;
* ``privacy.png`` (private runs): epsilon against rounds, and accuracy against epsilon.

Every figure has a title (what the runs share) and a legend of what differs between them
(:func:`hetfl.runinfo.legends`: the algorithm, the seed, any key a ``--set`` changed).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetfl.errors import HetflError
from hetfl.results import read_metrics
from hetfl.runinfo import Run, common_title, legends, load_run, load_runs

DEFAULT_OUT = Path("plots")


def _cumulative(rows: list[dict[str, Any]], cost: str) -> list[float]:
    """Cumulative bytes (MiB, up + down), training FLOPs (GFLOPs, every tier's) or simulated seconds (the rounds'
    ``round_sim_time_s``: the slowest sampled device's compute + transfer) at every row."""
    total, out = 0.0, []
    for r in rows:
        if cost == "bytes":
            total += (r.get("bytes_up", 0) or 0) + (r.get("bytes_down", 0) or 0)
        elif cost == "sim_time":
            total += r.get("round_sim_time_s", 0) or 0
        else:
            total += sum(v for k, v in r.items() if k.startswith("tier.") and k.endswith(".flops") and v)
        out.append(total / {"bytes": 2**20, "sim_time": 1.0}.get(cost, 1e9))
    return out


def _series(run: Run, metric: str, x: str = "round") -> tuple[list[float], list[float]]:
    if x in ("round", "virtual_time_s"):
        xs_all = [float(r.get(x, float("nan")) or 0.0) for r in run.rows]
    else:
        xs_all = _cumulative(run.rows, x)
    xs, ys = [], []
    for xv, r in zip(xs_all, run.rows):
        v = r.get(metric)
        if isinstance(v, (int, float)) and v == v:
            xs.append(xv)
            ys.append(float(v))
    return xs, ys


def _style(n: int) -> dict[str, Any]:
    # markers: a run with a single evaluation point is a point, not an invisible zero-length line
    return {"marker": "o", "markersize": 2.5 if n > 30 else 4}


def plot_runs(dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """Write the figures above for ``dirs`` into ``out`` (default ``plots/``); returns their paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(dirs)
    labels = legends(runs)
    title = common_title(runs)
    out_dir = Path(out) if out else DEFAULT_OUT
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise HetflError(f"cannot write plots to {str(out_dir)!r}: {exc}") from None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {id(r): colors[i % len(colors)] for i, r in enumerate(runs)}
    hetero = any(r.width_curves() or r.tier_curves() for r in runs)
    written = []

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        path = out_dir / name
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    # accuracy vs rounds, bytes, FLOPs
    has_flops = any(_cumulative(r.rows, "flops")[-1] > 0 for r in runs)
    xs = [("round", "round"), ("bytes", "cumulative bytes up + down (MiB)")]
    if has_flops:
        xs.append(("flops", "cumulative client training FLOPs (GFLOP)"))
    if any(r.rows and r.rows[-1].get("virtual_time_s") for r in runs):  # the fleet's simulated time (docs/async.md)
        xs.append(("virtual_time_s", "virtual time (s simulated on the fleet: compute + transfer)"))
    elif any(_cumulative(r.rows, "sim_time")[-1] > 0 for r in runs):  # runs from before virtual_time_s
        xs.append(("sim_time", "simulated time (s; per round the slowest device's compute + transfer)"))
    fig, axes = plt.subplots(1, len(xs), figsize=(5.2 * len(xs), 4.2), squeeze=False)
    for ax, (x, xlabel) in zip(axes[0], xs):
        for run, label in zip(runs, labels):
            gx, gy = _series(run, "test_accuracy", x)
            ax.plot(gx, gy, color=color[id(run)], label=f"{label}: global model" if hetero else label,
                    **_style(len(gy)))
            dx, dy = _series(run, "deployed_accuracy", x)
            if dy and dy != gy:
                ax.plot(dx, dy, color=color[id(run)], linestyle="--", label=f"{label}: deployed",
                        **_style(len(dy)))
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize="small")
    fig.suptitle(f"{title}: test accuracy" + (" (solid: global model, dashed: each client's deployed model)"
                                              if hetero else ""), fontsize="medium")
    save(fig, "accuracy.png")

    # train and test loss
    fig, (ax_train, ax_test) = plt.subplots(1, 2, figsize=(10.4, 4.2))
    for run, label in zip(runs, labels):
        tx, ty = _series(run, "train_loss")
        ax_train.plot(tx, ty, color=color[id(run)], label=label, **_style(len(ty)))
        ex, ey = _series(run, "test_loss")
        ax_test.plot(ex, ey, color=color[id(run)], label=label, **_style(len(ey)))
    ax_train.set_title("train loss (clients' local training, mean)", fontsize="medium")
    ax_test.set_title("test loss (global model, common test set)", fontsize="medium")
    for ax in (ax_train, ax_test):
        ax.set_xlabel("round")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
    ax_train.legend(fontsize="small")
    fig.suptitle(title, fontsize="medium")
    save(fig, "loss.png")

    if hetero:
        _tiers_figure(plt, runs, labels, title, save)
    if any(r.epsilon() != "" for r in runs):
        fig, (ax_e, ax_a) = plt.subplots(1, 2, figsize=(10.4, 4.2))
        for run, label in zip(runs, labels):
            ex, ey = _series(run, "privacy.epsilon")
            ax_e.plot(ex, ey, color=color[id(run)], label=label, **_style(len(ey)))
            eps_at = {r["round"]: r.get("privacy.epsilon") for r in run.rows}
            pts = [(eps_at.get(r["round"]), r["test_accuracy"]) for r in run.evals]
            pts = [(e, a) for e, a in pts if isinstance(e, (int, float))]
            ax_a.plot([e for e, _ in pts], [a for _, a in pts], color=color[id(run)], label=label,
                      **_style(len(pts)))
        ax_e.set(xlabel="round", ylabel="ε (client-level, δ as configured)")
        ax_a.set(xlabel="ε spent so far", ylabel="test accuracy")
        for ax in (ax_e, ax_a):
            ax.grid(alpha=0.3)
        ax_e.legend(fontsize="small")
        fig.suptitle(f"{title}: privacy", fontsize="medium")
        save(fig, "privacy.png")
    return written


def _tiers_figure(plt: Any, runs: list[Run], labels: list[str], title: str, save: Any) -> None:
    """Per run (one column each): accuracy of every width of the global model, of the deployed and the smallest
    model; below, every tier's model on its own clients' held-out data."""
    cols = len(runs)
    with_tiers = any(r.tier_curves() for r in runs)
    fig, axes = plt.subplots(2 if with_tiers else 1, cols, figsize=(5.2 * cols, 8.0 if with_tiers else 4.2),
                             squeeze=False, sharey="row")
    for col, (run, label) in enumerate(zip(runs, labels)):
        ax = axes[0][col]
        gx, gy = _series(run, "test_accuracy")
        curves = run.width_curves()
        ax.plot(gx, gy, label="width 1 (global model)" if curves else "global model", linewidth=2, **_style(len(gy)))
        for curve_label, key in curves:
            x, y = _series(run, key)
            ax.plot(x, y, label=curve_label, **_style(len(y)))
        for key, curve_label, style in (("deployed_accuracy", "deployed (each client's own model)", "--"),
                                        ("smallest_accuracy", "smallest model", ":")):
            x, y = _series(run, key)
            if y:
                ax.plot(x, y, color="black", linestyle=style, label=curve_label, **_style(len(y)))
        ax.set_title(label, fontsize="medium")
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy (common test set)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="x-small")
        if with_tiers:
            ax = axes[1][col]
            for curve_label, key in run.tier_curves():
                x, y = _series(run, key)
                ax.plot(x, y, label=curve_label, **_style(len(y)))
            ax.set_title(f"{label}: each tier's model on its clients' data", fontsize="medium")
            ax.set_xlabel("round")
            ax.set_ylabel("local test accuracy")
            ax.grid(alpha=0.3)
            if run.tier_curves():
                ax.legend(fontsize="x-small")
    fig.suptitle(f"{title}: per width and per tier", fontsize="medium")
    save(fig, "tiers.png")


def summary_rows(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        path = Path(d)
        run = load_run(path, need_metrics=False)
        summary = dict(run.summary)
        if not summary:
            metrics = read_metrics(path)
            if not metrics:
                raise HetflError(f"{str(path)!r} is not a hetfl run directory (no summary.json or metrics.jsonl)")
            summary = {"status": "running?", "rounds_completed": metrics[-1]["round"],
                       "test_accuracy": next((r["test_accuracy"] for r in reversed(metrics)
                                              if r.get("test_accuracy") is not None), None)}
        last = run.last_eval
        tiers = run.tier_accuracies()
        eps = run.epsilon()
        rows.append({"run": str(path), **summary,
                     "fleet": run.fleet() if run.config else None,
                     "deployed_accuracy": last.get("deployed_accuracy"),
                     "smallest_accuracy": last.get("smallest_accuracy"),
                     "tiers": " ".join(f"{k}:{v:.3f}" for k, v in tiers.items()) or None,
                     "epsilon": None if eps == "" else ("inf" if eps is None else eps)})
    return rows


SUMMARY_COLUMNS = (
    ("run", "run", None),
    ("status", "status", None),
    ("algorithm", "algorithm", None),
    ("model", "model", None),
    ("dataset", "dataset", None),
    ("fleet", "fleet", None),
    ("rounds", "rounds_completed", None),
    ("test_acc", "test_accuracy", 4),
    ("deployed", "deployed_accuracy", 4),
    ("smallest", "smallest_accuracy", 4),
    ("per_tier(local)", "tiers", None),
    ("best_acc", "best_test_accuracy", 4),
    ("last5_acc", "test_accuracy_last5_mean", 4),
    ("worst10%_clients", "client_acc_worst10", 4),
    ("epsilon", "epsilon", 3),
    ("wall_s", "wall_time_s", 1),
)


def format_summary(dirs: Sequence[str | Path]) -> str:
    """A plain aligned text table (readable in a terminal, a log or a pipe); a column no run has is left out."""

    def fmt(v: Any, digits: int | None) -> str:
        if v is None:
            return "-"
        return f"{v:.{digits}f}" if digits is not None and isinstance(v, (int, float)) else str(v)

    rows = summary_rows(dirs)
    columns = [c for c in SUMMARY_COLUMNS if c[0] in ("run", "status") or any(r.get(c[1]) is not None for r in rows)]
    table = [[head for head, _, _ in columns]]
    for r in rows:
        table.append([fmt(r.get(key), digits) for _, key, digits in columns])
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def summary_table(dirs: Sequence[str | Path]) -> None:
    print(format_summary(dirs))
