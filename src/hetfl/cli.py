"""The ``hetfl`` command line: thin wrappers over the library.

    hetfl run CONFIG [--set k=v ...] [--out DIR] [--resume DIR] [--seed N] [--device cpu|cuda] [--workers N|auto]
              [--quiet]
    hetfl list [ENTRY]                        (ENTRY: its parameters and defaults, e.g. hetfl list heterofl)
    hetfl plot [DIR ...] [--out DIR]          (no DIR: every run under runs/; --out default: plots/)
    hetfl summary [DIR ...]
    hetfl sweep STUDY.toml [--workers N] [--out DIR]
    hetfl report SWEEP_DIR [--out FILE]

``hetfl --version`` prints the version.  A user error (bad config, missing data, ...) prints one paragraph on
stderr and exits with code 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hetfl.catalog import REGISTRIES
from hetfl.config import apply_overrides, parse_toml
from hetfl.data.fetch import no_downloads
from hetfl.errors import HetflError
from hetfl.plot import plot_runs, summary_table
from hetfl.registry import describe
from hetfl.report import write_report
from hetfl.resolve import config_from_dict, load_config
from hetfl.results import CONFIG, METRICS, RunDir, config_text, read_summary
from hetfl.runner import _merge_resume, prepare, run
from hetfl.sweep import load_study, run_sweep

EXIT_USER_ERROR = 2


def _parser() -> argparse.ArgumentParser:
    # allow_abbrev=False everywhere: `--worker 2` must not silently mean `--workers 2`
    p = argparse.ArgumentParser(prog="hetfl", description="Federated learning across heterogeneous devices.",
                                allow_abbrev=False)
    p.add_argument("--debug", action="store_true", help="show tracebacks for user errors")
    p.add_argument("--version", action="version", version=f"hetfl {_version()}")
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
    r.add_argument("--dry-run", action="store_true", help="make every check the run makes before it starts (config, "
                                                           "--resume DIR, data, partition, models, fleet), print the "
                                                           "resolved config and stop: nothing is trained or written")
    r.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    ls = sub.add_parser("list", allow_abbrev=False,
                        help="list every registry (datasets, partitioners, models, algorithms, ...), or one entry's "
                             "parameters and defaults: hetfl list heterofl")
    ls.add_argument("entry", nargs="?", metavar="ENTRY", help="an entry's name: show where it is set, its parameters "
                                                               "and their defaults")

    pl = sub.add_parser("plot", allow_abbrev=False,
                        help="plot run directories: accuracy vs rounds, bytes and FLOPs, train and test loss, per "
                             "width / tier / deployed accuracy, epsilon of private runs")
    pl.add_argument("runs", nargs="*", metavar="DIR", help="run directories (default: every run under runs/)")
    pl.add_argument("--out", help="folder for the PNGs (default: plots/ in the current directory)")

    s = sub.add_parser("summary", allow_abbrev=False, help="print a table of run directories' results")
    s.add_argument("runs", nargs="*", metavar="DIR", help="run directories (default: every run under runs/)")

    sw = sub.add_parser("sweep", allow_abbrev=False,
                        help="run a study grid (policy x fleet x ... x seed) in parallel, resumable")
    sw.add_argument("study", help="study TOML: a base config, grid axes of --set overrides, seeds")
    sw.add_argument("--workers", help="worker processes: N >= 1, or auto (0 also means auto: the study's "
                                      "workers, else one per core)")
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
        if overrides and not any(o.split("=", 1)[0].strip() == "name" for o in overrides):
            cfg = cfg.replace(name=run_name(cfg, load_config(args.config)))
    for note in notes:
        print(f"hetfl run: {note}", file=sys.stderr)
    return cfg


#: What a run's name says: an override of any of these renames the run (``run_name``).
IDENTITY = (("data", "name"), ("data", "partition", "name"), ("model", "name"), ("algorithm", "name"),
            ("fleet", "source"), ("fleet", "mix"))


def auto_name(cfg: Any) -> str:
    """A run name read from the config: dataset-algorithm-model-partition[-fleet]."""
    parts = [cfg.data.name, cfg.algorithm.name, cfg.model.name, cfg.data.partition.name]
    if cfg.fleet.source == "phones":
        parts.append("phones")
    elif cfg.fleet.source == "tiers":
        parts.append(cfg.fleet.mix)
    return "-".join(str(p) for p in parts)


def run_name(cfg: Any, as_written: Any) -> str:
    """The name of a run of ``cfg``, which is ``as_written`` (the config file alone) plus ``--set`` overrides: the
    file's ``name`` while the overrides leave what a name says alone, else one read from the resolved config
    (``--set algorithm.name=fedrolex --set fleet.source=phones`` must not run as "...-heterofl-a-b-c-d-e")."""

    def get(c: Any, path: tuple[str, ...]) -> Any:
        for part in path:
            c = getattr(c, part)
        return c

    if cfg.name and all(get(cfg, k) == get(as_written, k) for k in IDENTITY):
        return cfg.name
    return auto_name(cfg)


def _cmd_run(args: argparse.Namespace) -> int:

    cfg = run_config(args)
    if args.dry_run:
        return _dry_run(cfg, args)
    warn_workers(cfg)
    done = read_summary(args.resume) if args.resume else None
    if done and done.get("status") == "complete" and cfg is not None and done.get("rounds_completed") == cfg.rounds:
        print(f"hetfl run: {args.resume} is already complete ({cfg.rounds} of {cfg.rounds} rounds); nothing to do. "
              f"Extend it with `hetfl run --resume {shlex.quote(args.resume)} --set rounds={2 * cfg.rounds}`",
              file=sys.stderr)
        summary = {**done, "run_dir": done.get("run_dir", args.resume)}
    else:
        summary = run(cfg, args.out, resume=args.resume, quiet=args.quiet, config_path=args.config)
    acc = summary.get("test_accuracy")
    acc_text = f"{acc:.4f}" if isinstance(acc, float) else "n/a"
    privacy = summary.get("privacy") or {}
    eps = privacy.get("epsilon")
    eps_text = "" if not privacy else (f"  epsilon={eps:.3f} (delta={privacy.get('delta')})"
                                       if isinstance(eps, (int, float)) else "  epsilon=inf (no guarantee)")
    print(f"{summary['run_dir']}  rounds={summary['rounds_completed']}  test_accuracy={acc_text}  "
          f"wall_time_s={summary['wall_time_s']:.1f}{eps_text}")
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
    warn_workers(cfg)
    checked = "data, partition, models, fleet and privacy checked"
    with no_downloads("--dry-run downloads nothing") as refused:
        try:  # every check the real run makes before it writes anything
            prepare(cfg)
        except HetflError:
            if not refused:
                raise
            checked = (f"the data is not on this machine ({refused[0]} would be downloaded), so the checks that "
                       f"need it (partition, models on the data, fleet) run when `hetfl run` has it")
    what = f"--resume {args.resume}" if args.resume else args.config
    print(config_text(cfg), end="")
    print(f"# {what}: valid (dataset {cfg.data.name}, partition {cfg.data.partition.name}, "
          f"model {cfg.model.name}, algorithm {cfg.algorithm.name}, {cfg.rounds} rounds, "
          f"engine {cfg.engine.name}); {checked}; --dry-run: the resolved config above, nothing trained or written")
    return 0


def warn_workers(cfg: Any) -> None:
    """One line on stderr when ``workers`` asks for more processes than this process has cores: they would
    share the cores, each round slower rather than faster."""
    from hetfl.engines.workers import available_cores

    workers = cfg.engine.workers if cfg is not None else "auto"
    cores = available_cores()
    if isinstance(workers, int) and workers > cores:
        print(f"hetfl run: warning: workers={workers} is more than the {cores} core(s) this process may use; up to "
              f"{workers} processes (at most one per client of a round) would share them, each round slower rather "
              f"than faster. Use --workers auto, or at most {cores}", file=sys.stderr)


def _toml_str(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _version() -> str:
    """The installed distribution's version (the package's own when it runs from a source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    from hetfl import __version__

    try:
        return version("hetfl")
    except PackageNotFoundError:  # pragma: no cover
        return __version__


def _cmd_list(args: argparse.Namespace) -> int:

    if args.entry:
        from hetfl.reference import describe_entry

        print(describe_entry(args.entry))
        return 0
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

    workers = _sweep_workers(args.workers)
    study = load_study(args.study)
    if args.dry_run:
        cells = study.cells()
        for c in cells:
            study.config(c)
        print(f"{args.study}: valid ({len(cells)} cells); --dry-run: nothing run or written")
        return 0
    result = run_sweep(study, args.out or Path("runs") / "sweeps" / study.name, workers=workers)
    return 1 if result["failed"] else 0


def _sweep_workers(text: str | None) -> int | None:
    """``hetfl sweep --workers``: N >= 1 cells side by side, or auto / 0 (None: the study's, else one per core),
    read as ``hetfl run --workers`` reads them."""
    if text is None or text.strip().lower() in ("auto", "0"):
        return None
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 1:
        raise HetflError(f"--workers must be an integer >= 1, or auto (0 also means auto), got {text!r}")
    return n


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
    shown = warnings.showwarning
    warnings.showwarning = _one_line_warnings(shown)
    try:
        return COMMANDS[args.command](args)
    except HetflError as exc:
        if args.debug:
            raise
        print(f"hetfl {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt as exc:
        print(interrupted_message(getattr(exc, "run_dir", None), args.command), file=sys.stderr)
        return 130
    finally:
        warnings.showwarning = shown


def interrupted_message(run_dir: str | None, command: str = "run") -> str:
    """What Ctrl-C prints: the command that continues the run, with its real directory."""
    if command == "sweep":
        return "hetfl: interrupted; run the same `hetfl sweep` command again to go on (complete cells are skipped)"
    if run_dir is None:
        return "hetfl: interrupted before a run directory was written; nothing to resume"
    return f"hetfl: interrupted; resume with `hetfl run --resume {shlex.quote(run_dir)}`"


def _one_line_warnings(fallback: Any) -> Any:
    """A ``warnings.showwarning`` that prints hetfl's own warnings (e.g. a data file that fails its checksum)
    as one line, without Python's second line quoting hetfl's source; other packages' as ``fallback`` does."""
    here = Path(__file__).resolve().parent

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int, file: Any = None,
             line: str | None = None) -> None:
        if category.__module__.split(".")[0] == "hetfl" or Path(filename).resolve().is_relative_to(here):
            print(f"hetfl: warning: {message}", file=file or sys.stderr)
        else:
            fallback(message, category, filename, lineno, file, line)

    return show


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
