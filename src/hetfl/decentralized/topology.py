"""Communication graphs for decentralized learning: the ``[graph]`` section, topologies, mixing weights.

A topology is a registered function ``fn(n, cfg, tiers, seed) -> networkx.Graph`` on nodes ``0..n-1``
(``tiers``: every node's capability tier, 0 = most capable; ``seed``: an integer for random graphs).
:func:`sample_topology` draws the graph of a round (once per run when ``resample = false``, a fresh
draw per round otherwise), checks it is connected (random graphs are redrawn up to ``max_tries`` times,
then a :class:`~hetfl.errors.ConfigError` names the parameters) and computes its mixing matrix:

* ``metropolis`` (Metropolis-Hastings): ``w_ij = 1 / (1 + max(d_i, d_j))`` on edges and
  ``w_ii = 1 - sum_j w_ij``.  The ``+1`` keeps every self-weight positive; without it a regular graph
  gets self-weight 0 and gossip on an even ring never converges (eigenvalue -1).
* ``uniform`` (max-degree): ``w_ij = 1 / (1 + d_max)`` on edges, ``w_ii = 1 - d_i / (1 + d_max)``.

Both are symmetric and doubly stochastic.  This module imports nothing heavy (``networkx`` is imported
when a graph is drawn), and :class:`~hetfl.config.GraphConfig` (``[graph]``) lives with the config.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from hetfl.config import MIXINGS, GraphConfig
from hetfl.errors import ConfigError
from hetfl.registry import Registry

TOPOLOGIES: Registry = Registry("topology")

TopologyFn = Callable[[int, "GraphConfig", np.ndarray, int], Any]


# --------------------------------------------------------------------------------------------------
# topologies
# --------------------------------------------------------------------------------------------------

#: topologies whose draw depends on the seed (redrawn when disconnected, resampled per round if asked)
RANDOM: set[TopologyFn] = set()


def _graph(n: int, edges: Any = ()) -> Any:
    import networkx as nx

    g = nx.Graph()
    g.add_nodes_from(range(n))
    g.add_edges_from((int(a), int(b)) for a, b in edges if a != b)
    return g


def seeded(fn: TopologyFn) -> TopologyFn:
    """Marks a topology whose draw depends on the seed (under ``@TOPOLOGIES.register``)."""
    RANDOM.add(fn)
    return fn


@TOPOLOGIES.register("ring")
def ring(n: int, cfg: GraphConfig, tiers: np.ndarray, seed: int) -> Any:
    """Ring: node i talks to i-1 and i+1 (mod n); degree 2, spectral gap Theta(1/n^2)."""
    return _graph(n, [(i, (i + 1) % n) for i in range(n)] if n > 1 else [])


def _factor(n: int, rows: int) -> tuple[int, int]:
    if rows:
        if n % rows:
            raise ConfigError(f"graph.rows={rows} does not divide the {n} nodes (data.num_clients); "
                              f"choose a divisor or 0 (the most square grid)")
        return rows, n // rows
    r = int(math.isqrt(n))
    while n % r:
        r -= 1
    return r, n // r


def _lattice(n: int, cfg: GraphConfig, periodic: bool) -> Any:
    rows, cols = _factor(n, cfg.rows)
    edges = []
    for r in range(rows):
        for c in range(cols):
            v = r * cols + c
            if periodic or r + 1 < rows:
                edges.append((v, ((r + 1) % rows) * cols + c))
            if periodic or c + 1 < cols:
                edges.append((v, r * cols + (c + 1) % cols))
    return _graph(n, edges)


@TOPOLOGIES.register("torus")
def torus(n: int, cfg: GraphConfig, tiers: np.ndarray, seed: int) -> Any:
    """2-D torus (rows x n/rows, wrap-around): degree <= 4 (a 1 x n torus is a ring)."""
    return _lattice(n, cfg, periodic=True)


@TOPOLOGIES.register("grid")
def grid(n: int, cfg: GraphConfig, tiers: np.ndarray, seed: int) -> Any:
    """2-D grid (rows x n/rows, no wrap-around): degree 2 to 4."""
    return _lattice(n, cfg, periodic=False)


@TOPOLOGIES.register("regular")
@seeded
def regular(n: int, cfg: GraphConfig, tiers: np.ndarray, seed: int) -> Any:
    """Random d-regular graph (graph.degree = d; n*d even, d < n), redrawn until connected."""
    import networkx as nx

    d = cfg.degree
    if d >= n or (n * d) % 2:
        raise ConfigError(f"graph 'regular' needs graph.degree < nodes and degree * nodes even; got degree={d} "
                          f"with {n} nodes (data.num_clients)")
    return _graph(n, nx.random_regular_graph(d, n, seed=seed).edges())


@TOPOLOGIES.register("erdos_renyi")
@seeded
def erdos_renyi(n: int, cfg: GraphConfig, tiers: np.ndarray, seed: int) -> Any:
    """Erdos-Renyi G(n, p) (graph.p), redrawn until connected (connected w.h.p. for p > ln(n)/n)."""
    import networkx as nx

    return _graph(n, nx.gnp_random_graph(n, cfg.p, seed=seed).edges())


@TOPOLOGIES.register("complete")
def complete(n: int, cfg: GraphConfig, tiers: np.ndarray, seed: int) -> Any:
    """Fully connected: every pair of nodes is an edge (gossip = exact averaging in one step)."""
    return _graph(n, [(i, j) for i in range(n) for j in range(i + 1, n)])


@TOPOLOGIES.register("capability")
@seeded
def capability(n: int, cfg: GraphConfig, tiers: np.ndarray, seed: int) -> Any:
    """Capability-aware: a ring inside every tier, and each node linked to graph.k random more capable nodes."""
    rng = np.random.default_rng([seed, 0x636170])
    edges = []
    tiers = np.asarray(tiers)
    for t in np.unique(tiers):
        members = np.flatnonzero(tiers == t)
        m = len(members)
        if m > 1:
            edges += [(members[i], members[(i + 1) % m]) for i in range(m if m > 2 else 1)]
    for v in range(n):
        stronger = np.flatnonzero(tiers < tiers[v])
        if len(stronger):
            pick = rng.choice(stronger, size=min(cfg.k, len(stronger)), replace=False)
            edges += [(v, int(u)) for u in pick]
    return _graph(n, edges)


# --------------------------------------------------------------------------------------------------
# mixing weights and sampling
# --------------------------------------------------------------------------------------------------


def mixing_matrix(n: int, edges: tuple[tuple[int, int], ...], kind: str = "metropolis") -> np.ndarray:
    """The symmetric, doubly stochastic gossip matrix of an undirected graph (see the module doc)."""
    deg = np.zeros(n, dtype=np.int64)
    for a, b in edges:
        deg[a] += 1
        deg[b] += 1
    w = np.zeros((n, n), dtype=np.float64)
    dmax = int(deg.max()) if n else 0
    for a, b in edges:
        v = 1.0 / (1.0 + max(deg[a], deg[b])) if kind == "metropolis" else 1.0 / (1.0 + dmax)
        w[a, b] = w[b, a] = v
    for i in range(n):
        w[i, i] = 1.0 - sum(w[i, j] for j in range(n) if j != i)
    return w


def spectral_gap(w: np.ndarray) -> float:
    """``1 - ||W - J/n||_2``: how fast gossip contracts disagreement (1 = exact averaging in one step)."""
    n = len(w)
    if n <= 1:
        return 1.0
    eig = np.linalg.eigvalsh(w - np.full((n, n), 1.0 / n))
    return float(1.0 - np.max(np.abs(eig)))


@dataclass(frozen=True)
class Topology:
    """One round's graph: sorted edges (i < j), each node's sorted neighbours, the mixing matrix."""

    n: int
    edges: tuple[tuple[int, int], ...]
    neighbours: tuple[tuple[int, ...], ...]
    weights: np.ndarray
    spectral_gap: float
    tries: int = 1

    def degree(self, i: int) -> int:
        return len(self.neighbours[i])


def _seed(seed: int, key: int, attempt: int) -> int:
    ss = np.random.SeedSequence([seed, key, attempt, 0x746F706F])
    return int(ss.generate_state(1, dtype=np.uint32)[0])


def sample_topology(cfg: GraphConfig, n: int, tiers: np.ndarray, seed: int, rnd: int) -> Topology:
    """The graph of round ``rnd``: drawn from (seed, rnd) when ``cfg.resample``, else from the seed alone."""
    import networkx as nx

    fn = TOPOLOGIES.get(cfg.name, "graph.name")
    is_random = fn in RANDOM
    key = rnd if (cfg.resample and is_random) else 0
    tries = cfg.max_tries if is_random else 1
    g = None
    for attempt in range(tries):
        g = fn(n, cfg, np.asarray(tiers), _seed(seed, key, attempt))
        if n <= 1 or nx.is_connected(g):
            edges = tuple(sorted((min(a, b), max(a, b)) for a, b in g.edges()))
            nbrs = tuple(tuple(sorted(int(j) for j in g.neighbors(i))) for i in range(n))
            w = mixing_matrix(n, edges, cfg.mixing)
            return Topology(n, edges, nbrs, w, spectral_gap(w), attempt + 1)
    params = {"regular": f"degree={cfg.degree}", "erdos_renyi": f"p={cfg.p} (ln(n)/n = {math.log(max(n, 2)) / n:.3f})",
              "capability": f"k={cfg.k}", "torus": f"rows={cfg.rows}", "grid": f"rows={cfg.rows}"}.get(cfg.name, "")
    comps = nx.number_connected_components(g) if g is not None else 0
    if is_random:
        raise ConfigError(f"graph {cfg.name!r} with {n} nodes and {params} was disconnected in all {tries} draws "
                          f"(last draw: {comps} components); use a denser graph or raise graph.max_tries")
    raise ConfigError(f"graph {cfg.name!r} with {n} nodes{' and ' + params if params else ''} is disconnected "
                      f"({comps} components); choose other graph parameters or another graph.name")


__all__ = ["MIXINGS", "TOPOLOGIES", "GraphConfig", "Topology", "mixing_matrix", "sample_topology", "spectral_gap"]
