"""What a new user trips over (issue 20): each case pinned by a test."""

from __future__ import annotations

from pathlib import Path

import pytest

from hetfl.cli import main
from hetfl.errors import ConfigError
from hetfl.resolve import load_config

ROOT = Path(__file__).parents[1]


# ------------------------------------------------------------------ --set SECTION.name drops the old entry's keys
def test_switching_the_partitioner_drops_the_old_partitioners_parameters():
    notes: list[str] = []
    cfg = load_config(ROOT / "configs/mnist_fedavg.toml",
                      ["data.partition.name=dirichlet", "data.partition.alpha=0.3"], notes=notes)
    assert cfg.data.partition.name == "dirichlet" and cfg.data.partition.kwargs == {"alpha": 0.3}
    assert notes == ["data.partition.name=dirichlet drops shards_per_client (it does not apply to 'dirichlet')"]


def test_switching_algorithm_keeps_the_shared_parameters_and_model_drops_its_own(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('[data]\nname = "digits"\n[model]\nname = "mlp"\nhidden = "32"\n'
                    '[algorithm]\nname = "fedavg"\nclients_per_round = 4\nserver_lr = 0.5\n')
    notes: list[str] = []
    cfg = load_config(path, ["algorithm.name=heterofl", "model.name=cnn"], notes=notes)
    assert cfg.algorithm.name == "heterofl" and dict(cfg.algorithm.params) == {"clients_per_round": 4}
    assert cfg.model.name == "cnn" and cfg.model.params == ()
    assert sorted(notes) == ["algorithm.name=heterofl drops server_lr (it does not apply to 'heterofl')",
                             "model.name=cnn drops hidden (it does not apply to 'cnn')"]
    assert load_config(path, ["algorithm.name=fedavg"]).algorithm.params == load_config(path).algorithm.params


def test_a_key_given_explicitly_is_not_dropped_silently():
    with pytest.raises(ConfigError, match="unknown key data.partition.shards_per_client for partitioner 'dirichlet'"):
        load_config(ROOT / "configs/mnist_fedavg.toml",
                    ["data.partition.shards_per_client=3", "data.partition.name=dirichlet"])


def test_the_switch_is_said_in_one_line_on_the_console(tmp_path, capsys):
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--set", 'data.partition={name="shards"}',
                 "--set", "data.partition.shards_per_client=2", "--set", "data.partition.name=dirichlet",
                 "--set", "rounds=1", "--out", str(tmp_path / "r"), "--quiet"]) == 2  # explicit key: an error
    assert "unknown key data.partition.shards_per_client" in capsys.readouterr().err
    cfg = tmp_path / "c.toml"
    cfg.write_text((ROOT / "configs/digits_fedavg.toml").read_text() + "\n")
    cfg.write_text(load_config(cfg, ['data.partition={name="shards", shards_per_client=2}']).to_toml())
    assert main(["run", str(cfg), "--set", "data.partition.name=iid", "--set", "rounds=1",
                 "--out", str(tmp_path / "r2"), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert err.count("data.partition.name=iid drops shards_per_client") == 1


# ------------------------------------------------------------------ a config names its dataset, model, algorithm
@pytest.mark.parametrize("text", ["", "# nothing\n", "rounds = 2\n", '[data]\nname = "digits"\n'])
def test_an_empty_or_sectionless_config_is_a_clear_error(tmp_path, capsys, text):
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert main(["run", str(path), "--out", str(tmp_path / "r"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "names at least its dataset, model and algorithm" in err
    assert not (tmp_path / "r").exists()


def test_names_may_come_from_set(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text("rounds = 1\n")
    cfg = load_config(path, ["data.name=digits", "model.name=mlp", "algorithm.name=fedavg"])
    assert (cfg.data.name, cfg.model.name, cfg.algorithm.name) == ("digits", "mlp", "fedavg")


# ------------------------------------------------------------------ the command line (issue 20 item 6)
def _tiny_run(path: Path, rounds: int = 1, every: int = 1) -> Path:
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--out", str(path), "--quiet",
                 "--set", f"rounds={rounds}", "--set", "data.num_clients=3", "--set", f"eval.every={every}"]) == 0
    return path


def test_summary_and_plot_without_arguments_read_runs_star(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["summary"]) == 2
    assert "no run directory under" in capsys.readouterr().err
    _tiny_run(tmp_path / "runs" / "a")
    _tiny_run(tmp_path / "runs" / "b")
    capsys.readouterr()
    assert main(["summary"]) == 0
    out = capsys.readouterr()
    assert "using runs/* (2 run directories)" in out.err
    assert "runs/a" in out.out and "runs/b" in out.out
    assert main(["plot", "--out", "plots"]) == 0
    assert "using runs/*" in capsys.readouterr().err and (tmp_path / "plots" / "accuracy.png").is_file()


def test_a_run_with_one_evaluation_point_is_drawn(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from hetfl.plot import plot_runs

    run = _tiny_run(tmp_path / "one", rounds=1)
    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", figures.append)
    plot_runs([run], tmp_path / "plots")
    monkeypatch.setattr(plt, "close", close)
    lines = [line for fig in figures for ax in fig.axes for line in ax.get_lines()]
    assert lines and all(len(line.get_xdata()) == 1 for line in lines)
    assert all(line.get_marker() not in (None, "", "None", " ") for line in lines)
    for fig in figures:
        plt.close(fig)


def test_no_abbreviations_and_a_misspelt_option_names_the_right_one(capsys):
    config = str(ROOT / "configs/digits_fedavg.toml")
    with pytest.raises(SystemExit) as exc:
        main(["run", config, "--worker", "2", "--dry-run"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: hetfl run" in err and "did you mean --workers?" in err
    with pytest.raises(SystemExit):
        main(["run", config, "--sed", "1"])
    err = capsys.readouterr().err
    assert "usage: hetfl run" in err and "did you mean --seed?" in err


def test_list_descriptions_are_whole_sentences(capsys):
    assert main(["list"]) == 0
    entries = [line for line in capsys.readouterr().out.splitlines() if line.startswith("  ")]
    assert any(line.split()[0] == "simulator" for line in entries)
    for line in entries:
        assert line.rstrip().endswith((".", ")")), line


def test_quiet_and_workers_zero_are_documented():
    import contextlib
    import io

    from hetfl.cli import _parser

    text = io.StringIO()
    with contextlib.redirect_stdout(text), pytest.raises(SystemExit):
        _parser().parse_args(["run", "--help"])
    helptext = " ".join(text.getvalue().split())
    assert "0 also means auto" in helptext and "only the final line" in helptext
    readme = " ".join((ROOT / "README.md").read_text().split())
    assert "`--workers 0`" in readme and "`--quiet`" in readme


def test_dry_run_validates_without_writing(tmp_path, capsys):
    assert main(["run", str(ROOT / "configs/mnist_fedavg.toml"), "--out", str(tmp_path / "r"), "--dry-run"]) == 0
    assert "valid (dataset mnist" in capsys.readouterr().out and not (tmp_path / "r").exists()
    assert main(["run", str(ROOT / "configs/mnist_fedavg.toml"), "--set", "rounds=0", "--dry-run"]) == 2
    run = _tiny_run(tmp_path / "run")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir())
    assert main(["run", "--resume", str(run), "--set", "rounds=5", "--dry-run"]) == 0
    assert main(["run", "--resume", str(run), "--set", "seed=5", "--dry-run"]) == 2
    assert sorted((p.name, p.stat().st_mtime_ns) for p in run.iterdir()) == before


# ------------------------------------------------------------------ summary.json during a run (issue 20 item 4)
def test_summary_json_follows_every_checkpoint(tmp_path, monkeypatch, digits_cfg):
    import json

    from hetfl import runner

    seen = []
    update = runner.RunProgress.update

    def spy(self, rnd, metrics):
        seen.append((rnd, json.loads((tmp_path / "r" / "summary.json").read_text())))
        update(self, rnd, metrics)

    monkeypatch.setattr(runner.RunProgress, "update", spy)
    runner.run(digits_cfg("rounds=4", "checkpoint_every=2"), tmp_path / "r", quiet=True)
    got = [(rnd, s["status"], s["rounds_completed"]) for rnd, s in seen]
    assert got[1] == (2, "running", 2) and got[0][2] == 0  # round 1: no checkpoint yet, nothing to resume from
    assert seen[1][1]["test_accuracy"] is not None
    assert got[2][2] == 2 and got[3] == (4, "running", 4)
    assert json.loads((tmp_path / "r" / "summary.json").read_text())["status"] == "complete"


# ------------------------------------------------------------------ evaluation shows as its own step (issue 20 item 3)
def test_evaluation_is_its_own_step_with_its_own_progress(tmp_path, monkeypatch, digits_cfg):
    import io

    from rich.console import Console

    from hetfl import progress, runner

    steps, phases = [], []
    eval_step, phase = progress.RunProgress.eval_step, progress.RunProgress.phase

    def spy_step(self, done, total, label):
        eval_step(self, done, total, label)
        task = next(t for t in self._progress.tasks if t.description.strip() == "evaluation")
        steps.append((done, total, label, task.completed, task.total, task.visible))

    monkeypatch.setattr(progress.RunProgress, "eval_step", spy_step)
    monkeypatch.setattr(progress.RunProgress, "phase", lambda self, *a: (phases.append(a), phase(self, *a))[1])
    monkeypatch.setattr(progress, "Console", lambda **kw: Console(file=io.StringIO(), force_terminal=True))
    cfg = digits_cfg("rounds=2", "eval.every=2", "eval.bn_samples=64", "data.local_test_fraction=0",
                     'algorithm={name="heterofl", clients_per_round=2}', 'fleet.source="tiers"',
                     'fleet.mix="a-b-c"', 'model={name="mlp", hidden="16"}')
    runner.run(cfg, tmp_path / "r", quiet=False)
    assert phases == [(1, "training"), (2, "training"), (2, "evaluating")]
    n = len(steps) - 1
    assert n >= 3  # the global model and one per width
    assert [s[:2] for s in steps] == [(i, n) for i in range(n + 1)]
    assert all(s[3:] == (s[0], n, True) for s in steps[:-1]) and steps[-1][3:] == (n, n, False)


def test_auto_workers_shows_no_estimated_time(digits_cfg, monkeypatch):
    """The FLOPs estimate decides workers=auto; shown as seconds it was far off (48 s vs 2.5 s measured)."""
    import re

    import torch

    from hetfl.engines import workers
    from hetfl.runner import prepare

    monkeypatch.setattr(workers, "available_cores", lambda: 4)
    exp = prepare(digits_cfg())
    for floor in (0.0, 1e9):  # goes parallel / stays in process
        monkeypatch.setattr(workers, "AUTO_MIN_ROUND_S", floor)
        _, why = workers.resolve_workers("auto", 1, exp.algorithm, exp.ctx, torch.device("cpu"))
        assert why.startswith("auto:") and not re.search(r"\d\s*(ms|s)\b", why), why


# ------------------------------------------------------------------ the resolved config marks what does nothing
def test_resolved_config_marks_inert_keys_and_reads_back(tmp_path):
    from hetfl.config import parse_toml

    out = tmp_path / "r"
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--out", str(out), "--quiet", "--set", "rounds=1",
                 "--set", "data.local_test_fraction=0"]) == 0
    text = (out / "config.toml").read_text()
    lines = {line.split(" = ")[0]: line for line in text.splitlines() if " = " in line}
    assert '# inert: fleet.source = "uniform"' in lines["mix"] and "# inert" in lines["assignment"]
    assert "# inert: data.local_test_fraction = 0" in lines["local"]
    assert "# inert" not in lines["rounds"] and "# inert" not in lines["source"]
    cfg = load_config(ROOT / "configs/digits_fedavg.toml", ["rounds=1", "data.local_test_fraction=0"])
    from hetfl.resolve import config_from_dict

    assert config_from_dict(parse_toml(text)) == cfg
    heterofl = tmp_path / "h"
    assert main(["run", str(ROOT / "configs/digits_fedavg.toml"), "--out", str(heterofl), "--quiet",
                 "--set", "rounds=1", "--set", 'fleet.source="tiers"', "--set", "data.local_test_fraction=0.2"]) == 0
    text = (heterofl / "config.toml").read_text()
    assert "# inert" not in next(line for line in text.splitlines() if line.startswith("mix = "))
    assert "# inert" not in next(line for line in text.splitlines() if line.startswith("local = "))
