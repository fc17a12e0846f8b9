"""Reliability: dropouts, stragglers, invalid updates and client crashes, decided and accounted for.

The ``[faults]`` section (:class:`FaultsConfig`) is defined here and wired into
:class:`~hetfl.config.RunConfig`; this module imports nothing heavy so the config can import it.

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

import math
from dataclasses import dataclass

from hetfl.errors import ConfigError


@dataclass(frozen=True)
class FaultsConfig:
    """``[faults]``: how clients misbehave (simulated) and how the server defends the global model.

    * ``dropout``: probability that a selected client fails during a round (its update never arrives);
      drawn per (seed, round, client), so runs and resumes are reproducible.
    * ``deadline_s``: round deadline in simulated seconds (0 = none); a client whose simulated time
      (compute + transfer, see :mod:`hetfl.reliability.plan`) exceeds it is dropped as a straggler.
    * ``min_clients``: the round is aggregated only if at least this many updates were accepted;
      otherwise it is skipped (global model unchanged) and logged.
    * ``device_gflops``: sustained training throughput, in GFLOP/s, of a device of relative speed 1
      (the fleet's ``speed`` scales it per client).
    * ``max_update_norm``: reject an update whose L2 norm ``||w_new - w_task||`` over all floating
      tensors exceeds this (0 = off).
    * ``max_update_ratio``: reject an update with ``||w_new - w_task|| / ||w_task||`` above this (0 = off).
    * ``fail_fast``: re-raise a client's exception instead of counting the client as failed.
    """

    dropout: float = 0.0
    deadline_s: float = 0.0
    min_clients: int = 1
    device_gflops: float = 10.0
    max_update_norm: float = 0.0
    max_update_ratio: float = 0.0
    fail_fast: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"faults.{field} must be {allowed}, got {getattr(self, field)!r}")

        need(0.0 <= self.dropout < 1.0, "dropout", "a probability in [0, 1) (0 = no dropouts)")
        need(self.deadline_s >= 0.0, "deadline_s", ">= 0 simulated seconds (0 = no deadline)")
        need(self.min_clients >= 1, "min_clients", "an integer >= 1")
        need(self.device_gflops > 0.0 and math.isfinite(self.device_gflops), "device_gflops",
             "> 0 (GFLOP/s of a relative-speed-1 device)")
        need(self.max_update_norm >= 0.0, "max_update_norm", ">= 0 (0 = no bound)")
        need(self.max_update_ratio >= 0.0, "max_update_ratio", ">= 0 (0 = no bound)")


def check_min_clients(faults: FaultsConfig, per_round: int) -> None:
    """A ConfigError if ``faults.min_clients`` can never be met with ``per_round`` selected clients."""
    if faults.min_clients > per_round:
        raise ConfigError(
            f"faults.min_clients={faults.min_clients} can never be met: only {per_round} clients are selected "
            f"per round (algorithm.clients_per_round / algorithm.fraction); lower faults.min_clients or "
            f"select more clients"
        )


__all__ = ["FaultsConfig", "check_min_clients"]
