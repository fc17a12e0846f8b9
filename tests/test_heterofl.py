"""Submodel algorithms end to end: identities with FedAvg, evaluation at every width, baselines."""

from __future__ import annotations

import pytest
import torch

from hetfl.data.base import DataInfo
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.evaluation import Evaluator
from hetfl.model_cache import ModelCache
from hetfl.models import ModelRef
from hetfl.results import read_metrics
from hetfl.runner import prepare, run

IID = 'data.partition={name="iid"}'


def _final(cfg, rounds=3):
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    for rnd in range(1, rounds + 1):
        state, _ = sim.run_round(state, rnd)
    return state.models["global"]


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "feddropout", "fjord"])
@pytest.mark.parametrize("model", ['model={name="mlp", hidden="32"}', 'model={name="heterofl_conv", hidden="8,16"}'])
def test_all_clients_at_width_one_equal_fedavg_bit_for_bit(digits_cfg, algo, model):
    common = (IID, model, "train.momentum=0.9", "train.grad_clip=1.0")
    ref = _final(digits_cfg(*common, 'algorithm={name="fedavg", clients_per_round=3, weighted=false}'))
    # static BN would keep the running statistics out of the average; FedAvg averages them
    got = _final(digits_cfg(*common, f'algorithm={{name="{algo}", clients_per_round=3, weighted=false, '
                                     f'static_bn=false}}'))
    assert ref.keys() == got.keys()
    for k in ref:
        assert torch.equal(ref[k], got[k]), k


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "feddropout", "fjord"])
def test_heterogeneous_fleet_runs_and_evaluates_every_width(tmp_path, digits_cfg, algo):
    cfg = digits_cfg(f'algorithm={{name="{algo}", clients_per_round=5}}', 'fleet.source="tiers"',
                     'fleet.mix="a-b-e"', "data.num_clients=6", 'model={name="heterofl_conv", hidden="8,16"}',
                     "rounds=2")
    summary = run(cfg, tmp_path / algo, quiet=True)
    assert summary["status"] == "complete"
    row = read_metrics(tmp_path / algo)[-1]
    for key in ("test_accuracy", "test_accuracy.w0.5", "test_accuracy.w0.0625", "tier_acc.global", "tier_acc.w0.5",
                "tier_acc.w0.0625"):
        assert key in row, key
    if algo != "feddropout":  # static BN: statistics recomputed for evaluation (off for random subsets)
        assert row["bn_calibration_samples"] > 0
    assert row["bytes_down"] < 5 * sum(v.numel() * 4 for v in _final(cfg, 0).values())  # submodels are smaller


def test_fleet_levels_below_full_get_smaller_models(digits_cfg):
    cfg = digits_cfg('algorithm={name="heterofl", clients_per_round=6}', 'fleet.source="tiers"',
                     'fleet.mix="a-e"', "data.num_clients=6", 'model={name="mlp", hidden="32"}')
    exp = prepare(cfg)
    state = exp.algorithm.init_state(exp.ctx)
    tasks = exp.algorithm.configure_round(state, 1, list(range(6)), exp.ctx)
    widths = sorted({t.model.width for t in tasks})
    assert widths == [0.0625, 1.0]
    small = next(t for t in tasks if t.model.width < 1)
    assert small.weights["fc1.weight"].shape == (2, 64)  # ceil(32/16) hidden units


def test_fjord_self_distillation_trains_and_differs(digits_cfg):
    common = ('fleet.source="tiers"', 'fleet.mix="a-c"', 'model={name="mlp", hidden="32"}', "rounds=2")
    plain = _final(digits_cfg(*common, 'algorithm={name="fjord", clients_per_round=5}'), 2)
    kd = _final(digits_cfg(*common, 'algorithm={name="fjord", clients_per_round=5, self_distill=true}'), 2)
    assert all(torch.isfinite(v).all() for v in kd.values())
    assert not torch.equal(plain["fc1.weight"], kd["fc1.weight"])


def test_bad_submodel_configs(digits_cfg):
    from hetfl.errors import ConfigError

    with pytest.raises(ConfigError, match="algorithm.index_policy must be one of prefix, random, rolling"):
        digits_cfg('algorithm={name="heterofl", index_policy="zigzag"}')
    with pytest.raises(ConfigError, match="needs nested submodels"):
        digits_cfg('algorithm={name="fjord", index_policy="random"}')
    with pytest.raises(ConfigError, match="stride must be >= 1"):
        digits_cfg('algorithm={name="fedrolex", index_policy="rolling(stride=0)"}')
    with pytest.raises(ConfigError, match="self_distill needs algorithm.ordered"):
        digits_cfg('algorithm={name="heterofl", self_distill=true}')


def test_fedavg_capable_only_baseline_samples_only_full_width_clients(digits_cfg):
    cfg = digits_cfg('algorithm={name="fedavg", clients_per_round=3, min_width=1.0}', 'fleet.source="tiers"',
                     'fleet.mix="a1-e3"', "data.num_clients=8")
    exp = prepare(cfg)
    import numpy as np

    capable = set(np.flatnonzero(exp.ctx.fleet.max_width == 1.0).tolist())
    for rnd in range(1, 6):
        chosen = exp.algorithm.sample_clients(None, rnd, exp.ctx, np.random.default_rng(rnd))
        assert set(chosen.tolist()) <= capable and len(chosen) == 2  # only 2 of 8 clients are 'a'


TEXT = ('data={name="synthetic_text", num_clients=0, num_groups=6, samples_per_group=40, partition={name="natural"}}',
        'fleet.source="tiers"', 'fleet.mix="a-b-d"', "rounds=2", "train.lr=0.5")


@pytest.mark.parametrize("algo", ["heterofl", "fedrolex", "feddropout", "fjord"])
@pytest.mark.parametrize("model", ['model={name="lstm", hidden=32}',
                                   'model={name="transformer", d_model=32, heads=4, ffn=64}'])
def test_sequence_models_train_with_every_policy(tmp_path, digits_cfg, algo, model):
    cfg = digits_cfg(*TEXT, model, f'algorithm={{name="{algo}", clients_per_round=6}}')
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    before = {k: v.clone() for k, v in state.models["global"].items()}
    for rnd in (1, 2):
        state, report = sim.run_round(state, rnd)
        assert report.samples > 0
    after = state.models["global"]
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    # every tensor was trained by someone (attention key biases get no gradient: softmax is shift-invariant)
    unchanged = {k for k in set(after) - set(changed) if not k.endswith("attn.k.bias")}
    assert not unchanged, unchanged
    assert all(torch.isfinite(v).all() for v in after.values())
    targets = exp.algorithm.eval_targets(state, exp.ctx)
    assert {"global", "w0.5", "w0.125"} <= set(targets)


def test_robust_aggregation_respects_partial_overlap(digits_cfg):
    from hetfl.algorithms.base import ClientResult
    from hetfl.hetero import spec_for

    cfg = digits_cfg('algorithm={name="heterofl", clients_per_round=3, aggregator="median", static_bn=false, '
                     'classifier_rule=false}', 'fleet.source="tiers"', 'fleet.mix="a2-b1"',
                     "data.num_clients=3", 'model={name="mlp", hidden="4"}')
    exp = prepare(cfg)
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    tasks = algo.configure_round(state, 1, [0, 1, 2], ctx)  # clients 0, 1 full width; client 2 half
    values = {0: 1.0, 1: 3.0, 2: 100.0}  # client 2 is an outlier on the channels it covers
    results = [ClientResult(t.client_id, 10, {k: torch.full_like(v, values[t.client_id]) for k, v in t.weights.items()},
                            extra={"rate": t.extra["rate"]}) for t in tasks]
    out = algo.aggregate(state, 1, results, ctx)
    assert spec_for(ctx.model, ctx.info)
    # hidden units 0-1 are covered by all three: median 3; units 2-3 only by the two full clients: (1+3)/2
    assert out["fc1.bias"].tolist() == [3.0, 3.0, 2.0, 2.0]


IMAGE = DataInfo((1, 8, 8), 10)
SEQ = DataInfo((12,), 20, vocab_size=20)


@pytest.mark.parametrize(("name", "model", "algo", "expected"), [
    ("mlp", {}, {}, False),
    ("cnn", {}, {}, False),
    ("heterofl_conv", {}, {}, True),  # static BN, recomputed at evaluation: HeteroFL's setting
    ("resnet", {"depth": 10, "base_channels": 8}, {}, True),
    ("heterofl_conv", {"norm": "gn"}, {}, False),
    ("heterofl_conv", {"norm": "none"}, {}, False),
    ("heterofl_conv", {}, {"static_bn": False}, False),  # averaged running statistics: not recalibrated
    ("heterofl_conv", {"bn_track_stats": False}, {"static_bn": False}, True),  # batch statistics at evaluation
    ("lstm", {}, {}, False),
    ("transformer", {}, {}, False),
    ("mlp", {}, {"scaler": True}, True),  # forced
    ("heterofl_conv", {}, {"scaler": False}, False),
])
def test_scaler_auto_resolves_per_model(name, model, algo, expected):
    from hetfl.algorithms.heterofl import HeteroFL

    info = SEQ if name in ("lstm", "transformer") else IMAGE
    assert HeteroFL(**algo).uses_scaler(ModelRef(name, params=tuple(model.items())).build(info)) is expected


def test_scaler_defaults_per_algorithm():
    from hetfl.algorithms.heterofl import FederatedDropout, FedRolex, FjORD, HeteroFL

    assert HeteroFL().scaler == FedRolex().scaler == FederatedDropout().scaler == "auto"
    assert FjORD().scaler is False
    with pytest.raises(ConfigError, match="algorithm.scaler must be"):
        HeteroFL(scaler="on")


def test_narrow_mlp_submodel_is_usable_by_default_and_collapses_with_forced_scaler(digits_cfg):
    """On a norm-free MLP the Scaler's train-only 1/rate is not absorbed at evaluation: forcing it puts the
    1/8 submodel at chance, the default ("auto": off here) leaves it well above chance."""
    common = (IID, "data.num_clients=6", "data.local_test_fraction=0", 'fleet.source="tiers"', 'fleet.mix="a-d"',
              'model={name="mlp", hidden="128,128"}', "rounds=15", "train.epochs=2")

    def narrow_accuracy(*algo: str) -> float:
        cfg = digits_cfg(*common, *algo)
        exp = prepare(cfg)
        sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
        state = exp.algorithm.init_state(exp.ctx)
        for rnd in range(1, cfg.rounds + 1):
            state, _ = sim.run_round(state, rnd)
        row = Evaluator(exp.federation, exp.ctx, cfg.eval, ModelCache(exp.ctx, exp.device), exp.device, cfg.seed)(
            exp.algorithm, state)
        return row["test_accuracy.w0.125"]

    assert narrow_accuracy('algorithm={name="heterofl", clients_per_round=6}') > 0.5  # 0.67 when written
    with pytest.warns(UserWarning, match="mis-scaled at evaluation"):
        forced = narrow_accuracy('algorithm={name="heterofl", clients_per_round=6, scaler=true}')
    assert forced < 0.2  # chance is 0.1


@pytest.mark.parametrize("rate", [0.5, 0.25, 0.125, 0.0625])
def test_scaler_scales_the_normalised_convs_and_never_the_classifier(rate):
    """HeteroFL's Scaler sits between a sliced conv and its norm (the first conv included) and never on the
    output layer: on the static-BN conv net the training logits keep their scale (issue 22: they were x 1/rate)."""
    from hetfl.hetero import spec_for, submodel_ref
    from hetfl.hetero.scaler import Scaler, scaler_layers

    ref = submodel_ref(ModelRef("heterofl_conv"), rate)
    model = ref.build(IMAGE)
    modules = list(model.named_children())
    normalised = {name for (name, m), (_, nxt) in zip(modules, modules[1:])
                  if isinstance(m, torch.nn.Conv2d) and isinstance(nxt, torch.nn.BatchNorm2d)}
    layers = scaler_layers(spec_for(ref, IMAGE))
    assert set(layers) == normalised == {"conv1", "conv2", "conv3", "conv4"} and "fc" not in layers

    x = torch.randn(16, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    model.train()
    plain = model(x)
    seen = []
    with Scaler(model, layers, rate) as scaler:
        hooks = [model.get_submodule(n).register_forward_hook(lambda m, i, o, n=n: seen.append(n)) for n in layers]
        scaled = model(x)
        for h in hooks:
            h.remove()
    assert len(scaler.handles) == len(layers) and seen == list(layers)
    # BatchNorm in training mode normalises the scaled conv outputs (up to its eps): the logits keep their scale
    assert torch.allclose(scaled, plain, rtol=1e-2, atol=1e-2)
    assert not torch.allclose(scaled, plain / rate, rtol=0.1, atol=0.1)


@pytest.mark.parametrize(("old", "hint"), [
    ('policy="rolling"', 'renamed to algorithm.index_policy (e.g. index_policy = "rolling")'),
    ("stride=2", 'now a parameter of the rolling index policy: index_policy = "rolling(stride=1)"'),
    ('width_policy="coverage"', 'renamed to algorithm.width_schedule (e.g. width_schedule = "coverage")'),
    ("width_q=0.25", 'now a parameter of the mixture schedule: width_schedule = "mixture(q=0.5)"'),
    ('width_target="deploy"', 'now a parameter of the coverage schedule: width_schedule = "coverage(target=equal)"'),
    ("width_val_size=100", 'now a parameter of the adaptive schedule: width_schedule = "adaptive(val_size=500)"'),
    ("width_ema=0.3", 'now a parameter of the adaptive schedule: width_schedule = "adaptive(ema=0.5)"'),
])
def test_old_config_names_are_refused_naming_the_new_one(digits_cfg, old, hint):
    key = old.split("=")[0]
    with pytest.raises(ConfigError) as err:
        digits_cfg(f'algorithm={{name="fedrolex", {old}}}')
    assert str(err.value) == f"algorithm.{key} is no longer accepted for algorithm 'fedrolex': {hint}"


def test_index_policy_and_width_schedule_with_parameters_are_config_strings(digits_cfg):
    cfg = digits_cfg('algorithm={name="heterofl", index_policy="rolling(stride=3)", '
                     'width_schedule="coverage(target=0.5,0.3,0.2)"}')
    algo = prepare(cfg).algorithm
    assert algo.channels.stride == 3 and algo.widths.schedule.target == "0.5,0.3,0.2"
    with pytest.raises(ConfigError, match="index policy 'rolling' has no parameter 'step'; its parameters: stride"):
        digits_cfg('algorithm={name="heterofl", index_policy="rolling(step=3)"}')
    with pytest.raises(ConfigError, match="mixture parameter q must be float"):
        digits_cfg('algorithm={name="heterofl", width_schedule="mixture(q=often)"}')


def test_a_new_index_policy_with_a_parameter_is_one_registered_class(digits_cfg):
    """No algorithm field, config key or factory to edit: the class and its registration are all it takes."""
    from dataclasses import dataclass

    import numpy as np

    from hetfl.hetero.policy import INDEX_POLICIES, IndexPolicy

    @INDEX_POLICIES.register("shifted")
    @dataclass(frozen=True)
    class Shifted(IndexPolicy):
        """A prefix window moved by ``offset`` channels."""

        offset: int = 0

        def choose(self, group, n_units, *, rnd, client, seed):
            return (np.arange(n_units) + self.offset) % group.units

    try:
        cfg = digits_cfg('fleet.source="tiers"', 'fleet.mix="a-c"', "data.num_clients=4",
                         'model={name="mlp", hidden="16"}',
                         'algorithm={name="heterofl", clients_per_round=4, index_policy="shifted(offset=2)"}')
        exp = prepare(cfg)
        state = exp.algorithm.init_state(exp.ctx)
        narrow = [t for t in exp.algorithm.configure_round(state, 1, [0, 1, 2, 3], exp.ctx) if t.extra["rate"] < 1]
        assert narrow and torch.equal(narrow[0].weights["fc1.weight"], state.models["global"]["fc1.weight"][2:6])
    finally:
        INDEX_POLICIES._entries.pop("shifted")
