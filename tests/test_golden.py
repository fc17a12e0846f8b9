"""Golden numbers: a short digits run of every registered algorithm, pinned bit for bit.

The files under tests/golden/ were written by the code *before* the one-round redesign (issue 19); any
restructuring must reproduce every metric (timing fields aside) and the final global weights.

Bit for bit holds only on the CPU that wrote the files: PyTorch picks other kernels on other CPUs (AVX2 vs
AVX-512/AMX), and the last digits of a loss move (1e-9 relative after 3 rounds). So integers, strings and
lists must match exactly, floats to ``RTOL`` relative, and the weights by each tensor's sum and L2 norm to
``RTOL``; a real change of numbers (a different sample, step or average) moves them by far more. The sha256
of the weights is kept in the files; ``HETFL_GOLDEN_EXACT=1`` asserts it too, for checks on one machine.
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


def _weights_summary(path: Path) -> dict[str, list[float]]:
    ckpt = torch.load(path / "checkpoint.pt", map_location="cpu", weights_only=False)
    out = {}
    for key in sorted(ckpt["state"]["models"]):
        for name, w in sorted(ckpt["state"]["models"][key].items()):
            w = w.detach().double()
            out[f"{key}/{name}"] = [w.sum().item(), w.norm().item()]
    return out


def golden_record(cfg, out: Path) -> dict:
    run(cfg, out, quiet=True)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [{k: v for k, v in r.items() if not _is_timing(k)} for r in rows]
    return {"metrics": rows, "weights_sha256": _weights_digest(out), "weights_summary": _weights_summary(out)}


RTOL = 1e-5


def _close(got, want, where: str) -> list[str]:
    """Differences between two records: exact for everything but floats, floats to RTOL."""
    if isinstance(want, float) or isinstance(got, float):
        if isinstance(got, (int, float)) and isinstance(want, (int, float)) and got == pytest.approx(
                want, rel=RTOL, abs=RTOL):
            return []
        return [f"{where}: {got!r} != {want!r}"]
    if isinstance(want, dict) and isinstance(got, dict):
        diffs = [f"{where}.{k}: missing" for k in want if k not in got]
        diffs += [f"{where}.{k}: not in the golden file" for k in got if k not in want]
        for k in want:
            if k in got:
                diffs += _close(got[k], want[k], f"{where}.{k}")
        return diffs
    if isinstance(want, list) and isinstance(got, list) and len(want) == len(got):
        return [d for i, (g, w) in enumerate(zip(got, want)) for d in _close(g, w, f"{where}[{i}]")]
    return [] if got == want else [f"{where}: {got!r} != {want!r}"]


def test_close_compares_floats_loosely_and_the_rest_exactly():
    assert _close({"a": 1.0, "b": [1, "x"]}, {"a": 1.0 + 1e-9, "b": [1, "x"]}, "r") == []
    assert _close({"a": 1.0}, {"a": 1.001}, "r") == ["r.a: 1.0 != 1.001"]
    assert _close({"b": [1, 2]}, {"b": [1, 3]}, "r") == ["r.b[1]: 2 != 3"]
    assert _close({"a": 1, "n": 2}, {"a": 1}, "r") == ["r.n: not in the golden file"]


@pytest.mark.parametrize("case", sorted(CASES))
def test_golden_numbers(case, tmp_path):
    cfg = load_config(None, list(CASES[case]), base=BASE)
    got = golden_record(cfg, tmp_path / case)
    path = GOLDEN / f"digits_{case}.json"
    if os.environ.get("HETFL_WRITE_GOLDEN"):
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(got, indent=1, sort_keys=True) + "\n")
    want = json.loads(path.read_text())
    diffs = _close(got["metrics"], want["metrics"], "metrics")
    assert not diffs, f"{case}: metrics differ from {path.name}:\n" + "\n".join(diffs[:20])
    diffs = _close(got["weights_summary"], want["weights_summary"], "weights")
    assert not diffs, f"{case}: final weights differ from {path.name}:\n" + "\n".join(diffs[:20])
    if os.environ.get("HETFL_GOLDEN_EXACT"):
        assert got["weights_sha256"] == want["weights_sha256"], f"{case}: final weights differ from {path.name}"
