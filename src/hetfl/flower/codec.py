"""hetfl tasks and results as Flower records: tensors in ArrayRecords, plain values in ConfigRecords.

Nothing is pickled.  A train message's :class:`~flwr.app.RecordDict` holds

* ``hetfl.task`` (ConfigRecord): ``client-id``, ``seed``, ``model.name``, ``model.width``,
  ``model.params`` (JSON), ``train.<field>`` for every field of :class:`~hetfl.config.TrainConfig`,
  ``algorithm.name`` and ``algorithm.params`` (JSON of the algorithm dataclass's fields), and the run's
  config (``run.config``, TOML text, and ``run.digest``) so a node can load its own data partition;
* ``hetfl.weights`` (ArrayRecord): the task's weights, one array per state-dict entry, in order;
* ``hetfl.extra.arrays`` / ``hetfl.extra.config``: :attr:`ClientTask.extra` (see :func:`encode_extra`).

A reply holds ``hetfl.result`` (ConfigRecord: ``client-id``, ``num-samples``, ``train-time-s``),
``hetfl.weights``, ``hetfl.metrics`` (MetricRecord) and the result's extra the same way.

Because every task names its own :class:`~hetfl.algorithms.base.ModelRef` (registered model name,
width, params), a node rebuilds exactly the module that task's weights fit, so clients of one round
may train differently shaped submodels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, MetricRecord, RecordDict

from hetfl.algorithms import ALGORITHMS
from hetfl.algorithms.base import Algorithm, ClientResult, ClientTask, Weights
from hetfl.config import TrainConfig
from hetfl.models import ModelRef

TASK = "hetfl.task"
RESULT = "hetfl.result"
WEIGHTS = "hetfl.weights"
METRICS = "hetfl.metrics"
EXTRA_ARRAYS = "hetfl.extra.arrays"
EXTRA_CONFIG = "hetfl.extra.config"
CAPABILITY = "hetfl.capability"
RUN = "hetfl.run"


# --------------------------------------------------------------------------------------- tensors
def _c_array(x: np.ndarray) -> np.ndarray:
    return np.require(x, requirements="C")  # (np.ascontiguousarray would turn a 0-d array into 1-d)


def weights_to_record(weights: Weights) -> ArrayRecord:
    rec = ArrayRecord()
    for k, v in weights.items():
        rec[k] = Array(_c_array(v.detach().cpu().numpy()))
    return rec


def record_to_weights(rec: ArrayRecord) -> Weights:
    # copy: the deserialised buffer is read-only, and the tensors must own writable memory
    return {k: torch.from_numpy(np.array(a.numpy(), copy=True)) for k, a in rec.items()}


# --------------------------------------------------------------------------------------- extra
def encode_extra(extra: dict[str, Any]) -> tuple[ArrayRecord, ConfigRecord]:
    """Tensors and plain values (any nesting of dicts with str keys, lists, tuples) as two records.

    Tensors and numpy arrays go into the ArrayRecord under a path key; bytes into the ConfigRecord;
    the rest of the structure is JSON (``layout`` key) with ``{"__tensor__": key}``-style leaves, so
    ``decode_extra(*encode_extra(x)) == x`` for every value made of those types.  Anything else
    (objects, functions) raises :class:`TypeError`: tasks and results must stay transport-neutral.
    """
    arrays = ArrayRecord()
    config = ConfigRecord()
    counter = [0]

    def key() -> str:
        counter[0] += 1
        return f"x{counter[0]}"

    def walk(v: Any, where: str) -> Any:
        if isinstance(v, torch.Tensor):
            k = key()
            arrays[k] = Array(_c_array(v.detach().cpu().numpy()))
            return {"__tensor__": k}
        if isinstance(v, np.ndarray):
            k = key()
            arrays[k] = Array(_c_array(v))
            return {"__ndarray__": k}
        if isinstance(v, (bytes, bytearray)):
            k = key()
            config[k] = bytes(v)
            return {"__bytes__": k}
        if isinstance(v, np.generic):
            return v.item()
        if v is None or isinstance(v, (bool, int, str)):
            return v
        if isinstance(v, float):
            return v if math.isfinite(v) else {"__float__": repr(v)}
        if isinstance(v, tuple):
            return {"__tuple__": [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]}
        if isinstance(v, list):
            return [walk(x, f"{where}[{i}]") for i, x in enumerate(v)]
        if isinstance(v, dict):
            if not all(isinstance(k, str) for k in v):
                raise TypeError(f"extra{where}: dict keys must be str to travel over Flower")
            return {"__dict__": {k: walk(x, f"{where}.{k}") for k, x in v.items()}}
        raise TypeError(f"extra{where} is a {type(v).__name__}; only tensors, numpy arrays and plain "
                        f"values (numbers, str, bytes, bool, None, lists, tuples, dicts) travel over Flower")

    config["layout"] = json.dumps({"__dict__": {k: walk(v, f"[{k!r}]") for k, v in extra.items()}})
    return arrays, config


def decode_extra(arrays: ArrayRecord | None, config: ConfigRecord | None) -> dict[str, Any]:
    if config is None or "layout" not in config:
        return {}

    def walk(v: Any) -> Any:
        if isinstance(v, list):
            return [walk(x) for x in v]
        if not isinstance(v, dict):
            return v
        if "__tensor__" in v:
            return torch.from_numpy(np.array(arrays[v["__tensor__"]].numpy(), copy=True))
        if "__ndarray__" in v:
            return np.array(arrays[v["__ndarray__"]].numpy(), copy=True)
        if "__bytes__" in v:
            return bytes(config[v["__bytes__"]])
        if "__float__" in v:
            return float(v["__float__"])
        if "__tuple__" in v:
            return tuple(walk(x) for x in v["__tuple__"])
        return {k: walk(x) for k, x in v["__dict__"].items()}

    return walk(json.loads(str(config["layout"])))


def _put_extra(content: RecordDict, extra: dict[str, Any]) -> None:
    if extra:
        arrays, config = encode_extra(extra)
        content[EXTRA_ARRAYS] = arrays
        content[EXTRA_CONFIG] = config


def _get_extra(content: RecordDict) -> dict[str, Any]:
    arrays = content.array_records.get(EXTRA_ARRAYS)
    config = content.config_records.get(EXTRA_CONFIG)
    return decode_extra(arrays, config)


# --------------------------------------------------------------------------------------- algorithm
def algorithm_name(algorithm: Algorithm) -> str:

    for name, cls in ALGORITHMS.items():
        if type(algorithm) is cls:
            return name
    raise TypeError(f"{type(algorithm).__name__} is not registered in hetfl.algorithms.ALGORITHMS; "
                    f"a Flower node can only rebuild registered algorithms")


def algorithm_params(algorithm: Algorithm) -> str:
    return json.dumps({f.name: getattr(algorithm, f.name) for f in dataclasses.fields(algorithm) if f.init},
                      sort_keys=True)


def build_algorithm(name: str, params_json: str) -> Algorithm:

    return ALGORITHMS.get(name, "algorithm.name")(**json.loads(params_json))


def config_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_record(config_toml: str, device: str = "cpu") -> ConfigRecord:
    """The run's config, so a node can load and partition its data exactly like the simulator."""
    return ConfigRecord({"config": config_toml, "digest": config_digest(config_toml), "device": device})


# --------------------------------------------------------------------------------------- task / result
def encode_task(task: ClientTask, algorithm: Algorithm, run: ConfigRecord) -> RecordDict:
    cfg = ConfigRecord({
        "client-id": int(task.client_id),
        "seed": int(task.seed),
        "model.name": task.model.name,
        "model.width": float(task.model.width),
        "model.params": json.dumps([[k, v] for k, v in task.model.params]),
        "algorithm.name": algorithm_name(algorithm),
        "algorithm.params": algorithm_params(algorithm),
    })
    for f in dataclasses.fields(task.train):
        cfg[f"train.{f.name}"] = getattr(task.train, f.name)
    content = RecordDict({TASK: cfg, WEIGHTS: weights_to_record(task.weights), RUN: run})
    _put_extra(content, task.extra)
    return content


def decode_task(content: RecordDict) -> tuple[ClientTask, str, str]:
    """The task, and the name and JSON params of the algorithm that should run it."""
    cfg = content.config_records[TASK]
    train = TrainConfig(**{f.name: cfg[f"train.{f.name}"] for f in dataclasses.fields(TrainConfig)
                           if f"train.{f.name}" in cfg})
    params = tuple((str(k), v) for k, v in json.loads(str(cfg["model.params"])))
    model = ModelRef(str(cfg["model.name"]), float(cfg["model.width"]), params)
    task = ClientTask(
        client_id=int(cfg["client-id"]),
        model=model,
        weights=record_to_weights(content.array_records[WEIGHTS]),
        train=train,
        seed=int(cfg["seed"]),
        extra=_get_extra(content),
    )
    return task, str(cfg["algorithm.name"]), str(cfg["algorithm.params"])


def encode_result(result: ClientResult, train_time_s: float = 0.0) -> RecordDict:
    cfg = ConfigRecord({"client-id": int(result.client_id), "num-samples": int(result.num_samples),
                        "train-time-s": float(train_time_s)})
    metrics = MetricRecord({k: (int(v) if isinstance(v, numbers.Integral) else float(v))
                            for k, v in result.metrics.items()
                            if isinstance(v, numbers.Real) and not isinstance(v, (bool, np.bool_))})
    content = RecordDict({RESULT: cfg, WEIGHTS: weights_to_record(result.weights), METRICS: metrics})
    _put_extra(content, result.extra)
    return content


def decode_result(content: RecordDict) -> tuple[ClientResult, float]:
    cfg = content.config_records[RESULT]
    metrics_rec = content.metric_records.get(METRICS)
    metrics = dict(metrics_rec.items()) if metrics_rec is not None else {}
    result = ClientResult(
        client_id=int(cfg["client-id"]),
        num_samples=int(cfg["num-samples"]),
        weights=record_to_weights(content.array_records[WEIGHTS]),
        metrics=metrics,
        extra=_get_extra(content),
    )
    return result, float(cfg.get("train-time-s", 0.0))
