"""FedProto and FedTGP: prototypes, their server rules, the lambda = 0 identity, the margin, resume, refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hetfl.algorithms.base import ClientTask, round_seed
from hetfl.algorithms.fedproto import (
    FedProto,
    ProtoUpdate,
    average_prototypes,
    class_prototypes,
    client_key,
    prototype_forward,
)
from hetfl.algorithms.fedtgp import FedTGP, adaptive_margin, class_gaps
from hetfl.data.base import Split
from hetfl.decentralized.protocol import node_key
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.resolve import load_config
from hetfl.runner import prepare, run
from hetfl.train import local_sgd

PROTO = {
    "name": "t-proto",
    "rounds": 2,
    "seed": 0,
    "data": {"name": "digits", "num_clients": 5, "local_test_fraction": 0.2,
             "partition": {"name": "dirichlet", "alpha": 0.3}},
    "model": {"name": "mlp", "hidden": "32,16"},
    "algorithm": {"name": "fedproto", "clients_per_round": 5},
    "train": {"steps": 4, "batch_size": 16, "lr": 0.05},
    "eval": {"every": 1},
}


def cfg(*overrides: str):
    return load_config(None, overrides, base=PROTO)


def rows_of(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------- client side
def test_one_class_client_uploads_one_prototype_the_mean_of_its_features():
    exp = prepare(cfg())
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    model = ctx.model.build(ctx.info)
    model.load_state_dict(state.models["global"])
    torch.manual_seed(1)
    data = Split(torch.randn(37, *ctx.info.input_shape), torch.full((37,), 7, dtype=torch.long))
    task = ClientTask(0, ctx.model, state.models["global"], ctx.train, seed=5)
    res = algo.local_update(task, model, data, torch.device("cpu"))
    assert res.extra["proto_labels"].tolist() == [7]
    assert res.extra["proto_counts"].tolist() == [37]
    assert res.extra["prototypes"].shape == (1, 16)
    model.eval()
    with torch.no_grad():  # the trained model's features without its head: every layer but the last ("out")
        feats = model[:-1](data.x)
    torch.testing.assert_close(res.extra["prototypes"][0], feats.mean(0), rtol=1e-5, atol=1e-6)
    # batching the prototype pass changes nothing but rounding
    protos, counts = class_prototypes(model, data, 10, batch_size=5)
    torch.testing.assert_close(protos[7], feats.mean(0), rtol=1e-5, atol=1e-6)
    assert counts.tolist() == [0] * 7 + [37, 0, 0] and protos[:7].abs().sum() == 0


def test_lambda_zero_is_local_training_bit_for_bit():
    """proto_weight = 0: two rounds of FedProto leave every client exactly the model two local_sgd calls give."""
    exp = prepare(cfg("algorithm.proto_weight=0.0"))
    algo, ctx = exp.algorithm, exp.ctx
    sim = Simulator(algo, exp.federation, ctx)
    state = init = algo.init_state(ctx)
    for rnd in (1, 2):
        state, _ = sim.run_round(state, rnd)
    for c in range(ctx.num_clients):
        model = ctx.model.build(ctx.info)
        model.load_state_dict(init.models["global"])
        data = exp.federation.client_train(c)
        for rnd in (1, 2):
            local_sgd(model, data, algo.round_train_config(ctx, rnd), seed=round_seed(ctx.seed, rnd, c))
        for k, v in model.state_dict().items():
            assert torch.equal(state.models[client_key(c)][k], v), (c, k)
    # and the regulariser does act once global prototypes exist (round 2)
    reg = prepare(cfg("algorithm.proto_weight=5.0"))
    sim = Simulator(reg.algorithm, reg.federation, reg.ctx)
    s = reg.algorithm.init_state(reg.ctx)
    s1, _ = sim.run_round(s, 1)  # no global prototypes yet: round 1 is plain local training
    first, _ = Simulator(algo, exp.federation, ctx).run_round(init, 1)
    assert torch.equal(s1.models[client_key(0)]["out.weight"], first.models[client_key(0)]["out.weight"])
    s2, _ = sim.run_round(s1, 2)
    assert not torch.equal(s2.models[client_key(0)]["out.weight"], state.models[client_key(0)]["out.weight"])


# ---------------------------------------------------------------------------------------------- server side
def test_server_average_weights_by_class_counts():
    a = (torch.tensor([0, 1]), torch.tensor([[0.0, 0.0], [1.0, 1.0]]), torch.tensor([1, 2]))
    b = (torch.tensor([0]), torch.tensor([[4.0, 8.0]]), torch.tensor([3]))
    mean, total = average_prototypes(*zip(a, b), num_classes=3, weighting="counts")
    # class 0: (1 * [0, 0] + 3 * [4, 8]) / 4; class 1: client a only; class 2: nobody
    torch.testing.assert_close(mean, torch.tensor([[3.0, 6.0], [1.0, 1.0], [0.0, 0.0]]))
    assert total.tolist() == [4, 2, 0]
    uniform, _ = average_prototypes(*zip(a, b), num_classes=3, weighting="uniform")
    torch.testing.assert_close(uniform[0], torch.tensor([2.0, 4.0]))


def test_server_step_keeps_classes_nobody_uploaded_and_counts_bytes():
    exp = prepare(cfg())
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    state.buffers["prototypes"][9] = 5.0
    state.buffers["proto_present"][9] = True
    upd = ProtoUpdate(families={0: 0, 1: 0}, labels=[torch.tensor([0, 1]), torch.tensor([0])],
                      protos=[torch.ones(2, 16), torch.full((1, 16), 3.0)], counts=[torch.tensor([1, 2]),
                                                                                 torch.tensor([1])])
    new = algo.server_step(state, upd, ctx)
    protos, present = algo.global_prototypes(new)
    assert present.tolist() == [True, True] + [False] * 7 + [True]
    assert torch.equal(protos[0], torch.full((16,), 2.0)) and torch.equal(protos[9], torch.full((16,), 5.0))
    assert new.buffers["proto_counts"][:2].tolist() == [2, 2]
    assert new.buffers["family"][:3].tolist() == [0, 0, -1]
    # sent before this step: one present class (16 float32 + its int64 label) to each of the 2 clients
    assert new.buffers["metrics"]["proto_bytes_down"] == 2 * (16 * 4 + 8)
    tasks = algo.configure_round(new, 2, [3], ctx)
    assert tasks[0].extra["proto_labels"].tolist() == [0, 1, 9]


def test_fedtgp_margin_on_a_hand_made_case():
    labels = torch.tensor([0, 0, 1, 2])
    protos = torch.tensor([[-1.0, 0.0], [1.0, 0.0], [3.0, 4.0], [0.0, 10.0]])  # class means (0,0), (3,4), (0,10)
    gaps = class_gaps(labels, protos, num_classes=4)
    # 0-1: 5, 0-2: 10, 1-2: sqrt(45); class 3 uploaded nothing: the smallest gap
    torch.testing.assert_close(gaps, torch.tensor([5.0, 5.0, 45 ** 0.5, 5.0], dtype=torch.float64))
    assert adaptive_margin(labels, protos, 4, cap=100.0) == pytest.approx(45 ** 0.5)
    assert adaptive_margin(labels, protos, 4, cap=6.0) == 6.0
    assert adaptive_margin(torch.tensor([2, 2]), protos[:2], 4, cap=3.0) == 3.0  # no pair of classes: the cap


def test_fedtgp_server_training_separates_the_prototypes():
    exp = prepare(cfg("algorithm.name='fedtgp'", "algorithm.server_epochs=50"))
    algo: FedTGP = exp.algorithm
    ctx = exp.ctx
    state = algo.init_state(ctx)
    torch.manual_seed(0)
    centers = torch.randn(10, 16) * 3
    labels = torch.arange(10).repeat(3)
    protos = centers[labels] + 0.1 * torch.randn(30, 16)
    upd = ProtoUpdate(families={0: 0}, labels=[labels], protos=[protos], counts=[torch.ones(30, dtype=torch.long)])
    new = algo.server_step(state, upd, ctx)
    glob, present = algo.global_prototypes(new)
    assert present.all() and glob.shape == (10, 16)
    nearest = torch.cdist(centers, glob).argmin(1)
    assert nearest.tolist() == list(range(10))  # every class's uploads are nearest its own global prototype
    assert new.buffers["metrics"]["tgp_margin"] > 0
    assert not torch.equal(new.models["prototypes"]["embedding.weight"], state.models["prototypes"]["embedding.weight"])


def test_nearest_prototype_forward_ignores_absent_classes():
    model = torch.nn.Sequential(torch.nn.Identity(), torch.nn.Linear(2, 3))
    protos = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.1, 0.0]])
    present = torch.tensor([True, True, False])
    logits = prototype_forward(protos, present)(model, torch.tensor([[0.1, 0.0], [9.0, 0.0]]))
    assert logits.argmax(1).tolist() == [0, 1]
    assert logits[0, 0] == pytest.approx(-0.01)


# ---------------------------------------------------------------------------------------------- runs
def test_runs_report_prototype_bytes_and_personal_accuracy(tmp_path):
    summary = run(cfg(), tmp_path / "p", quiet=True)
    assert summary["status"] == "complete" and summary["eval_by"] == "prototype"
    rows = rows_of(tmp_path / "p")
    # every client uploads, per class it holds, 16 float32 + an int64 label + an int64 count
    held = [int((np.bincount(prepare(cfg()).federation.client_train(c).y.numpy(), minlength=10) > 0).sum())
            for c in range(5)]
    assert rows[0]["proto_bytes_up"] == sum(held) * (16 * 4 + 8 + 8)
    assert rows[0]["proto_bytes_down"] == 0 and rows[1]["proto_bytes_down"] == 5 * 10 * (16 * 4 + 8)
    assert len(rows[-1]["client.test_acc"]) == 5
    assert rows[-1]["test_accuracy"] == pytest.approx(np.mean(rows[-1]["client.test_acc"]), abs=1e-6)
    assert 0 <= rows[-1]["client_acc_mean"] <= 1


def test_resume_equals_an_uninterrupted_run(tmp_path):
    over = ("algorithm.name='fedtgp'", "algorithm.server_epochs=5", "algorithm.clients_per_round=3")
    full = run(cfg(*over, "rounds=3"), tmp_path / "a", quiet=True)
    run(cfg(*over, "rounds=2"), tmp_path / "b", quiet=True)
    resumed = run(cfg(*over, "rounds=3"), resume=tmp_path / "b", quiet=True)
    assert resumed["test_accuracy"] == full["test_accuracy"]
    ra, rb = rows_of(tmp_path / "a")[-1], rows_of(tmp_path / "b")[-1]
    for key in ("client.test_acc", "tgp_loss", "tgp_margin", "client_acc_mean", "train_loss"):
        assert ra[key] == rb[key], key


def test_heterogeneous_families_keep_their_own_models(tmp_path):
    over = ("model.name='cnn'", "model.fc=16", "algorithm.families='cnn, mlp(hidden=32,16)'",
            "fleet.source='tiers'", "fleet.mix='a-b'", "algorithm.eval_by='head'")
    summary = run(cfg(*over), tmp_path / "h", quiet=True)
    assert "test_accuracy.mlp(hidden=32,16)" in summary and "test_accuracy.cnn" in summary
    assert summary["eval_by"] == "head"
    state = torch.load(tmp_path / "h" / "checkpoint.pt", weights_only=True)["state"]
    held = state["buffers"]["family"].tolist()
    for c, f in enumerate(held):  # every client trained the model of its family, and keeps it
        shapes = {k: v.shape for k, v in state["models"][client_key(c)].items()}
        family = ("cnn", "mlp(hidden=32,16)")[f]
        assert shapes == {k: v.shape for k, v in state["models"][family].items()}, c
    exp = prepare(cfg(*over))
    fams = exp.algorithm.client_families(exp.algorithm.init_state(exp.ctx), 1, exp.ctx)
    assert sorted(set(fams.tolist())) == [0, 1]


@pytest.mark.parametrize("overrides, message", [
    (("algorithm.weighting='median'",), "algorithm.weighting must be one of counts, uniform, got 'median'"),
    (("algorithm.eval_by='logits'",), "algorithm.eval_by must be one of prototype, head"),
    (("algorithm.proto_weight=-1.0",), "algorithm.proto_weight must be >= 0"),
    (("algorithm.name='fedtgp'", "algorithm.margin_cap=-1.0"), "algorithm.margin_cap must be >= 0"),
    (("model.name='cnn'", "algorithm.families='cnn, mlp(hidden=64)'"),
     "fedproto's prototypes need one feature dimension in front of every family's head"),
    (("algorithm.weighted=true",), "algorithm.weighted has no effect"),
    (("algorithm.aggregator='median'",), "algorithm.aggregator has no effect"),
    (('asynchronous.mode="fedbuff"',), "averages updates of one global model; algorithm FedProto"),
])
def test_bad_config(tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        run(cfg(*overrides), tmp_path / "r", quiet=True)
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("name", ["fedproto", "fedtgp"])
def test_privacy_is_refused_with_what_prototypes_reveal(tmp_path, name):
    with pytest.raises(ConfigError, match=f"cannot be honoured by algorithm '{name}'.*label set, its label histogram "
                                          "and its class-conditional feature means"):
        run(cfg(f"algorithm.name='{name}'", "privacy.clip=1.0", "privacy.noise_multiplier=1.0"), tmp_path / "r",
            quiet=True)
    assert not (tmp_path / "r").exists()
    assert FedProto.private_refusal == FedTGP.private_refusal


def test_worker_processes_give_the_in_process_run(tmp_path, one_thread):
    """Prototypes travel in task.extra / result.extra like any tensor: the worker pool gives the same run."""
    c = cfg("algorithm.name='fedtgp'", "algorithm.server_epochs=3")
    a = run(c, tmp_path / "inproc", quiet=True)
    b = run(c.with_engine(workers=2), tmp_path / "workers", quiet=True)
    assert a["test_accuracy"] == b["test_accuracy"]
    assert rows_of(tmp_path / "inproc")[-1]["client.test_acc"] == rows_of(tmp_path / "workers")[-1]["client.test_acc"]


def test_lambda_zero_equals_the_isolated_graph_algorithm(tmp_path):
    """proto_weight = 0, every client every round, scored by its head: hetfl's ``isolated`` (graph protocol, no
    communication) run for run: the same client models bit for bit and the same accuracies."""
    proto = run(cfg("algorithm.proto_weight=0.0", "algorithm.eval_by='head'"), tmp_path / "p", quiet=True)
    alone = run(cfg("algorithm={name='isolated'}"), tmp_path / "i", quiet=True)
    assert proto["test_accuracy"] == alone["test_accuracy"]
    assert rows_of(tmp_path / "p")[-1]["client.test_acc"] == rows_of(tmp_path / "i")[-1]["node.test_acc"]
    assert proto["client_acc_mean"] == alone["client_acc_mean"]
    mp = torch.load(tmp_path / "p" / "checkpoint.pt", weights_only=True)["state"]["models"]
    mi = torch.load(tmp_path / "i" / "checkpoint.pt", weights_only=True)["state"]["models"]
    for c in range(5):
        for k, v in mi[node_key(c)].items():
            assert torch.equal(mp[client_key(c)][k], v), (c, k)
