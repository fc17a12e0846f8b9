"""Reliability: dropouts, stragglers, invalid updates and client crashes, decided and accounted for.

The ``[faults]`` section (:class:`~hetfl.config.FaultsConfig`) lives with the config (re-exported here).

* :mod:`hetfl.reliability.plan`: the simulated time model and the up-front plan of a round (who drops
  out, who misses the deadline): a pure function of the tasks, the fleet and the model costs.
* :mod:`hetfl.reliability.validate`: checks a :class:`~hetfl.algorithms.base.ClientResult` against
  its :class:`~hetfl.algorithms.base.ClientTask` (keys, shapes, dtypes, finiteness, update norm).
* :mod:`hetfl.reliability.guard`: :class:`~hetfl.reliability.guard.RoundGuard`, which any engine uses
  to run a round's clients through the plan, catch client exceptions, validate results, apply
  ``min_clients`` and report the per-round fault metrics.

See docs/reliability.md for the guarantees.
"""

from __future__ import annotations

from hetfl.config import FaultsConfig
from hetfl.errors import ConfigError


def check_min_clients(faults: FaultsConfig, per_round: int) -> None:
    """A ConfigError if ``faults.min_clients`` can never be met with ``per_round`` selected clients."""
    if faults.min_clients > per_round:
        raise ConfigError(
            f"faults.min_clients={faults.min_clients} can never be met: only {per_round} clients are selected "
            f"per round (algorithm.clients_per_round / algorithm.fraction); lower faults.min_clients or "
            f"select more clients"
        )


__all__ = ["FaultsConfig", "check_min_clients"]
