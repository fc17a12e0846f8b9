"""``hetfl report SWEEP_DIR``: a markdown report with heatmaps and curves over a finished (or partial) sweep.

The study's first axis (or ``[report] rows``) is the *compared* axis (e.g. the width schedule); every
combination of the other axes is a *setting* (e.g. fleet x size correlation).  For each headline metric
the report has a table and a heatmap of mean ± sample standard deviation over seeds (settings x compared
levels), and the *paired* difference to the baseline level (``[report] baseline``, default the first level
of the compared axis): seed ``s`` of a level minus seed ``s`` of the baseline, which share the partition,
fleet and initial model, so the seed-to-seed spread of the setting cancels.  Curves show the accuracy of
every width (and every tier, when the runs have local test splits) against the schedule's expected
``width_q`` (the fraction of training samples trained below the client's maximum width), one figure per
level of the first setting axis and one panel per combination of the others.

Metrics are the mean of the last 5 evaluations (``*_last5`` columns) by default, or the final evaluation with
``[report] use = "final"``; ``[report] metrics`` lists other results-table columns to report.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from hetfl.errors import HetflError
from hetfl.results import atomic_write_text
from hetfl.sweep import CELLS, SWEEP_LOG, Study, collect, load_study, write_results

DEFAULT_METRICS = (
    ("deployed_acc", "deployed accuracy (mean over clients of the accuracy of the width each runs)"),
    ("test_accuracy", "full-width (global) model accuracy"),
    ("acc_narrowest", "narrowest-width submodel accuracy"),
)
MIXTURE_FAMILY = ("max", "mixture")
MARKERS = {"uniform": "^", "coverage": "s", "adaptive": "*", "fjord": "D"}


def _stats(values: Sequence[float]) -> tuple[float, float, int]:
    v = np.asarray([x for x in values if x is not None], dtype=np.float64)
    if len(v) == 0:
        return float("nan"), float("nan"), 0
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0, len(v)


def _pct(mean: float, std: float, n: int, digits: int = 2) -> str:
    if n == 0 or not np.isfinite(mean):
        return "–"
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"


class Grid:
    """Rows of a sweep indexed by (compared level, setting, seed)."""

    def __init__(self, study: Study, rows: list[dict[str, Any]]) -> None:
        self.study = study
        self.suffix = "" if study.report.get("use", "last5") == "final" else "_last5"
        self.when = "final evaluation" if self.suffix == "" else "mean of the last 5 evaluations"
        axes = list(study.axes)
        self.compare = study.report.get("rows", axes[0])
        self.setting_axes = [a for a in axes if a != self.compare]
        self.levels = list(study.axes[self.compare])
        self.settings = [tuple(c) for c in product(*(list(study.axes[a]) for a in self.setting_axes))]
        self.baseline = study.report.get("baseline", self.levels[0])
        self.rows = [r for r in rows if r.get("status") == "complete"]
        self.by: dict[tuple[str, tuple[str, ...]], dict[int, dict[str, Any]]] = defaultdict(dict)
        for r in self.rows:
            key = (str(r[self.compare]), tuple(str(r[a]) for a in self.setting_axes))
            self.by[key][int(r["seed"])] = r

    def label(self, setting: tuple[str, ...]) -> str:
        return ", ".join(f"{a}={v}" for a, v in zip(self.setting_axes, setting)) or "all"

    def values(self, level: str, setting: tuple[str, ...], metric: str) -> dict[int, float]:
        return {s: r[metric] for s, r in self.by.get((level, setting), {}).items() if r.get(metric) is not None}

    def stat(self, level: str, setting: tuple[str, ...], metric: str) -> tuple[float, float, int]:
        return _stats(list(self.values(level, setting, metric).values()))

    def paired(self, level: str, other: str, setting: tuple[str, ...], metric: str) -> tuple[float, float, int]:
        a, b = self.values(level, setting, metric), self.values(other, setting, metric)
        return _stats([a[s] - b[s] for s in sorted(set(a) & set(b))])

    def metrics_present(self, metrics: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        return [(m, d) for m, d in metrics if any(r.get(m) is not None for r in self.rows)]


# --------------------------------------------------------------------------------------------------
# figures
# --------------------------------------------------------------------------------------------------


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def heatmap(grid: Grid, metric: str, title: str, path: Path, diff: bool = False) -> Path:
    plt = _plt()
    settings, levels = grid.settings, grid.levels
    mean = np.full((len(settings), len(levels)), np.nan)
    text = [["" for _ in levels] for _ in settings]
    for i, s in enumerate(settings):
        for j, lv in enumerate(levels):
            m, sd, n = grid.paired(lv, grid.baseline, s, metric) if diff else grid.stat(lv, s, metric)
            if n:
                mean[i, j] = 100 * m
                text[i][j] = f"{100 * m:+.2f}\n±{100 * sd:.2f}" if diff else f"{100 * m:.2f}\n±{100 * sd:.2f}"
    fig, ax = plt.subplots(figsize=(1.3 + 1.15 * len(levels), 0.9 + 0.62 * len(settings)))
    if diff:
        lim = np.nanmax(np.abs(mean)) if np.isfinite(mean).any() else 1.0
        im = ax.imshow(mean, cmap="RdBu", vmin=-lim, vmax=lim, aspect="auto")
    else:
        im = ax.imshow(mean, cmap="viridis", aspect="auto")
    for i in range(len(settings)):
        for j in range(len(levels)):
            if text[i][j]:
                ax.text(j, i, text[i][j], ha="center", va="center", fontsize=7,
                        color="black" if diff or mean[i, j] > np.nanmean(mean) else "white")
    ax.set_xticks(range(len(levels)), levels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(settings)), [grid.label(s) for s in settings], fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.04, label="percentage points" if diff else "accuracy (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _width_columns(rows: list[dict[str, Any]], prefix: str) -> list[str]:
    cols = {k[len(prefix):].removesuffix("_last5") for r in rows for k in r
            if k.startswith(prefix) and k[len(prefix):].startswith("w")}
    return sorted(cols, key=lambda w: -float(w[1:]))


def curves(grid: Grid, prefix: str, what: str, out_dir: Path) -> list[Path]:
    """Accuracy of every width (prefix 'acc_') or tier ('tier_') vs the schedule's expected width_q."""
    plt = _plt()
    widths = _width_columns(grid.rows, prefix)
    if not widths:
        return []
    first = grid.setting_axes[0] if grid.setting_axes else None
    groups: dict[str, list[tuple[str, ...]]] = defaultdict(list)
    for s in grid.settings:
        groups[s[0] if first else "all"].append(s)
    colors = plt.get_cmap("viridis")(np.linspace(0, 0.9, len(widths)))
    paths = []
    for head, settings in groups.items():
        fig, axes = plt.subplots(1, len(settings), figsize=(4.2 * len(settings), 3.6), squeeze=False,
                                 sharey=False)
        for ax, s in zip(axes[0], settings):
            for w, color in zip(widths + ["deployed"], list(colors) + ["black"]):
                metric = f"deployed_acc{grid.suffix}" if w == "deployed" else f"{prefix}{w}{grid.suffix}"
                if w == "deployed" and prefix != "acc_":
                    continue
                family, others = [], []
                for lv in grid.levels:
                    m, sd, n = grid.stat(lv, s, metric)
                    q, _, _ = grid.stat(lv, s, "width_q")
                    if not n:
                        continue
                    cell = next(iter(grid.by[(lv, s)].values()))
                    name = cell.get("width_schedule", cell.get("width_policy", ""))  # older studies: width_policy
                    (family if name in MIXTURE_FAMILY else others).append((q, m, sd, lv, name))
                family.sort()
                label = "deployed" if w == "deployed" else f"{what} {w[1:]}"
                if family:
                    ax.errorbar([f[0] for f in family], [100 * f[1] for f in family],
                                yerr=[100 * f[2] for f in family], color=color, marker="o", ms=3, capsize=2,
                                lw=1.6 if w == "deployed" else 1.0, label=label)
                for q, m, sd, lv, name in others:
                    ax.errorbar([q], [100 * m], yerr=[100 * sd], color=color, marker=MARKERS.get(name, "x"),
                                ms=7, capsize=2, ls="none", label=None if family else label)
                    if w == widths[-1]:
                        ax.annotate(lv, (q, 100 * m), fontsize=6, xytext=(3, -8), textcoords="offset points")
            ax.set_title(grid.label(s), fontsize=8)
            ax.set_xlabel("width_q: share of samples trained below the client's max", fontsize=7)
            ax.grid(alpha=0.3)
            ax.tick_params(labelsize=7)
        axes[0][0].set_ylabel(f"{what} accuracy, {grid.when} (%)", fontsize=7)
        labelled = max(axes[0], key=lambda a: len(a.get_legend_handles_labels()[1]))
        if labelled.get_legend_handles_labels()[1]:
            labelled.legend(fontsize=6, loc="best")
        fig.suptitle(f"{what} accuracy vs width_q, {first}={head} (lines: max and mixture(q))", fontsize=8)
        fig.tight_layout()
        path = out_dir / f"curves_{prefix.rstrip('_')}_{head}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------------
# markdown
# --------------------------------------------------------------------------------------------------


def _table(grid: Grid, metric: str) -> list[str]:
    head = f"| setting | {' | '.join(grid.levels)} | best − {grid.baseline} (paired) | best − runner-up (paired) |"
    lines = [head, "|" + "---|" * (len(grid.levels) + 3)]
    for s in grid.settings:
        stats = {lv: grid.stat(lv, s, metric) for lv in grid.levels}
        ranked = sorted((v[0], lv) for lv, v in stats.items() if v[2])
        best = ranked[-1][1] if ranked else None
        cells = []
        for lv in grid.levels:
            m, sd, n = stats[lv]
            txt = _pct(m, sd, n)
            cells.append(f"**{txt}**" if lv == best else txt)
        gap_base = gap_next = "–"
        if best is not None:
            m, sd, n = grid.paired(best, grid.baseline, s, metric)
            gap_base = f"{best}: {100 * m:+.2f} ± {100 * sd:.2f} (n={n})" if n and best != grid.baseline else best
            if len(ranked) > 1:
                m, sd, n = grid.paired(best, ranked[-2][1], s, metric)
                gap_next = f"vs {ranked[-2][1]}: {100 * m:+.2f} ± {100 * sd:.2f} (n={n})" if n else "–"
        lines.append(f"| {grid.label(s)} | {' | '.join(cells)} | {gap_base} | {gap_next} |")
    return lines


def _wins(grid: Grid, metric: str) -> list[str]:
    count: dict[str, int] = defaultdict(int)
    for s in grid.settings:
        ranked = sorted((grid.stat(lv, s, metric)[0], lv) for lv in grid.levels if grid.stat(lv, s, metric)[2])
        if ranked:
            count[ranked[-1][1]] += 1
    overall = []
    for lv in grid.levels:
        diffs = [grid.paired(lv, grid.baseline, s, metric)[0] for s in grid.settings
                 if grid.paired(lv, grid.baseline, s, metric)[2]]
        overall.append((lv, count.get(lv, 0), float(np.mean(diffs)) if diffs else float("nan")))
    lines = [f"| {grid.compare} | settings won | mean paired difference to {grid.baseline} over settings (pp) |",
             "|---|---|---|"]
    lines += [f"| {lv} | {n} | {100 * d:+.2f} |" if np.isfinite(d) else f"| {lv} | {n} | – (no paired cell) |"
              for lv, n, d in overall]
    return lines


def _runtime(sweep_dir: Path, rows: list[dict[str, Any]]) -> list[str]:
    cell_s = [r["wall_time_s"] for r in rows if r.get("wall_time_s") is not None]
    lines = [f"- cells' own wall time: {sum(cell_s) / 3600:.2f} h in total over {len(cell_s)} runs "
             f"(mean {np.mean(cell_s) if cell_s else 0:.0f} s, max {max(cell_s) if cell_s else 0:.0f} s)"]
    log_path = sweep_dir / SWEEP_LOG
    if log_path.is_file():
        log = json.loads(log_path.read_text())
        inv = log.get("invocations", [])
        lines.append(f"- `hetfl sweep` wall clock: {log.get('wall_s_total', 0) / 3600:.2f} h over {len(inv)} "
                     f"invocation(s) (workers: {', '.join(str(i.get('workers')) for i in inv)}; first started "
                     f"{inv[0]['started'] if inv else '?'}, last finished {inv[-1]['finished'] if inv else '?'})")
    return lines


def _setup(study: Study) -> str:
    b = study.base
    data, model, algo = b.get("data", {}), b.get("model", {}), b.get("algorithm", {})
    part = data.get("partition", {})
    sets = ", ".join(f"`{s}`" for s in study.sets)
    clients = f"{data['num_clients']} clients" if data.get("num_clients") else "one client per natural group"
    return (f"{data.get('name', '?')} · model `{model.get('name', '?')}` "
            f"({', '.join(f'{k}={v}' for k, v in model.items() if k != 'name') or 'defaults'}) · "
            f"{clients}, "
            f"{algo.get('clients_per_round', '?')} per round · partition "
            f"`{part.get('name', '?')}` · {b.get('rounds', '?')} rounds"
            + (f" · study overrides {sets}" if sets else ""))


def write_report(sweep_dir: str | Path, out: str | Path | None = None,
                 metrics: Sequence[tuple[str, str]] | None = None) -> Path:
    """Write ``report.md`` (and PNGs under ``report/``) for the sweep in ``sweep_dir``; returns the path."""
    sweep_dir = Path(sweep_dir)
    if not (sweep_dir / CELLS).is_dir():
        raise HetflError(f"{str(sweep_dir)!r} is not a sweep directory (no {CELLS}/); run `hetfl sweep STUDY.toml "
                         f"--out {sweep_dir}` first")
    study = load_study(sweep_dir)
    rows = collect(sweep_dir, study)
    write_results(sweep_dir, study)
    grid = Grid(study, rows)
    if not grid.rows:
        raise HetflError(f"{sweep_dir}: no complete cell yet; nothing to report")
    md_path = Path(out) if out else sweep_dir / "report.md"
    img_dir = md_path.parent / "report"
    img_dir.mkdir(parents=True, exist_ok=True)
    if metrics is None:
        wanted = study.report.get("metrics")
        metrics = [(m, m) for m in wanted] if wanted else [(m + grid.suffix, f"{d}, {grid.when}")
                                                          for m, d in DEFAULT_METRICS]
    metrics = grid.metrics_present(metrics)

    def rel(p: Path) -> str:
        return p.relative_to(md_path.parent).as_posix()

    seeds = sorted({int(r["seed"]) for r in grid.rows})
    lines = [f"# Sweep report: {study.name}", "",
             f"{len(grid.rows)} of {len(rows)} cells complete; seeds {', '.join(map(str, seeds))}. "
             f"Setup: {_setup(study)}.", "",
             f"Entries are mean ± sample standard deviation over seeds, in % (accuracy) or percentage points "
             f"(differences); paired differences subtract the `{grid.baseline}` cell of the same seed (same "
             f"partition, fleet and initial model). With 2-3 seeds a difference smaller than about twice its "
             f"standard deviation is not evidence.", "", "## Runtime", "", *_runtime(sweep_dir, rows), ""]
    for metric, desc in metrics:
        hm = heatmap(grid, metric, f"{desc}\n{metric}, mean ± std over seeds", img_dir / f"heatmap_{metric}.png")
        hd = heatmap(grid, metric, f"{metric}: paired difference to {grid.baseline} (pp)",
                     img_dir / f"heatmap_{metric}_vs_{grid.baseline}.png", diff=True)
        lines += [f"## {desc} (`{metric}`)", "", *_table(grid, metric), "", *_wins(grid, metric), "",
                  f"![{metric}]({rel(hm)})", "", f"![{metric} vs {grid.baseline}]({rel(hd)})", ""]
    for prefix, what in (("acc_", "width"), ("tier_", "tier")):
        paths = curves(grid, prefix, what, img_dir)
        if paths:
            lines += [f"## Accuracy of every {what} vs width_q", ""]
            lines += [f"![{what} curves]({rel(p)})" for p in paths]
            lines.append("")
    lines += ["Curves: lines join `max` (width_q = 0) and the `mixture(q)` cells; markers: "
              + ", ".join(f"{k} {v}" for k, v in MARKERS.items()) + "; error bars: std over seeds.", ""]
    failed = [r["cell"] for r in rows if r.get("status") not in ("complete", "missing")]
    missing = [r["cell"] for r in rows if r.get("status") == "missing"]
    if failed or missing:
        lines += ["## Incomplete cells", ""]
        lines += [f"- {c}: not complete" for c in failed] + [f"- {c}: not run yet" for c in missing]
        lines.append("")
    lines += ["The table of every cell is `results.csv`; each cell is an ordinary run directory under `cells/`.", ""]
    atomic_write_text(md_path, "\n".join(lines))
    return md_path
