"""Sweeps: study expansion, validation, parallel run, skip/resume, the results table and the report."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from hetfl.cli import main
from hetfl.errors import ConfigError, HetflError
from hetfl.results import SUMMARY
from hetfl.sweep import CELLS, RESULTS_CSV, load_study, read_results, run_sweep, study_from_dict

BASE = {
    "rounds": 2,
    "data": {"name": "digits", "num_clients": 8, "local_test_fraction": 0.2,
             "partition": {"name": "quantity", "sigma": 1.0, "min_size": 10}},
    "model": {"name": "mlp", "hidden": "16"},
    "algorithm": {"name": "heterofl", "clients_per_round": 4, "scaler": False},
    "fleet": {"source": "tiers", "mix": "a-b-c"},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.1},
}
AXES = {
    "policy": {"max": ['algorithm.width_schedule="max"'],
               "mix-0.5": ['algorithm.width_schedule="mixture(q=0.5)"']},
    "corr": {"none": ['fleet.size_correlation="none"'], "pos": ['fleet.size_correlation="positive"']},
}


def _study(**over):
    raw = {"name": "tiny", "seeds": [0, 1], "base": BASE, "axes": AXES, "report": {"metrics": ["deployed_acc_last5"]},
           **over}
    return study_from_dict(raw, "tiny.toml")


def test_expansion_order_and_overrides():
    study = _study(set=["rounds=1"])
    cells = study.cells()
    assert len(cells) == 2 * 2 * 2
    # seed by seed; within a seed, all levels of the compared (first) axis of one setting together
    assert [c.name for c in cells[:4]] == ["max__none__s0", "mix-0.5__none__s0", "max__pos__s0", "mix-0.5__pos__s0"]
    cfg = study.config(cells[3])
    assert cfg.rounds == 1 and cfg.seed == 0 and cfg.fleet.size_correlation == "positive"
    assert dict(cfg.algorithm.params)["width_schedule"] == "mixture(q=0.5)" and cfg.name == "tiny/mix-0.5__pos__s0"
    # the resolved study (base inline, quoted level names) round-trips through OUT/study.toml
    again = study_from_dict(__import__("tomllib").loads(study.to_toml()), "again")
    assert [c.overrides for c in again.cells()] == [c.overrides for c in cells]


def test_bad_studies_fail_before_running(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'axis'"):
        study_from_dict({"axis": {}}, "s.toml")
    with pytest.raises(ConfigError, match="seeds must be a non-empty list"):
        _study(seeds=[])
    with pytest.raises(ConfigError, match="must be a list of --set overrides"):
        _study(axes={"policy": {"max": 3}})
    bad = _study(axes={"policy": {"max": ["algorithm.width_schedule=\"often\""]}})
    with pytest.raises(ConfigError, match=r"cell max__s0: .*unknown width schedule 'often'"):
        run_sweep(bad, tmp_path / "bad", workers=1, log=None)
    assert not (tmp_path / "bad").exists()


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    out = tmp_path_factory.mktemp("sweep") / "tiny"
    first = run_sweep(_study(), out, workers=1, log=None)
    return out, first


def test_sweep_runs_every_cell_and_writes_one_table(tiny_sweep):
    out, first = tiny_sweep
    assert first["ran"] == 8 and not first["failed"] and not first["skipped"]
    rows = read_results(out / RESULTS_CSV)
    assert len(rows) == 8 and {r["status"] for r in rows} == {"complete"}
    row = next(r for r in rows if r["cell"] == "mix-0.5__pos__s1")
    assert row["policy"] == "mix-0.5" and row["corr"] == "pos" and row["seed"] == 1 and \
        row["width_schedule"] == "mixture"
    for key in ("test_accuracy", "test_accuracy_last5", "deployed_acc", "deployed_acc_last5", "acc_w1", "acc_w0.25",
                "tier_w0.5_last5", "acc_narrowest", "wall_time_s"):
        assert isinstance(row[key], float), key
    assert 0 < row["width_q"] < 1 and next(r for r in rows if r["policy"] == "max")["width_q"] == 0
    log = json.loads((out / "sweep.json").read_text())
    assert log["invocations"][-1]["ran"] == 8


def test_sweep_skips_finished_and_resumes_interrupted_cells(tiny_sweep):
    out, _ = tiny_sweep
    cell = out / CELLS / "max__pos__s0"
    before = (cell / "metrics.jsonl").read_text()
    summary = json.loads((cell / SUMMARY).read_text())
    (cell / SUMMARY).write_text(json.dumps({**summary, "status": "interrupted"}))  # as a killed worker leaves it
    again = run_sweep(_study(), out, workers=1, log=None)
    assert again["ran"] == 1 and len(again["skipped"]) == 7
    assert json.loads((cell / SUMMARY).read_text())["status"] == "complete"
    assert len((cell / "metrics.jsonl").read_text().splitlines()) == len(before.splitlines())
    # a cell directory holding a different config is refused, not silently reused
    changed = _study(set=["train.lr=0.2"])
    with pytest.raises(HetflError, match="different config"):
        run_sweep(changed, out, workers=1, log=None)
    # ... but execution settings (worker processes, threads) do not change a run: finished cells stay valid
    same = run_sweep(_study(set=["workers=2", "threads_per_worker=1"]), out, workers=1, log=None)
    assert same["ran"] == 0 and len(same["skipped"]) == 8


def test_report_has_tables_heatmaps_and_curves(tiny_sweep, capsys):
    out, _ = tiny_sweep
    assert main(["report", str(out)]) == 0
    md = Path(capsys.readouterr().out.strip())
    text = md.read_text()
    assert "| setting | max | mix-0.5 |" in text and "± " in text and "## Runtime" in text
    images = [line[line.index("(") + 1:-1] for line in text.splitlines() if line.startswith("![")]
    assert any("heatmap_deployed_acc_last5" in i for i in images) and any("curves_acc" in i for i in images)
    assert any("curves_tier" in i for i in images)
    for rel in images:
        assert (md.parent / rel).stat().st_size > 1000, rel


def test_cli_sweep_with_worker_processes(tmp_path, capsys):
    study = tmp_path / "s.toml"
    base = Path(__file__).parent.parent / "configs" / "digits_fedavg.toml"
    study.write_text(f'name = "cli"\nseeds = [0]\nbase = "{base.as_posix()}"\n'
                     'set = ["rounds=1", "data.num_clients=4", "algorithm.clients_per_round=2"]\n'
                     '[axes.lr]\nslow = ["train.lr=0.05"]\nfast = ["train.lr=0.1"]\n')
    assert load_study(study).base["name"]  # a base given as a path
    assert main(["sweep", str(study), "--out", str(tmp_path / "o"), "--workers", "2"]) == 0
    printed = capsys.readouterr().out
    assert "2 to run on 2 workers" in printed and "2 ran, 0 skipped, 0 failed" in printed
    assert [r["status"] for r in read_results(tmp_path / "o" / RESULTS_CSV)] == ["complete", "complete"]
    for auto in ("auto", "0"):  # as `hetfl run --workers` reads them: the study's workers, else one per core
        assert main(["sweep", str(study), "--out", str(tmp_path / "o"), "--workers", auto]) == 0
        assert "0 ran, 2 skipped" in capsys.readouterr().out
    assert main(["sweep", str(study), "--out", str(tmp_path / "o"), "--workers", "-1"]) == 2  # user error
    assert "--workers must be an integer >= 1, or auto (0 also means auto), got '-1'" in capsys.readouterr().err


def test_full_width_accuracy_is_the_tiers_own_where_a_run_logs_it_per_tier():
    from hetfl.sweep import _acc_key

    central = {"test_accuracy": 0.8, "test_accuracy.w0.5": 0.7}
    decentral = {"test_accuracy": 0.75, "test_accuracy.w1": 0.8, "test_accuracy.w0.25": 0.7}
    assert [_acc_key(central, w) for w in (1.0, 0.5)] == ["test_accuracy", "test_accuracy.w0.5"]
    assert [_acc_key(decentral, w) for w in (1.0, 0.25)] == ["test_accuracy.w1", "test_accuracy.w0.25"]


def test_pool_workers_stop_when_the_sweep_process_is_killed(tmp_path):
    """`kill` of a sweep (SIGTERM/SIGKILL: no clean shutdown) must not leave workers running its cells."""
    import os
    import signal
    import subprocess
    import sys
    import time

    script = tmp_path / "parent.py"
    script.write_text(
        "import multiprocessing, os, sys, time\n"
        "from concurrent.futures import ProcessPoolExecutor\n"
        "from hetfl.sweep import _init_worker\n"
        "if __name__ == '__main__':\n"
        "    ctx = multiprocessing.get_context('spawn')\n"
        "    pool = ProcessPoolExecutor(1, mp_context=ctx, initializer=_init_worker, initargs=(os.getpid(), 0.2))\n"
        "    print(pool.submit(os.getpid).result(), flush=True)\n"
        "    pool.submit(time.sleep, 60)\n"
        "    time.sleep(60)\n"
    )
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    worker = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            os.kill(worker, 0)
        except ProcessLookupError:
            return
        stat = Path(f"/proc/{worker}/stat")
        if stat.is_file() and stat.read_text().rsplit(")", 1)[-1].split()[0] == "Z":
            return  # exited; an init that does not reap leaves a zombie
        time.sleep(0.2)
    os.kill(worker, signal.SIGKILL)
    raise AssertionError("the pool worker outlived its killed sweep process")


def test_rolling_tiers_scored_with_their_window_keep_the_prefix_as_a_column(tmp_path):
    axes = {"method": {"fedrolex": ['algorithm={name="fedrolex", clients_per_round=4, eval_window="trained"}']}}
    study = study_from_dict({"name": "win", "seeds": [0], "base": BASE, "axes": axes}, "win.toml")
    run_sweep(study, tmp_path, workers=1, log=None)
    row = read_results(tmp_path / RESULTS_CSV)[0]
    assert row["status"] == "complete"
    for w in ("w0.5", "w0.25"):  # the trained window's score and, beside it, the prefix's
        assert isinstance(row[f"acc_{w}_last5"], float) and isinstance(row[f"prefix_acc_{w}_last5"], float)


def test_the_log_says_how_long_the_rest_will_take(tmp_path):
    lines = []
    run_sweep(_study(set=["rounds=1"], seeds=[0]), tmp_path, workers=1, log=lines.append)
    progress = [line for line in lines if line.startswith("[")]
    assert len(progress) == 4
    assert all(re.search(r", ~\d+ min left$", line) for line in progress[:3]), progress
    assert not progress[-1].endswith("left")


def test_time_left_reads_in_minutes_then_hours():
    from hetfl.sweep import _time_left

    assert _time_left(600.0, 2, 4) == ", ~10 min left"
    assert _time_left(3600.0, 1, 3) == ", ~2.0 h left"
    assert _time_left(5.0, 4, 4) == ""
