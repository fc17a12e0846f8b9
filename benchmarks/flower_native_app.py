"""A plain Flower 1.42 app, written the way Flower's own documentation writes one: the baseline of issue #10.

What this is: a typical Flower app in the style of Flower's PyTorch quickstart (the ``flwr new`` PyTorch
template, Message API): a ``Net`` class, a ``load_data`` that caches the federated dataset per process and
builds a ``DataLoader`` for the node's partition, a ``train`` function, a ``ClientApp`` whose ``@app.train()``
handler rebuilds the model, loads the weights from the message's ``ArrayRecord``, trains and replies with an
``ArrayRecord`` + ``MetricRecord``, and a ``ServerApp`` that starts Flower's built-in
:class:`flwr.serverapp.strategy.FedAvg` with the initial model's ``ArrayRecord``.  It is our own code, not
copied from Flower's repository or templates; it does not use hetfl's Flower engine (``hetfl.flower``).

Why it exists: issue #10 measured Flower as a user writes a Flower app (about 0.45 s per client-round on the
MNIST 2NN workload), while ``benchmarks/flower_vs_sim.py``'s ``flower-*`` sides run hetfl's own lean
Flower app (``--engine flower``).  ``flower_vs_sim.py``'s ``flower-app-*`` sides run this module through
Flower's simulation engine, so both Flower baselines are measured in the same invocation.

Same task as hetfl's run: the model architectures are hetfl's ``mlp`` (784-200-200-10) and ``cnn``
(parameter names and creation order match, so hetfl's initial weights and evaluation apply), and the data
of partition ``partition-id`` is hetfl client ``partition-id``'s training data from hetfl's prepared
federation (the same samples).  What stays Flower's: client sampling (``FedAvg``'s ``random.sample`` of
node ids, so the sampled clients differ from hetfl's), batching (a shuffling ``DataLoader``) and everything
between the ServerApp and the ClientApps.  Client-side evaluation is off (``fraction_evaluate=0``), as the
benchmark compares training; the caller evaluates the final model once.

What a template app does and this one does not, both of which cost time per client call: its data come
from ``flwr_datasets`` (a Hugging Face dataset, split into train/test and converted sample by sample with
torchvision transforms in every call), and it evaluates on the clients too (``FedAvg``'s default
``fraction_evaluate=1.0`` sends an evaluate message to *every* node every round, unless the app lowers it).
Here a client call gets tensors that hetfl already prepared, and no evaluate messages are sent.

Run config keys (``[tool.flwr.app.config]`` in an app's ``pyproject.toml``; ``run_simulation`` passes an
empty run config, so there the same keys come as JSON from the environment variable
``FLOWER_NATIVE_RUN_CONFIG``, which Ray's workers inherit): ``model`` (``mlp`` | ``cnn``),
``num-server-rounds``, ``fraction-train``, ``min-available-nodes``, ``min-train-nodes``, ``local-epochs``,
``batch-size``, ``lr``, ``init-seed`` (torch seed of the initial model), ``seed`` (of the DataLoaders'
shuffling), ``hetfl-config`` (the hetfl run config, TOML, whose prepared federation supplies the partitions).

    from flower_native_app import run
    result = run(run_config, num_supernodes=1000, backend_config={"client_resources": {"num_cpus": 1}})
"""

from __future__ import annotations

import functools
import json
import os
import time
from typing import Any

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")  # offline machine; hetfl's Flower sides do the same

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import FedAvg  # noqa: E402
from torch import nn  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

RUN_CONFIG_ENV = "FLOWER_NATIVE_RUN_CONFIG"


# ------------------------------------------------------------------------------------ task: model, data, train
class Net2NN(nn.Module):
    """MNIST 2NN (McMahan et al. 2017): 784-200-200-10, as hetfl's ``mlp`` with ``hidden="200,200"``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(28 * 28, 200)
        self.fc2 = nn.Linear(200, 200)
        self.out = nn.Linear(200, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.out(x)


class NetCNN(nn.Module):
    """FedAvg's MNIST CNN: 5x5 conv 32, pool, 5x5 conv 64, pool, fc 512, fc 10 (hetfl's ``cnn``)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.fc1 = nn.Linear(64 * 7 * 7, 512)
        self.fc2 = nn.Linear(512, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        return self.fc2(x)


def Net(name: str) -> nn.Module:  # noqa: N802 - named like the templates' model class
    return {"mlp": Net2NN, "cnn": NetCNN}[name]()


_federations: dict[str, Any] = {}  # cached per process, like the templates' FederatedDataset


def load_data(partition_id: int, hetfl_config: str, batch_size: int, seed: int) -> DataLoader:
    """This partition's training data (hetfl client ``partition_id``) in a shuffling DataLoader."""
    federation = _federations.get(hetfl_config)
    if federation is None:
        from hetfl.config import parse_toml
        from hetfl.resolve import config_from_dict
        from hetfl.runner import prepare

        federation = prepare(config_from_dict(parse_toml(hetfl_config, "hetfl-config"))).federation
        _federations.clear()
        _federations[hetfl_config] = federation
    part = federation.client_train(partition_id)
    trainset = TensorDataset(part.x, part.y)
    return DataLoader(trainset, batch_size=batch_size, shuffle=True,
                      generator=torch.Generator().manual_seed(seed))


def train(net: nn.Module, trainloader: DataLoader, epochs: int, lr: float, device: torch.device) -> float:
    """Local SGD on the training set; returns the average training loss."""
    net.to(device)
    criterion = nn.CrossEntropyLoss().to(device)
    optimizer = torch.optim.SGD(net.parameters(), lr=lr)
    net.train()
    running_loss = 0.0
    for _ in range(epochs):
        for images, labels in trainloader:
            images, labels = images.to(device), labels.to(device)
            optimizer.zero_grad()
            loss = criterion(net(images), labels)
            loss.backward()
            optimizer.step()
            running_loss += loss.item()
    return running_loss / (epochs * len(trainloader))


@functools.lru_cache(maxsize=4)
def _env_run_config(raw: str) -> dict[str, Any]:
    return json.loads(raw)


def run_config(context: Context) -> dict[str, Any]:
    """The app's run config: Flower's (``flwr run``), else the JSON in ``FLOWER_NATIVE_RUN_CONFIG``."""
    if context.run_config:
        return dict(context.run_config)
    return _env_run_config(os.environ[RUN_CONFIG_ENV])


# ------------------------------------------------------------------------------------ ClientApp
client_app = ClientApp()


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's partition and reply with the new weights."""
    rc = run_config(context)
    model = Net(rc["model"])
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    device = torch.device("cuda:0" if torch.cuda.is_available() else "cpu")

    partition_id = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    trainloader = load_data(partition_id, rc["hetfl-config"], int(rc["batch-size"]),
                            seed=hash((int(rc["seed"]), server_round, partition_id)) % 2**63)

    train_loss = train(model, trainloader, int(rc["local-epochs"]), float(msg.content["config"]["lr"]), device)

    model_record = ArrayRecord(model.state_dict())
    metrics = MetricRecord({"train_loss": train_loss, "num-examples": len(trainloader.dataset)})
    content = RecordDict({"arrays": model_record, "metrics": metrics})
    return Message(content=content, reply_to=msg)


# ------------------------------------------------------------------------------------ ServerApp
server_app = ServerApp()

#: what the last ServerApp run left: ``arrays`` (the final global model), ``train_metrics`` (per round),
#: ``round_ends`` (perf_counter at the start and after every round; FedAvg's ``evaluate_fn`` hook, which
#: here evaluates nothing)
RESULT: dict[str, Any] = {}


def _round_clock(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
    RESULT.setdefault("round_ends", []).append(time.perf_counter())
    return None


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    """FedAvg for ``num-server-rounds`` rounds, starting from a fresh ``Net``."""
    rc = run_config(context)
    torch.manual_seed(int(rc["init-seed"]))
    global_model = Net(rc["model"])
    arrays = ArrayRecord(global_model.state_dict())

    # In the simulation the ServerApp starts while the SuperNodes are still registering, and FedAvg sizes its
    # sample from the nodes connected *before* it waits for min_available_nodes: with Flower's defaults (2, 2)
    # round 1 trains int(fraction * nodes registered so far) clients (37 instead of 100 of 1000, once).
    # min_available_nodes = all nodes and min_train_nodes = the intended sample size give every round its clients.
    strategy = FedAvg(fraction_train=float(rc["fraction-train"]), fraction_evaluate=0.0,
                      min_available_nodes=int(rc.get("min-available-nodes", 2)),
                      min_train_nodes=int(rc.get("min-train-nodes", 2)))
    RESULT.clear()
    result = strategy.start(grid=grid, initial_arrays=arrays, train_config=ConfigRecord({"lr": float(rc["lr"])}),
                            num_rounds=int(rc["num-server-rounds"]), evaluate_fn=_round_clock)
    RESULT["arrays"] = result.arrays
    RESULT["train_metrics"] = {rnd: dict(m) for rnd, m in result.train_metrics_clientapp.items()}


# ------------------------------------------------------------------------------------ running it
def run(rc: dict[str, Any], num_supernodes: int, backend_config: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run this app in Flower's simulation engine (Ray) and shut Ray down; returns :data:`RESULT`.

    Every Ray process that this call started is gone when it returns (ended by ``ray.shutdown()``, else
    killed by pid).
    """
    import ray
    from flwr.simulation import run_simulation

    from hetfl.flower.engine import ray_processes, reap

    os.environ[RUN_CONFIG_ENV] = json.dumps(rc)  # before Ray starts, so that its workers inherit it
    owns_ray = not ray.is_initialized()
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=num_supernodes,
                       backend_config=backend_config or {})
    finally:
        if owns_ray:
            ours = ray_processes(os.getpid())
            if ray.is_initialized():
                ray.shutdown()
            reap(ours)
    if "arrays" not in RESULT:
        raise RuntimeError("the ServerApp ended without a result (see Flower's log above)")
    return RESULT
