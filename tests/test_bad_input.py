"""Bad input everywhere: every case is one clear message on stderr, exit code 2, no traceback, and no
run directory left behind claiming to be complete."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from hetfl.cli import main
from hetfl.errors import HetflError

GOOD = """
name = "bad-input"
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
[train]
epochs = 1
batch_size = 32
[eval]
local = false
"""


def _config(tmp: Path, text: str = GOOD, name: str = "c.toml") -> str:
    path = tmp / name
    path.write_text(text)
    return str(path)


def _with(*sets: str):
    """A valid config file plus ``--set`` overrides."""
    return lambda tmp: ["run", _config(tmp), *[x for s in sets for x in ("--set", s)]]


def _toml(text: str):
    """A config file with ``text`` appended to the valid one (later tables/keys may clash: that is the point)."""
    return lambda tmp: ["run", _config(tmp, GOOD + text)]


def _garbage_mnist(tmp: Path) -> list[str]:
    (tmp / "data").mkdir()
    (tmp / "data" / "mnist.npz").write_bytes(b"PK\x03\x04 this is not a zip archive" * 10)
    return ["run", _config(tmp), "--set", 'data.name="mnist"', "--data-dir", str(tmp / "data")]


def _out_under_a_file(tmp: Path) -> list[str]:
    (tmp / "afile").write_text("a regular file cannot hold a directory, even for root")
    return ["run", _config(tmp), "--out", str(tmp / "afile" / "run")]


def _out_not_empty(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "notes.txt").write_text("mine")
    return ["run", _config(tmp), "--out", str(tmp / "out")]


def _not_utf8(tmp: Path) -> list[str]:
    (tmp / "c.toml").write_bytes(b"rounds = 3\n\xff\xfe\x00name = 'x'\n")
    return ["run", str(tmp / "c.toml")]


def _corrupt_checkpoint(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "config.toml").write_text(GOOD)
    (tmp / "out" / "checkpoint.pt").write_bytes(b"\x80\x02 torn checkpoint")
    return ["run", "--resume", str(tmp / "out")]


def _corrupt_saved_config(tmp: Path) -> list[str]:
    (tmp / "out").mkdir()
    (tmp / "out" / "config.toml").write_text("rounds = [unclosed\n")
    return ["run", "--resume", str(tmp / "out")]


CASES = [
    # malformed files
    ("malformed TOML", _toml("rounds = = 3\n"), "is not valid TOML"),
    ("duplicate table", _toml("[train]\nlr = 0.1\n"), "is not valid TOML"),
    ("not UTF-8", _not_utf8, "cannot read config file"),
    ("missing file", lambda tmp: ["run", str(tmp / "nope.toml")], "does not exist"),
    # unknown and mistyped keys
    ("unknown top-level key", _with("epochs=3"), "unknown key epochs; allowed top-level keys"),
    ("unknown train key", _with("train.epoch=1"), "unknown key train.epoch; allowed keys in [train]"),
    ("unknown model key", _with("model.depth=3"), "unknown key model.depth for model 'mlp'"),
    ("unknown algorithm key", _with("algorithm.mu=0.1"), "unknown key algorithm.mu for algorithm 'fedavg'"),
    ("unknown faults key", _with("faults.retries=3"), "unknown key faults.retries; allowed keys in [faults]"),
    ("mistyped rounds", _with('rounds="ten"'), "rounds must be int, got str 'ten'"),
    ("mistyped dropout", _with('faults.dropout="high"'), "faults.dropout must be float, got str 'high'"),
    ("section as a value", _with("data=3"), "[data] must be a table (section), got 3"),
    ("unknown model", _with('model.name="vgg"'), "model.name: unknown model 'vgg'"),
    ("unknown partitioner", _with('data.partition.name="zipf"'), "data.partition.name"),
    # values out of range
    ("negative rounds", _with("rounds=-1"), "rounds must be >= 1, got -1"),
    ("negative lr", _with("train.lr=-0.1"), "train.lr must be > 0, got -0.1"),
    ("zero width", _with("model.width=0"), "model.width must be in (0, 1], got 0.0"),
    ("dropout of 1", _with("faults.dropout=1.0"), "faults.dropout must be a probability in [0, 1)"),
    ("negative deadline", _with("faults.deadline_s=-5"), "faults.deadline_s must be >= 0 simulated seconds"),
    ("zero min_clients", _with("faults.min_clients=0"), "faults.min_clients must be an integer >= 1, got 0"),
    ("unmeetable min_clients", _with("faults.min_clients=4"), "faults.min_clients=4 can never be met: only 3"),
    ("negative norm bound", _with("faults.max_update_norm=-1"), "faults.max_update_norm must be >= 0"),
    ("unknown aggregator", _with('algorithm.aggregator="mode"'), "algorithm.aggregator must be one of 'mean'"),
    ("trim of one half", _with('algorithm.aggregator="trimmed_mean"', "algorithm.trim=0.5"),
     "algorithm.trim must be in [0, 0.5)"),
    # impossible fleets and partitions
    ("impossible fleet", _with('fleet.source="phones"', 'fleet.mix="a-b"'), "can afford no width in mix 'a-b'"),
    ("unreadable fleet mix", _with('fleet.source="tiers"', 'fleet.mix="a-z"'), "fleet.mix: cannot read 'z'"),
    ("empty client partition", _with("data.num_clients=200", 'data.partition={name="dirichlet", alpha=0.01, '
                                     'min_size=0}'), "received no training samples"),
    ("more clients than samples", _with("data.num_clients=5000"), "data.num_clients=5000 exceeds the"),
    ("model does not fit the data", _with('model={name="lstm"}'), "token"),
    # data and output
    ("corrupt data file", _garbage_mnist, "is not a valid hetfl MNIST cache"),
    ("missing data dir", _with('data.data_dir="/nonexistent/hetfl"', 'data.name="mnist"'), "does not exist"),
    ("output under a file", _out_under_a_file, "cannot write to output directory"),
    ("output not empty", _out_not_empty, "already exists and is not empty"),
    ("output is a file", lambda tmp: ["run", _config(tmp), "--out", _config(tmp, "x", "f.txt")], "is a file"),
    # command line
    ("--set without =", _with("rounds"), "--set expects KEY=VALUE"),
    ("--set empty key", _with(".rounds=3"), "--set has an empty key"),
    ("--set into a value", _with("rounds.x=3"), "rounds is a value, not a section"),
    ("no config", lambda tmp: ["run"], "needs a CONFIG"),
    ("--out with --resume", lambda tmp: ["run", "--resume", str(tmp), "--out", str(tmp / "o")], "exclude each other"),
    # resuming
    ("resume a non-run", lambda tmp: ["run", "--resume", str(tmp)], "not a hetfl run directory"),
    ("resume a corrupt checkpoint", _corrupt_checkpoint, "is unreadable"),
    ("resume a corrupt config", _corrupt_saved_config, "is not valid TOML"),
]


@pytest.mark.parametrize("make_args, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_clear_message(tmp_path, capsys, make_args, message):
    args = make_args(tmp_path)
    before = {p for p in tmp_path.rglob("*")}
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err, err
    assert "Traceback" not in err and err.count("error:") == 1 and err.startswith("hetfl run: error: ")
    for summary in tmp_path.rglob("summary.json"):  # nothing may claim to be a finished run
        assert json.loads(summary.read_text()).get("status") != "complete"
    created = {p for p in tmp_path.rglob("*")} - before
    assert not created, f"left behind: {sorted(map(str, created))}"


def test_enough_cases():
    assert len(CASES) >= 20 and len({c[0] for c in CASES}) == len(CASES)


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(HetflError, match="faults.dropout must be a probability"):
        main(["--debug", "run", _config(tmp_path), "--set", "faults.dropout=2"])
