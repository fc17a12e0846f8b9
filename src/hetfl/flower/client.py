"""The node side: a Flower ClientApp that runs a hetfl algorithm's local update on the node's own data.

A node knows three things about itself, from its Flower *node config* (``flower-supernode
--node-config "partition-id=0 max-width=0.5"``; Flower's simulation engine sets ``partition-id`` and
``num-partitions`` for every virtual node):

* ``partition-id``: which hetfl client it is (its data partition under the run's partitioner);
* its capability: ``max-width`` (the largest model width it can train), and optionally ``speed``,
  ``memory-gb``, ``bandwidth-mbps``, ``device-name``.  Keys it does not set are taken from the run's
  ``[fleet]`` profile for its partition (in simulation that profile *is* the virtual device);
* ``device`` (``cpu`` / ``cuda``) and ``data-dir`` (where its dataset lives), optional.

The server's query round (message type ``query``) asks every node for this, and for its number of
training samples; train messages (type ``train``) carry a :class:`~hetfl.algorithms.base.ClientTask`
(see :mod:`hetfl.flower.codec`).  The node loads and partitions its dataset once per process and run
config (cached) and runs the task with the one :class:`~hetfl.client.ClientRunner` of every engine (one
module per model shape, kept per process and run: the task's weights loaded into it, the algorithm's own
``local_update``, timed).
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any

import torch
from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from hetfl.client import ClientRunner
from hetfl.config import parse_toml
from hetfl.experiment import prepare
from hetfl.flower import codec
from hetfl.resolve import config_from_dict

CAPABILITY_KEYS = ("max-width", "speed", "memory-gb", "bandwidth-mbps", "device-name")

_lock = threading.Lock()
_cache: dict[tuple[str, str, str], Any] = {}  # (config digest, device, data-dir) -> Experiment
_runners: dict[tuple[str, str], ClientRunner] = {}  # (algorithm name, its params) -> runner, for the cached run


def _node_value(context: Context, key: str, default: Any = None) -> Any:
    return context.node_config.get(key, default)


def partition_id(context: Context) -> int:
    pid = _node_value(context, "partition-id")
    if pid is None:
        raise ValueError("this node has no 'partition-id' in its node config; start it with "
                         "flower-supernode --node-config 'partition-id=N num-partitions=M'")
    return int(pid)


def _experiment(run: ConfigRecord, context: Context) -> Any:
    """The run's prepared data (dataset, partition, federation), loaded once per process."""

    device = str(_node_value(context, "device", run.get("device", "cpu")))
    data_dir = str(_node_value(context, "data-dir", ""))
    key = (str(run["digest"]), device, data_dir)
    with _lock:
        exp = _cache.get(key)
        if exp is None:
            raw = parse_toml(str(run["config"]), "run config")
            raw["device"] = device
            if data_dir:
                raw.setdefault("data", {})["data_dir"] = data_dir
            exp = prepare(config_from_dict(raw))
            _cache.clear()  # one run at a time per process: drop the previous run's data and modules
            _runners.clear()
            _cache[key] = exp
    return exp


def capability(context: Context, exp: Any) -> dict[str, Any]:
    """What this node reports about itself: node config first, then its [fleet] profile."""
    pid = partition_id(context)
    out: dict[str, Any] = {"partition-id": pid}
    fleet = getattr(exp.ctx, "fleet", None)
    profile: dict[str, Any] = {}
    if fleet is not None and pid < fleet.num_clients:
        profile = {"max-width": float(fleet.max_width[pid]), "speed": float(fleet.speed[pid]),
                   "memory-gb": float(fleet.memory_gb[pid]), "bandwidth-mbps": float(fleet.bandwidth_mbps[pid])}
        if len(fleet.device):
            profile["device-name"] = str(fleet.device[pid])
    for key in CAPABILITY_KEYS:
        if key in context.node_config:
            out[key] = context.node_config[key]
            out[f"{key}.source"] = "node-config"
        elif key in profile:
            out[key] = profile[key]
            out[f"{key}.source"] = "fleet-profile"
    out["num-examples"] = int(len(exp.federation.train_idx[pid])) if pid < exp.federation.num_clients else 0
    out["device"] = str(exp.device)
    out["torch-threads"] = int(torch.get_num_threads())
    return out


def _runner(exp: Any, name: str, params: str) -> ClientRunner:
    """The client runner of this run's algorithm (built once per process and run; call under ``_lock``)."""
    runner = _runners.get((name, params))
    if runner is None:
        runner = ClientRunner(codec.build_algorithm(name, params), exp.federation, exp.ctx, exp.device)
        _runners[(name, params)] = runner
    return runner


def handle_query(msg: Message, context: Context) -> Message:
    exp = _experiment(msg.content.config_records[codec.RUN], context)
    return Message(RecordDict({codec.CAPABILITY: ConfigRecord(capability(context, exp))}), reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    exp = _experiment(msg.content.config_records[codec.RUN], context)
    task, algo_name, algo_params = codec.decode_task(msg.content)
    pid = partition_id(context)
    if task.client_id != pid:
        raise ValueError(f"a task for client {task.client_id} reached the node holding partition {pid}")
    with _lock:  # one module per model shape per process: threads of one process train one at a time
        result, seconds = _runner(exp, algo_name, algo_params).timed(task)
    result = dataclasses.replace(result, weights={k: v.cpu() for k, v in result.weights.items()})
    return Message(codec.encode_result(result, seconds), reply_to=msg)


def make_client_app() -> ClientApp:
    """A fresh ClientApp with hetfl's ``query`` and ``train`` handlers."""
    app = ClientApp()
    app.query()(handle_query)
    app.train()(handle_train)
    return app


#: The ClientApp that ``flwr run`` loads (``hetfl.flower.client:app``).
app = make_client_app()
