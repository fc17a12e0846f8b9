"""Resolve a config against the registries: names to entries, parameters checked against what each
entry declares, the entries' own range checks, in one step before anything is written.

:mod:`hetfl.config` parses and types (and imports nothing above it); this module sits above the
registries of what a run is made of (datasets, partitioners, models, algorithms, topologies) and below
the engines, which rebuild a config sent to a remote node with it.  The engine name is checked where
engines are built (:func:`hetfl.runner.prepare`), before anything is written.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from hetfl.algorithms import ALGORITHMS
from hetfl.config import (
    DATA_RESERVED,
    MODEL_RESERVED,
    AlgorithmConfig,
    AsyncConfig,
    Component,
    DataConfig,
    EngineConfig,
    EvalConfig,
    FaultsConfig,
    FleetConfig,
    GraphConfig,
    LogConfig,
    ModelConfig,
    PrivacyConfig,
    RunConfig,
    TrainConfig,
    build_fixed,
    check_params,
    check_value,
    declared_params,
    fold_engine_keys,
    read_config,
    validate_ranges,
)
from hetfl.data.datasets import DATASETS
from hetfl.data.partition import PARTITIONERS
from hetfl.decentralized import protocol as _decentralized  # noqa: F401  (registers dkd, dpsgd, isolated)
from hetfl.decentralized.topology import TOPOLOGIES
from hetfl.errors import ConfigError
from hetfl.models import MODELS


def config_from_dict(raw: Mapping[str, Any]) -> RunConfig:
    """Validate a nested dict (parsed TOML + overrides) into a :class:`RunConfig`."""
    raw = fold_engine_keys(raw)  # older configs: engine = "flower", workers = 2, ... at the top level
    sections = {"data", "model", "algorithm", "train", "eval", "fleet", "faults", "graph", "privacy", "engine", "log",
                "asynchronous"}
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
    dataset = DATASETS.get(data_name, "data.name")
    data_params = check_params("data", "dataset", data_name, dataset, data_raw,
                                skip=("data_dir", "seed", "verify"), reserved=DATA_RESERVED)
    part_name = check_value("data.partition.name", part_raw.pop("name", "iid"), str)
    partitioner = PARTITIONERS.get(part_name, "data.partition.name")
    part_params = check_params("data.partition", "partitioner", part_name, partitioner, part_raw,
                                skip=(), reserved=("name",))
    partitioner(**dict(part_params))  # runs the partitioner's own range checks now
    data = build_fixed(DataConfig, "data", data_fixed)
    data = dataclasses.replace(data, params=data_params, partition=Component(part_name, part_params))

    # model
    model_raw = dict(raw.get("model", {}))
    model_fixed = {k: model_raw.pop(k) for k in list(model_raw) if k in MODEL_RESERVED}
    model_name = check_value("model.name", model_fixed.get("name", ModelConfig.name), str)
    model_fn = MODELS.get(model_name, "model.name")
    model_params = check_params("model", "model", model_name, model_fn, model_raw,
                                 skip=("width",), reserved=MODEL_RESERVED)
    model = dataclasses.replace(build_fixed(ModelConfig, "model", model_fixed), params=model_params)

    # algorithm
    algo_raw = dict(raw.get("algorithm", {}))
    algo_name = check_value("algorithm.name", algo_raw.pop("name", AlgorithmConfig.name), str)
    algo_cls = ALGORITHMS.get(algo_name, "algorithm.name")
    algo_params = check_params("algorithm", "algorithm", algo_name, algo_cls, algo_raw,
                                skip=(), reserved=("name",))
    algo_cls(**dict(algo_params))  # the algorithm's own range checks
    algorithm = AlgorithmConfig(algo_name, algo_params)

    train = build_fixed(TrainConfig, "train", raw.get("train", {}))
    ev = build_fixed(EvalConfig, "eval", raw.get("eval", {}))
    fleet = build_fixed(FleetConfig, "fleet", raw.get("fleet", {}))
    faults = build_fixed(FaultsConfig, "faults", raw.get("faults", {}))
    graph = build_fixed(GraphConfig, "graph", raw.get("graph", {}))
    privacy = build_fixed(PrivacyConfig, "privacy", raw.get("privacy", {}))
    engine = build_fixed(EngineConfig, "engine", raw.get("engine", {}))
    asynchronous = build_fixed(AsyncConfig, "asynchronous", raw.get("asynchronous", {}))
    log = build_fixed(LogConfig, "log", raw.get("log", {}))
    run = build_fixed(RunConfig, "", top)
    cfg = dataclasses.replace(run, data=data, model=model, algorithm=algorithm, train=train, eval=ev, fleet=fleet,
                              faults=faults, graph=graph, privacy=privacy, engine=engine, asynchronous=asynchronous,
                              log=log)
    validate_ranges(cfg)
    TOPOLOGIES.get(cfg.graph.name, "graph.name")  # (engine.name: hetfl.runner.prepare, which builds it)
    return cfg


def entry_keys(section: str, name: str) -> set[str] | None:
    """The keys the registry entry ``name`` declares in config section ``section`` (None: no such entry);
    what ``--set SECTION.name=NEW`` keeps of the old entry's parameters."""
    registry, skip = {
        "data": (DATASETS, ("data_dir", "seed", "verify")),
        "data.partition": (PARTITIONERS, ()),
        "model": (MODELS, ("width",)),
        "algorithm": (ALGORITHMS, ()),
    }[section]
    if name not in registry:
        return None
    return set(declared_params(registry.get(name), skip))


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (),
                base: Mapping[str, Any] | None = None, *, notes: list[str] | None = None) -> RunConfig:
    """Read a TOML file (or start from ``base`` / the defaults), apply ``--set`` overrides, resolve and
    validate.  A config file must name its dataset, model and algorithm; ``notes`` collects one line per
    parameter set dropped because ``--set SECTION.name=...`` changed the entry."""
    return config_from_dict(read_config(path, overrides, base, entry_keys=entry_keys, notes=notes))
