"""Successive layer training (SLT): identity with FedAvg, frozen layers, the stage schedule, memory budgets."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hetfl.algorithms.base import FROZEN, nbytes
from hetfl.algorithms.slt import allocate_rounds, derive_stages, fit_width, stage_of
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.fleet import Fleet
from hetfl.runner import prepare

IID = 'data.partition={name="iid"}'
MLP = 'model={name="mlp", hidden="32,32,32"}'
CONV = 'model={name="heterofl_conv", hidden="8,16,32"}'
AB = ('fleet.source="tiers"', 'fleet.mix="a-b"', "data.num_clients=8")


def _run(cfg, rounds):
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    reports = []
    for rnd in range(1, rounds + 1):
        state, report = sim.run_round(state, rnd)
        reports.append(report)
    return exp, state, reports


@pytest.mark.parametrize("model", [MLP, CONV])
@pytest.mark.parametrize("slt", ['stages="1x0"', 'budget="width"', 'stages="1x2"'])
def test_unconstrained_or_one_full_width_stage_equals_fedavg_bit_for_bit(digits_cfg, model, slt):
    """A uniform fleet (budget = the full model's memory: the table is the one stage (1, 0)), or one explicit
    full-width stage with nothing frozen (every tier can train all its full-width layers) is FedAvg."""
    common = (IID, model, "train.momentum=0.9", "train.weight_decay=0.001")
    _, ref, _ = _run(digits_cfg(*common, 'algorithm={name="fedavg", clients_per_round=3, weighted=false}'), 3)
    exp, got, _ = _run(digits_cfg(*common, f'algorithm={{name="slt", clients_per_round=3, static_bn=false, {slt}}}'),
                       3)
    plan = got.buffers["slt"]
    assert plan["rounds"].tolist() == [3] and plan["depth"].tolist() == [[plan["stages"][0, 1].item()]]
    ref, got = ref.models["global"], got.models["global"]
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def _share(exp, level) -> str:
    """A ``device(share=...)`` budget equal to the training memory of ``level`` on the fleet's 4 GB devices."""
    return f"{exp.algorithm.memory(exp.ctx, level) / (4.0 * 2**30)!r}"


def test_frozen_layers_are_neither_changed_nor_uploaded(digits_cfg):
    base = (IID, MLP, "train.weight_decay=0.01", "train.momentum=0.9", "rounds=2", 'fleet.source="tiers"',
            'fleet.mix="a"')
    probe = prepare(digits_cfg(*base, 'algorithm={name="slt", stages="1x2"}'))
    share = _share(probe, (1.0, 2, 1))  # exactly layer 2 at full width with layer 1 frozen: depth 1
    slt = f'algorithm={{name="slt", clients_per_round=3, stages="1x2", budget="device(share={share})"}}'
    cfg = digits_cfg(*base, slt)
    exp = prepare(cfg)
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    assert state.buffers["slt"]["depth"].tolist() == [[1]]
    before = {k: v.clone() for k, v in state.models["global"].items()}
    tasks = algo.configure_round(state, 1, [0, 1, 2], ctx)
    assert all(t.extra[FROZEN] == ["fc1.weight", "fc1.bias"] for t in tasks)
    # a client: the frozen layer's parameters do not train (no gradient, no weight decay) and do not come back
    task = tasks[0]
    model = task.model.build(ctx.info)
    model.load_state_dict(task.weights)
    assert [n for n, p in model.named_parameters() if not p.requires_grad] == ["fc1.weight", "fc1.bias"]
    res = algo.local_update(task, model, exp.federation.client_train(0), torch.device("cpu"))
    assert set(res.weights) == set(task.weights) - {"fc1.weight", "fc1.bias"}
    assert torch.equal(model.fc1.weight, task.weights["fc1.weight"])
    assert not torch.equal(res.weights["fc2.weight"], task.weights["fc2.weight"])
    # a round: bytes up are the returned tensors only; the global frozen layer is unchanged, the rest moved
    sim = Simulator(algo, exp.federation, ctx)
    new, report = sim.run_round(state, 1)
    frozen_bytes = nbytes({k: before[k] for k in ("fc1.weight", "fc1.bias")})
    assert report.bytes_up == report.bytes_down - len(report.clients) * frozen_bytes
    m = report.as_metrics()
    assert m["tier.w1.bytes_up"] == m["bytes_up"] < m["tier.w1.bytes_down"] == m["bytes_down"]
    glob = new.models["global"]
    assert torch.equal(glob["fc1.weight"], before["fc1.weight"]) and torch.equal(glob["fc1.bias"], before["fc1.bias"])
    assert not torch.equal(glob["fc2.weight"], before["fc2.weight"])
    # the accounting: the frozen prefix has no gradients, no SGD buffer, no backward
    from hetfl.accounting import model_cost, train_cost
    cost = model_cost(model, torch.zeros(1, *ctx.info.input_shape))
    full = model_cost(exp.ctx.model.build(ctx.info), torch.zeros(1, *ctx.info.input_shape))
    assert cost.trainable_params == full.params - 64 * 32 - 32
    assert cost.backward_flops == 2 * (full.forward_flops - 2 * 64 * 32)
    mem = [train_cost(c, 10, 16, momentum=True).peak_memory_bytes for c in (cost, full)]
    assert mem[0] < mem[1]


def test_stage_schedule_on_a_hand_made_case():
    def memory(s, b, d):  # bytes of a hand-made net: boundary 1 never fits a budget of 60
        return {0: 100 * s, 1: 61 + s, 2: 40 + 30 * s, 3: 50 + 10 * s}[b]

    assert fit_width(lambda s: 100 * s, 60) == 0.6 and fit_width(lambda s: 100 * s, 0.01) is None
    assert derive_stages(memory, 3, 60) == ((0.6, 0), (0.666, 2), (1.0, 3))
    assert derive_stages(memory, 3, 100) == ((1.0, 0),)
    with pytest.raises(ConfigError, match="cannot reach the full model"):
        derive_stages(memory, 3, 55)
    # the small model takes int(0.25 * 20) = 5 rounds, the others share 15 as 300 : 100 -> 11.25 : 3.75 -> 11 : 4
    assert allocate_rounds([(0.25, 0), (0.5, 1), (1.0, 2)], [100, 300, 100], 20) == [5, 11, 4]
    assert allocate_rounds([(0.5, 1), (1.0, 2)], [1, 1], 5) == [3, 2]
    assert allocate_rounds([(1.0, 0)], [7], 9) == [9]
    assert allocate_rounds([(0.5, 0), (0.5, 1), (1.0, 2)], [1, 100, 1], 4) == [2, 1, 1]  # the last stage runs
    assert [stage_of([5, 11, 4], r) for r in (1, 5, 6, 16, 17, 20, 25)] == [0, 0, 1, 1, 2, 2, 2]


def test_stage_schedule_as_run(digits_cfg):
    cfg = digits_cfg(IID, CONV, *AB, 'algorithm={name="slt", clients_per_round=4, stages="0.5x0,0.75x1,1x2", '
                     'stage_rounds="2,1,2"}', "rounds=5")
    exp, state, _ = _run(cfg, 5)
    algo, ctx = exp.algorithm, exp.ctx
    seen = []
    for rnd in range(1, 6):
        tasks = algo.configure_round(state, rnd, [0, 7], ctx)
        seen.append(tuple(t.weights["conv2.weight"].shape for t in tasks))
    # tier a (client 0) and b (client 7) follow one table: 8-16-32 at 1/2, then conv1 full, then conv1-2 full
    assert seen == [((8, 4, 3, 3),) * 2] * 2 + [((12, 8, 3, 3),) * 2] + [((16, 8, 3, 3),) * 2] * 2
    assert state.buffers["metrics"] == {**state.buffers["metrics"], "slt.stage": 2, "slt.width": 1.0, "slt.layers": 2}


def test_derived_table_and_budgets_on_the_digits_config(digits_cfg):
    exp = prepare(digits_cfg(IID, CONV, *AB, 'algorithm={name="slt", clients_per_round=4}', "rounds=20"))
    algo, ctx = exp.algorithm, exp.ctx
    plan = algo.make_plan(ctx)
    budgets = plan["budget"].tolist()
    assert budgets == [algo.memory(ctx, (1.0, 0, 0)), algo.memory(ctx, (0.5, 0, 0))]  # the tiers' widths' nets
    # golden (hetfl's accounting, batch 16, no momentum): conv1 at full width alone never fits the half-width
    # budget (boundary 1 skipped); the small model takes int(0.5 * 20) rounds, the rest go 4 : 6 by trainable size
    assert plan["stages"].tolist() == [[0.5, 0], [0.5, 2], [1.0, 3]]
    assert plan["rounds"].tolist() == [10, 4, 6]
    assert plan["depth"].tolist() == [[0, 0], [2, 1], [3, 1]]
    assert (plan["memory"] <= plan["budget"][None, :]).all()


def test_memory_budget_selection_on_a_hand_made_fleet(digits_cfg):
    base = (IID, MLP, "data.num_clients=4", "rounds=4")
    exp = prepare(digits_cfg(*base, 'algorithm={name="slt"}'))
    algo, ctx = exp.algorithm, exp.ctx
    small, deep = algo.memory(ctx, (1.0, 3, 1)), algo.memory(ctx, (1.0, 3, 2))
    # tiers a (clients 0, 1) and b (2, 3); a tier's budget is its smallest device's memory (share 1)
    fleet = Fleet(max_width=np.array([1.0, 1.0, 0.5, 0.5]), speed=np.ones(4),
                  memory_gb=np.array([deep, deep * 1.5, small * 1.01, small]) / 2**30,
                  bandwidth_mbps=np.ones(4), levels=(1.0, 0.5), proportions=np.array([0.5, 0.5]))
    ctx = dataclasses.replace(ctx, fleet=fleet)
    slt = dataclasses.replace(algo, budget="device(share=1.0)")
    assert slt.budgets(ctx) == [float(deep), float(small)]  # the smallest device of each tier
    plan = slt.make_plan(ctx)
    stages = [tuple(x) for x in plan["stages"].tolist()]
    assert stages[-1] == (1.0, 3) and stages[0][1] == 0
    for (s, b), depth, mem in zip(stages, plan["depth"].tolist(), plan["memory"].tolist()):
        for t, budget in enumerate(slt.budgets(ctx)):  # the deepest training that fits the tier's budget
            assert mem[t] <= budget and (depth[t] == b or slt.memory(ctx, (s, b, depth[t] + 1)) > budget)
    assert plan["depth"][-1].tolist() == [2, 1]
    tasks = slt.configure_round(slt.init_state(ctx), 4, [0, 3], ctx)  # the last stage: tier a freezes less
    assert tasks[0].extra[FROZEN] == ["fc1.weight", "fc1.bias"]
    assert tasks[1].extra[FROZEN] == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]


@pytest.mark.parametrize("setting, message", [
    ('stages="0.5y2"', "algorithm.stages: cannot read '0.5y2'"),
    ('stages="1.5x0"', "needs a width in (0, 1]"),
    ('stage_rounds="a,b"', "algorithm.stage_rounds must be comma-separated round counts"),
    ('budget="ram"', "unknown memory budget 'ram': algorithm.budget must be one of device, width"),
    ('budget="device(share=2)"', "algorithm.budget = 'device(share=2)': share must be in (0, 1], got 2.0"),
    ('budget="device(fraction=0.1)"', "memory budget 'device' has no parameter 'fraction'; its parameters: share"),
])
def test_bad_settings_name_the_field(digits_cfg, setting, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        digits_cfg(f'algorithm={{name="slt", {setting}}}')


@pytest.mark.parametrize("overrides, message", [
    (('algorithm={name="slt", stages="0.5x0,1x9"}', MLP), "asks for 9 full-width layers, but model 'mlp' has 3"),
    (('algorithm={name="slt", stages="0.5x0,1x2", stage_rounds="1,1"}', MLP, "rounds=3"),
     "must give one count per stage"),
    (('algorithm={name="slt"}', CONV, 'fleet.source="tiers"', 'fleet.mix="a-b-c-d"'), "cannot reach the full model"),
    (('algorithm={name="slt", budget="device(share=1e-9)"}', MLP, 'fleet.source="tiers"', 'fleet.mix="a-b"'),
     "do not fit even the model at width 0.001"),
    (('algorithm={name="slt"}', 'data={name="synthetic_text", num_clients=0, num_groups=4, samples_per_group=30, '
      'partition={name="natural"}}', 'model={name="lstm"}'), "layerwise"),
])
def test_bad_runs_are_refused_before_training(digits_cfg, overrides, message):
    with pytest.raises(ConfigError, match=message):
        exp = prepare(digits_cfg(*overrides))
        exp.algorithm.init_state(exp.ctx)


def test_checkpoint_resume_equals_uninterrupted(tmp_path, digits_cfg, monkeypatch):
    from hetfl.results import read_metrics
    from hetfl.runner import run

    cfg = digits_cfg(CONV, *AB, 'algorithm={name="slt", clients_per_round=4, stages="0.5x0,0.75x1,1x3"}',
                     "rounds=5", "checkpoint_every=2")
    run(cfg, tmp_path / "full", quiet=True)
    original = Simulator.run_round

    def crash_at_4(self, state, rnd):
        if rnd == 4:
            raise KeyboardInterrupt
        return original(self, state, rnd)

    monkeypatch.setattr(Simulator, "run_round", crash_at_4)
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "cut", quiet=True)
    monkeypatch.setattr(Simulator, "run_round", original)
    run(None, resume=tmp_path / "cut", quiet=True)
    a, b = (torch.load(tmp_path / e / "checkpoint.pt", weights_only=True)["state"] for e in ("full", "cut"))
    for k in a["models"]["global"]:
        assert torch.equal(a["models"]["global"][k], b["models"]["global"][k]), k
    drop = ("time", "_s")
    rows = [[{k: v for k, v in r.items() if not any(d in k for d in drop)} for r in read_metrics(tmp_path / e)]
            for e in ("full", "cut")]
    assert rows[0] == rows[1]
    assert [r["slt.stage"] for r in rows[0]] == [0, 0, 1, 2, 2]  # rounds 2 : 1 : 2 by SLT's rule


def test_configs_load_and_prepare():
    from pathlib import Path

    from hetfl.resolve import load_config

    root = Path(__file__).parents[1] / "configs"
    exp = prepare(load_config(root / "fmnist_slt.toml", ['data.name="digits"', "data.num_clients=8",
                                                          'model={name="heterofl_conv", hidden="8,16,32"}']))
    state = exp.algorithm.init_state(exp.ctx)
    assert len(state.buffers["slt"]["stages"]) >= 2
    exp = prepare(load_config(root / "digits_slt.toml"))
    assert exp.algorithm.make_plan(exp.ctx)["stages"][-1].tolist() == [1.0, 3.0]


def test_simulator_and_two_workers_give_the_same_model(tmp_path, digits_cfg, one_thread):
    """Results without their frozen tensors travel back from worker processes (another layout than the task's)."""
    from hetfl.results import read_metrics
    from hetfl.runner import run

    cfg = digits_cfg(CONV, *AB, 'algorithm={name="slt", clients_per_round=4, stages="1x2", stage_rounds="2"}',
                     "rounds=2")
    run(cfg, tmp_path / "inproc", quiet=True)
    run(cfg.with_engine(workers=2), tmp_path / "workers", quiet=True)
    a, b = (torch.load(tmp_path / e / "checkpoint.pt", weights_only=True)["state"] for e in ("inproc", "workers"))
    for k in a["models"]["global"]:
        assert torch.equal(a["models"]["global"][k], b["models"]["global"][k]), k
    ra, rb = read_metrics(tmp_path / "inproc"), read_metrics(tmp_path / "workers")
    assert [r["bytes_up"] for r in ra] == [r["bytes_up"] for r in rb]
    assert ra[-1]["bytes_up"] < ra[-1]["bytes_down"]  # tier b freezes conv1 at this stage


def test_a_task_with_frozen_tensors_and_its_result_cross_the_flower_codec(digits_cfg):
    """Flower carries the frozen list and a result without the frozen tensors; validation accepts exactly that."""
    pytest.importorskip("flwr")
    from flwr.app import ConfigRecord

    from hetfl.flower import codec
    from hetfl.reliability.validate import validate_result

    exp = prepare(digits_cfg(IID, MLP, 'algorithm={name="slt", clients_per_round=2, stages="1x2"}',
                             'fleet.source="tiers"', 'fleet.mix="a-b"', "data.num_clients=4"))
    algo, ctx = exp.algorithm, exp.ctx
    task = algo.configure_round(algo.init_state(ctx), 1, [3], ctx)[0]  # tier b: fc1 frozen
    assert task.extra[FROZEN] == ["fc1.weight", "fc1.bias"]
    back, name, _ = codec.decode_task(codec.encode_task(task, algo, ConfigRecord({})))
    assert name == "slt" and back.extra == task.extra and back.model == task.model
    model = back.model.build(ctx.info)
    model.load_state_dict(back.weights)
    res = algo.local_update(back, model, exp.federation.client_train(3), torch.device("cpu"))
    got, _ = codec.decode_result(codec.encode_result(res))
    assert list(got.weights) == list(res.weights) and "fc1.weight" not in got.weights
    assert validate_result(task, got) is None
    assert "unexpected weights fc1.weight" in validate_result(task, dataclasses.replace(
        got, weights={**got.weights, "fc1.weight": task.weights["fc1.weight"]}))
    assert "missing weights fc2.bias" in validate_result(task, dataclasses.replace(
        got, weights={k: v for k, v in got.weights.items() if k != "fc2.bias"}))
