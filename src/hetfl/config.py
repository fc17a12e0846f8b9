"""Run configuration: frozen dataclasses, loaded from TOML and overridden with ``--set key=value``.

The layout of a config file::

    name = "mnist-fedavg"      # optional run name
    rounds = 100
    seed = 0

    [data]                     # fixed keys + the chosen dataset's own parameters
    name = "mnist"
    num_clients = 100
    [data.partition]           # the chosen partitioner's parameters
    name = "shards"
    shards_per_client = 2

    [model]                    # name, width + the model's own parameters
    name = "cnn"

    [algorithm]                # the algorithm's parameters (clients_per_round, server_lr, ...)
    name = "fedavg"

    [train]                    # the local update every client runs
    epochs = 1
    batch_size = 10
    lr = 0.05

    [eval]
    every = 1

Registry-backed sections (``data``, ``data.partition``, ``model``, ``algorithm``) accept exactly the
parameters that the chosen entry declares (keyword arguments of its factory or fields of its
dataclass); anything else is an error that names the field and lists what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal, Union

from hetfl.decentralized.topology import GraphConfig
from hetfl.errors import ConfigError
from hetfl.fleet import FleetConfig
from hetfl.privacy.config import PrivacyConfig
from hetfl.reliability import FaultsConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

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
    num_clients: int = 10
    local_test_fraction: float = 0.0
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
    # faster, e.g. FedAvg's CNN; see hetfl.train.training_memory_format), "contiguous", "channels_last"
    memory_format: str = "auto"


@dataclass(frozen=True)
class EvalConfig:
    every: int = 1
    batch_size: int = 1000
    local: bool = True
    local_clients: int = 0
    bn_samples: int = 10000


@dataclass(frozen=True)
class RunConfig:
    name: str = ""
    rounds: int = 10
    seed: int = 0
    device: str = "cpu"
    engine: str = "simulator"
    workers: int | Literal["auto"] = "auto"  # client-parallel worker processes (simulator); "auto"/0 = decide
    threads_per_worker: int = 1  # torch intra-op threads in each worker process
    worker_timeout_s: float = 0.0  # a client taking longer in a worker counts as a dead worker (0 = no limit)
    checkpoint_every: int = 1
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    # train same-shape clients as one vmapped model: "auto" (CUDA only, if a start-up micro-benchmark
    # says it is faster), true, false (hetfl.engines.batched)
    batched: bool | str = "auto"

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return config_to_dict(self)

    def to_toml(self) -> str:
        return dump_toml(self.to_dict())


# --------------------------------------------------------------------------------------------------
# Value checking
# --------------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def check_value(where: str, value: Any, tp: Any) -> Any:
    """Return ``value`` coerced to ``tp`` (int -> float only) or raise a ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return check_value(where, value, arg)
            except ConfigError:
                continue
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if origin is typing.Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{where} must be {_type_name(tp)}, got {value!r}")
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where} must be none, got {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(float(value)):
                raise ConfigError(f"{where} must be a finite number, got {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(tp, type) and isinstance(value, tp):
        return value
    raise ConfigError(f"{where} must be {_type_name(tp)}, got {type(value).__name__} {value!r}")


def declared_params(obj: Any, skip: Sequence[str] = ()) -> dict[str, tuple[Any, Any]]:
    """The parameters a registry entry declares: ``{name: (type, default)}``.

    A dataclass declares its init fields; a function its keyword parameters.
    """
    import inspect

    hints = typing.get_type_hints(obj)
    out: dict[str, tuple[Any, Any]] = {}
    if dataclasses.is_dataclass(obj):
        for f in fields(obj):
            if not f.init or f.name in skip:
                continue
            default = f.default if f.default is not dataclasses.MISSING else None
            out[f.name] = (hints.get(f.name, Any), default)
        return out
    for p in inspect.signature(obj).parameters.values():
        if p.name in skip or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            continue
        if p.kind is p.POSITIONAL_OR_KEYWORD and p.default is p.empty:
            continue  # positional inputs (e.g. the DataInfo of a model factory) are not config
        out[p.name] = (hints.get(p.name, Any), None if p.default is p.empty else p.default)
    return out


def _check_params(section: str, kind: str, entry_name: str, entry: Any, raw: Mapping[str, Any],
                  skip: Sequence[str], reserved: Sequence[str]) -> Params:
    declared = declared_params(entry, skip)
    out = {}
    for key, value in raw.items():
        if key not in declared:
            allowed = sorted(set(declared) | set(reserved))
            raise ConfigError(
                f"unknown key {section}.{key} for {kind} {entry_name!r}; allowed keys in [{section}]: "
                f"{', '.join(allowed)}"
            )
        out[key] = check_value(f"{section}.{key}", value, declared[key][0])
    return _params(out)


def _build_fixed(cls: type, section: str, raw: Mapping[str, Any], extra_allowed: Sequence[str] = ()) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in fields(cls) if f.name not in ("params", "partition")]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            where = f"{section}.{key}" if section else key
            allowed = sorted(set(names) | set(extra_allowed))
            raise ConfigError(f"unknown key {where}; allowed keys{f' in [{section}]' if section else ''}: "
                              f"{', '.join(allowed)}")
        kwargs[key] = check_value(f"{section}.{key}" if section else key, value, hints[key])
    return cls(**kwargs)


def _require(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _validate_ranges(cfg: RunConfig) -> None:
    _require(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    _require(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = only at the end), "
             f"got {cfg.checkpoint_every}")
    _require(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    _require(cfg.batched in ("auto", True, False), f'batched must be "auto", true or false, got {cfg.batched!r}')
    from hetfl.engines import ENGINES

    ENGINES.get(cfg.engine, "engine")
    _require(cfg.device == "cpu" or cfg.device.startswith("cuda"),
             f"device must be 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    _require(cfg.workers == "auto" or cfg.workers >= 0,
             f"workers must be \"auto\", 0 (= auto) or a number of processes >= 1, got {cfg.workers!r}")
    _require(cfg.threads_per_worker >= 1, f"threads_per_worker must be >= 1, got {cfg.threads_per_worker}")
    _require(cfg.worker_timeout_s >= 0, f"worker_timeout_s must be >= 0 (0 = no limit), got {cfg.worker_timeout_s}")
    if cfg.workers != "auto" and cfg.workers > 1:
        _require(cfg.engine == "simulator", f"workers={cfg.workers} applies to engine 'simulator'; engine "
                 f"{cfg.engine!r} places clients itself (use workers=1 or \"auto\")")
        _require(cfg.device == "cpu", f"workers={cfg.workers}: worker processes train on the CPU; with device "
                 f"{cfg.device!r} clients train in this process (use workers=1 or \"auto\")")
    d = cfg.data
    _require(d.num_clients >= 1 or (d.num_clients == 0 and d.partition.name == "natural"),
             f"data.num_clients must be >= 1 (or 0 with the natural partitioner: one client per group), "
             f"got {d.num_clients}")
    _require(0.0 <= d.local_test_fraction < 1.0,
             f"data.local_test_fraction must be in [0, 1), got {d.local_test_fraction}")
    _require(0.0 < cfg.model.width <= 1.0, f"model.width must be in (0, 1], got {cfg.model.width}")
    t = cfg.train
    _require(t.epochs >= 0, f"train.epochs must be >= 0, got {t.epochs}")
    _require(t.steps >= 0, f"train.steps must be >= 0 (0 = use train.epochs), got {t.steps}")
    _require(t.epochs > 0 or t.steps > 0, "train.epochs and train.steps are both 0: set one of them > 0")
    _require(t.batch_size >= 1, f"train.batch_size must be >= 1, got {t.batch_size}")
    _require(t.lr > 0, f"train.lr must be > 0, got {t.lr}")
    _require(0 < t.lr_decay <= 1, f"train.lr_decay must be in (0, 1], got {t.lr_decay}")
    _require(0 <= t.momentum < 1, f"train.momentum must be in [0, 1), got {t.momentum}")
    _require(t.weight_decay >= 0, f"train.weight_decay must be >= 0, got {t.weight_decay}")
    _require(t.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 = off), got {t.grad_clip}")
    _require(t.memory_format in MEMORY_FORMATS,
             f"train.memory_format must be one of {', '.join(map(repr, MEMORY_FORMATS))}, got {t.memory_format!r}")
    e = cfg.eval
    _require(e.every >= 1, f"eval.every must be >= 1, got {e.every}")
    _require(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    _require(e.bn_samples >= 1, f"eval.bn_samples must be >= 1, got {e.bn_samples}")
    _require(e.local_clients >= 0, f"eval.local_clients must be >= 0 (0 = all), got {e.local_clients}")


# --------------------------------------------------------------------------------------------------
# dict <-> config
# --------------------------------------------------------------------------------------------------

DATA_RESERVED = ("name", "data_dir", "num_clients", "local_test_fraction", "partition")
MODEL_RESERVED = ("name", "width")


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a nested dict (parsed TOML + overrides) into a :class:`RunConfig`."""
    from hetfl import catalog

    raw = dict(raw)
    sections = {"data", "model", "algorithm", "train", "eval", "fleet", "faults", "graph", "privacy"}
    top = {k: v for k, v in raw.items() if k not in sections}
    for key in sections:
        if key in raw and not isinstance(raw[key], Mapping):
            raise ConfigError(f"[{key}] must be a table (section), got {raw[key]!r}")
    run_fields = [f.name for f in fields(RunConfig) if f.name not in sections]
    for key in top:
        if key not in run_fields:
            raise ConfigError(f"unknown key {key}; allowed top-level keys: {', '.join(sorted(run_fields))}, "
                              f"and sections [{'], ['.join(sorted(sections))}]")

    # data + partition
    data_raw = dict(raw.get("data", {}))
    part_raw = data_raw.pop("partition", {"name": "iid"})
    if not isinstance(part_raw, Mapping):
        raise ConfigError(f"[data.partition] must be a table (section), got {part_raw!r}")
    part_raw = dict(part_raw)
    data_fixed = {k: data_raw.pop(k) for k in list(data_raw) if k in DATA_RESERVED}
    data_name = check_value("data.name", data_fixed.get("name", DataConfig.name), str)
    dataset = catalog.DATASETS.get(data_name, "data.name")
    data_params = _check_params("data", "dataset", data_name, dataset, data_raw,
                                skip=("data_dir", "seed"), reserved=DATA_RESERVED)
    part_name = check_value("data.partition.name", part_raw.pop("name", "iid"), str)
    partitioner = catalog.PARTITIONERS.get(part_name, "data.partition.name")
    part_params = _check_params("data.partition", "partitioner", part_name, partitioner, part_raw,
                                skip=(), reserved=("name",))
    partitioner(**dict(part_params))  # runs the partitioner's own range checks now
    data = _build_fixed(DataConfig, "data", data_fixed)
    data = dataclasses.replace(data, params=data_params, partition=Component(part_name, part_params))

    # model
    model_raw = dict(raw.get("model", {}))
    model_fixed = {k: model_raw.pop(k) for k in list(model_raw) if k in MODEL_RESERVED}
    model_name = check_value("model.name", model_fixed.get("name", ModelConfig.name), str)
    model_fn = catalog.MODELS.get(model_name, "model.name")
    model_params = _check_params("model", "model", model_name, model_fn, model_raw,
                                 skip=("width",), reserved=MODEL_RESERVED)
    model = dataclasses.replace(_build_fixed(ModelConfig, "model", model_fixed), params=model_params)

    # algorithm
    algo_raw = dict(raw.get("algorithm", {}))
    algo_name = check_value("algorithm.name", algo_raw.pop("name", AlgorithmConfig.name), str)
    algo_cls = catalog.ALGORITHMS.get(algo_name, "algorithm.name")
    algo_params = _check_params("algorithm", "algorithm", algo_name, algo_cls, algo_raw,
                                skip=(), reserved=("name",))
    algo_cls(**dict(algo_params))  # the algorithm's own range checks
    algorithm = AlgorithmConfig(algo_name, algo_params)

    train = _build_fixed(TrainConfig, "train", raw.get("train", {}))
    ev = _build_fixed(EvalConfig, "eval", raw.get("eval", {}))
    fleet = _build_fixed(FleetConfig, "fleet", raw.get("fleet", {}))
    faults = _build_fixed(FaultsConfig, "faults", raw.get("faults", {}))
    graph = _build_fixed(GraphConfig, "graph", raw.get("graph", {}))
    privacy = _build_fixed(PrivacyConfig, "privacy", raw.get("privacy", {}))
    run = _build_fixed(RunConfig, "", top)
    cfg = dataclasses.replace(run, data=data, model=model, algorithm=algorithm, train=train, eval=ev, fleet=fleet,
                              faults=faults, graph=graph, privacy=privacy)
    _validate_ranges(cfg)
    return cfg


def config_to_dict(cfg: RunConfig) -> dict[str, Any]:
    """The nested dict that :func:`config_from_dict` turns back into ``cfg`` (round trip)."""

    def plain(obj: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
        return {f.name: getattr(obj, f.name) for f in fields(obj)
                if f.name not in skip and not dataclasses.is_dataclass(getattr(obj, f.name))}

    out = plain(cfg)
    data = plain(cfg.data, skip=("params", "partition"))
    data.update(dict(cfg.data.params))
    data["partition"] = {"name": cfg.data.partition.name, **cfg.data.partition.kwargs}
    model = plain(cfg.model, skip=("params",))
    model.update(dict(cfg.model.params))
    out.update(
        data=data,
        model=model,
        algorithm={"name": cfg.algorithm.name, **dict(cfg.algorithm.params)},
        train=plain(cfg.train),
        eval=plain(cfg.eval),
        fleet=plain(cfg.fleet),
        faults=plain(cfg.faults),
        graph=plain(cfg.graph),
        privacy=plain(cfg.privacy),
    )
    return out


# --------------------------------------------------------------------------------------------------
# TOML in and out, overrides
# --------------------------------------------------------------------------------------------------


def parse_toml(text: str, source: str = "<config>") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}") from None


def read_toml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist (ship-ready examples are in configs/)")
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {str(p)!r}: {exc}") from None
    return parse_toml(text, str(p))


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"data.partition.alpha=0.3"`` -> (["data", "partition", "alpha"], 0.3).

    The value is read as a TOML value (numbers, booleans, quoted strings, arrays); a bare word that
    is not valid TOML is taken as a string, so ``--set data.name=mnist`` works.
    """
    if "=" not in item:
        raise ConfigError(f"--set expects KEY=VALUE (e.g. --set rounds=50), got {item!r}")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set has an empty key in {item!r}")
    try:
        value = tomllib.loads(f"v = {text.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = text.strip()
    return key.split("."), value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    out = _deepcopy_tables(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _deepcopy_tables(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_tables(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None) -> RunConfig:
    """Read a TOML file (or start from ``base`` / the defaults), apply ``--set`` overrides, validate."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw = read_toml(path)
    return config_from_dict(apply_overrides(raw, overrides))


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} to TOML")


def dump_toml(d: Mapping[str, Any]) -> str:
    """A small TOML writer for config dicts (scalars, arrays and nested tables; ``None`` is omitted)."""
    lines: list[str] = []

    def emit(table: Mapping[str, Any], prefix: str) -> None:
        scalars = [(k, v) for k, v in table.items() if not isinstance(v, Mapping) and v is not None]
        subs = [(k, v) for k, v in table.items() if isinstance(v, Mapping)]
        if prefix:
            lines.append(f"\n[{prefix}]")
        for k, v in scalars:
            lines.append(f"{k} = {_toml_value(v)}")
        for k, v in subs:
            emit(v, f"{prefix}.{k}" if prefix else k)

    emit(d, "")
    return "\n".join(lines).lstrip("\n") + "\n"
