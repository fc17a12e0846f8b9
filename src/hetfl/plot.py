"""Plots and tables over run directories (``hetfl plot`` and ``hetfl summary``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetfl.errors import HetflError
from hetfl.results import read_metrics, read_summary


def _label(run_dir: Path) -> str:
    summary = read_summary(run_dir) or {}
    return summary.get("name") or run_dir.name


def load_runs(dirs: Sequence[str | Path]) -> list[tuple[Path, list[dict[str, Any]]]]:
    runs = []
    for d in dirs:
        path = Path(d)
        rows = read_metrics(path)
        if not path.is_dir() or not rows:
            raise HetflError(f"{str(path)!r} is not a hetfl run directory with metrics (no metrics.jsonl rows)")
        runs.append((path, rows))
    return runs


def plot_runs(dirs: Sequence[str | Path], out: str | Path | None = None) -> list[Path]:
    """accuracy.png and loss.png: test metric vs round (left) and vs cumulative bytes (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = load_runs(dirs)
    out_dir = Path(out) if out else runs[0][0]
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for metric, title in (("test_accuracy", "test accuracy"), ("test_loss", "test loss")):
        fig, (ax_r, ax_b) = plt.subplots(1, 2, figsize=(11, 4))
        for path, rows in runs:
            total, xs_r, xs_b, ys = 0, [], [], []
            for r in rows:
                total += r.get("bytes_up", 0) + r.get("bytes_down", 0)
                if r.get(metric) is not None:
                    xs_r.append(r["round"])
                    xs_b.append(total / 2**20)
                    ys.append(r[metric])
            # markers: a run with a single evaluation point is a point, not an invisible zero-length line
            style = {"marker": "o", "markersize": 3 if len(ys) > 30 else 4}
            ax_r.plot(xs_r, ys, label=_label(path), **style)
            ax_b.plot(xs_b, ys, label=_label(path), **style)
        ax_r.set_xlabel("round")
        ax_b.set_xlabel("cumulative bytes up+down (MiB)")
        for ax in (ax_r, ax_b):
            ax.set_ylabel(title)
            ax.grid(alpha=0.3)
        ax_r.legend(fontsize="small")
        fig.tight_layout()
        path = out_dir / f"{metric.replace('test_', '')}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def summary_rows(dirs: Sequence[str | Path]) -> list[dict[str, Any]]:
    rows = []
    for d in dirs:
        path = Path(d)
        summary = read_summary(path)
        if summary is None:
            metrics = read_metrics(path)
            if not metrics:
                raise HetflError(f"{str(path)!r} is not a hetfl run directory (no summary.json or metrics.jsonl)")
            summary = {"status": "running?", "rounds_completed": metrics[-1]["round"],
                       "test_accuracy": next((r["test_accuracy"] for r in reversed(metrics)
                                              if r.get("test_accuracy") is not None), None)}
        rows.append({"run": str(path), **summary})
    return rows


SUMMARY_COLUMNS = (
    ("run", "run", None),
    ("status", "status", None),
    ("algorithm", "algorithm", None),
    ("model", "model", None),
    ("dataset", "dataset", None),
    ("rounds", "rounds_completed", None),
    ("test_acc", "test_accuracy", 4),
    ("best_acc", "best_test_accuracy", 4),
    ("last5_acc", "test_accuracy_last5_mean", 4),
    ("worst10%_clients", "client_acc_worst10", 4),
    ("wall_s", "wall_time_s", 1),
)


def format_summary(dirs: Sequence[str | Path]) -> str:
    """A plain aligned text table (readable in a terminal, a log or a pipe)."""

    def fmt(v: Any, digits: int | None) -> str:
        if v is None:
            return "-"
        return f"{v:.{digits}f}" if digits is not None and isinstance(v, (int, float)) else str(v)

    table = [[head for head, _, _ in SUMMARY_COLUMNS]]
    for r in summary_rows(dirs):
        table.append([fmt(r.get(key), digits) for _, key, digits in SUMMARY_COLUMNS])
    widths = [max(len(row[i]) for row in table) for i in range(len(SUMMARY_COLUMNS))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def summary_table(dirs: Sequence[str | Path]) -> None:
    print(format_summary(dirs))
