"""FedDF: architecture families, server data drawn before partitioning, streaming = resident teachers, runs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetfl.algorithms.base import ClientResult, weights_of
from hetfl.algorithms.families import RunningMean, family_index, parse_families, resolve_families
from hetfl.data.base import DataInfo, Dataset, Split
from hetfl.data.server import ServerDataSpec, draw_server_data
from hetfl.errors import ConfigError
from hetfl.experiment import load_data
from hetfl.models import ModelRef
from hetfl.resolve import load_config
from hetfl.runner import prepare, run

FEDDF = {
    "name": "t-feddf",
    "rounds": 2,
    "seed": 0,
    "data": {"name": "digits", "num_clients": 6, "local_test_fraction": 0.2,
             "partition": {"name": "dirichlet", "alpha": 1.0}},
    "model": {"name": "cnn", "conv1": 4, "conv2": 8, "fc": 16},
    "fleet": {"source": "tiers", "mix": "a-b-c"},
    "algorithm": {"name": "feddf", "clients_per_round": 6, "families": "cnn, cnn@0.5, mlp(hidden=16)",
                  "server_data_size": 120, "server_val_size": 40, "distill_steps": 6, "distill_batch": 32,
                  "val_every": 2, "patience": 4},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05, "momentum": 0.9},
    "eval": {"every": 1},
}


def cfg(*overrides: str):
    return load_config(None, overrides, base=FEDDF)


# ------------------------------------------------------------------------------------------------ families
def test_families_parse_inherit_and_errors():
    default = ModelRef("cnn", 1.0, (("conv1", 4),))
    fams = resolve_families("cnn, cnn@0.5, mlp(hidden=64,32; ), cnn@0.25(fc=8)", default)
    assert [f.key for f in fams] == ["cnn", "cnn@0.5", "mlp(hidden=64,32;)", "cnn@0.25(fc=8)"]
    assert fams[0].ref == default and fams[1].ref == ModelRef("cnn", 0.5, (("conv1", 4),))
    assert fams[2].ref == ModelRef("mlp", 1.0, (("hidden", "64,32"),))  # str param keeps its commas
    assert fams[3].ref == ModelRef("cnn", 0.25, (("fc", 8),))  # explicit params: no inheritance
    assert resolve_families("", default)[0].key == "global"
    for text, msg in [("cnn, transformerx", "unknown model 'transformerx'"), ("cnn@1.5", "width must be in"),
                      ("cnn, cnn", "listed twice"), ("mlp(depth=3)", "has no parameter 'depth'"),
                      ("cnn@x", "is not a number"), ("mlp(hidden)", "expected key=value"), ("mlp(a=1", "cannot read")]:
        with pytest.raises(ConfigError, match=msg) as err:
            parse_families(text)
        assert "algorithm.families" in str(err.value)


def test_families_follow_fleet_tiers_widest_first(digits_cfg):
    exp = prepare(cfg())
    idx = family_index(exp.ctx, 1, 3)
    assert idx.tolist() == exp.ctx.fleet.tiers().tolist() == [0, 0, 1, 1, 2, 2]
    assert family_index(exp.ctx, 1, 2).tolist() == [0, 0, 1, 1, 1, 1]  # more tiers than families: cap
    uniform = prepare(cfg("fleet.source=uniform"))
    assert family_index(uniform.ctx, 1, 3).tolist() == [0] * 6
    tasks = exp.algorithm.configure_round(exp.algorithm.init_state(exp.ctx), 1, [0, 2, 5], exp.ctx)
    assert [t.model.name for t in tasks] == ["cnn", "cnn", "mlp"] and tasks[1].model.width == 0.5


def test_running_mean_matches_weighted_average():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(2)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(4)}
    m = RunningMean()
    m.add(a, 1.0)
    m.add(b, 3.0)
    torch.testing.assert_close(m.value()["w"], torch.tensor([3.25, 6.5]))
    assert m.value()["n"].dtype == torch.int64
    one = RunningMean()
    one.add(a, 5.0)
    assert one.value()["w"] is a["w"] and RunningMean().value() == {}


# ------------------------------------------------------------------------------------------------ server data
def _unique_dataset(n: int = 200) -> Dataset:
    x = torch.arange(n, dtype=torch.float32)[:, None, None, None].expand(n, 1, 4, 4).contiguous()
    return Dataset("toy", Split(x, torch.arange(n) % 10), Split(x[:10], torch.arange(10)), DataInfo((1, 4, 4), 10))


def test_heldout_server_data_leaves_the_client_pool():
    ds = _unique_dataset()
    reduced, sd = draw_server_data(ds, ServerDataSpec("heldout", 50, 20), seed=3)
    ids = lambda t: set(t[:, 0, 0, 0].long().tolist())  # noqa: E731
    assert len(reduced.train) == 130 and len(sd.x) == 50 and len(sd.val) == 20
    assert not ids(reduced.train.x) & ids(sd.x) and not ids(reduced.train.x) & ids(sd.val.x)
    assert not ids(sd.x) & ids(sd.val.x)
    assert ids(reduced.train.x) | ids(sd.x) | ids(sd.val.x) == set(range(200))
    again, sd2 = draw_server_data(ds, ServerDataSpec("heldout", 50, 20), seed=3)
    assert torch.equal(sd.x, sd2.x) and torch.equal(again.train.y, reduced.train.y)
    noise_ds, noise = draw_server_data(ds, ServerDataSpec("noise", 30, 10), seed=3)
    assert noise.x.shape == (30, 1, 4, 4) and len(noise_ds.train) == 190  # only the validation split is held out
    assert float(noise.x.min()) >= 0.0 and float(noise.x.max()) <= 199.0
    assert draw_server_data(ds, None, seed=0) == (ds, None)
    only_val, sd0 = draw_server_data(ds, ServerDataSpec("noise", 0, 10), seed=3)  # a validation split alone
    assert sd0.x.shape == (0, 1, 4, 4) and len(sd0.val) == 10 and len(only_val.train) == 190


def test_another_dataset_is_resized_to_the_run_input_shape():
    from hetfl.data.datasets import MNIST_CACHE_NAME, default_cache_dir

    if not (default_cache_dir() / "mnist" / MNIST_CACHE_NAME).exists():
        pytest.skip("MNIST is not in hetfl's cache")
    exp = prepare(cfg("algorithm.server_data='mnist'"))
    sd = exp.ctx.server_data
    assert sd.source == "mnist" and sd.x.shape == (120, 1, 8, 8) and len(sd.val) == 40
    assert float(sd.x.min()) >= 0.0 and float(sd.x.max()) <= 1.0 + 1e-5
    assert len(exp.federation.train) == len(load_data(exp.cfg).train) - 40  # only validation left the pool


def test_server_data_bad_values_name_the_field(digits_cfg):
    with pytest.raises(ConfigError, match="algorithm.server_data_size"):
        prepare(cfg("algorithm.server_data_size=5000"))
    with pytest.raises(ConfigError, match=r"algorithm.server_data must be 'heldout', 'noise' or a registered"):
        prepare(cfg("algorithm.server_data=imagenet"))
    with pytest.raises(ConfigError, match="run's own dataset"):
        prepare(cfg("algorithm.server_data=digits"))
    with pytest.raises(ConfigError, match="inputs shaped"):
        prepare(cfg("algorithm.server_data=synthetic"))
    exp = prepare(cfg())
    assert len(exp.ctx.server_data.x) == 120 and len(exp.ctx.server_data.val) == 40
    assert len(exp.federation.train) == len(load_data(exp.cfg).train) - 160  # the server's 160 left the pool


@pytest.mark.parametrize("override, msg", [
    ("algorithm.distill_steps=-1", "algorithm.distill_steps must be >= 0"),
    ("algorithm.teachers='all'", "algorithm.teachers must be one of streaming, resident"),
    ("algorithm.ensemble='median'", "algorithm.ensemble must be one of logits, probs"),
    ("algorithm.temperature=0", "algorithm.temperature must be > 0"),
    ("algorithm.server_val_size=-1", "algorithm.server_val_size must be >= 0"),
    ("algorithm.families='cnn,cnn'", "algorithm.families: family 'cnn' is listed twice"),
    ("algorithm.distill_lr=0", "algorithm.distill_lr must be > 0"),
    ("algorithm.server_data_size=0", "algorithm.server_data_size must be >= 1"),
])
def test_bad_config_errors(override, msg):
    with pytest.raises(ConfigError, match=msg):
        cfg(override)


def test_family_that_cannot_run_fails_before_any_file(tmp_path):
    with pytest.raises(ConfigError, match="transformer"):
        prepare(cfg("algorithm.families='cnn, transformer'"))


# ------------------------------------------------------------------------------------------------ rounds
def _fake_results(exp, rnd: int = 1):
    """Every client 'trains' by perturbing its family's model: deterministic, no SGD."""
    state = exp.algorithm.init_state(exp.ctx)
    tasks = exp.algorithm.configure_round(state, rnd, list(range(exp.ctx.num_clients)), exp.ctx)
    out = []
    for t in tasks:
        g = torch.Generator().manual_seed(t.client_id)
        w = {k: v + 0.05 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v
             for k, v in t.weights.items()}
        out.append(ClientResult(t.client_id, 10 + t.client_id, w))
    return state, out


def test_streaming_and_resident_teachers_give_the_same_models_and_report_costs():
    exps = {mode: prepare(cfg(f"algorithm.teachers='{mode}'")) for mode in ("streaming", "resident")}
    new, metrics = {}, {}
    for mode, exp in exps.items():
        state, results = _fake_results(exp)
        upd = exp.algorithm.aggregate(state, 1, iter(results), exp.ctx)
        out = exp.algorithm.server_step(state, upd, exp.ctx)
        new[mode], metrics[mode] = out.models, exp.algorithm.round_metrics(out)
        assert out.round == 1 and set(out.models) == {"cnn", "cnn@0.5", "mlp(hidden=16)"}
    for key in new["streaming"]:
        for name, v in new["streaming"][key].items():
            torch.testing.assert_close(v, new["resident"][key][name], atol=1e-5, rtol=1e-4)
    s, r = metrics["streaming"], metrics["resident"]
    assert s["teachers"] == r["teachers"] == 6
    assert s["ensemble_val_acc"] == pytest.approx(r["ensemble_val_acc"])
    # resident: all six client models; streaming: cached logits (120 + 40 rows x 10 classes) + one module per family
    exp = exps["resident"]
    refs = {f.key: f.ref for f in exp.algorithm.family_list(exp.ctx)}
    model_bytes = {k: sum(t.numel() * 4 for t in weights_of(ref.build(exp.ctx.info)).values())
                   for k, ref in refs.items()}
    assert r["server_teacher_bytes"] == 2 * sum(model_bytes.values())
    assert s["server_teacher_bytes"] == 160 * 10 * 4 + sum(model_bytes.values())
    for m in (s, r):
        assert m["server_distill_s"] > 0 and m["server_peak_bytes"] > m["server_teacher_bytes"]
        assert m["distill_steps.cnn"] <= 6 and m["distill_kl.cnn"] <= m["distill_kl0.cnn"] + 1e-6


def test_without_distillation_each_family_is_its_uniform_fedavg():
    exp = prepare(cfg("algorithm.distill_steps=0"))
    state, results = _fake_results(exp)
    out = exp.algorithm.server_step(state, exp.algorithm.aggregate(state, 1, iter(results), exp.ctx), exp.ctx)
    fam_of = family_index(exp.ctx, 1, 3)
    for i, f in enumerate(exp.algorithm.family_list(exp.ctx)):
        mine = [r.weights for r in results if fam_of[r.client_id] == i]
        for k, v in out.models[f.key].items():
            if v.is_floating_point():
                torch.testing.assert_close(v, torch.stack([w[k] for w in mine]).mean(0))
    assert "server_distill_s" not in exp.algorithm.round_metrics(out)
    targets = exp.algorithm.eval_targets(out, exp.ctx)
    assert list(targets) == ["global", "cnn@0.5", "mlp(hidden=16)"]
    assert targets["global"].weights is out.models["cnn"]


def test_two_rounds_end_to_end_through_the_runner(tmp_path):
    summary = run(cfg("algorithm.server_data='noise'"), tmp_path / "run", quiet=True)
    assert summary["status"] == "complete" and summary["rounds_completed"] == 2
    for key in ("test_accuracy.cnn@0.5", "test_accuracy.mlp(hidden=16)", "server_distill_s_mean",
                "server_peak_bytes_max", "test_accuracy_best5_mean"):
        assert key in summary, key
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for row in rows:
        assert row["teachers"] == 6 and row["server_teacher_s"] >= 0 and np.isfinite(row["test_accuracy"])
        assert {"clients.cnn", "clients.cnn@0.5", "clients.mlp(hidden=16)"} <= set(row)
