"""Device fleets: what each client can afford, as a width of the global model.

Three sources (``[fleet] source``):

* ``uniform``: every client affords the full model (plain FL; the default).
* ``tiers``: fixed tiers in HeteroFL's notation, e.g. ``mix = "a-b-c-d-e"`` or ``"a2-e8"``: levels
  a=1, b=1/2, c=1/4, d=1/8, e=1/16, each followed by an optional proportion (default 1).  Widths are
  relative to the largest level in the mix, which trains the full global model.  With
  ``assignment = "fixed"`` clients get levels in contiguous id blocks (HeteroFL's rule; leftover
  clients take the last level); with ``"dynamic"`` every client's level is redrawn each round from the
  proportions, whatever its device (HeteroFL's dynamic mode).
* ``phones``: every client is a phone drawn (seeded, with replacement) from the 320 measured Android
  phones in ``phones.csv``.  A phone of relative speed ``s`` affords the largest level ``w`` with
  ``w**2 <= s / s_ref``, where ``s_ref`` is the speed at ``budget_quantile`` of the table (0.95: the
  per-round time budget is just enough for the p95 phone to train the full model; compute grows as
  width squared).

Every client also gets a relative speed, RAM and an uplink bandwidth, which time models (stragglers,
deadlines) use.

``size_correlation`` decides which client (which amount of data) gets which device: ``"none"`` keeps the
assignment above (independent of data size); ``"positive"`` gives the strongest device (largest width, then
fastest) to the client with the most training samples, the next strongest to the next largest, and so on
(rank correlation +1 between data size and capability); ``"negative"`` gives the strongest device to the
client with the least data (rank correlation -1).  Ties are broken by a seeded permutation.  The devices
themselves (and hence the level shares) do not change, only who holds them.  Use it with a size-skewed
partition (``data.partition.name = "quantity"``).
"""

from __future__ import annotations

import csv
import dataclasses
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np

from hetfl.errors import ConfigError

LEVELS = {"a": 1.0, "b": 0.5, "c": 0.25, "d": 0.125, "e": 0.0625}
SOURCES = ("uniform", "tiers", "phones")
ASSIGNMENTS = ("fixed", "dynamic")
CORRELATIONS = ("none", "positive", "negative")
PHONES_CSV = Path(__file__).with_name("phones.csv")


@dataclass(frozen=True)
class FleetConfig:
    source: str = "uniform"
    mix: str = "a-b-c-d-e"
    assignment: str = "fixed"
    budget_quantile: float = 0.95
    bandwidth_mbps: float = 20.0
    bandwidth_spread: float = 0.5  # sigma of the lognormal draw of each client's bandwidth (0: every client the same)
    size_correlation: str = "none"  # data size vs capability: none, positive, negative

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"fleet.source must be one of {', '.join(SOURCES)}, got {self.source!r}")
        if self.assignment not in ASSIGNMENTS:
            raise ConfigError(f"fleet.assignment must be one of {', '.join(ASSIGNMENTS)}, got {self.assignment!r}")
        parse_mix(self.mix)
        if not 0.0 < self.budget_quantile <= 1.0:
            raise ConfigError(f"fleet.budget_quantile must be in (0, 1], got {self.budget_quantile}")
        if self.bandwidth_mbps <= 0:
            raise ConfigError(f"fleet.bandwidth_mbps must be > 0, got {self.bandwidth_mbps}")
        if not 0.0 <= self.bandwidth_spread <= 5.0:
            raise ConfigError(f"fleet.bandwidth_spread must be in [0, 5] (a lognormal sigma), "
                              f"got {self.bandwidth_spread}")
        if self.size_correlation not in CORRELATIONS:
            raise ConfigError(f"fleet.size_correlation must be one of {', '.join(CORRELATIONS)}, "
                              f"got {self.size_correlation!r}")


def parse_mix(mix: str) -> tuple[tuple[float, ...], np.ndarray]:
    """``"a2-e8"`` -> ((1.0, 0.0625), [0.2, 0.8]): widths relative to the largest level, proportions."""
    parts = [p.strip() for p in mix.lower().split("-") if p.strip()]
    pattern = re.compile(r"^([a-e])(\d*\.?\d*)$")
    levels, props = [], []
    for part in parts:
        m = pattern.match(part)
        if not m:
            raise ConfigError(f"fleet.mix: cannot read {part!r} in {mix!r}; write levels a-e with optional "
                              f"proportions, e.g. 'a-b-c-d-e' or 'a2-e8' (a=1, b=1/2, c=1/4, d=1/8, e=1/16)")
        level = LEVELS[m.group(1)]
        if level in levels:
            raise ConfigError(f"fleet.mix: level {m.group(1)!r} appears twice in {mix!r}")
        prop = float(m.group(2)) if m.group(2) else 1.0
        if prop <= 0:
            raise ConfigError(f"fleet.mix: proportion of {m.group(1)!r} must be > 0 in {mix!r}")
        levels.append(level)
        props.append(prop)
    if not levels:
        raise ConfigError(f"fleet.mix is empty; write e.g. 'a-b-c-d-e' (got {mix!r})")
    top = max(levels)
    order = np.argsort(levels)[::-1]
    widths = tuple(levels[i] / top for i in order)
    p = np.array([props[i] for i in order], dtype=np.float64)
    return widths, p / p.sum()


@lru_cache(maxsize=1)
def phone_table() -> dict[str, np.ndarray]:
    with open(PHONES_CSV, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return {
        "device": np.array([r["device"] for r in rows]),
        "relative_speed": np.array([float(r["relative_speed"]) for r in rows]),
        "ram_gb": np.array([float(r["ram_gb"]) for r in rows]),
        "year": np.array([int(r["year"]) for r in rows]),
    }


@dataclass(frozen=True)
class Fleet:
    """Per-client capabilities.  ``max_width[c]`` is the largest width client ``c`` can train."""

    max_width: np.ndarray
    speed: np.ndarray
    memory_gb: np.ndarray
    bandwidth_mbps: np.ndarray
    levels: tuple[float, ...]  # the widths that exist, largest first
    proportions: np.ndarray  # share of each level (dynamic assignment draws from it)
    assignment: str = "fixed"
    device: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=str))  # phone names (``phones`` only)

    @property
    def num_clients(self) -> int:
        return len(self.max_width)

    @property
    def heterogeneous(self) -> bool:
        return len(self.levels) > 1

    def widths(self, rnd: int, seed: int) -> np.ndarray:
        """Each client's width in round ``rnd``: its max width, or a fresh draw (dynamic assignment)."""
        if self.assignment == "fixed":
            return self.max_width
        rng = np.random.default_rng([seed, rnd, 0x666C74])
        idx = rng.choice(len(self.levels), size=self.num_clients, p=self.proportions)
        return np.asarray(self.levels)[idx]

    def tier(self, width: float) -> int:
        """Index of a width among ``levels`` (0 = widest)."""
        return int(np.argmin(np.abs(np.asarray(self.levels) - width)))

    def tiers_of(self, widths: np.ndarray) -> np.ndarray:
        """:meth:`tier` of every width, vectorised (one pass over the fleet's arrays, no Python loop)."""
        widths = np.asarray(widths, dtype=np.float64)
        levels = np.asarray(self.levels, dtype=np.float64)
        return np.argmin(np.abs(widths[:, None] - levels[None, :]), axis=1).astype(np.int64)

    def tiers(self) -> np.ndarray:
        return self.tiers_of(self.max_width)

    def describe(self) -> dict[str, object]:
        counts = {f"{w:g}": int(np.sum(np.isclose(self.max_width, w))) for w in self.levels}
        return {"levels": list(self.levels), "clients_per_level": counts, "assignment": self.assignment,
                "speed_median": float(np.median(self.speed)), "ram_gb_median": float(np.median(self.memory_gb))}


def correlate_with_sizes(fleet: Fleet, sizes: np.ndarray, mode: str, seed: int) -> Fleet:
    """Reassign the fleet's devices so capability rank follows (``positive``) or opposes (``negative``) the
    rank of the clients' data sizes; ``none`` returns the fleet unchanged."""
    if mode == "none":
        return fleet
    sizes = np.asarray(sizes)
    n = fleet.num_clients
    if sizes.shape != (n,):
        raise ConfigError(f"fleet.size_correlation: got {sizes.shape} client sizes for {n} clients")
    rng = np.random.default_rng([seed, 0x636F7272])
    slots = np.lexsort((rng.permutation(n), -fleet.speed, -fleet.max_width))  # strongest device first
    by_size = np.lexsort((rng.permutation(n), -sizes))  # most data first
    if mode == "negative":
        by_size = by_size[::-1]
    perm = np.empty(n, dtype=np.int64)
    perm[by_size] = slots  # client by_size[i] gets device slots[i]
    device = fleet.device[perm] if len(fleet.device) else fleet.device
    return dataclasses.replace(fleet, max_width=fleet.max_width[perm], speed=fleet.speed[perm],
                               memory_gb=fleet.memory_gb[perm], bandwidth_mbps=fleet.bandwidth_mbps[perm],
                               device=device)


def build_fleet(cfg: FleetConfig, num_clients: int, seed: int, sizes: np.ndarray | None = None) -> Fleet:
    """The fleet of ``num_clients`` clients; ``sizes`` (training samples per client) is needed only for
    ``cfg.size_correlation`` other than ``"none"``."""
    if cfg.size_correlation != "none":
        if sizes is None:
            raise ConfigError("fleet.size_correlation needs the clients' data sizes (build_fleet(..., sizes=...))")
        return correlate_with_sizes(build_fleet(dataclasses.replace(cfg, size_correlation="none"), num_clients,
                                                seed), sizes, cfg.size_correlation, seed)
    rng = np.random.default_rng([seed, 0x666C6565])
    bandwidth = rng.lognormal(np.log(cfg.bandwidth_mbps), cfg.bandwidth_spread, size=num_clients)
    if cfg.source == "uniform":
        ones = np.ones(num_clients)
        return Fleet(ones, ones, np.full(num_clients, 4.0), bandwidth, (1.0,), np.array([1.0]), "fixed")
    levels, props = parse_mix(cfg.mix)
    if cfg.source == "tiers":
        counts = np.floor(num_clients * props).astype(int)
        counts[-1] += num_clients - counts.sum()  # leftover clients take the last (smallest) level
        max_width = np.repeat(np.asarray(levels), counts)
        # speed consistent with the width budget: width^2 = speed / s_ref with s_ref = 1
        return Fleet(max_width, max_width**2, np.full(num_clients, 4.0), bandwidth, levels, props,
                     cfg.assignment)
    table = phone_table()
    pick = rng.integers(0, len(table["relative_speed"]), size=num_clients)
    speed = table["relative_speed"][pick]
    s_ref = float(np.quantile(table["relative_speed"], cfg.budget_quantile))
    lv = np.asarray(levels)
    affordable = lv[None, :] ** 2 <= speed[:, None] / s_ref + 1e-12
    none = ~affordable.any(axis=1)
    if none.any():
        raise ConfigError(
            f"fleet: {int(none.sum())} of {num_clients} phones can afford no width in mix {cfg.mix!r} "
            f"(slowest relative speed {speed.min():.3f}, budget set by the p{cfg.budget_quantile * 100:g} phone, "
            f"speed {s_ref:.3f}); add smaller levels (e.g. 'a-b-c-d-e') or lower fleet.budget_quantile"
        )
    max_width = lv[np.argmax(affordable, axis=1)]
    share = np.array([np.mean(np.isclose(max_width, w)) for w in levels])
    return Fleet(max_width, speed, table["ram_gb"][pick], bandwidth, levels,
                 share if share.sum() > 0 else props, cfg.assignment, table["device"][pick])
