"""Every command line in README.md and docs/*.md runs (issue 20 item 1).

Each command in a ```bash / ```sh / ```console block of README.md or docs/*.md is one test case, found when
the tests are collected, so a command added to the docs later is checked too:

* ``hetfl run`` is validated with ``--dry-run`` (config, registry names and parameters, ``--resume``'s merge
  rules); on a dataset at hand (digits, synthetic) its experiment is also prepared as a run would (data loaded
  and partitioned, every model built and run on two samples), without training;
* ``hetfl sweep`` is validated with ``--dry-run`` (every cell's config); ``hetfl list``, ``summary`` and
  ``plot`` run (run directories they name are stand-in one-round digits runs); ``hetfl report`` must name
  the ``--out`` of a ``hetfl sweep`` in the same file;
* ``python FILE`` must name an existing file; ``pip install`` may only name extras pyproject.toml defines;
* any other program must be listed in :data:`NOT_RUN` with the reason it is not run here.
"""

from __future__ import annotations

import glob
import re
import shlex
import sys
from pathlib import Path

import pytest

from hetfl.cli import _parser, main, run_config
from hetfl.runner import prepare

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_BLOCKS = ("bash", "sh", "shell", "console")
OFFLINE_DATA = ("digits", "synthetic")

#: Programs the docs use that this test does not run, and why.
NOT_RUN = {
    "pytest": "the test suite itself",
    "flower-superlink": "a long-running Flower server (tests/test_flower.py runs a real localhost deployment)",
    "flower-supernode": "a long-running Flower node (see flower-superlink)",
    "flwr": "needs the SuperLink above (tests/test_flower.py)",
    "mkdir": "shell plumbing of a walkthrough",
    "cat": "shell plumbing of a walkthrough",
    "kill": "shell plumbing of a walkthrough",
    "export": "shell plumbing of a walkthrough",
}


def _commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, argv) of every simple command in the file's shell blocks."""
    out: list[tuple[int, list[str]]] = []
    lang, heredoc, pending, start = None, None, "", 0
    for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = re.match(r"^\s*```(\w*)", line)
        if fence:
            lang = None if lang is not None else fence.group(1) or "text"
            continue
        if lang not in SHELL_BLOCKS:
            continue
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not pending:
            start = no
        pending += line
        if line.rstrip().endswith("\\"):
            pending = pending.rstrip()[:-1] + " "
            continue
        text, pending = pending, ""
        here = re.search(r"<<-?\s*'?\"?(\w+)", text)
        if here:
            heredoc = here.group(1)
            text = text[:here.start()]
        words: list[str] = []
        for word in shlex.split(text, comments=True) + [";"]:
            if word in ("&&", "||", ";", "&", "|"):
                while words and re.match(r"^[A-Z_][A-Z0-9_]*=", words[0]):  # VAR=value prefixes
                    words.pop(0)
                if words:
                    out.append((start, words))
                words = []
            else:
                words.append(word)
    return out


CASES = [(path, no, argv) for path in DOCS for no, argv in _commands(path)]


def test_the_docs_have_commands_to_check():
    assert len(CASES) > 30
    assert any(argv[:2] == ["hetfl", "run"] and "--resume" in argv for _, _, argv in CASES)


def _stand_in(run_dir: Path) -> None:
    """A one-round digits run at ``run_dir`` (for commands that read or resume a run directory)."""
    if not run_dir.exists():
        assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--out", str(run_dir), "--quiet",
                     "--set", "rounds=1", "--set", "data.num_clients=3"]) == 0


def _check_hetfl(argv: list[str], path: Path, tmp_path: Path) -> None:
    args = argv[1:]
    while args and args[0] == "--debug":
        args = args[1:]
    command = args[0]
    if command == "run":
        if "--resume" in args:
            _stand_in(Path(args[args.index("--resume") + 1]))
        assert main([*args, "--dry-run"]) == 0, argv
        cfg = run_config(_parser().parse_args(args))
        if cfg.data.name in OFFLINE_DATA:  # data at hand: load, partition, build every model and run it on 2 samples
            prepare(cfg)
    elif command == "sweep":
        assert main([*args, "--dry-run"]) == 0, argv
    elif command == "report":
        sweeps = [a[a.index("--out") + 1] for _, _, a in ((p, n, a) for p, n, a in CASES if p == path)
                  if a[:2] == ["hetfl", "sweep"] and "--out" in a]
        assert args[1] in sweeps, f"{argv}: reports a sweep directory no `hetfl sweep --out` in {path.name} writes"
    elif command in ("summary", "plot"):
        expanded = []
        for a in args[1:]:
            if a.startswith("runs/") and not any(ch in a for ch in "*?["):
                _stand_in(Path(a))
            if any(ch in a for ch in "*?["):
                _stand_in(Path("runs") / "stand-in")
                expanded.extend(sorted(glob.glob(a)))
            else:
                expanded.append(a)
        assert main([command, *expanded]) == 0, argv
    elif command == "list":
        assert main(args) == 0
    else:
        pytest.fail(f"{argv}: no check for `hetfl {command}` yet; add one to tests/test_docs_commands.py")


@pytest.mark.parametrize(("path", "no", "argv"), CASES,
                         ids=[f"{p.relative_to(ROOT)}:{n}:{' '.join(a)[:60]}" for p, n, a in CASES])
def test_documented_command_runs(path, no, argv, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for folder in ("configs", "examples", "benchmarks"):
        (tmp_path / folder).symlink_to(ROOT / folder)
    program = argv[0]
    if program == "torchrun":  # `torchrun ... -m hetfl ARGS`: the hetfl command it starts
        assert "-m" in argv and argv[argv.index("-m") + 1] == "hetfl", argv
        argv = ["hetfl", *argv[argv.index("-m") + 2:]]
        program = "hetfl"
    if program == "hetfl":
        _check_hetfl(argv, path, tmp_path)
    elif program in ("python", "python3"):
        script = next(a for a in argv[1:] if not a.startswith("-"))
        assert (ROOT / script).is_file(), f"{path.name}:{no}: {script} does not exist"
    elif program == "pip":
        extras = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"])
        for a in argv:
            for extra in re.findall(r"\[([\w,-]+)\]", a):
                assert set(extra.split(",")) <= extras, f"{path.name}:{no}: extra [{extra}] is not in pyproject.toml"
    else:
        assert program in NOT_RUN, (f"{path.name}:{no}: `{program}` is not checked; run it in this test or add it "
                                    f"to NOT_RUN with the reason")


def test_ci_runs_the_readmes_test_command_and_it_includes_flower():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    test_command = 'pip install -e ".[dev]" && pytest'
    assert f"```bash\n{test_command}\n```" in readme
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == test_command
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(req.startswith("flwr") for req in extras["dev"]), "the dev extra must install what the Flower tests need"
