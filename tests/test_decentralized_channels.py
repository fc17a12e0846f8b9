"""dkd's cross-tier channels (issue 41): distillation in both directions, overlap gossip together with
distillation, neighbour prototype exchange.  Tiny problem (4 digits nodes, 2 strong + 2 weak, complete graph)."""

from __future__ import annotations

import math

import pytest
import torch

from hetfl.algorithms.base import nbytes
from hetfl.data.base import Split
from hetfl.decentralized.prototypes import PrototypePull, cut_prototype, neighbour_mean, node_prototypes
from hetfl.errors import ConfigError
from hetfl.resolve import load_config
from hetfl.runner import prepare
from tests.test_decentralized import BASE as DEC_BASE
from tests.test_decentralized_teachers import run_rounds, same

BASE = {**DEC_BASE, "name": "dec-channels"}
STRONG, WEAK = (0, 1), (2, 3)
BOTH = 'algorithm.direction="both"'
UP = 'algorithm.direction="up"'
# two families with one feature size (32) in front of their heads: prototypes can be compared
EQUAL_FEATURES = 'algorithm.families="mlp(hidden=64,32), mlp(hidden=32)"'
NAN = float("nan")


# ---------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("override, message", [
    ('algorithm.direction="sideways"', "algorithm.direction must be one of down, up, both, got 'sideways'"),
    ("algorithm.prototypes=-0.5", r"algorithm.prototypes must be >= 0 \(the weight λ of the prototype term; 0 = off\), "
                                  "got -0.5"),
])
def test_bad_values_are_config_errors_naming_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=message):
        prepare(load_config(None, [override], base=BASE))


def test_prototypes_across_families_of_different_feature_sizes_are_refused_before_the_run():
    with pytest.raises(ConfigError, match=r"algorithm.prototypes needs one feature size .* mlp\(hidden=32\): 32, "
                                          r"mlp\(hidden=8\): 8; give the families equal head inputs"):
        prepare(load_config(None, ['algorithm.families="mlp(hidden=32), mlp(hidden=8)"', "algorithm.prototypes=1.0"],
                            base=BASE))
    # width-slices of one model (features 32 and 2) compare on their overlap: accepted
    prepare(load_config(None, ["algorithm.prototypes=1.0"], base=BASE))


# ---------------------------------------------------------------------------------------------- exactness


def test_explicit_defaults_are_todays_dkd_bit_for_bit():
    _, base, _ = run_rounds()
    _, explicit, _ = run_rounds('algorithm.direction="down"', "algorithm.prototypes=0.0")
    assert all(same(base, explicit, i) for i in range(4))


def test_without_distillation_the_slice_gossip_is_dpsgd_bit_for_bit_in_every_direction():
    _, ref, _ = run_rounds('algorithm.name="dpsgd"')
    for direction in ("down", "up", "both"):
        _, got, m = run_rounds("algorithm.kd_weight=0.0", 'algorithm.gossip="overlap"',
                               f'algorithm.direction="{direction}"')
        assert m["kd_pairs"] == 0 and all(same(ref, got, i) for i in range(4)), direction


def test_both_directions_in_round_one_are_down_for_the_weak_and_up_for_the_strong_nodes():
    """Round 1: every teacher is a node's model after local training, so the two directions do not interact: the
    weak nodes end as with distillation into them only, the strong nodes as with distillation into them only."""
    _, down, _ = run_rounds(rounds=1)
    _, up, up_m = run_rounds(UP, rounds=1)
    _, both, both_m = run_rounds(BOTH, rounds=1)
    _, plain, _ = run_rounds("algorithm.kd_weight=0.0", rounds=1)
    assert all(same(both, down, i) for i in WEAK) and all(same(both, up, i) for i in STRONG)
    assert all(same(up, plain, i) for i in WEAK) and not any(same(up, plain, i) for i in STRONG)
    assert up_m["kd_pairs"] == 4 and both_m["kd_pairs"] == 8  # directed (teacher, student) pairs
    assert up_m["no_stronger"] == both_m["no_stronger"] == 0


def test_both_directions_account_bytes_and_the_weak_nodes_compute():
    _, state, m = run_rounds(BOTH, rounds=1)
    _, _, down = run_rounds(rounds=1)
    strong, weak = nbytes(state.models["node0"]), nbytes(state.models["node2"])
    # weak: its model to 2 strong nodes, the 2 strong models back, gossip with the other weak node; strong: the
    # 2 weak models back, its model to 2 weak nodes, gossip with the other strong node
    assert m["node.bytes_sent"] == [2 * weak + 3 * strong] * 2 + [3 * weak + 2 * strong] * 2
    assert m["node.bytes_recv"] == m["node.bytes_sent"]
    # a weak node trains each strong neighbour's model on its own samples (3 forwards) plus its own as teacher
    extra = [b - a for a, b in zip(down["node.flops"], m["node.flops"])]
    assert extra[0] == extra[1] == 0 and extra[2] == extra[3] > 0
    assert extra[2] > down["node.flops"][2]  # training the strong model costs a weak node more than its own


# ---------------------------------------------------------------------------------------------- prototypes


class _Mlp(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = torch.nn.Linear(3, 4)
        self.head = torch.nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.body(x)))


def test_prototypes_of_a_one_class_node_are_one_row_the_rest_nan():
    torch.manual_seed(0)
    model = _Mlp()
    x = torch.randn(10, 3)
    data = Split(x, torch.full((10,), 3, dtype=torch.long))
    train = load_config(None, ["train.steps=0", "train.epochs=2", "train.batch_size=4"], base=BASE).train
    proto, samples = node_prototypes(model, data, train, seed=1, num_classes=5)
    assert samples == 20 and proto.shape == (5, 4)  # two passes over the 10 samples
    assert torch.isnan(proto[[0, 1, 2, 4]]).all()
    want = torch.relu(model.body(x)).mean(0)
    assert torch.allclose(proto[3], want.detach(), atol=1e-6)
    assert model.training  # back to the mode it was in


def test_neighbour_mean_is_per_element_over_the_prototypes_that_hold_it():
    wide = torch.tensor([[1.0, 2.0, 3.0], [NAN, NAN, NAN]])
    narrow = torch.tensor([[3.0], [5.0]])
    cut = cut_prototype(wide, 1)
    assert cut.shape == (2, 1) and cut[0, 0] == 1.0 and torch.isnan(cut[1, 0])
    assert cut_prototype(narrow, 3) is narrow
    got = neighbour_mean(3, [wide, narrow])
    assert got[0].tolist() == [2.0, 2.0, 3.0]
    assert got[1, 0] == 5.0 and torch.isnan(got[1, 1:]).all()


def test_prototype_term_is_fedprotos_mean_squared_error_and_skips_classes_without_a_prototype():
    model = _Mlp()
    target = torch.full((5, 4), NAN)
    target[1] = 1.0
    pull = PrototypePull(model, target, weight=2.0, device=torch.device("cpu"))
    x, y = torch.randn(6, 3), torch.tensor([1, 1, 1, 0, 0, 0])
    with pull:
        logits = model(x)
        loss = pull(model, x, y, logits)
        feats = torch.relu(model.body(x))
    want = 2.0 * ((feats[:3] - 1.0) ** 2).mean(1).sum() / 6
    assert torch.allclose(loss, want)
    assert not model.head._forward_hooks  # the hook is gone after training


def test_prototypes_start_in_round_two_and_cost_classes_times_feature_size_per_message():
    _, plain1, _ = run_rounds(EQUAL_FEATURES, rounds=1)
    _, proto1, _ = run_rounds(EQUAL_FEATURES, "algorithm.prototypes=1.0", rounds=1)
    assert all(same(plain1, proto1, i) for i in range(4))  # round 1: no prototype term
    exp, plain, pm = run_rounds(EQUAL_FEATURES)
    _, proto, m = run_rounds(EQUAL_FEATURES, "algorithm.prototypes=1.0")
    assert not any(same(plain, proto, i) for i in range(4))
    per_message = exp.ctx.info.num_classes * 32 * 4  # classes x feature size, float32
    assert [b - a for a, b in zip(pm["node.bytes_sent"], m["node.bytes_sent"])] == [3 * per_message] * 4
    assert [b - a for a, b in zip(pm["node.bytes_recv"], m["node.bytes_recv"])] == [3 * per_message] * 4
    assert all(b > a for a, b in zip(pm["node.flops"], m["node.flops"]))  # one forward per prototype sample


def test_slice_prototypes_are_cut_to_the_narrower_receiver():
    exp, _, pm = run_rounds()
    _, _, m = run_rounds("algorithm.prototypes=0.5")
    c = exp.ctx.info.num_classes
    # features: 32 (width 1) and 2 (width 1/16); complete graph: every node sends to 3 neighbours
    sent = [b - a for a, b in zip(pm["node.bytes_sent"], m["node.bytes_sent"])]
    assert sent == [c * 4 * (32 + 2 + 2)] * 2 + [c * 4 * 2 * 3] * 2
    assert math.isfinite(m["train_loss"])


def test_every_channel_together_runs_and_keeps_the_plan():
    _, _, m = run_rounds(BOTH, 'algorithm.gossip="overlap"', "algorithm.prototypes=0.5", "algorithm.alpha=0.3",
                         "algorithm.temperature=3.0")
    assert m["kd_pairs"] == 8 and math.isfinite(m["kd_loss"])
