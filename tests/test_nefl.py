"""NeFL: nested width x depth levels with per-level ("inconsistent") normalisation layers."""

from __future__ import annotations

import pytest
import torch

from hetfl.aggregation import level_key
from hetfl.algorithms.base import ClientResult
from hetfl.engines.simulator import Simulator
from hetfl.errors import ConfigError
from hetfl.runner import prepare, run

IID = 'data.partition={name="iid"}'
BN = 'model={name="heterofl_conv", hidden="8,8,16,16"}'
TIERS = ('fleet.source="tiers"', 'fleet.mix="a-c"', "data.num_clients=6")


def _final(cfg, rounds=3):
    exp = prepare(cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    state = exp.algorithm.init_state(exp.ctx)
    for rnd in range(1, rounds + 1):
        state, _ = sim.run_round(state, rnd)
    return state.models["global"]


def _plain(weights):
    """Per-level keys of a one-level run under their plain names."""
    return {k.split("@")[0]: v for k, v in weights.items()}


@pytest.mark.parametrize("model", [BN, 'model={name="mlp", hidden="32,32"}'])
def test_one_level_equals_scalefl_and_fedavg_bit_for_bit(digits_cfg, model):
    common = (IID, model, "train.momentum=0.9", "train.grad_clip=1.0")
    nefl = _final(digits_cfg(*common, 'algorithm={name="nefl", clients_per_round=3, levels="1x1"}'))
    scalefl = _final(digits_cfg(*common, 'algorithm={name="scalefl", clients_per_round=3, levels="1x1", '
                                         'kd_gamma=0.0}'))
    fedavg = _final(digits_cfg(*common, 'algorithm={name="fedavg", clients_per_round=3, weighted=false}'))
    if model == BN:
        assert level_key("norm1.weight", "w1d1") in nefl  # the per-level copy exists, under the level's label
    got = _plain(nefl)
    assert got.keys() == scalefl.keys() == fedavg.keys()
    for k in got:
        assert torch.equal(got[k], scalefl[k]), k
        assert torch.equal(got[k], fedavg[k]), k


def test_per_level_keys_are_averaged_over_their_level_only(digits_cfg):
    cfg = digits_cfg(IID, BN, *TIERS, 'algorithm={name="nefl", clients_per_round=6, levels="1x1,0.5x0.5"}')
    exp = prepare(cfg)
    algo, ctx = exp.algorithm, exp.ctx
    state = algo.init_state(ctx)
    glob = state.models["global"]
    tiers = ctx.fleet.tiers()
    strong, weak = [int(c) for c in range(6) if tiers[c] == 0][:2], int(next(c for c in range(6) if tiers[c] == 1))
    tasks = {t.client_id: t for t in algo.configure_round(state, 1, [*strong, weak], ctx)}
    assert tasks[weak].weights["norm1.weight"].shape == (4,)  # half of 8 channels, the weak level's own copy
    # hand-made results: every tensor of client i filled with v_i
    values = {strong[0]: 1.0, strong[1]: 2.0, weak: 4.0}
    results = [ClientResult(c, 10, {k: torch.full_like(v, values[c]) if v.is_floating_point() else v
                                    for k, v in tasks[c].weights.items()}) for c in values]
    new = algo.server_step(state, algo.aggregate(state, 1, results, ctx), ctx).models["global"]

    top, low = "w1d1", "w0.5d0.5"
    # per-level: level w1d1's copy over its two clients, level w0.5d0.5's over its one (at its prefix only)
    assert torch.equal(new[level_key("norm1.weight", top)], torch.full((8,), 1.5))
    low_norm = new[level_key("norm1.weight", low)]
    assert torch.equal(low_norm[:4], torch.full((4,), 4.0))
    assert torch.equal(low_norm[4:], glob[level_key("norm1.weight", low)][4:])  # nobody of that level held them
    # shared (consistent) tensors: nested, over every client holding the element
    conv = new["conv1.weight"]
    assert torch.equal(conv[:4], torch.full_like(conv[:4], 7.0 / 3))
    assert torch.equal(conv[4:], torch.full_like(conv[4:], 1.5))
    # each level is evaluated with its own copies
    targets = algo.eval_targets(ServerStateLike(new, state), ctx)
    assert torch.equal(targets[low].weights["norm1.weight"], torch.full((4,), 4.0))
    assert torch.equal(targets["global"].weights["norm1.weight"], torch.full((8,), 1.5))


def ServerStateLike(models, state):  # noqa: N802  (a state with new global weights)
    from hetfl.algorithms.base import ServerState

    return ServerState(state.round + 1, {"global": models}, state.buffers)


def test_nefl_runs_with_feddyn_and_per_level_checkpoint_resumes(tmp_path, digits_cfg):
    from hetfl.results import read_metrics, strip_timing

    cfg = digits_cfg(IID, BN, *TIERS, "rounds=3", 'algorithm={name="nefl", clients_per_round=4, '
                                                  'levels="1x1,0.5x0.5", dyn=0.1}')
    full = run(cfg, tmp_path / "full", quiet=True)
    part = run(cfg.replace(rounds=2), tmp_path / "part", quiet=True)
    run(cfg, resume=tmp_path / "part", quiet=True)
    assert full["status"] == "complete"
    rows = read_metrics(tmp_path / "full")
    assert strip_timing(rows) == strip_timing(read_metrics(tmp_path / "part"))
    assert "test_accuracy.w0.5d0.5" in rows[-1] and part["status"] == "complete"


def test_privacy_footprints_follow_the_per_level_copies(digits_cfg):
    cfg = digits_cfg(IID, BN, *TIERS, "rounds=1", "privacy.clip=1.0", "privacy.noise_multiplier=0.5",
                     'algorithm={name="nefl", clients_per_round=4, levels="1x1,0.5x0.5"}')
    exp = prepare(cfg)
    state = exp.algorithm.init_state(exp.ctx)
    fp = exp.algorithm.footprints(state, 1, exp.ctx)
    keys = {k for c in range(6) for _, p in fp(c) for k in p.pieces}
    assert level_key("norm1.weight", "w0.5d0.5") in keys and "norm1.weight" not in keys
    assert keys <= state.models["global"].keys()


def test_bad_per_level_configs(digits_cfg):
    with pytest.raises(ConfigError, match=r"'\*\.step' matches no floating tensor"):
        prepare(digits_cfg(BN, 'algorithm={name="nefl", per_level="norm,*.step"}'))
    with pytest.raises(ConfigError, match="contains '@'"):
        digits_cfg('algorithm={name="nefl", per_level="norm1.weight@w1d1"}')
    with pytest.raises(ConfigError, match="per_level is not available for inclusivefl"):
        digits_cfg('algorithm={name="inclusivefl", per_level="norm"}')
