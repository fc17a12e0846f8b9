from __future__ import annotations

import numpy as np
import pytest

from hetfl.errors import ConfigError
from hetfl.fleet import FleetConfig, build_fleet, parse_mix, phone_table


def test_parse_mix():
    widths, props = parse_mix("a2-e8")
    assert widths == (1.0, 0.0625)
    np.testing.assert_allclose(props, [0.2, 0.8])
    widths, _ = parse_mix("c-b")  # relative to the largest level, sorted widest first
    assert widths == (1.0, 0.5)
    for bad in ("", "f", "a-a", "a0", "a-x2"):
        with pytest.raises(ConfigError, match="fleet.mix"):
            parse_mix(bad)


def test_tiers_fixed_blocks_like_heterofl():
    fleet = build_fleet(FleetConfig(source="tiers", mix="a-b-c-d-e"), 100, seed=0)
    assert fleet.levels == (1.0, 0.5, 0.25, 0.125, 0.0625)
    assert list(fleet.max_width[:20]) == [1.0] * 20 and list(fleet.max_width[80:]) == [0.0625] * 20
    assert np.array_equal(fleet.widths(3, 0), fleet.max_width)
    odd = build_fleet(FleetConfig(source="tiers", mix="a1-b2"), 10, seed=0)
    assert sorted(odd.max_width) == [0.5] * 7 + [1.0] * 3  # floor(10/3)=3 a, leftovers to the last level


def test_dynamic_assignment_redraws_each_round():
    fleet = build_fleet(FleetConfig(source="tiers", mix="a1-e3", assignment="dynamic"), 4000, seed=0)
    w1, w2 = fleet.widths(1, 0), fleet.widths(2, 0)
    assert not np.array_equal(w1, w2)
    assert abs(np.mean(w1 == 1.0) - 0.25) < 0.03
    assert np.array_equal(fleet.widths(1, 0), w1)


def test_phones_match_the_documented_p95_budget_shares():
    fleet = build_fleet(FleetConfig(source="phones"), 20000, seed=1)
    share = {w: np.mean(fleet.max_width == w) for w in fleet.levels}
    # device_fleet.md: 5.3% width 1, 60.6% 1/2, 27.8% 1/4, 6.3% 1/8, 0% 1/16 (catalogue shares)
    for w, expected in ((1.0, 0.053), (0.5, 0.606), (0.25, 0.278), (0.125, 0.063), (0.0625, 0.0)):
        assert abs(share[w] - expected) < 0.02, (w, share[w])
    assert len(phone_table()["relative_speed"]) == 320


def test_impossible_fleet_is_a_clear_error():
    with pytest.raises(ConfigError, match="can afford no width in mix 'a-b'"):
        build_fleet(FleetConfig(source="phones", mix="a-b"), 200, seed=0)
    with pytest.raises(ConfigError, match="fleet.source must be one of uniform, tiers, phones"):
        FleetConfig(source="cloud")
