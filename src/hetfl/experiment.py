"""An experiment built from a config: data loaded and partitioned, the algorithm, the model checked to
run on the data, the fleet and the :class:`~hetfl.algorithms.base.Context` — everything that can fail
because of user input, checked before a run directory exists.  Used by the runner and by the processes
that host clients elsewhere (Flower's ClientApp, torchrun's worker ranks)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from hetfl.algorithms import ALGORITHMS
from hetfl.algorithms.base import Algorithm, Context
from hetfl.asynchronous import check_async
from hetfl.config import RunConfig
from hetfl.data.augment import check_augment
from hetfl.data.base import Dataset
from hetfl.data.datasets import load_dataset
from hetfl.data.federation import Federation, build_federation
from hetfl.data.partition import check_groups, make_partitioner
from hetfl.data.server import draw_server_data, hold_out_validation
from hetfl.decentralized.protocol import GraphAlgorithm
from hetfl.errors import ConfigError, HetflError
from hetfl.evaluation import check_bn_rule
from hetfl.fleet import build_fleet
from hetfl.models import ModelRef
from hetfl.privacy.plan import check_algorithm, plan_privacy
from hetfl.reliability import check_min_clients


@dataclass
class Experiment:
    cfg: RunConfig
    dataset: Dataset
    federation: Federation
    algorithm: Algorithm
    ctx: Context
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"device {name!r} was asked for but this machine has no CUDA device "
                              f"(torch {torch.__version__}); use --device cpu")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ConfigError(f"device {name!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
        return dev
    return torch.device("cpu")


def load_data(cfg: RunConfig) -> Dataset:

    return load_dataset(cfg.data.name, data_dir=cfg.data.data_dir, seed=cfg.seed, verify=cfg.data.verify,
                        **dict(cfg.data.params))


def prepare(cfg: RunConfig) -> Experiment:
    """Load data, partition it, check the model builds and runs; no files are written."""
    device = resolve_device(cfg.device)
    dataset = load_data(cfg)
    check_augment(cfg.train.augment, dataset.info.input_shape)
    algo_cls = ALGORITHMS.get(cfg.algorithm.name, "algorithm.name")
    algorithm = algo_cls(**dict(cfg.algorithm.params))
    check_algorithm(cfg.privacy, cfg.algorithm.name, algorithm, cfg.faults.min_clients)  # before partitioning
    if cfg.asynchronous.active:
        check_async(algorithm, cfg.privacy.active, cfg.faults.deadline_s, cfg.engine.name)
    # server-side data (e.g. FedDF's transfer set) leaves the training split before anything is partitioned
    dataset, server_data = draw_server_data(dataset, algorithm.server_data_spec(), cfg.seed, cfg.data.data_dir)
    dataset = hold_out_validation(dataset, cfg.data.validation_fraction, cfg.seed)  # data.validation_fraction
    part = make_partitioner({"name": cfg.data.partition.name, **cfg.data.partition.kwargs})
    groups = dataset.groups
    check_groups(part, groups, cfg.data.name)
    labels = dataset.train.y.numpy()
    num_clients = cfg.data.num_clients if cfg.data.num_clients > 0 else None
    if num_clients is not None and num_clients > len(labels):
        raise ConfigError(f"data.num_clients={num_clients} exceeds the {len(labels)} training samples "
                          f"of dataset {cfg.data.name!r}")
    rng = np.random.default_rng([cfg.seed, 0x70617274])
    parts = part(labels, num_clients, rng, groups)
    federation = build_federation(dataset, parts, local_test_fraction=cfg.data.local_test_fraction,
                                  seed=cfg.seed, device=device)
    model_ref = ModelRef(cfg.model.name, cfg.model.width, cfg.model.params)
    _check_model(model_ref, dataset)
    fleet = build_fleet(cfg.fleet, federation.num_clients, cfg.seed, sizes=federation.sizes)
    ctx = Context(info=dataset.info, model=model_ref, train=cfg.train, client_sizes=federation.sizes,
                  seed=cfg.seed, rounds=cfg.rounds, fleet=fleet, faults=cfg.faults,
                  asynchronous=cfg.asynchronous if cfg.asynchronous.active else None,
                  server_data=None if server_data is None else server_data.to(device))
    for ref in algorithm.model_refs(ctx):
        if ref != model_ref:
            _check_model(ref, dataset)
            _check_depth_cut(ref, dataset, cfg.algorithm.name)
    check_min_clients(cfg.faults, algorithm.clients_for(federation.num_clients))
    ctx = dataclasses.replace(ctx, privacy=plan_privacy(cfg.privacy, algorithm, cfg.algorithm.name, ctx, cfg.rounds,
                                                        cfg.faults.min_clients))  # [privacy]: refused or resolved
    if isinstance(algorithm, GraphAlgorithm):  # the graph protocol: nodes on the [graph] (hetfl.decentralized)
        algorithm.check_setup(ctx, cfg.graph)
    check_bn_rule(cfg.eval.bn, algorithm, ctx)

    return Experiment(cfg, dataset, federation, algorithm, ctx, device)


def _check_depth_cut(ref: ModelRef, dataset: Dataset, algorithm: str) -> None:
    """A depth level below 1 needs a model of more than one block: a one-block model cut at any depth is the
    whole model, so every "shallower" level would silently train and report the full model."""
    if ref.name != "multi_exit":
        return
    params = dict(ref.params)
    depth = float(params.get("depth", 1.0))
    if depth >= 1:
        return
    from hetfl.hetero.depth import decode_params, plan_for  # (the depth machinery only for depth algorithms)

    base, base_params = str(params["base"]), str(params.get("base_params", ""))
    plan = plan_for(base, base_params, dataset.info)
    if plan.num_blocks < 2:
        own = ", ".join(f"{k}={v!r}" for k, v in decode_params(base_params))
        raise ConfigError(f"algorithm {algorithm!r} cuts the model in depth (a level of depth {depth:g}), but model "
                          f"{base!r}{f' ({own})' if own else ''} on {dataset.name!r} is a single block: every depth "
                          f"level would be the whole model. Use a model with several blocks (e.g. mlp with "
                          f"hidden = \"64,64\", cnn, heterofl_conv, resnet) or a width method (heterofl, fjord)")


def _check_model(ref: ModelRef, dataset: Dataset) -> None:
    """Build the model and run two samples through it, so a mismatch fails before any file is written."""
    try:
        model = ref.build(dataset.info)
        with torch.no_grad():
            model.eval()
            out = model(dataset.train.x[:2])
    except HetflError:
        raise
    except (RuntimeError, ValueError, TypeError) as exc:
        raise ConfigError(f"model {str(ref)!r} cannot run on dataset {dataset.name!r} "
                          f"(input shape {dataset.info.input_shape}): {exc}") from None
    if out.shape != (min(2, len(dataset.train)), dataset.info.num_classes):
        raise ConfigError(f"model {str(ref)!r} outputs shape {tuple(out.shape)} on {dataset.name!r}; "
                          f"expected (batch, {dataset.info.num_classes})")
