"""Depth and width x depth submodels (DepthFL, ScaleFL, InclusiveFL) and FIARSE's element masks."""

from __future__ import annotations

import pytest
import torch

from hetfl.engines.simulator import Simulator
from hetfl.runner import prepare

IID = 'data.partition={name="iid"}'
MLP = 'model={name="mlp", hidden="32,32"}'


def _final(cfg, rounds=3):
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    for rnd in range(1, rounds + 1):
        state, _ = sim.run_round(state, rnd)
    return state.models["global"]


NO_KD = {"depthfl": "kd=0.0", "scalefl": "kd_gamma=0.0", "inclusivefl": "mom_beta=0.0"}


@pytest.mark.parametrize("algo", list(NO_KD))
@pytest.mark.parametrize("model", [MLP, 'model={name="heterofl_conv", hidden="8,16", norm="gn"}'])
def test_full_width_and_depth_equals_fedavg_bit_for_bit(digits_cfg, algo, model):
    common = (IID, model, "train.momentum=0.9", "train.grad_clip=1.0")
    ref = _final(digits_cfg(*common, 'algorithm={name="fedavg", clients_per_round=3, weighted=false}'))
    got = _final(digits_cfg(*common, f'algorithm={{name="{algo}", clients_per_round=3, {NO_KD[algo]}}}'))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


CONV4 = 'model={name="heterofl_conv", hidden="8,8,16,16"}'
MLP4 = 'model={name="mlp", hidden="16,16,16,16"}'
TIERS4 = ('fleet.source="tiers"', 'fleet.mix="a-b-c-d"', "data.num_clients=8")


def test_depth_cut_extract_then_scatter_is_identity_on_what_it_holds(digits_cfg):
    from hetfl.algorithms.depthfl import keys_of
    from hetfl.hetero import spec_for
    from hetfl.hetero.extract import OverlapAverage

    cfg = digits_cfg(CONV4, *TIERS4, 'algorithm={name="scalefl", clients_per_round=8}')
    exp = prepare(cfg)
    algo, ctx = exp.algorithm, exp.ctx
    glob = algo.init_state(ctx).models["global"]
    spec = spec_for(algo.global_ref(ctx), ctx.info)
    for level in algo.level_table(ctx):
        ref = algo.client_ref(ctx, level)
        sub = algo.submodel(glob, ctx, ref, level[0])
        assert set(sub) == set(keys_of(ref, ctx.info)) <= set(glob)
        assert level == (1.0, 1.0) or set(sub) < set(glob)
        model = ref.build(ctx.info)
        model.load_state_dict(sub)  # the shapes of the client's real network
        acc = OverlapAverage(glob, spec)
        acc.add({k: v.clone() for k, v in sub.items()}, algo.selection(ctx, level[0]))
        back = acc.result()
        for k in glob:
            assert torch.equal(back[k], glob[k]), (level, k)
        # and a changed submodel lands exactly on the elements it holds
        acc = OverlapAverage(glob, spec)
        acc.add({k: v + 1 for k, v in sub.items()}, algo.selection(ctx, level[0]))
        moved = acc.result()
        assert not any(torch.equal(moved[k], glob[k]) for k in sub if glob[k].is_floating_point())
        assert all(torch.equal(moved[k], glob[k]) for k in set(glob) - set(sub))
        assert torch.equal(algo.submodel(moved, ctx, ref, level[0])["conv1.weight"], sub["conv1.weight"] + 1)


@pytest.mark.parametrize("algo", ["depthfl", "scalefl", "inclusivefl"])
def test_heterogeneous_depth_fleet_runs_and_evaluates_every_level(tmp_path, digits_cfg, algo):
    from hetfl.results import read_metrics
    from hetfl.runner import run

    cfg = digits_cfg(MLP4, *TIERS4, f'algorithm={{name="{algo}", clients_per_round=6}}', "rounds=2")
    summary = run(cfg, tmp_path / algo, quiet=True)
    assert summary["status"] == "complete"
    row = read_metrics(tmp_path / algo)[-1]
    exp = prepare(cfg)
    labels = [k for k in exp.algorithm.eval_targets(exp.algorithm.init_state(exp.ctx), exp.ctx) if k != "global"]
    assert len(labels) >= 2
    for label in labels:
        assert f"test_accuracy.{label}" in row, label
    assert "test_accuracy" in row and "tier_acc.global" in row


# ------------------------------------------------------------------------------------------- FIARSE
def test_fiarse_at_capacity_one_equals_fedavg_bit_for_bit(digits_cfg):
    common = (IID, MLP, "train.momentum=0.9", "train.grad_clip=1.0")
    ref = _final(digits_cfg(*common, 'algorithm={name="fedavg", clients_per_round=3, weighted=false}'))
    got = _final(digits_cfg(*common, 'algorithm={name="fiarse", clients_per_round=3}'))
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


def test_fiarse_masks_thresholds_and_gradient():
    from hetfl.aggregation import WeightedMean
    from hetfl.hetero.importance import TCBMask, masks, place_masked, sparse_bytes, thresholds

    w = {"a": torch.tensor([0.1, -0.5, 0.3, -0.05]), "b": torch.tensor([[1.0, -0.2], [0.0, 0.4]]), "n": torch.ones(2)}
    taus = thresholds(w, ["a", "b"], 0.5, "global")  # 4 of 8 maskable elements: |.| >= 0.3
    assert taus == {"a": 0.30000001192092896, "b": 0.30000001192092896}
    m = masks(w, taus)
    assert m["a"].tolist() == [False, True, True, False] and m["b"].tolist() == [[True, False], [False, True]]
    assert thresholds(w, ["a", "b"], 1.0) == {}
    kept, nbytes = sparse_bytes(w, taus)
    assert kept == 4 + 2 and nbytes == 4 * 4 + 1 + 1 + 2 * 4
    theta = torch.tensor([0.5, -0.1, 1.0], requires_grad=True)
    TCBMask.apply(theta, 0.5).sum().backward()
    # kept |theta| = tau: factor 1 + 2 tau^2 / (2 tau)^2 = 1.5; 1.0: 1 + 1 / 1.5^2; masked: 0
    assert torch.allclose(theta.grad, torch.tensor([1.5, 0.0, 1 + 1 / 2.25]))
    acc = WeightedMean({"global": {"a": torch.zeros(4)}})
    acc.add(place_masked({"a": torch.ones(4)}, {"a": torch.tensor([True, True, False, False])}))
    acc.add(place_masked({"a": torch.full((4,), 3.0)}, {"a": torch.tensor([True, False, False, False])}))
    assert acc.result()["global"]["a"].tolist() == [2.0, 1.0, 0.0, 0.0]


def test_fiarse_heterogeneous_fleet_trains_masked_submodels(tmp_path, digits_cfg):
    from hetfl.results import read_metrics
    from hetfl.runner import run

    cfg = digits_cfg(MLP, 'fleet.source="tiers"', 'fleet.mix="a-b-c-d"', "data.num_clients=8", "rounds=2",
                     'algorithm={name="fiarse", clients_per_round=8}')
    assert run(cfg, tmp_path / "f", quiet=True)["status"] == "complete"
    row = read_metrics(tmp_path / "f")[-1]
    for r in ("0.25", "0.0625", "0.015625"):
        assert f"test_accuracy.r{r}" in row and f"tier_acc.r{r}" in row
        assert row[f"kept_params.r{r}"] < row["dense_params"]
        assert row[f"sparse_bytes.r{r}"] < row["dense_bytes"]
    assert row["kept_params.r0.0625"] < row["kept_params.r0.25"]


# ------------------------------------------------------------------------------------------- engines
ENGINE_CASES = {
    "depthfl": 'algorithm={name="depthfl", clients_per_round=4, kd_rampup=1}',
    "scalefl": 'algorithm={name="scalefl", clients_per_round=4, kd_start=0.0}',
    "inclusivefl": 'algorithm={name="inclusivefl", clients_per_round=4}',
    "fiarse": 'algorithm={name="fiarse", clients_per_round=4}',
}


@pytest.mark.parametrize("algo", list(ENGINE_CASES))
def test_simulator_and_two_workers_give_the_same_model(tmp_path, digits_cfg, algo):
    from hetfl.results import read_metrics
    from hetfl.runner import run

    model = 'model={name="transformer", d_model=16, heads=2, ffn=16, layers=3}' if algo == "inclusivefl" else MLP4
    data = ('data={name="synthetic_text", num_clients=0, num_groups=4, samples_per_group=30, '
            'partition={name="natural"}}') if algo == "inclusivefl" else "data.num_clients=4"
    cfg = digits_cfg(data, model, 'fleet.source="tiers"', 'fleet.mix="a-b-c-d"', "rounds=2", ENGINE_CASES[algo])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the in-process run at one thread per client, as each worker trains
    try:
        run(cfg, tmp_path / "inproc", quiet=True)
    finally:
        torch.set_num_threads(threads)
    run(cfg.with_engine(workers=2), tmp_path / "workers", quiet=True)
    a, b = (torch.load(tmp_path / e / "checkpoint.pt", weights_only=True)["state"] for e in ("inproc", "workers"))
    for k in a["models"]["global"]:
        assert torch.equal(a["models"]["global"][k], b["models"]["global"][k]), k
    ra, rb = read_metrics(tmp_path / "inproc"), read_metrics(tmp_path / "workers")
    for x, y in zip(ra, rb):
        assert x["test_accuracy"] == y["test_accuracy"] and x["bytes_up"] == y["bytes_up"]
    if algo == "inclusivefl":  # the transformer's layers carry momentum from the deeper levels
        assert a["buffers"]["momentum"] and ra[-1]["momentum_blended_tensors"] > 0


@pytest.mark.parametrize("algo", ["depthfl", "scalefl", "inclusivefl", "fiarse"])
def test_fashion_mnist_configs_load_and_prepare(algo):
    from pathlib import Path

    from hetfl.resolve import load_config

    path = Path(__file__).parents[1] / "configs" / f"fmnist_{algo}.toml"
    # fashion_mnist may not be registered in this tree: the same config on digits, small
    small = 'model={name="heterofl_conv", hidden="4,4,8,8"}'
    cfg = load_config(path, ['data.name="digits"', "data.num_clients=8", small])
    exp = prepare(cfg)
    state = exp.algorithm.init_state(exp.ctx)
    tasks = exp.algorithm.configure_round(state, 1, list(range(8)), exp.ctx)
    assert len({t.model for t in tasks} if algo != "fiarse" else {t.extra["capacity"] for t in tasks}) == 4


def test_exit_losses():
    import torch.nn.functional as F

    from hetfl.algorithms.base import ClientTask
    from hetfl.algorithms.depthfl import DepthFL, levels_for_tiers, mutual_kl, parse_levels
    from hetfl.algorithms.scalefl import ScaleFL
    from hetfl.config import TrainConfig
    from hetfl.models import ModelRef

    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(3, 5, 4, generator=g), torch.tensor([0, 1, 2, 3, 0])
    assert mutual_kl(torch.stack([z[0], z[0]])) == 0
    kl01 = F.kl_div(F.log_softmax(z[1], -1), F.softmax(z[0], -1), reduction="batchmean")
    kl10 = F.kl_div(F.log_softmax(z[0], -1), F.softmax(z[1], -1), reduction="batchmean")
    assert torch.allclose(mutual_kl(z[:2]), kl01 + kl10)
    task = ClientTask(0, ModelRef("mlp"), {}, TrainConfig(), 0, {"kd": 0.5})
    ce = sum(F.cross_entropy(z[i], y) for i in range(3))
    assert torch.allclose(DepthFL().exit_loss(task)(z, y), ce + 0.5 * mutual_kl(z))
    assert DepthFL().kd_weight(1) == pytest.approx(torch.exp(torch.tensor(-5.0)).item())
    assert DepthFL().kd_weight(400) == 1.0
    one = z[:1]
    assert torch.equal(ScaleFL().exit_loss(task)(one, y), F.cross_entropy(one[0], y))
    t = 3.0
    kd = [(F.softmax(z[2] / t, -1) * (F.log_softmax(z[2] / t, -1) - F.log_softmax(z[j] / t, -1))).mean()
          for j in range(2)]
    want = (3 * F.cross_entropy(z[2], y) + 1 * (F.cross_entropy(z[0], y) + 0.5 * 9 * kd[0])
            + 2 * (F.cross_entropy(z[1], y) + 0.5 * 9 * kd[1])) / 6
    assert torch.allclose(ScaleFL().exit_loss(task)(z, y), want)
    assert levels_for_tiers(parse_levels("1x1,1x0.75,1x0.5,1x0.25"), 2) == ((1.0, 1.0), (1.0, 0.25))
    assert levels_for_tiers(parse_levels("1x1,0.5x0.5"), 1) == ((1.0, 1.0),)


# ------------------------------------------------------------------------------------------- level schedules
def test_level_schedule_lets_strong_clients_train_weaker_levels_and_the_server_recomputes_them(digits_cfg):
    cfg = digits_cfg(MLP4, *TIERS4, 'algorithm={name="depthfl", clients_per_round=8, '
                     'level_schedule="mixture(q=0.7)"}')
    exp = prepare(cfg)
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    table, tiers = algo.level_table(ctx), algo.tiers(ctx, 1)
    clients = list(range(8))
    stepped = 0
    for rnd in range(1, 6):
        tasks = algo.configure_round(state, rnd, clients, ctx)
        for task in tasks:
            level = tuple(task.extra["level"])
            own = table[int(tiers[task.client_id])]
            assert table.index(level) >= table.index(own)  # never stronger than the client's tier
            assert algo.client_level(ctx, rnd, task.client_id) == level  # what aggregate() recomputes
            stepped += level != own
    assert stepped > 0
    # "max" (the default) is every client at its own tier's level
    plain = prepare(digits_cfg(MLP4, *TIERS4, 'algorithm={name="depthfl", clients_per_round=8}'))
    assert [tuple(t.extra["level"]) for t in plain.algorithm.configure_round(state, 1, clients, plain.ctx)] == \
        [table[int(t)] for t in tiers[:8]]
    _final(cfg, rounds=2)  # a round with mixed levels aggregates


def test_level_schedule_refuses_adaptive_and_unknown_names(digits_cfg):
    from hetfl.errors import ConfigError

    with pytest.raises(ConfigError, match=r"algorithm.level_schedule: 'adaptive' needs every width's validation"):
        prepare(digits_cfg(MLP4, *TIERS4, 'algorithm={name="depthfl", level_schedule="adaptive"}'))
    with pytest.raises(ConfigError, match=r"algorithm.level_schedule must be one of"):
        prepare(digits_cfg(MLP4, *TIERS4, 'algorithm={name="scalefl", level_schedule="often"}'))


def test_exit_heads_read_a_token_model_at_its_last_position_and_average_feature_maps():
    from hetfl.hetero.depth import ExitHead

    torch.manual_seed(0)
    seq = ExitHead(4, 3, channel_dim=2, ndim=3)  # (batch, positions, channels): LSTM / Transformer states
    x = torch.randn(5, 7, 4)
    assert torch.equal(seq(x), seq.fc(x[:, -1]))
    y = x.clone()
    y[:, :-1] += 10.0  # earlier positions do not reach the exit directly
    assert torch.equal(seq(y), seq(x))
    conv = ExitHead(4, 3, channel_dim=1, ndim=4)  # (batch, channels, H, W)
    z = torch.randn(5, 4, 3, 3)
    assert torch.allclose(conv(z), conv.fc(z.mean(dim=(2, 3))))
    conv1d = ExitHead(4, 3, channel_dim=1, ndim=3)  # (batch, channels, length): averaged, not the last step
    w = torch.randn(5, 4, 6)
    assert torch.allclose(conv1d(w), conv1d.fc(w.mean(dim=2)))


def test_loss_rules_are_a_registry_any_depth_method_takes(tmp_path, digits_cfg):
    """A new loss rule is one registered dataclass: the depth methods take it through algorithm.loss."""
    from dataclasses import dataclass

    import torch.nn.functional as F

    from hetfl.errors import ConfigError
    from hetfl.hetero.losses import LOSS_RULES, LossRule, loss_rule
    from hetfl.results import read_metrics
    from hetfl.runner import run

    @dataclass(frozen=True)
    class DeepestOnly(LossRule):
        scale: float = 1.0

        def loss(self, weight, labels=None):
            return lambda z, y: self.scale * F.cross_entropy(z[-1], y)

    LOSS_RULES.register("test_deepest_only")(DeepestOnly)
    try:
        assert loss_rule("test_deepest_only(scale=2.0)") == DeepestOnly(scale=2.0)
        for rule in ("test_deepest_only(scale=2.0)", "exits(masked=true)", "mutual_kd(weight_max=0.5; rampup=0)"):
            out = tmp_path / rule.split("(")[0]
            run(digits_cfg(MLP, 'fleet.source="tiers"', 'fleet.mix="a-b"', "data.num_clients=6", "rounds=1",
                           f'algorithm={{name="scalefl", levels="1x1,0.5x0.5", clients_per_round=4, loss="{rule}"}}'),
                out, quiet=True)
            assert read_metrics(out)[-1]["train_loss"] > 0
    finally:
        LOSS_RULES._entries.pop("test_deepest_only")
    with pytest.raises(ConfigError, match="unknown loss rule 'nope'"):
        run(digits_cfg(MLP, 'algorithm={name="depthfl", loss="nope"}'), tmp_path / "bad", quiet=True)
    with pytest.raises(ConfigError, match="mutual_kd needs"):
        run(digits_cfg(MLP, 'algorithm={name="depthfl", loss="mutual_kd(temperature=0.0)"}'), tmp_path / "bad2",
            quiet=True)


def test_masked_exits_zero_absent_labels():
    from hetfl.hetero.losses import ExitsCE

    z = torch.tensor([[[2.0, 5.0, -1.0]]])  # one exit, one sample, three classes
    y = torch.tensor([0])
    held = torch.tensor([True, False, True])
    got = ExitsCE(masked=True).loss(0.0, held)(z, y)
    want = torch.nn.functional.cross_entropy(torch.tensor([[2.0, 0.0, -1.0]]), y)
    assert torch.allclose(got, want)


def test_depth_levels_take_an_index_policy(tmp_path, digits_cfg):
    """A rolling window on a width x depth level: the task holds the window's channels, the server places them
    back there, and the deployed submodel is evaluated at the prefix."""
    from hetfl.runner import prepare

    exp = prepare(digits_cfg(MLP, 'fleet.source="tiers"', 'fleet.mix="a-b"', "data.num_clients=6",
                             'algorithm={name="scalefl", levels="1x1,0.5x0.5", index_policy="rolling", '
                             'clients_per_round=6}'))
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    narrow = [c for c in range(6) if algo.level_of(ctx, 5)(c)[0] == 0.5]
    sel = algo.selection(ctx, 0.5, 5, narrow[0])
    assert any(not torch.equal(v, torch.arange(len(v))) for v in sel.values())  # not the prefix in round 5
    tasks = algo.configure_round(state, 5, narrow[:1], ctx)
    placed = algo.placer(state, 5, ctx)(type("R", (), {"client_id": narrow[0], "weights": tasks[0].weights,
                                                       "num_samples": 1, "extra": {}})())
    glob = state.models["global"]
    for key, piece in placed.pieces.items():  # the task's values sit exactly where the placement puts them
        assert torch.equal(piece.gather(glob[key]), tasks[0].weights[key])


def test_depth_rules_are_a_registry(tmp_path, digits_cfg):
    """Which blocks a level keeps is a registered rule: 'round' keeps fewer blocks than 'ceil' at 0.4 of 3, and a
    new rule registered in the test runs through algorithm.depth_rule."""
    from dataclasses import dataclass

    from hetfl.errors import ConfigError
    from hetfl.hetero.depth import DEPTH_RULES, depth_rule, kept_blocks
    from hetfl.runner import prepare, run

    assert kept_blocks(3, 0.4) == 2 and kept_blocks(3, 0.4, "round") == 1 and kept_blocks(3, 1.0, "round") == 3

    @dataclass(frozen=True)
    class OneBlock:
        def count(self, num_blocks, depth):
            return 1 if depth < 1 else num_blocks

    DEPTH_RULES.register("test_one_block")(OneBlock)
    try:
        cfg = digits_cfg('model={name="mlp", hidden="32,32,32"}', 'fleet.source="tiers"', 'fleet.mix="a-b"',
                         "data.num_clients=6", "rounds=1",
                         'algorithm={name="depthfl", levels="1x1,1x0.75", depth_rule="test_one_block", '
                         'clients_per_round=4}')
        exp = prepare(cfg)
        weak = exp.algorithm.client_ref(exp.ctx, (1.0, 0.75))
        assert ("blocks", "test_one_block") in weak.params
        keys = weak.build(exp.ctx.info).state_dict()
        assert not any(k.startswith("net.2") or k.startswith("fc2") for k in keys)  # one block kept
        run(cfg, tmp_path / "r", quiet=True)
    finally:
        DEPTH_RULES._entries.pop("test_one_block")
        depth_rule.cache_clear()
    with pytest.raises(ConfigError, match="unknown depth rule 'nope'"):
        run(digits_cfg(MLP, 'algorithm={name="depthfl", depth_rule="nope"}'), tmp_path / "bad", quiet=True)


def test_mutual_kd_ramp_scales_to_the_run():
    """DepthFL's ramp over 300 rounds leaves a 100-round run near 0 (the audit's 0.039 mean); as a share of the
    run it reaches the full weight within the run."""
    import numpy as np

    from hetfl.hetero.losses import MutualKD

    fixed = [MutualKD().weight(r, 100) for r in range(1, 101)]
    assert float(np.mean(fixed)) == pytest.approx(0.039, abs=0.005)
    scaled = MutualKD(rampup_share=0.3)
    assert scaled.weight(1, 100) == pytest.approx(MutualKD(rampup=30).weight(1, 100))
    assert scaled.weight(31, 100) == 1.0 and scaled.weight(31, 1000) < 0.2


def test_depthfl_ramp_scales_to_the_run_and_kd_off_is_zero_every_round():
    """issue 40 item 3: 100 rounds of the 300-round ramp average a weight of 0.039; kd_rampup_share = 0.3 makes it
    DepthFL's ramp over 30 % of the run (mean 0.81, full weight from round 31); kd = 0 / kd_gamma = 0 switch the
    distillation off in every round (the KD-off ablations)."""
    from hetfl.algorithms.depthfl import DepthFL
    from hetfl.algorithms.scalefl import ScaleFL
    from hetfl.errors import ConfigError

    def mean(algo, rounds=100):
        return sum(algo.loss_rule.weight(t, rounds) for t in range(1, rounds + 1)) / rounds

    assert mean(DepthFL()) == pytest.approx(0.0393, abs=1e-4)
    scaled = DepthFL(kd_rampup_share=0.3)
    assert mean(scaled) == pytest.approx(0.8137, abs=1e-4)
    assert scaled.kd_weight(31, 100) == 1.0 and scaled.kd_weight(30, 100) < 1.0
    assert scaled.kd_weight(301, 1000) == DepthFL().kd_weight(301, 1000) == 1.0  # DepthFL's own 1 000 rounds
    assert mean(DepthFL(kd=0)) == 0.0 and mean(ScaleFL(kd_gamma=0)) == 0.0
    with pytest.raises(ConfigError, match="algorithm.kd_rampup_share must be in \\[0, 1\\].*got 1.5"):
        DepthFL(kd_rampup_share=1.5)
