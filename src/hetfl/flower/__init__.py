"""hetfl on Flower: the same algorithm objects, carried by Flower's Message API (``pip install 'hetfl[flower]'``).

* :class:`FlowerSimulation` (``hetfl run CONFIG --engine flower``): Flower's simulation engine (Ray),
  one virtual SuperNode per client, kept alive across the rounds of one run;
* :mod:`hetfl.flower.server` / :mod:`hetfl.flower.client`: the ServerApp and ClientApp that ``flwr run``
  starts on a real deployment (SuperLink + SuperNodes), see ``docs/flower.md``;
* :class:`HetflStrategy`: the round logic shared by both (query round, one train message per task,
  streaming aggregation with the algorithm's own ``aggregate``, failure threshold);
* :mod:`hetfl.flower.codec`: tasks/results <-> RecordDicts (ArrayRecord/ConfigRecord/MetricRecord).

Flower's telemetry is off unless ``FLWR_TELEMETRY_ENABLED`` is set (hetfl runs offline).
"""

from __future__ import annotations

import os

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

from hetfl.flower.client import make_client_app  # noqa: E402
from hetfl.flower.engine import FlowerSimulation, make_engine, use_grid  # noqa: E402
from hetfl.flower.strategy import FlowerOptions, FlowerRoundReport, HetflStrategy  # noqa: E402

__all__ = ["FlowerOptions", "FlowerRoundReport", "FlowerSimulation", "HetflStrategy", "make_client_app",
           "make_engine", "use_grid"]
