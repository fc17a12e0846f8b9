"""Fully decentralized heterogeneous learning: no server, devices of different power on a graph.

* :mod:`hetfl.decentralized.topology`: the ``[graph]`` section, the topology registry, mixing weights;
* :mod:`hetfl.decentralized.protocol`: the graph protocol (:class:`GraphAlgorithm`: who each node is, the
  round's plan on the graph, the node-side steps) and its algorithms ``dkd`` (distillation into weaker
  neighbours), ``dpsgd`` and ``isolated``;
* :mod:`hetfl.decentralized.host`: :class:`NodeHost`, which runs one round for the nodes a process hosts
  over a transport, and the round's metrics;
* :mod:`hetfl.decentralized.engine`: the in-process engine and the per-node evaluator;
* :mod:`hetfl.decentralized.torchrun`: one OS process per node (or per group of nodes) over
  ``torch.distributed`` (gloo), launched by ``hetfl run --engine torchrun`` or by ``torchrun``.

Only the light topology module is imported here (the config imports :class:`GraphConfig`); the
algorithms are registered when :mod:`hetfl.catalog` imports :mod:`hetfl.decentralized.protocol`.
See docs/decentralized.md.
"""

from hetfl.decentralized.topology import TOPOLOGIES, GraphConfig, Topology, sample_topology

__all__ = ["TOPOLOGIES", "GraphConfig", "Topology", "sample_topology"]
