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

This module parses and types; it imports nothing of hetfl above it.  Resolving names against the
registries (and the entries' own checks) is :mod:`hetfl.resolve`, one step that the CLI, the runner
and sweeps call before anything is written.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import types
import typing
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Union

from hetfl.errors import ConfigError
from hetfl.fleet import FleetConfig
from hetfl.logwriters import LogConfig

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

from hetfl.sections import (  # noqa: F401  (re-exported: every section is importable from hetfl.config)
    ACCOUNTANTS,
    ASYNC_MODES,
    AUGMENTATIONS,
    BATCHED,
    BN_RULES,
    ENGINE_KEYS,
    MEMORY_FORMATS,
    MIXINGS,
    PRECISIONS,
    SAMPLING,
    STALENESS,
    AlgorithmConfig,
    AsyncConfig,
    Component,
    DataConfig,
    EngineConfig,
    EvalConfig,
    FaultsConfig,
    GraphConfig,
    ModelConfig,
    Params,
    PrivacyConfig,
    TrainConfig,
    _params,
    fold_engine_keys,
)


@dataclass(frozen=True)
class RunConfig:
    name: str = ""
    rounds: int = 10
    seed: int = 0
    device: str = "cpu"
    checkpoint_every: int = 1
    engine: EngineConfig = field(default_factory=EngineConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fleet: FleetConfig = field(default_factory=FleetConfig)
    faults: FaultsConfig = field(default_factory=FaultsConfig)
    graph: GraphConfig = field(default_factory=GraphConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    asynchronous: AsyncConfig = field(default_factory=AsyncConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def replace(self, **changes: Any) -> RunConfig:
        return dataclasses.replace(self, **changes)

    def with_engine(self, **changes: Any) -> RunConfig:
        """A copy with ``[engine]`` keys changed: ``cfg.with_engine(name="flower", workers=1)``."""
        return dataclasses.replace(self, engine=dataclasses.replace(self.engine, **changes))

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


def check_params(section: str, kind: str, entry_name: str, entry: Any, raw: Mapping[str, Any],
                  skip: Sequence[str], reserved: Sequence[str]) -> Params:
    declared = declared_params(entry, skip)
    out = {}
    for key, value in raw.items():
        if key not in declared:
            hint = getattr(entry, "renamed_params", {}).get(key)  # a key of an earlier version
            if hint:
                raise ConfigError(f"{section}.{key} is no longer accepted for {kind} {entry_name!r}: {hint}")
            allowed = sorted(set(declared) | set(reserved))
            raise ConfigError(
                f"unknown key {section}.{key} for {kind} {entry_name!r}; allowed keys in [{section}]: "
                f"{', '.join(allowed)}"
            )
        out[key] = check_value(f"{section}.{key}", value, declared[key][0])
    return _params(out)


def build_fixed(cls: type, section: str, raw: Mapping[str, Any], extra_allowed: Sequence[str] = ()) -> Any:
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


def validate_ranges(cfg: RunConfig) -> None:
    _require(cfg.rounds >= 1, f"rounds must be >= 1, got {cfg.rounds}")
    _require(cfg.checkpoint_every >= 0, f"checkpoint_every must be >= 0 (0 = only at the end), "
             f"got {cfg.checkpoint_every}")
    _require(cfg.seed >= 0, f"seed must be >= 0, got {cfg.seed}")
    _require(cfg.device == "cpu" or cfg.device.startswith("cuda"),
             f"device must be 'cpu' or 'cuda[:N]', got {cfg.device!r}")
    eng = cfg.engine
    if eng.workers != "auto" and eng.workers > 1:
        _require(eng.name == "simulator", f"engine.workers={eng.workers} applies to engine 'simulator'; engine "
                 f"{eng.name!r} places clients itself (use workers=1 or \"auto\")")
        _require(cfg.device == "cpu", f"engine.workers={eng.workers}: worker processes train on the CPU; with device "
                 f"{cfg.device!r} clients train in this process (use workers=1 or \"auto\")")
    d = cfg.data
    _require(d.num_clients >= 1 or (d.num_clients == 0 and d.partition.name == "natural"),
             f"data.num_clients must be >= 1 (or 0 with the natural partitioner: one client per group), "
             f"got {d.num_clients}")
    _require(0.0 <= d.local_test_fraction < 1.0,
             f"data.local_test_fraction must be in [0, 1), got {d.local_test_fraction}")
    _require(0.0 <= d.validation_fraction < 1.0,
             f"data.validation_fraction must be in [0, 1) (0 = no validation split), got {d.validation_fraction}")
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
    _require(t.precision in PRECISIONS,
             f"train.precision must be one of {', '.join(map(repr, PRECISIONS))}, got {t.precision!r}")
    _require(t.augment in AUGMENTATIONS,
             f"train.augment must be one of {', '.join(map(repr, AUGMENTATIONS))}, got {t.augment!r}")
    e = cfg.eval
    _require(e.every >= 1, f"eval.every must be >= 1, got {e.every}")
    _require(e.start >= 0, f"eval.start must be >= 0 (0 = from the first eval.every), got {e.start}")
    _require(e.batch_size >= 1, f"eval.batch_size must be >= 1, got {e.batch_size}")
    _require(e.bn_samples >= 1, f"eval.bn_samples must be >= 1, got {e.bn_samples}")
    _require(e.bn in BN_RULES, f"eval.bn must be one of {', '.join(map(repr, BN_RULES))}, got {e.bn!r}")
    _require(e.local_clients >= 0, f"eval.local_clients must be >= 0 (0 = all), got {e.local_clients}")


# --------------------------------------------------------------------------------------------------
# dict <-> config
# --------------------------------------------------------------------------------------------------

DATA_RESERVED = ("name", "data_dir", "verify", "num_clients", "local_test_fraction", "validation_fraction",
                 "partition")
MODEL_RESERVED = ("name", "width")


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
        asynchronous=plain(cfg.asynchronous),
        log=plain(cfg.log),
        engine=plain(cfg.engine),
    )
    return out


# --------------------------------------------------------------------------------------------------
# TOML in and out, overrides
# --------------------------------------------------------------------------------------------------


def parse_toml(text: str, source: str = "<config>") -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source} is not valid TOML: {exc}{_toml_hint(text, str(exc))}") from None


def _toml_hint(text: str, message: str) -> str:
    """What the TOML reader's message leaves out: the key given twice, or that a bare word needs quotes."""
    import re

    at = re.search(r"at line (\d+)", message)
    if at is None or not 0 < int(at.group(1)) <= len(text.splitlines()):
        return ""
    lines = text.splitlines()
    line = lines[int(at.group(1)) - 1].strip()
    key, eq, value = line.partition("=")
    key, value = key.strip(), value.split("#", 1)[0].strip()
    if message.startswith("Cannot overwrite a value") and eq:
        heads = [h.strip() for h in lines[:int(at.group(1)) - 1] if h.strip().startswith("[")]
        where = f" in {heads[-1]}" if heads else ""
        return f": key {key!r}{where} is set twice (line {at.group(1)}: {line}); keep one of them"
    if message.startswith("Invalid value") and eq and re.fullmatch(r"[A-Za-z_][\w.-]*", value) \
            and value not in ("true", "false", "inf", "nan"):
        return f": {key} = {value} is not a TOML value; a string needs quotes: {key} = \"{value}\""
    return ""


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


#: Sections whose ``name`` chooses a registry entry: the keys every entry shares (the rest are the entry's own).
ENTRY_SECTIONS: dict[tuple[str, ...], tuple[str, ...]] = {
    ("data",): DATA_RESERVED,
    ("data", "partition"): ("name",),
    ("model",): MODEL_RESERVED,
    ("algorithm",): ("name",),
}

#: ``entry_keys(section, name)``: the keys the entry ``name`` of ``section`` declares (None = unknown name).
EntryKeys = Callable[[str, str], "Collection[str] | None"]


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str], *, entry_keys: EntryKeys | None = None,
                    notes: list[str] | None = None) -> dict[str, Any]:
    """``raw`` with the ``--set`` overrides applied, in order.

    ``--set SECTION.name=NEW`` on a registry-backed section (:data:`ENTRY_SECTIONS`) that changes the name
    drops the old entry's parameters that ``NEW`` does not declare (``entry_keys`` says which it declares;
    without it nothing is dropped); one line per such change is appended to ``notes``.  Keys given by an
    earlier ``--set`` are kept (an explicit key the new entry lacks is still the user's error to see).
    """
    out = _deepcopy_tables(raw)
    given: set[tuple[str, ...]] = set()
    for item in overrides:
        path, value = parse_override(item)
        if len(path) == 1 and path[0] in ENGINE_KEYS and not isinstance(value, Mapping):
            path = ["engine", ENGINE_KEYS[path[0]]]  # an older top-level key: --set workers=2, --set engine="flower"
        node = out
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"--set {item!r}: {part} is a value, not a section")
            node = child
        section = tuple(path[:-1])
        if (path[-1] == "name" and section in ENTRY_SECTIONS and entry_keys is not None and isinstance(value, str)
                and node.get("name") != value):
            declared = entry_keys(".".join(section), value)
            if declared is not None:
                keep = set(ENTRY_SECTIONS[section]) | set(declared)
                dropped = [k for k in node if k not in keep and (*section, k) not in given]
                for k in dropped:
                    del node[k]
                if dropped and notes is not None:
                    notes.append(f"{'.'.join(section)}.name={value} drops {', '.join(sorted(dropped))} "
                                 f"({'it does' if len(dropped) == 1 else 'they do'} not apply to {value!r})")
        node[path[-1]] = value
        given.add(tuple(path))
    return out


def _deepcopy_tables(raw: Mapping[str, Any]) -> dict[str, Any]:
    return {k: _deepcopy_tables(v) if isinstance(v, Mapping) else v for k, v in raw.items()}


def read_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None, *, entry_keys: EntryKeys | None = None,
                notes: list[str] | None = None) -> dict[str, Any]:
    """The nested dict of a TOML file (or of ``base`` / the defaults) with ``--set`` overrides applied
    (``entry_keys`` / ``notes``: see :func:`apply_overrides`); a file must name its dataset, model and
    algorithm.  :func:`hetfl.resolve.load_config` validates the result into a :class:`RunConfig`."""
    raw: dict[str, Any] = dict(base or {})
    if path is not None:
        raw = read_toml(path)
    raw = apply_overrides(fold_engine_keys(raw), overrides, entry_keys=entry_keys, notes=notes)
    if path is not None:
        require_names(raw, str(path))
    return raw


def require_names(raw: Mapping[str, Any], source: str) -> None:
    """A config file names at least ``data.name``, ``model.name`` and ``algorithm.name`` (no silent defaults)."""
    missing = [f"{section}.name" for section in ("data", "model", "algorithm")  # a non-table: config_from_dict says
               if section not in raw or (isinstance(raw[section], Mapping) and "name" not in raw[section])]
    if missing:
        what = "is empty" if not raw else f"does not set {', '.join(missing)}"
        raise ConfigError(f"config {source} {what}: a config names at least its dataset, model and algorithm, "
                          f'e.g. [data] name = "digits", [model] name = "mlp", [algorithm] name = "fedavg" '
                          f"(see configs/ and `hetfl list`)")


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
