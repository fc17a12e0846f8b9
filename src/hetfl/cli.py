"""The ``hetfl`` command line: thin wrappers over the library.

    hetfl run CONFIG [--set k=v ...] [--out DIR] [--resume DIR] [--seed N] [--device cpu|cuda] [--workers N|auto]
              [--quiet]
    hetfl list
    hetfl plot [DIR ...] [--out DIR]          (no DIR: every run under runs/)
    hetfl summary [DIR ...]
    hetfl sweep STUDY.toml [--workers N] [--out DIR]
    hetfl report SWEEP_DIR [--out FILE]

A user error (bad config, missing data, ...) prints one paragraph on stderr and exits with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetfl.catalog import REGISTRIES
from hetfl.config import apply_overrides, parse_toml
from hetfl.errors import HetflError
from hetfl.plot import plot_runs, summary_table
from hetfl.registry import describe
from hetfl.report import write_report
from hetfl.resolve import config_from_dict, load_config
from hetfl.results import CONFIG, METRICS, RunDir
from hetfl.runner import _merge_resume, run
from hetfl.sweep import load_study, run_sweep

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: `--worker 2` must not silently mean `--workers 2`
    p = argparse.ArgumentParser(prog="hetfl", description="Federated learning across heterogeneous devices.",
                                allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser("run", allow_abbrev=False, help="run (or resume) an experiment from a TOML config")
    r.add_argument("config", nargs="?", help="TOML config file (optional with --resume)")
    r.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set rounds=50 --set data.partition.alpha=0.3")
    r.add_argument("--out", help="run directory to create (default: runs/<name>-<timestamp>)")
    r.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    r.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    r.add_argument("--device", help="cpu or cuda[:N] (shorthand for --set device=...)")
    r.add_argument("--engine", help="simulator (default, in-process), flower, or torchrun (decentralized algorithms: "
                                    "one process per node; also under torchrun) (shorthand for --set engine.name=...)")
    r.add_argument("--data-dir", help="where to read datasets from (shorthand for --set data.data_dir=...)")
    r.add_argument("--workers", help="worker processes that train a round's clients side by side: N >= 1, or auto "
                                     "(0 also means auto; default: the cores when a round's work pays for it, "
                                     "else 1 = in this process) (shorthand for --set engine.workers=...)")
    r.add_argument("--threads-per-worker", type=int, metavar="N",
                   help="torch threads in each worker process (default 1) "
                        "(shorthand for --set engine.threads_per_worker=N)")
    r.add_argument("--quiet", action="store_true", help="no progress bar or round messages; only the final line "
                                                         "(run directory, rounds, test accuracy, wall time) is printed")
    r.add_argument("--dry-run", action="store_true", help="load and validate the config (and --resume DIR) and stop: "
                                                           "nothing is trained, downloaded or written")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    sub.add_parser("list", allow_abbrev=False, help="list every registry: datasets, partitioners, models, algorithms")

    pl = sub.add_parser("plot", allow_abbrev=False, help="plot accuracy/loss vs round and vs bytes for run directories")
    pl.add_argument("runs", nargs="*", metavar="DIR", help="run directories (default: every run under runs/)")
    pl.add_argument("--out", help="folder for the PNGs (default: the first run directory)")

    s = sub.add_parser("summary", allow_abbrev=False, help="print a table of run directories' results")
    s.add_argument("runs", nargs="*", metavar="DIR", help="run directories (default: every run under runs/)")

    sw = sub.add_parser("sweep", allow_abbrev=False,
                        help="run a study grid (policy x fleet x ... x seed) in parallel, resumable")
    sw.add_argument("study", help="study TOML: a base config, grid axes of --set overrides, seeds")
    sw.add_argument("--workers", type=int, help="worker processes (default: the study's, else one per core)")
    sw.add_argument("--out", help="sweep directory (default: runs/sweeps/<study name>); rerun to resume")
    sw.add_argument("--dry-run", action="store_true", help="validate the study and every cell's config, run nothing")

    rp = sub.add_parser("report", allow_abbrev=False,
                        help="markdown report with heatmaps and curves for a sweep directory")
    rp.add_argument("sweep", metavar="SWEEP_DIR")
    rp.add_argument("--out", help="markdown file to write (default: SWEEP_DIR/report.md)")
    return p


def run_config(args: argparse.Namespace) -> Any:
    """The RunConfig that ``hetfl run ARGS`` would run (None: --resume of a folder that is not a run);
    one line on stderr per parameter dropped by a ``--set SECTION.name=...`` switch."""

    overrides = list(args.overrides)
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    if args.device:
        overrides.append(f'device="{args.device}"')
    if args.engine:
        overrides.append(f"engine.name={_toml_str(args.engine)}")
    if args.data_dir:
        overrides.append(f"data.data_dir={_toml_str(args.data_dir)}")
    if args.workers is not None:
        w = args.workers.strip()
        overrides.append(f"engine.workers={w if w.isdigit() else _toml_str(w)}")
    if args.threads_per_worker is not None:
        overrides.append(f"engine.threads_per_worker={args.threads_per_worker}")
    notes: list[str] = []
    if args.resume:
        if args.out:
            raise HetflError("--out and --resume exclude each other: a resumed run stays in its directory")
        saved = Path(args.resume) / CONFIG
        if args.config:
            cfg = load_config(args.config, overrides, notes=notes)
        elif saved.is_file():
            cfg = config_from_dict(apply_overrides(parse_toml(saved.read_text(), str(saved)), overrides))
        else:
            cfg = None  # run() reports the missing run directory
    else:
        if not args.config:
            raise HetflError("hetfl run needs a CONFIG file (e.g. configs/digits_fedavg.toml) or --resume DIR")
        cfg = load_config(args.config, overrides, notes=notes)
    for note in notes:
        print(f"hetfl run: {note}", file=sys.stderr)
    return cfg


def _cmd_run(args: argparse.Namespace) -> int:

    cfg = run_config(args)
    if args.dry_run:
        return _dry_run(cfg, args)
    summary = run(cfg, args.out, resume=args.resume, quiet=args.quiet, config_path=args.config)
    acc = summary.get("test_accuracy")
    acc_text = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
    print(f"{summary['run_dir']}  rounds={summary['rounds_completed']}  test_accuracy={acc_text}  "
          f"wall_time_s={summary['wall_time_s']:.1f}")
    participation = summary.get("participation_by_tier") or {}
    if any(v < 1 for v in participation.values()) or summary.get("rounds_skipped"):  # faults: make them visible
        tiers = " ".join(f"{k}={v:.2f}" for k, v in participation.items())
        print(f"  participation {tiers}  rounds_skipped={summary.get('rounds_skipped', 0)}  "
              f"rejected_invalid={summary.get('rejected_invalid', 0)}")
    return 0


def _dry_run(cfg: Any, args: argparse.Namespace) -> int:

    if args.resume:
        run_dir = RunDir(Path(args.resume))
        if not (run_dir.path / CONFIG).is_file():
            raise HetflError(f"{args.resume!r} is not a hetfl run directory (no {CONFIG}); nothing to resume")
        saved = config_from_dict(parse_toml((run_dir.path / CONFIG).read_text(), str(run_dir.path / CONFIG)))
        cfg = _merge_resume(saved, cfg)
    what = f"--resume {args.resume}" if args.resume else args.config
    print(f"{what}: valid (dataset {cfg.data.name}, partition {cfg.data.partition.name}, "
          f"model {cfg.model.name}, algorithm {cfg.algorithm.name}, {cfg.rounds} rounds, "
          f"engine {cfg.engine.name}); --dry-run: nothing trained or written")
    return 0


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _cmd_list(args: argparse.Namespace) -> int:

    for kind, reg in REGISTRIES.items():
        print(f"{kind}:")
        for name, obj in reg.items():
            doc = describe(obj)
            print(f"  {name:<16} {doc}" if doc else f"  {name}")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:

    for path in plot_runs(_runs_or_default(args.runs, "plot"), args.out):
        print(path)
    return 0


def _runs_or_default(runs: list[str], command: str) -> list[str]:
    """The given run directories, or every run directory under runs/ (said on stderr) when none is given."""
    if runs:
        return runs

    found = sorted(str(d) for d in Path("runs").glob("*")
                   if d.is_dir() and ((d / CONFIG).is_file() or (d / METRICS).is_file()))
    if not found:
        raise HetflError(f"hetfl {command} with no DIR reads runs/*, and there is no run directory under "
                         f"{str(Path('runs').resolve())!r}; name run directories, e.g. hetfl {command} runs/mine")
    print(f"hetfl {command}: no DIR given; using runs/* ({len(found)} run directories)", file=sys.stderr)
    return found


def _cmd_summary(args: argparse.Namespace) -> int:

    summary_table(_runs_or_default(args.runs, "summary"))
    return 0


def _cmd_sweep(args: argparse.Namespace) -> int:

    if args.workers is not None and args.workers < 1:
        raise HetflError(f"--workers must be >= 1, got {args.workers}")
    study = load_study(args.study)
    if args.dry_run:
        cells = study.cells()
        for c in cells:
            study.config(c)
        print(f"{args.study}: valid ({len(cells)} cells); --dry-run: nothing run or written")
        return 0
    result = run_sweep(study, args.out or Path("runs") / "sweeps" / study.name, workers=args.workers)
    return 1 if result["failed"] else 0


def _cmd_report(args: argparse.Namespace) -> int:

    print(write_report(args.sweep, args.out))
    return 0


COMMANDS = {"run": _cmd_run, "list": _cmd_list, "plot": _cmd_plot, "summary": _cmd_summary,
            "sweep": _cmd_sweep, "report": _cmd_report}


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse; an unknown option is reported by its own subcommand's usage, with the closest option named."""
    import difflib

    parser = _parser()
    args, extra = parser.parse_known_args(argv)
    if not extra:
        return args
    sub = next(a for a in parser._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))  # type: ignore[union-attr]
    cmd_parser = sub.choices[args.command]
    options = [o for action in cmd_parser._actions for o in action.option_strings]
    hints = []
    for word in extra:
        if word.startswith("-"):
            close = difflib.get_close_matches(word.split("=", 1)[0], options, n=1)
            if close:
                hints.append(f"{word} (did you mean {close[0]}?)")
    cmd_parser.error(f"unrecognized arguments: {' '.join(extra)}" + (f"; {'; '.join(hints)}" if hints else ""))
    raise AssertionError("unreachable")  # pragma: no cover


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(argv)
    try:
        return COMMANDS[args.command](args)
    except HetflError as exc:
        if args.debug:
            raise
        print(f"hetfl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("hetfl: interrupted; resume with `hetfl run --resume RUN_DIR`", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
