"""Sweeps: a grid of ordinary runs from one study file, run in parallel worker processes, resumable, one table.

A study file is TOML::

    name = "width-sampling-mnist"
    seeds = [0, 1]
    workers = 1                      # optional default for --workers (0 or absent: one per CPU core)
    set = ["rounds=20"]              # optional --set overrides applied to every cell
    base = "mnist_heterofl.toml"     # the base config: a path (relative to the study file) ...
    [base]                           # ... or the config itself, inline
    name = "..."

    [axes.policy]                    # axes in file order; every level is a list of --set overrides
    max = ['algorithm.width_schedule="max"']
    "mixture-0.25" = ['algorithm.width_schedule="mixture(q=0.25)"']
    [axes.fleet]
    balanced = ['fleet.mix="a-b-c-d"']

    [report]                         # optional: what `hetfl report` puts in rows / plots against
    rows = "policy"                  # default: the first axis

The grid is the product of every axis' levels and the seeds.  A cell's config is the base, then the
study's ``set``, then each axis' overrides in axis order, then ``seed=N``; every cell is validated before
anything runs.  Each cell is an ordinary :func:`hetfl.runner.run` in ``OUT/cells/<level>__...__s<seed>``,
so a cell whose ``summary.json`` says ``complete`` is skipped, an interrupted one resumes from its
checkpoint, and ``hetfl summary`` / ``hetfl plot`` work on any cell.  Cells run in a
``ProcessPoolExecutor`` (spawn) with one torch thread per worker; ``--workers 1`` runs them in this process.

``OUT/results.csv`` (rewritten after every finished cell) has one row per cell: the axis levels, the
seed, status, final and last-5-evaluation-mean accuracy of the global model, of every width (its prefix
submodel on the global test set) and of every capability tier (local test splits, when the runs have
them), the deployed accuracy (the mean over clients of the test accuracy of the width each client runs),
the width schedule's expected ``width_q`` and the wall time; with ``data.validation_fraction > 0`` also the
validation split's ``val_acc`` and ``deployed_val_acc`` (tune on those, never on the test columns), and
``mflops_<label>``: the forward MFLOPs per sample of every evaluated model (summary.json ``evaluated_models``),
and per fleet tier, whatever model serves it, ``deployed_tier_acc_w<width>_last5`` (the tier's clients' local
test splits) and ``deployed_tier_test_w<width>_last5`` (the global test set).
``OUT/sweep.json`` logs every invocation.
"""

from __future__ import annotations

import csv
import io
import json
import math
import multiprocessing
import os
import re
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass, field, replace
from datetime import datetime
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np

from hetfl import catalog
from hetfl.config import (
    RunConfig,
    apply_overrides,
    dump_toml,
    parse_toml,
    read_toml,
)
from hetfl.errors import ConfigError, HetflError
from hetfl.fleet import build_fleet
from hetfl.hetero.sampling import UniformWidth, plan_round
from hetfl.registry import split_entry
from hetfl.resolve import config_from_dict
from hetfl.results import CONFIG, PARTITION, atomic_write_text, read_metrics, read_summary, write_json
from hetfl.runner import run

STUDY_FILE = "study.toml"
RESULTS_CSV = "results.csv"
SWEEP_LOG = "sweep.json"
CELLS = "cells"
STUDY_KEYS = ("name", "base", "seeds", "set", "axes", "workers", "report")
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


@dataclass(frozen=True)
class Cell:
    """One grid point: its directory name, the level of every axis, the seed and its overrides."""

    name: str
    levels: tuple[tuple[str, str], ...]
    seed: int
    overrides: tuple[str, ...]


@dataclass(frozen=True)
class Study:
    name: str
    base: dict[str, Any]
    sets: tuple[str, ...]
    axes: dict[str, dict[str, tuple[str, ...]]]
    seeds: tuple[int, ...]
    workers: int = 0
    report: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    def cells(self) -> list[Cell]:
        """Every grid point, in run order: seed by seed, and within a seed every setting with all levels of the
        compared (first) axis together, so a partial sweep has complete comparisons."""
        out = []
        names = list(self.axes)
        for seed, rest, first in product(self.seeds, product(*(list(self.axes[a]) for a in names[1:])),
                                         list(self.axes[names[0]])):
            combo = (first, *rest)
            overrides = list(self.sets)
            for axis, level in zip(names, combo):
                overrides.extend(self.axes[axis][level])
            overrides.append(f"seed={seed}")
            dirname = "__".join(_SAFE.sub("_", level) for level in combo) + f"__s{seed}"
            out.append(Cell(dirname, tuple(zip(names, combo)), seed, tuple(overrides)))
        return out

    def config(self, cell: Cell) -> RunConfig:
        try:
            cfg = config_from_dict(apply_overrides(self.base, cell.overrides))
        except ConfigError as exc:
            raise ConfigError(f"study {self.source or self.name!r}, cell {cell.name}: {exc}") from None
        return replace(cfg, name=f"{self.name}/{cell.name}")

    def to_toml(self) -> str:
        """The study with its base inline (what OUT/study.toml holds, so `hetfl report` needs nothing else)."""
        head: dict[str, Any] = {"name": self.name, "seeds": list(self.seeds), "workers": self.workers,
                                "set": list(self.sets), "base": self.base}
        if self.report:
            head["report"] = self.report
        lines = [dump_toml(head).rstrip("\n")]
        for axis, levels in self.axes.items():
            lines.append(f"\n[axes.{_toml_key(axis)}]")
            lines += [f"{_toml_key(level)} = {_toml_list(sets)}" for level, sets in levels.items()]
        return "\n".join(lines) + "\n"


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def _toml_list(items: Sequence[str]) -> str:
    return "[" + ", ".join(json.dumps(s) for s in items) + "]"


def _str_list(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ConfigError(f"{where} must be a list of --set overrides (strings like 'rounds=20'), got {value!r}")
    return tuple(value)


def study_from_dict(raw: dict[str, Any], source: str = "<study>", base_dir: Path | None = None) -> Study:
    unknown = sorted(set(raw) - set(STUDY_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown key {unknown[0]!r}; a study has {', '.join(STUDY_KEYS)}")
    name = raw.get("name") or Path(source).stem
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: name must be a non-empty string, got {name!r}")
    base = raw.get("base", {})
    if isinstance(base, str):
        path = Path(base) if Path(base).is_absolute() or base_dir is None else base_dir / base
        base = read_toml(path)
    if not isinstance(base, dict):
        raise ConfigError(f"{source}: base must be a config file path or a [base] table, got {base!r}")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = [seeds]
    if (not isinstance(seeds, list) or not seeds
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ConfigError(f"{source}: seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{source}: seeds has duplicates: {seeds!r}")
    axes_raw = raw.get("axes", {})
    if not isinstance(axes_raw, dict):
        raise ConfigError(f"{source}: [axes] must be a table of axes, got {axes_raw!r}")
    axes: dict[str, dict[str, tuple[str, ...]]] = {}
    for axis, levels in axes_raw.items():
        if not isinstance(levels, dict) or not levels:
            raise ConfigError(f"{source}: [axes.{axis}] must map level names to lists of overrides, got {levels!r}")
        axes[axis] = {str(level): _str_list(sets, f"{source}: axes.{axis}.{level}") for level, sets in levels.items()}
    workers = raw.get("workers", 0)
    if not isinstance(workers, int) or isinstance(workers, bool) or workers < 0:
        raise ConfigError(f"{source}: workers must be an integer >= 0 (0 = one per core), got {workers!r}")
    report = raw.get("report", {})
    if not isinstance(report, dict):
        raise ConfigError(f"{source}: [report] must be a table, got {report!r}")
    if "rows" in report and report["rows"] not in axes:
        raise ConfigError(f"{source}: report.rows={report['rows']!r} is not an axis ({', '.join(axes)})")
    compared = report.get("rows", next(iter(axes), None))
    if "baseline" in report and compared is not None and str(report["baseline"]) not in axes[compared]:
        raise ConfigError(f"{source}: report.baseline={report['baseline']!r} is not a level of the compared axis "
                          f"{compared!r} ({', '.join(axes[compared])}); name one of them")
    study = Study(name.strip(), base, _str_list(raw.get("set", []), f"{source}: set"), axes, tuple(seeds), workers,
                  report, source)
    dirs = [c.name for c in study.cells()]
    if len(set(dirs)) != len(dirs):
        raise ConfigError(f"{source}: two cells map to the same directory name; make level names distinct")
    return study


def load_study(path: str | Path) -> Study:
    p = Path(path)
    if p.is_dir():
        p = p / STUDY_FILE
    return study_from_dict(read_toml(p), str(p), p.parent)


# --------------------------------------------------------------------------------------------------
# running
# --------------------------------------------------------------------------------------------------


def cell_state(run_dir: Path, cfg: RunConfig) -> str:
    """``"complete"`` (skip), ``"resume"`` (a run directory exists) or ``"new"``; raises for a directory that
    holds a run of a different config (the study changed under it)."""
    if not (run_dir / CONFIG).is_file():
        return "new"
    saved = config_from_dict(parse_toml((run_dir / CONFIG).read_text(encoding="utf-8"), str(run_dir / CONFIG)))
    # execution settings (how many rounds to go, where and in how many processes) may differ; the run may not
    # (every [engine] knob but the engine's name: processes, threads, timeouts, batching)
    execution = {"rounds": saved.rounds, "device": saved.device, "engine": replace(saved.engine, name=cfg.engine.name)}
    if replace(cfg, **execution) != saved:
        raise HetflError(f"{run_dir} holds a run of a different config than the study's cell; delete it or "
                         f"write the sweep to another --out")
    summary = read_summary(run_dir) or {}
    if summary.get("status") == "complete" and summary.get("rounds_completed", 0) >= cfg.rounds:
        return "complete"
    return "resume"


def _init_worker(parent: int | None = None, interval: float = 1.0) -> None:
    import torch

    torch.set_num_threads(1)
    if parent is not None:
        threading.Thread(target=_exit_with_parent, args=(parent, interval), daemon=True).start()


def _exit_with_parent(parent: int, interval: float) -> None:
    """A worker whose sweep process is gone (killed, SIGTERM: no clean shutdown reaches the pool) stops too,
    instead of finishing its cell unseen and writing into a run directory a rerun may be using."""
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(1)


def run_cell(job: dict[str, Any]) -> dict[str, Any]:
    """Run (or resume) one cell; never raises: failures come back as ``{"error": ...}``."""

    t0 = time.perf_counter()
    out: dict[str, Any] = {"cell": job["cell"], "error": None}
    try:
        cfg = config_from_dict(parse_toml(job["config"], job["cell"]))
        if job.get("in_pool") and cfg.engine.workers in ("auto", 0):
            cfg = cfg.with_engine(workers=1)  # the sweep already runs cells side by side: no nested worker pools
        run_dir = Path(job["dir"])
        if job["state"] == "resume":
            summary = run(cfg, resume=run_dir, quiet=True)
        else:
            summary = run(cfg, run_dir, quiet=True)
        out.update(status=summary.get("status"), test_accuracy=summary.get("test_accuracy"))
    except HetflError as exc:
        out["error"] = str(exc)
    except Exception as exc:  # noqa: BLE001 - one broken cell must not stop the others
        out["error"] = f"{type(exc).__name__}: {exc}\n{traceback.format_exc(limit=6)}"
    out["seconds"] = time.perf_counter() - t0
    return out


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


def run_sweep(study: Study, out: str | Path, *, workers: int | None = None,
              log: Callable[[str], None] | None = print) -> dict[str, Any]:
    """Run every unfinished cell of ``study`` into ``out``; returns what happened (and writes results.csv)."""
    out = Path(out)
    say = log or (lambda _msg: None)
    cells = study.cells()
    configs = {c.name: study.config(c) for c in cells}  # validates every cell before anything runs
    out.mkdir(parents=True, exist_ok=True)
    (out / CELLS).mkdir(exist_ok=True)
    atomic_write_text(out / STUDY_FILE, study.to_toml())
    jobs, skipped = [], []
    for c in cells:
        run_dir = out / CELLS / c.name
        state = cell_state(run_dir, configs[c.name])
        if state == "complete":
            skipped.append(c.name)
            continue
        jobs.append({"cell": c.name, "dir": str(run_dir), "config": configs[c.name].to_toml(), "state": state})
    n_workers = workers if workers is not None and workers > 0 else (study.workers or default_workers())
    n_workers = max(1, min(n_workers, len(jobs) or 1))
    say(f"sweep {study.name}: {len(cells)} cells, {len(skipped)} already complete, {len(jobs)} to run "
        f"on {n_workers} worker{'s' if n_workers > 1 else ''} -> {out}")
    started = datetime.now().isoformat(timespec="seconds")
    t0 = time.perf_counter()
    failed: dict[str, str] = {}
    done = 0

    def finished(res: dict[str, Any]) -> None:
        nonlocal done
        done += 1
        left = _time_left(time.perf_counter() - t0, done, len(jobs))
        if res["error"]:
            failed[res["cell"]] = res["error"]
            say(f"[{done}/{len(jobs)}] {res['cell']}: FAILED after {res['seconds']:.0f}s: "
                f"{res['error'].splitlines()[0]}{left}")
        else:
            acc = res.get("test_accuracy")
            shown = f" test_accuracy={acc:.4f}" if isinstance(acc, float) else ""
            say(f"[{done}/{len(jobs)}] {res['cell']}: {res.get('status')}{shown} ({res['seconds']:.0f}s){left}")
        write_results(out, study)

    try:
        if n_workers == 1:
            import torch

            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                for job in jobs:
                    finished(run_cell(job))
            finally:
                torch.set_num_threads(threads)
        elif jobs:
            _run_pool([{**job, "in_pool": True} for job in jobs], n_workers, finished)
    finally:
        elapsed = time.perf_counter() - t0
        _log_invocation(out, {"started": started, "finished": datetime.now().isoformat(timespec="seconds"),
                              "wall_s": round(elapsed, 1), "workers": n_workers, "cells": len(cells),
                              "ran": done, "skipped": len(skipped), "failed": sorted(failed)})
        write_results(out, study)
    say(f"sweep {study.name}: {done - len(failed)} ran, {len(skipped)} skipped, {len(failed)} failed "
        f"in {elapsed:.0f}s; table {out / RESULTS_CSV}")
    return {"cells": len(cells), "ran": done, "skipped": skipped, "failed": failed, "wall_s": elapsed,
            "results": out / RESULTS_CSV}


def _time_left(elapsed: float, done: int, total: int) -> str:
    """``", ~12 min left"``: the remaining cells at the pace of the finished ones (wall time, all workers)."""
    if done >= total or done == 0:
        return ""
    seconds = elapsed / done * (total - done)
    return f", ~{seconds / 3600:.1f} h left" if seconds >= 5400 else f", ~{max(1, round(seconds / 60))} min left"


def _run_pool(jobs: list[dict[str, Any]], n_workers: int, finished: Callable[[dict[str, Any]], None]) -> None:
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=n_workers, mp_context=ctx, initializer=_init_worker,
                             initargs=(os.getpid(),)) as pool:
        names: dict[Future, str] = {pool.submit(run_cell, job): job["cell"] for job in jobs}
        pending: set[Future] = set(names)
        try:
            while pending:
                complete, pending = wait(pending, return_when=FIRST_COMPLETED)
                for fut in complete:
                    try:
                        finished(fut.result())
                    except Exception as exc:  # noqa: BLE001 - a dead worker process (killed, out of memory)
                        finished({"cell": names.get(fut, "?"), "error": f"worker died: {exc!r}", "seconds": 0.0})
        except BaseException:
            for fut in pending:
                fut.cancel()
            raise


def _log_invocation(out: Path, entry: dict[str, Any]) -> None:
    path = out / SWEEP_LOG
    log = json.loads(path.read_text()) if path.is_file() else {"invocations": []}
    log["invocations"].append(entry)
    log["wall_s_total"] = round(sum(e["wall_s"] for e in log["invocations"]), 1)
    write_json(path, log)


# --------------------------------------------------------------------------------------------------
# the results table
# --------------------------------------------------------------------------------------------------


def _label_rate(label: str) -> float:
    return 1.0 if label == "global" else float(label[1:])


def _width_key(rate: float) -> str:
    return f"w{rate:g}"


def _acc_key(row: dict[str, Any], rate: float) -> str:
    """The metrics key of width ``rate``'s test accuracy in one eval row: the full width is the global model
    (``test_accuracy``) unless the run logs it per tier (decentralized runs, whose ``test_accuracy`` is the
    mean over every node)."""
    key = f"test_accuracy.{_width_key(rate)}"
    return key if rate != 1.0 or key in row else "test_accuracy"


def _last5(values: list[float]) -> float | None:
    return float(np.mean(values[-5:])) if values else None


def _algorithm(cfg: RunConfig) -> Any:

    return catalog.ALGORITHMS.get(cfg.algorithm.name, "algorithm.name")(**dict(cfg.algorithm.params))


def _fleet_shares(run_dir: Path, cfg: RunConfig, ordered: bool = False) -> tuple[dict[float, float], float]:
    """Share of clients whose maximum (deployed) width is each level: the fleet rebuilt from the run's config
    and its partition's client sizes (the same fleet the run used).  Also, for FjORD's per-minibatch draws
    (``ordered``), the expected share of training steps below the client's maximum (its ``width_q``)."""

    part = json.loads((run_dir / PARTITION).read_text(encoding="utf-8"))
    sizes = np.asarray(part["sizes"])
    fleet = build_fleet(cfg.fleet, len(sizes), cfg.seed, sizes=sizes)
    shares = {float(w): float(np.mean(np.isclose(fleet.max_width, w))) for w in fleet.levels}
    q = 0.0
    if ordered and fleet.heterogeneous:
        q = plan_round(UniformWidth(), levels=fleet.levels, max_width=fleet.max_width, fixed_max_width=fleet.max_width,
                       samples=sizes * max(cfg.train.epochs, 1), buffers={}, seed=cfg.seed, rnd=1).expected_q()
    return shares, q


def cell_row(study: Study, cell: Cell, run_dir: Path) -> dict[str, Any]:
    """One results-table row from a cell's run directory (missing runs give status 'missing')."""
    row: dict[str, Any] = {"cell": cell.name, **dict(cell.levels), "seed": cell.seed}
    cfg = study.config(cell)
    algo = _algorithm(cfg)
    schedule = getattr(algo, "width_schedule", "")
    schedule = split_entry(schedule, "algorithm.width_schedule")[0] if schedule else ""  # its name
    ordered = bool(getattr(algo, "ordered", False))
    row.update(algorithm=cfg.algorithm.name, width_schedule="fjord" if ordered and schedule == "max" else schedule)
    summary = read_summary(run_dir)
    rows = read_metrics(run_dir)
    if summary is None or not rows:
        row["status"] = "missing"
        return row
    evals = [r for r in rows if r.get("test_accuracy") is not None]
    row.update(status=summary.get("status"), rounds=cfg.rounds, rounds_completed=summary.get("rounds_completed"),
               wall_time_s=summary.get("wall_time_s"))
    if not evals:
        return row
    shares, ordered_q = _fleet_shares(run_dir, cfg, ordered) if (run_dir / PARTITION).is_file() else ({1.0: 1.0}, 0.0)
    levels = sorted(shares, reverse=True)
    row["test_accuracy"] = evals[-1]["test_accuracy"]
    row["test_accuracy_last5"] = _last5([r["test_accuracy"] for r in evals])
    row["best_test_accuracy"] = max(r["test_accuracy"] for r in evals)
    per_eval_deployed = []
    for r in evals:
        accs = {w: r.get(_acc_key(r, w)) for w in levels}
        if all(v is not None for v in accs.values()):
            per_eval_deployed.append(sum(shares[w] * accs[w] for w in levels))
    if per_eval_deployed:
        row["deployed_acc"] = per_eval_deployed[-1]
        row["deployed_acc_last5"] = _last5(per_eval_deployed)
    for w in levels:
        vals = [r[k] for r in evals if r.get(k := _acc_key(r, w)) is not None]
        if vals:
            row[f"acc_{_width_key(w)}"] = vals[-1]
            row[f"acc_{_width_key(w)}_last5"] = _last5(vals)
        tkey = "tier_acc.global" if w == 1.0 else f"tier_acc.{_width_key(w)}"
        tvals = [r[tkey] for r in evals if r.get(tkey) is not None]
        if tvals:
            row[f"tier_{_width_key(w)}"] = tvals[-1]
            row[f"tier_{_width_key(w)}_last5"] = _last5(tvals)
    narrow = levels[-1]
    if f"acc_{_width_key(narrow)}" in row:
        row["acc_narrowest"] = row[f"acc_{_width_key(narrow)}"]
        row["acc_narrowest_last5"] = row[f"acc_{_width_key(narrow)}_last5"]
    for key, col in (("deployed_accuracy", "deployed_acc"), ("smallest_accuracy", "acc_narrowest"),
                     ("deployed_client_acc_worst10", "worst10_acc"), ("val_accuracy", "val_acc"),
                     ("deployed_val_accuracy", "deployed_val_acc")):  # val_*: data.validation_fraction > 0 only
        vals = [r[key] for r in evals if r.get(key) is not None]  # the evaluator's, for depth and capacity levels
        if vals and col not in row:
            row[col], row[f"{col}_last5"] = vals[-1], _last5(vals)
    for key in (k for k in evals[-1] if k.startswith(("deployed_tier_acc.", "deployed_tier_test."))):
        vals = [r[key] for r in evals if r.get(key) is not None]  # per fleet tier, whatever model serves it
        row[f"{key.replace('.', '_', 1)}_last5"] = _last5(vals)
    for key in (k for k in evals[-1] if k.startswith("test_accuracy.prefix_")):  # eval_window = "trained"
        vals = [r[key] for r in evals if r.get(key) is not None]  # the prefix score beside the trained window
        row[f"prefix_acc_{key[len('test_accuracy.prefix_'):]}_last5"] = _last5(vals)
    for label, model in (summary.get("evaluated_models") or {}).items():  # each evaluated model's inference cost
        row[f"mflops_{label}"] = model["forward_flops"] / 1e6
    qs = [r["width_q"] for r in rows if r.get("width_q") is not None]
    row["width_q"] = float(np.mean(qs)) if qs else ordered_q
    for w in levels:
        vals = [r[f"width_share.{_width_key(w)}"] for r in rows if r.get(f"width_share.{_width_key(w)}") is not None]
        if vals:
            row[f"share_{_width_key(w)}"] = float(np.mean(vals))
    row["deploy_shares"] = " ".join(f"{w:g}:{shares[w]:.3f}" for w in levels)
    row["run_dir"] = str(run_dir)
    return row


def collect(out: str | Path, study: Study | None = None) -> list[dict[str, Any]]:
    out = Path(out)
    study = study or load_study(out)
    return [cell_row(study, c, out / CELLS / c.name) for c in study.cells()]


def write_results(out: str | Path, study: Study | None = None) -> Path:
    """Rewrite OUT/results.csv from the cells' run directories."""
    out = Path(out)
    rows = collect(out, study)
    columns: list[str] = []
    for r in rows:
        columns.extend(k for k in r if k not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: _fmt(v) for k, v in r.items()})
    atomic_write_text(out / RESULTS_CSV, buf.getvalue())
    return out / RESULTS_CSV


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return v


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """results.csv back as dicts; numbers parsed, empty cells None."""
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        for r in csv.DictReader(f):
            rows.append({k: _parse(v) for k, v in r.items()})
    return rows


def _parse(v: str | None) -> Any:
    if v is None or v == "":
        return None
    try:
        return int(v)
    except ValueError:
        pass
    try:
        return float(v)
    except ValueError:
        return v
