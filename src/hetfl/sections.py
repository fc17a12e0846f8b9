"""The config file's sections as frozen dataclasses: ``[data]``, ``[model]``, ``[algorithm]`` (their fixed
keys), ``[train]``, ``[eval]``, ``[faults]``, ``[graph]``, ``[asynchronous]``, ``[privacy]``, ``[engine]``.

Each checks its own values (a ConfigError naming the field, the value and what is allowed).  :mod:`hetfl.config`
assembles them into :class:`~hetfl.config.RunConfig` and re-exports them; like it, this module imports nothing of
hetfl above it (``[fleet]`` is :class:`hetfl.fleet.FleetConfig`, ``[log]`` :class:`hetfl.logwriters.LogConfig`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

from hetfl.errors import ConfigError

Params = tuple[tuple[str, Any], ...]


def _params(mapping: Mapping[str, Any]) -> Params:
    return tuple(sorted(mapping.items()))


# --------------------------------------------------------------------------------------------------
# Fixed sections
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Component:
    """A registry entry chosen by name, plus the parameters it declares."""

    name: str
    params: Params = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        return dict(self.params)


@dataclass(frozen=True)
class DataConfig:
    name: str = "digits"
    data_dir: str | None = None
    verify: bool = True  # check data files against their published checksums (false: warn and go on)
    num_clients: int = 10
    local_test_fraction: float = 0.0
    #: share of the training split held out (seeded, before partitioning) as a validation split the server scores
    #: every evaluated model on (``val_accuracy``): tune on it, never on the test set (0 = none)
    validation_fraction: float = 0.0
    partition: Component = Component("iid")
    params: Params = ()


@dataclass(frozen=True)
class ModelConfig:
    name: str = "mlp"
    width: float = 1.0
    params: Params = ()


@dataclass(frozen=True)
class AlgorithmConfig:
    name: str = "fedavg"
    params: Params = ()


MEMORY_FORMATS = ("auto", "contiguous", "channels_last")
BN_RULES = ("method", "recalibrate", "running")  # eval.bn (hetfl.evaluation)
PRECISIONS = ("fp32", "auto", "bf16")
AUGMENTATIONS = ("none", "crop_flip")


@dataclass(frozen=True)
class TrainConfig:
    """The local update: SGD for ``epochs`` passes (or exactly ``steps`` minibatches if > 0)."""

    epochs: int = 1
    steps: int = 0
    batch_size: int = 10
    lr: float = 0.05
    lr_decay: float = 1.0
    momentum: float = 0.0
    weight_decay: float = 0.0
    grad_clip: float = 0.0
    # layout of 4-D weights while training: "auto" (channels_last on the CPU for models that declare it
    # faster, e.g. FedAvg's CNN; see hetfl.precision.training_memory_format), "contiguous", "channels_last"
    memory_format: str = "auto"
    # train-time augmentation of image minibatches: "none", or "crop_flip" (4-pixel padded random crop +
    # horizontal flip, seeded per (seed, round, client); hetfl.data.augment)
    augment: str = "none"
    # arithmetic of the client step and evaluation: "fp32" (the default: results reproducible bit for bit),
    # "bf16" (autocast to bfloat16; master weights, aggregation, noise and checkpoints stay fp32), or
    # "auto" (bf16 where the hardware has bf16 matrix units and a measured step is faster; decided once at
    # the run's start and recorded in summary.json; hetfl.precision)
    precision: str = "fp32"


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1
    #: no evaluation before this round (0: from the first multiple of ``every``); the last round always is.
    #: Evaluation has no effect on training, so a later start changes no evaluated round's numbers
    start: int = 0
    batch_size: int = 1000
    local: bool = True
    local_clients: int = 0
    bn_samples: int = 10000
    #: BatchNorm statistics of every evaluated model (hetfl.evaluation.BN_RULES): "method" (each algorithm's
    #: own: static BN recalibrates, the others run the averaged statistics), "recalibrate" (every method
    #: recomputes them over eval.bn_samples client samples), "running" (every method runs its averaged ones)
    bn: str = "method"

    def due(self, rnd: int, rounds: int) -> bool:
        """Whether round ``rnd`` of a ``rounds``-round run is evaluated."""
        return rnd == rounds or (rnd >= self.start and rnd % self.every == 0)


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
    * ``min_success_fraction``: share of the clients sent a task this round (those the fault plan let
      train) that must come back (not raise, not be lost by the transport); fewer and the round raises
      :class:`~hetfl.errors.HetflError`: the run stops and can be resumed.  Every engine honours it the
      same way (on Flower it is the rule for vanished nodes; 0.5 was that engine's own default before it
      became this key).  0 = never stop (the default).
    """

    dropout: float = 0.0
    deadline_s: float = 0.0
    min_clients: int = 1
    device_gflops: float = 10.0
    max_update_norm: float = 0.0
    max_update_ratio: float = 0.0
    fail_fast: bool = False
    min_success_fraction: float = 0.0

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
        need(0.0 <= self.min_success_fraction <= 1.0, "min_success_fraction", "in [0, 1] (0 = never stop)")


MIXINGS = ("metropolis", "uniform")


@dataclass(frozen=True)
class GraphConfig:
    """``[graph]``: the communication graph of decentralized algorithms (``dkd``, ``dpsgd``, ``isolated``).

    * ``name``: a registered topology (``hetfl list``); ``degree`` (``regular``), ``p`` (``erdos_renyi``),
      ``rows`` (``torus``/``grid``; 0 = the most square factorisation of the node count) and ``k``
      (``capability``: stronger neighbours per node) are its parameters.
    * ``resample``: draw a new graph every round (random topologies), else one graph for the whole run.
    * ``mixing``: ``metropolis`` or ``uniform`` gossip weights.
    * ``max_tries``: draws of a random graph before a disconnected result is an error.
    * ``processes`` (torchrun engine, when hetfl starts the processes itself): OS processes, nodes
      spread round-robin over them (0 = one process per node).  ``timeout_s`` bounds every wait of the
      torchrun engine (process-group start, each send/receive/collective).
    """

    name: str = "ring"
    degree: int = 4
    p: float = 0.3
    rows: int = 0
    k: int = 2
    resample: bool = False
    mixing: str = "metropolis"
    max_tries: int = 100
    processes: int = 0
    timeout_s: float = 600.0

    def __post_init__(self) -> None:
        checks = [
            (self.degree >= 1, "degree", "must be >= 1"),
            (0.0 < self.p <= 1.0, "p", "must be in (0, 1]"),
            (self.rows >= 0, "rows", "must be >= 0 (0 = the most square grid)"),
            (self.k >= 1, "k", "must be >= 1"),
            (self.mixing in MIXINGS, "mixing", f"must be one of {', '.join(MIXINGS)}"),
            (self.max_tries >= 1, "max_tries", "must be >= 1"),
            (self.processes >= 0, "processes", "must be >= 0 (0 = one process per node)"),
            (self.timeout_s > 0 and math.isfinite(self.timeout_s), "timeout_s", "must be > 0 seconds"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ConfigError(f"graph.{name} {msg}, got {getattr(self, name)!r}")


ASYNC_MODES = ("sync", "fedbuff")
STALENESS = ("sqrt", "constant")


@dataclass(frozen=True)
class AsyncConfig:
    """``[asynchronous]``: synchronous rounds (the default) or buffered asynchronous aggregation (FedBuff).

    * ``mode``: ``"sync"`` (a round waits for its clients) or ``"fedbuff"`` (``concurrency`` clients are always
      in flight on the virtual clock; every ``buffer`` results the server takes one step; docs/async.md).
    * ``concurrency``: clients in flight at every moment (0 = the algorithm's clients per round).
    * ``buffer``: results per server step (0 = the algorithm's clients per round).
    * ``staleness``: the weight of a result trained on a model ``s`` server steps old: ``"sqrt"``
      ``1 / sqrt(1 + s)`` (FedBuff's) or ``"constant"`` 1.
    * ``server_lr``: the server step on the mean of the weighted updates.
    """

    mode: str = "sync"
    concurrency: int = 0
    buffer: int = 0
    staleness: str = "sqrt"
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        checks = [
            (self.mode in ASYNC_MODES, "mode", f"must be one of {', '.join(map(repr, ASYNC_MODES))}"),
            (self.concurrency >= 0, "concurrency", "must be >= 0 (0 = the algorithm's clients per round)"),
            (self.buffer >= 0, "buffer", "must be >= 0 (0 = the algorithm's clients per round)"),
            (self.staleness in STALENESS, "staleness", f"must be one of {', '.join(map(repr, STALENESS))}"),
            (self.server_lr > 0 and math.isfinite(self.server_lr), "server_lr", "must be > 0"),
        ]
        for ok, name, msg in checks:
            if not ok:
                raise ConfigError(f"asynchronous.{name} {msg}, got {getattr(self, name)!r}")

    @property
    def active(self) -> bool:
        return self.mode != "sync"


SAMPLING = ("poisson",)
ACCOUNTANTS = ("rdp", "pld")


@dataclass(frozen=True)
class PrivacyConfig:
    """``[privacy]``: clip every client's update, add Gaussian noise to their sum, account with dp-accounting.

    * ``clip``: L2 bound C on each client's update (result minus the weights it was sent), over the
      tensors the server releases; unset = no clipping (then ``noise_multiplier`` must be 0).
    * ``noise_multiplier``: z; the sum of clipped updates gets N(0, (z C)^2) per element.
    * ``target_epsilon``: instead of ``noise_multiplier``: the smallest z (up to ``max_noise_multiplier``)
      whose epsilon after ``rounds`` rounds at ``delta`` is at most this, found before round 1.
    * ``delta``: the delta of the reported epsilon; must be below 1 / number of clients.
    * ``sampling``: ``"poisson"``: every round each client joins independently with probability
      q = (the algorithm's clients per round) / (clients), which is what the accountant analyses.
    * ``accountant``: ``"pld"`` (default: privacy loss distributions, the tight figure; calibrates
      ``target_epsilon`` and makes the reported epsilon) or ``"rdp"`` (Renyi DP of the sampled Gaussian, a
      looser upper bound), both from dp-accounting.  Every round's row also carries the cheap RDP bound.
    * ``reproducible_noise``: the noise and the Poisson draw become pure functions of (seed, round), so anyone
      who knows the seed can subtract the noise: for tests and studies only (warns on every run, marked in
      summary.json).  Default false: both come from the operating system's entropy, never stored.
    * ``adaptive_clip`` (Andrew et al., 2021): ``clip`` is the initial C; every round C follows the
      ``target_quantile`` of the update norms, ``C <- C exp(-clip_lr (b - target_quantile))`` with ``b`` the
      noised fraction of updates within C.  The fraction's noise (std ``count_noise``, default the expected
      cohort / 20) and the update's noise share the budget: together they are one Gaussian release of
      multiplier ``noise_multiplier``, so epsilon is unchanged.

    A section asking for nothing (z = 0, no clip, no target) is inactive: the run is the non-private one.
    """

    noise_multiplier: float = 0.0
    clip: float | None = None
    target_epsilon: float | None = None
    delta: float = 1e-5
    max_noise_multiplier: float = 50.0
    sampling: str = "poisson"
    accountant: str = "pld"
    adaptive_clip: bool = False
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    count_noise: float | None = None
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"privacy.{field} must be {allowed}, got {getattr(self, field)!r}")

        need(self.noise_multiplier >= 0.0, "noise_multiplier", ">= 0 (0 = no noise)")
        need(self.clip is None or (self.clip > 0.0 and math.isfinite(self.clip)), "clip",
             "> 0 (the L2 bound on one client's update; leave it unset for no clipping)")
        need(self.target_epsilon is None or self.target_epsilon > 0.0, "target_epsilon", "> 0")
        need(0.0 < self.delta < 1.0, "delta", "in (0, 1) and below 1 / number of clients")
        need(self.max_noise_multiplier > 0.0, "max_noise_multiplier", "> 0")
        need(self.sampling in SAMPLING, "sampling", f"one of {', '.join(map(repr, SAMPLING))}")
        need(self.accountant in ACCOUNTANTS, "accountant", f"one of {', '.join(map(repr, ACCOUNTANTS))}")
        need(0.0 < self.target_quantile < 1.0, "target_quantile", "in (0, 1)")
        need(self.clip_lr > 0.0, "clip_lr", "> 0")
        need(self.count_noise is None or self.count_noise > 0.0, "count_noise", "> 0 (std of the noise on the count)")
        if self.adaptive_clip and self.clip is None:
            raise ConfigError("privacy.adaptive_clip needs privacy.clip: the initial clipping norm")
        if self.target_epsilon is not None and self.noise_multiplier > 0.0:
            raise ConfigError("privacy.target_epsilon and privacy.noise_multiplier are alternatives: give one "
                              "(the noise multiplier is derived from the target before round 1)")
        if (self.noise_multiplier > 0.0 or self.target_epsilon is not None) and self.clip is None:
            raise ConfigError("privacy.noise_multiplier / privacy.target_epsilon need privacy.clip: the noise is "
                              "noise_multiplier x clip, calibrated to one client's clipped update")

    @property
    def active(self) -> bool:
        """Whether the section changes the round at all (clipping, noise or a target)."""
        return self.clip is not None or self.noise_multiplier > 0.0 or self.target_epsilon is not None


BATCHED = ("auto", True, False)


@dataclass(frozen=True)
class EngineConfig:
    """``[engine]``: which engine carries the rounds, and its knobs.

    * ``name``: ``simulator`` (default; server algorithms: clients in this process or in worker
      processes; graph algorithms: every node in this process), ``flower``, or ``torchrun`` (graph
      algorithms, one process per node); ``hetfl list`` shows which carries which protocol.
    * ``workers`` (simulator): client-parallel worker processes; ``"auto"`` or 0 = decide, 1 = in this process.
    * ``threads_per_worker``: torch intra-op threads in each worker process.
    * ``worker_timeout_s``: a client taking longer in a worker counts as a dead worker (0 = no limit).
    * ``batched``: train same-shape clients as one vmapped model: ``"auto"`` (CUDA only, if a start-up
      micro-benchmark says it is faster), true, false (:mod:`hetfl.engines.batched`).
    * ``flower_num_cpus`` / ``flower_num_gpus``: Flower simulation's ``client_resources`` per virtual
      client (``flower_num_cpus = 0``: Flower's default, 2).
    * ``flower_round_timeout_s``: a Flower client that has not replied by then is lost (0 = wait for Flower's
      own node-unavailable reply); ``flower_query_timeout_s``: how long to wait for nodes to connect and
      answer the capability query; ``flower_verbose``: Flower's INFO/DEBUG logs.

    The top-level keys of older configs (``engine = "flower"``, ``workers``, ``threads_per_worker``,
    ``worker_timeout_s``, ``batched``) are read into this section (:func:`fold_engine_keys`).
    """

    name: str = "simulator"
    workers: int | Literal["auto"] = "auto"
    threads_per_worker: int = 1
    worker_timeout_s: float = 0.0
    batched: bool | str = "auto"
    flower_num_cpus: float = 0.0
    flower_num_gpus: float = 0.0
    flower_round_timeout_s: float = 0.0
    flower_query_timeout_s: float = 600.0
    flower_verbose: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, field: str, allowed: str) -> None:
            if not ok:
                raise ConfigError(f"engine.{field} must be {allowed}, got {getattr(self, field)!r}")

        need(self.batched in BATCHED, "batched", '"auto", true or false')
        need(self.workers == "auto" or self.workers >= 0, "workers",
             '"auto", 0 (= auto) or a number of processes >= 1')
        need(self.threads_per_worker >= 1, "threads_per_worker", ">= 1")
        need(self.worker_timeout_s >= 0, "worker_timeout_s", ">= 0 (0 = no limit)")
        need(self.flower_num_cpus >= 0, "flower_num_cpus", ">= 0 (0 = Flower's default)")
        need(self.flower_num_gpus >= 0, "flower_num_gpus", ">= 0")
        need(self.flower_round_timeout_s >= 0, "flower_round_timeout_s", ">= 0 (0 = no timeout)")
        need(self.flower_query_timeout_s > 0, "flower_query_timeout_s", "> 0 seconds")


#: top-level keys of older configs -> their key in ``[engine]``
ENGINE_KEYS = {"engine": "name", "workers": "workers", "threads_per_worker": "threads_per_worker",
               "worker_timeout_s": "worker_timeout_s", "batched": "batched"}


def fold_engine_keys(raw: Mapping[str, Any]) -> dict[str, Any]:
    """``raw`` with the top-level engine keys of older configs (``engine = "flower"``, ``workers = 2``, ...)
    moved into the ``[engine]`` section; a top-level key wins over the section's (it is what ``--set
    workers=2`` writes)."""
    out = dict(raw)
    engine = out.get("engine")
    table = dict(engine) if isinstance(engine, Mapping) else {}
    for key, into in ENGINE_KEYS.items():
        if key in out and not (key == "engine" and isinstance(out[key], Mapping)):
            table[into] = out.pop(key)
    if table or "engine" in out:
        out["engine"] = table
    return out


__all__ = ["ACCOUNTANTS", "ASYNC_MODES", "AUGMENTATIONS", "AlgorithmConfig", "AsyncConfig", "BATCHED", "Component",
           "DataConfig", "ENGINE_KEYS", "EngineConfig", "EvalConfig", "FaultsConfig", "GraphConfig",
           "MEMORY_FORMATS", "MIXINGS", "ModelConfig", "PRECISIONS", "PrivacyConfig", "SAMPLING", "STALENESS",
           "TrainConfig", "fold_engine_keys", "Params"]
