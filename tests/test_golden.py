"""Golden numbers: a short digits run of every registered algorithm, pinned bit for bit.

The files under tests/golden/ were written by the code *before* the one-round redesign (issue 19); any
restructuring must reproduce every metric (timing fields aside) and a hash of the final global weights.
To re-pin after an intended change of numbers (say why in the commit):
``HETFL_WRITE_GOLDEN=1 pytest tests/test_golden.py``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch

from hetfl.resolve import load_config
from hetfl.runner import run

GOLDEN = Path(__file__).parent / "golden"
# measured wall-clock seconds (every key ending in "_s" except the simulated round time)
SIMULATED = {"round_sim_time_s"}


def _is_timing(key: str) -> bool:
    return key.endswith("_s") and key not in SIMULATED

BASE = {
    "name": "golden",
    "rounds": 3,
    "seed": 0,
    "data": {"name": "digits", "num_clients": 8, "local_test_fraction": 0.2,
             "partition": {"name": "dirichlet", "alpha": 0.5}},
    "model": {"name": "mlp", "hidden": "32,32"},
    "algorithm": {"name": "fedavg", "clients_per_round": 4},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "momentum": 0.9},
    "eval": {"every": 1},
}
TIERS = ('fleet.source="tiers"', 'fleet.mix="a-c-e"')
SMALL_CNN = ('model={name="cnn", conv1=4, conv2=8, fc=16}',)

CASES: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedavg_faults": ('faults.dropout=0.3', 'faults.min_clients=1'),
    "heterofl": (*TIERS, 'algorithm={name="heterofl", clients_per_round=4}'),
    "heterofl_coverage": (*TIERS, 'algorithm={name="heterofl", clients_per_round=4, width_schedule="coverage"}'),
    "fedrolex": (*TIERS, 'algorithm={name="fedrolex", clients_per_round=4}'),
    "feddropout": (*TIERS, 'algorithm={name="feddropout", clients_per_round=4}'),
    "fjord": (*TIERS, 'algorithm={name="fjord", clients_per_round=4}'),
    "heterofl_cnn": (*TIERS, *SMALL_CNN, 'algorithm={name="heterofl", clients_per_round=4}'),
    "feddf": (*SMALL_CNN, 'fleet.source="tiers"', 'fleet.mix="a-b"',
              'algorithm={name="feddf", clients_per_round=4, families="cnn, mlp(hidden=16)", server_data="heldout", '
              'server_data_size=100, server_val_size=40, distill_steps=10, distill_batch=32, val_every=5, '
              'patience=20}'),
    "fedgen": (*SMALL_CNN, 'algorithm={name="fedgen", clients_per_round=4}', 'train={steps=5, batch_size=16, lr=0.05}'),
    "dkd": (*TIERS, 'algorithm={name="dkd"}', 'graph={name="capability", k=2}',
            'train={steps=5, batch_size=16, lr=0.05}'),
    "dpsgd": (*TIERS, 'algorithm={name="dpsgd"}', 'graph={name="ring"}', 'train={steps=5, batch_size=16, lr=0.05}'),
    "isolated": ('algorithm={name="isolated"}', 'train={steps=5, batch_size=16, lr=0.05}'),
}


def _weights_digest(path: Path) -> str:
    ckpt = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)
    h = hashlib.sha256()
    for key in sorted(ckpt["state"]["models"]):
        weights = ckpt["state"]["models"][key]
        for name in sorted(weights):
            h.update(f"{key}/{name}".encode())
            h.update(weights[name].detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def golden_record(cfg, out: Path) -> dict:
    run(cfg, out, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in r.items() if not _is_timing(k)} for r in rows]
    return {"metrics": rows, "weights_sha256": _weights_digest(out)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_numbers(case, tmp_path):
    cfg = load_config(None, list(CASES[case]), base=BASE)
    got = golden_record(cfg, tmp_path / case)
    path = GOLDEN / f"digits_{case}.json"
    if os.environ.get("HETFL_WRITE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    assert got["metrics"] == want["metrics"], f"{case}: metrics differ from {path.name}"
    assert got["weights_sha256"] == want["weights_sha256"], f"{case}: final weights differ from {path.name}"
