"""The algorithm interface: transport-agnostic objects with explicit state.

An algorithm never knows which engine drives it (the in-process simulator, Flower, worker
processes).  A round is four calls, each a pure function of its inputs::

    clients = algo.sample_clients(state, rnd, ctx, rng)          # server
    tasks   = algo.configure_round(state, rnd, clients, ctx)     # server: one ClientTask per client
    result  = algo.local_update(task, model, data, device)       # client (engine loads task.weights)
    update  = algo.aggregate(state, rnd, results, ctx)           # server, streams over results
    state   = algo.server_step(state, update, ctx)               # server

Every :class:`ClientTask` names its own :class:`ModelRef` and carries its own weights and local
config, so clients of one round may train models of different shapes or architectures.  Tasks and
results hold only tensors and plain values, so any transport can carry them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn

from hetfl.aggregation import Placement, Reducer, footprint_of, make_reducer, whole
from hetfl.aggregation.blocks import BlockSum
from hetfl.config import TrainConfig
from hetfl.data.base import DataInfo, Split
from hetfl.data.server import ServerData, ServerDataSpec
from hetfl.errors import ConfigError
from hetfl.fleet import Fleet
from hetfl.models.ref import ModelRef
from hetfl.reliability import FaultsConfig
from hetfl.robust import check_method

Weights = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Context:
    """Static facts about a run that the server side of an algorithm may use."""

    info: DataInfo
    model: ModelRef
    train: TrainConfig
    client_sizes: np.ndarray  # training samples per client
    seed: int
    rounds: int
    fleet: Fleet | None = None
    faults: FaultsConfig | None = None  # [faults]: dropouts, deadline, update validation (None = defaults)
    server_data: ServerData | None = None  # drawn by the runner when algorithm.server_data_spec() asks
    privacy: Any = None  # the resolved [privacy] (hetfl.privacy.plan.PrivacyPlan), None = no privacy step
    asynchronous: Any = None  # [asynchronous] when active (hetfl.config.AsyncConfig), None = synchronous rounds

    @property
    def num_clients(self) -> int:
        return len(self.client_sizes)


@dataclass
class ClientTask:
    client_id: int
    model: ModelRef
    weights: Weights
    train: TrainConfig
    seed: int
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ClientResult:
    client_id: int
    num_samples: int
    weights: Weights
    metrics: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerState:
    """Everything the server carries between rounds; checkpointed as plain tensors and values.

    ``models`` maps a model key ("global", or one key per architecture family) to its weights;
    ``buffers`` holds optimiser state and other algorithm-specific values.
    """

    round: int
    models: dict[str, Weights]
    buffers: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"round": self.round, "models": self.models, "buffers": self.buffers}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ServerState:
        return cls(round=int(d["round"]), models=d["models"], buffers=d.get("buffers", {}))


@dataclass(frozen=True)
class EvalTarget:
    """A model the runner should evaluate: its architecture and weights.

    ``calibrate_bn``: recompute BatchNorm statistics (one pass over client training data at this
    width) before evaluating, as static BN requires.  ``clients``: the clients this model serves (a
    capability tier); their local test splits give its per-tier accuracy.  ``personal``: the model is one
    client's own (``clients`` = that client; FedProto keeps one per device): it is scored only in the mean over
    the personal targets of its group (``personal`` = the group's label: ``"global"`` or an architecture
    family), never under its own key.  ``prototypes``: ``(classes x features, present-class mask)``: classify by
    the nearest prototype (Euclidean) of the features in front of the model's head instead of by the head.
    """

    model: ModelRef
    weights: Weights
    calibrate_bn: bool = False
    clients: np.ndarray | None = None
    personal: str | None = None
    prototypes: tuple[torch.Tensor, torch.Tensor] | None = None


def weights_of(model: nn.Module) -> Weights:
    """A detached copy of a module's state (parameters and buffers), safe to keep after reuse."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def nbytes(weights: Weights) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())


#: ``ClientTask.extra`` key: the state-dict keys a client receives but neither trains nor returns (frozen layers,
#: as in successive layer training); a valid result carries every other key of the task
FROZEN = "frozen"


def returned(task: ClientTask) -> Weights:
    """The part of ``task.weights`` a valid result carries (all of it unless some keys are :data:`FROZEN`)."""
    frozen = task.extra.get(FROZEN) if task.extra else None
    if not frozen:
        return task.weights
    skip = set(frozen)
    return {k: v for k, v in task.weights.items() if k not in skip}


def round_seed(seed: int, rnd: int, client_id: int = -1) -> int:
    """A 63-bit seed derived from (run seed, round, client): independent of execution order."""
    ss = np.random.SeedSequence([seed, rnd, client_id + 1, 0x6865_7466])
    return int(ss.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


@dataclass(frozen=True)
class Algorithm:
    """Base of every algorithm: client sampling plus the four-call round protocol.

    Subclasses are frozen dataclasses whose fields are their hyperparameters (the ``[algorithm]``
    section of a config), registered in :data:`hetfl.algorithms.ALGORITHMS`.
    """

    #: why client-level DP (``[privacy]``) cannot cover this algorithm (it releases more than model updates),
    #: or None: every server algorithm whose clients release only their updates runs private
    private_refusal: ClassVar[str | None] = None
    #: same-shape clients may be trained as one batched model (hetfl.engines.batched): the client update is
    #: exactly FedAvg's plain local SGD (cross-entropy, no per-client state); an override of local_update that
    #: changes this must set it False
    batchable: ClassVar[bool] = False
    #: a round's results may be pre-summed in blocks of consecutive clients where they train
    #: (:mod:`hetfl.aggregation.blocks`, :meth:`aggregate_sums`): every task of a round carries the same
    #: weights, every result is placed whole on ``global`` with :meth:`weight_of` (the default
    #: :meth:`placer`), there is no :meth:`side_channel`, and :meth:`combine` reads only the reduced models.
    #: Used only when the round's reducer accepts sums (the mean; not the robust ones, not ``[privacy]``).
    #: An override of any of these that breaks it must set it False
    block_sums: ClassVar[bool] = False

    clients_per_round: int = 10
    fraction: float = 0.0
    #: how the server reduces the placed results: "mean" (streaming, weighted as the algorithm places them),
    #: or coordinate-wise "median" / "trimmed_mean" (cutting ``trim`` of each end; unweighted, n x model memory)
    aggregator: str = "mean"
    trim: float = 0.1
    weighted: bool = False  # a client's weight in the mean: its sample count (else 1)

    def __post_init__(self) -> None:
        check_method(self.aggregator, self.trim)
        if self.clients_per_round < 1:
            raise ConfigError(f"algorithm.clients_per_round must be >= 1, got {self.clients_per_round}")
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"algorithm.fraction must be in [0, 1] (0 = use clients_per_round), "
                              f"got {self.fraction}")

    # ------------------------------------------------------------------ server side
    def clients_for(self, num_clients: int) -> int:
        if self.fraction > 0:
            return max(1, int(round(self.fraction * num_clients)))
        return min(self.clients_per_round, num_clients)

    def sample_clients(self, state: ServerState, rnd: int, ctx: Context,
                       rng: np.random.Generator) -> np.ndarray:
        k = self.clients_for(ctx.num_clients)
        return np.sort(rng.choice(ctx.num_clients, size=k, replace=False))

    def init_state(self, ctx: Context) -> ServerState:
        raise NotImplementedError

    def configure_round(self, state: ServerState, rnd: int, clients: Sequence[int],
                        ctx: Context) -> list[ClientTask]:
        raise NotImplementedError

    # ------------------------------------------------------------------ aggregation (one part for all)
    def placer(self, state: ServerState, rnd: int, ctx: Context) -> Callable[[ClientResult], Placement]:
        """Round ``rnd``'s placement rule, made once per round: where a client's result lands in the server's
        models (:mod:`hetfl.aggregation`).  Default: every tensor of ``global``, whole, with :meth:`weight_of`."""
        return lambda res: whole(res.weights, weight=self.weight_of(res))

    def weight_of(self, res: ClientResult) -> float:
        """A result's weight in the mean: its sample count when ``weighted``, else 1."""
        return float(res.num_samples) if self.weighted else 1.0

    def footprints(self, state: ServerState, rnd: int, ctx: Context
                   ) -> Callable[[int], list[tuple[float, Placement]]]:
        """Round ``rnd``'s possible footprints of any client, with their probabilities: which elements the
        client would hold if it reported (placements without values).  Differential privacy needs them for
        the expected number of contributors of every element; they may depend on the round and the public
        server state, never on a client's data.  Default: the floating tensors of ``global``, whole."""
        fp = footprint_of(state.models["global"])
        return lambda client: [(1.0, fp)]

    def deployed_footprints(self, state: ServerState, ctx: Context) -> dict[str, Placement]:
        """The footprint of every model a device deploys, by label (``w0.5``, ...); empty: only the whole
        model.  Used for per-level noise figures under ``[privacy]``."""
        return {}

    @property
    def reads_beside_mean(self) -> bool:
        """Whether the server step reads results beside the reduced mean or keeps several server models
        (:meth:`side_channel` or :meth:`combine` overridden); FedBuff's stale updates cannot feed such a step."""
        cls = type(self)
        return cls.side_channel is not Algorithm.side_channel or cls.combine is not Algorithm.combine

    def side_channel(self, state: ServerState, rnd: int, ctx: Context) -> Any:
        """An object with ``add(result, placement)`` that reads raw results beside the reducer (FedDF's teachers,
        FedGen's heads), or None.  Never called in a private round: there only the reducer sees results."""
        return None

    def combine(self, state: ServerState, rnd: int, models: dict[str, Weights], side: Any, ctx: Context) -> Any:
        """The update ``server_step`` takes, from the reduced models (and the side channel, None when private).
        Default: the new ``global`` weights, ``{}`` when nobody reported."""
        return models.get("global", {})

    def aggregate(self, state: ServerState, rnd: int, results: Iterable[ClientResult], ctx: Context,
                  reducer: Reducer | None = None) -> Any:
        """Place every result, reduce (``reducer``: the round's, e.g. the private one; default: this
        algorithm's ``aggregator``), then :meth:`combine`.  Results stream through: one pass."""
        if reducer is None:
            reducer = make_reducer(state.models, self.aggregator, self.trim)
        place = self.placer(state, rnd, ctx)
        side = None if reducer.private else self.side_channel(state, rnd, ctx)
        for res in results:
            placement = place(res)
            reducer.add(placement)
            if side is not None:
                side.add(res, placement)
        return self.combine(state, rnd, reducer.result() if reducer.clients or reducer.private else {}, side, ctx)

    def aggregate_sums(self, state: ServerState, rnd: int, sums: Iterable[BlockSum], ctx: Context,
                       reducer: Reducer) -> Any:
        """:meth:`aggregate` for an algorithm with :attr:`block_sums`: the round's results come as the float64
        weighted sums of blocks of consecutive results (:mod:`hetfl.aggregation.blocks`), added in block
        order into ``reducer`` (one with ``accepts_sums``), then :meth:`combine` as usual (no side channel)."""
        for total in sums:
            reducer.add_sum("global", total)
        return self.combine(state, rnd, reducer.result() if reducer.clients else {}, None, ctx)

    def server_step(self, state: ServerState, update: Any, ctx: Context) -> ServerState:
        raise NotImplementedError

    def eval_targets(self, state: ServerState, ctx: Context) -> dict[str, EvalTarget]:
        """The models to evaluate on the test set, by label (``"global"`` is the headline)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ optional hooks (defaults: none)
    def server_data_spec(self) -> ServerDataSpec | None:
        """Server-side data this algorithm needs (FedDF's transfer set), or None.

        The runner draws it before partitioning (held-out samples leave the clients' pool) and passes it
        as ``ctx.server_data``; see :mod:`hetfl.data.server`.
        """
        return None

    def model_refs(self, ctx: Context) -> list[ModelRef]:
        """Every architecture this algorithm builds; the runner checks each runs on the data before
        writing any file (an algorithm may raise ConfigError here for an inconsistent set)."""
        return [ctx.model]

    def round_metrics(self, state: ServerState) -> dict[str, Any]:
        """Server-side metrics of the round that produced ``state``, merged into its metrics.jsonl row."""
        return dict(state.buffers.get("metrics", {}))

    def summarize(self, rows: list[dict[str, Any]]) -> dict[str, Any]:
        """Algorithm-specific entries for summary.json, from the metrics.jsonl rows."""
        return {}

    # ------------------------------------------------------------------ client side
    def local_update(self, task: ClientTask, model: nn.Module, data: Split,
                     device: torch.device) -> ClientResult:
        raise NotImplementedError

    # ------------------------------------------------------------------ helpers
    def round_train_config(self, ctx: Context, rnd: int) -> TrainConfig:
        """The local config of round ``rnd`` (1-based): the configured lr decayed per round."""
        t = ctx.train
        if t.lr_decay == 1.0:
            return t
        return dataclasses.replace(t, lr=t.lr * t.lr_decay ** (rnd - 1))
