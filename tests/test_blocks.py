"""Blocks of pre-summed results (hetfl.aggregation.blocks): workers validate and sum a block of consecutive
clients and send one message; the in-process engine sums the same blocks; both equal bit for bit."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import pytest
import torch

from hetfl.aggregation import WeightedMean, whole
from hetfl.aggregation.blocks import BlockSum
from hetfl.algorithms.base import ClientResult
from hetfl.algorithms.fedavg import FedAvg
from hetfl.engines import pool as pool_module
from hetfl.engines.simulator import Simulator
from hetfl.engines.workers import ParallelSimulator
from hetfl.rounds import BLOCK_TASKS, round_rng
from hetfl.runner import prepare

linux = pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="worker processes need fork (Linux)")


def _results(n: int, seed: int = 0) -> list[ClientResult]:
    g = torch.Generator().manual_seed(seed)
    return [ClientResult(i, 3 + i, {"a": torch.randn(4, 3, generator=g), "b": torch.randn(5, generator=g)})
            for i in range(n)]


def _mean_of_blocks(results: list[ClientResult], size: int) -> dict[str, torch.Tensor]:
    mean = WeightedMean({"global": {k: torch.zeros_like(v) for k, v in results[0].weights.items()}})
    for i in range(0, len(results), size):
        total = BlockSum.like(results[i].weights)
        for res in results[i:i + size]:
            total.add(res.weights, float(res.num_samples))
        mean.add_sum("global", total)
    return mean.result()["global"]


def test_one_block_equals_the_running_mean_bit_for_bit():
    """Within a block the additions are the running mean's, in the same order: a round of at most
    BLOCK_TASKS clients averages exactly as before blocks existed."""
    results = _results(BLOCK_TASKS)
    running = WeightedMean({"global": {k: torch.zeros_like(v) for k, v in results[0].weights.items()}})
    for res in results:
        running.add(whole(res.weights, weight=float(res.num_samples)))
    expected = running.result()["global"]
    got = _mean_of_blocks(results, BLOCK_TASKS)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_blocks_add_their_sums_in_block_order():
    results = _results(11)
    got = _mean_of_blocks(results, 4)
    for k in got:
        sums = []
        for i in range(0, 11, 4):
            s = results[i].weights[k].double() * results[i].num_samples
            for r in results[i + 1:i + 4]:
                s = s + r.weights[k].double() * r.num_samples
            sums.append(s)
        total = sums[0] + sums[1] + sums[2]
        weight = float(sum(r.num_samples for r in results))
        assert torch.equal(got[k], (total / weight).float()), k


def test_a_one_client_round_returns_its_weights():
    res = _results(1)
    got = _mean_of_blocks(res, BLOCK_TASKS)
    assert all(torch.equal(got[k], res[0].weights[k]) for k in got)


def test_zero_weight_adds_nothing_and_counts_no_client():
    total = BlockSum.like(_results(1)[0].weights)
    total.add(_results(1)[0].weights, 0.0)
    mean = WeightedMean()
    mean.add_sum("global", total)
    assert total.n == 0 and mean.clients == 0 and mean.result() == {}


def test_only_the_mean_of_a_block_sums_algorithm_takes_sums(digits_cfg, monkeypatch):
    """The capability decides: FedAvg's mean pre-sums; its median, [privacy] and HeteroFL (sliced
    placements) aggregate every result on its own."""
    calls = []
    orig = FedAvg.aggregate_sums

    def spy(self, *a, **kw):
        calls.append(type(self).__name__)
        return orig(self, *a, **kw)

    monkeypatch.setattr(FedAvg, "aggregate_sums", spy)
    for overrides, sums in [((), True), (('algorithm.aggregator="median"',), False),
                            (('algorithm={name="heterofl", clients_per_round=3}', 'fleet.source="tiers"'), False),
                            (("privacy.noise_multiplier=0.5", "privacy.clip=1.0"), False)]:
        calls.clear()
        exp = prepare(digits_cfg(*overrides))
        sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
        sim.run_round(exp.algorithm.init_state(exp.ctx), 1)
        assert bool(calls) == sums, overrides


@dataclass(frozen=True)
class Mixed(FedAvg):
    """FedAvg where client ``raiser`` raises and client ``poisoner`` sends NaN weights (rejected)."""

    raiser: int = -1
    poisoner: int = -1

    def local_update(self, task, model, data, device):
        if task.client_id == self.raiser:
            raise ValueError(f"client {task.client_id} broke")
        res = super().local_update(task, model, data, device)
        if task.client_id == self.poisoner:
            res.weights[next(iter(res.weights))].fill_(math.nan)
        return res


@linux
def test_workers_send_one_message_per_block_and_equal_in_process(digits_cfg, one_thread, monkeypatch):
    """19 clients: 3 blocks (8, 8, 3), one message each; a client that raises and one whose result is
    rejected inside a block are booked exactly as in process, and the weights are equal bit for bit."""
    sent = []
    orig = pool_module.WorkerPool._send

    def spy(self, w, job, unit):
        sent.append((job.block is not None, len(unit)))
        return orig(self, w, job, unit)

    monkeypatch.setattr(pool_module.WorkerPool, "_send", spy)
    exp = prepare(digits_cfg("data.num_clients=24", "algorithm.clients_per_round=19"))
    state0 = exp.algorithm.init_state(exp.ctx)
    clients = exp.algorithm.sample_clients(state0, 1, exp.ctx, round_rng(exp.ctx.seed, 1))
    tasks = exp.algorithm.configure_round(state0, 1, clients, exp.ctx)
    algo = Mixed(clients_per_round=19, raiser=tasks[3].client_id, poisoner=tasks[10].client_id)
    seq = Simulator(algo, exp.federation, exp.ctx)
    par = ParallelSimulator(algo, exp.federation, exp.ctx, workers=2)
    try:
        out = []
        for sim in (seq, par):
            state = state0
            reports = []
            for rnd in (1, 2):
                state, report = sim.run_round(state, rnd)
                reports.append({k: v for k, v in report.as_metrics().items() if not k.endswith("time_s")})
            out.append((state, reports))
    finally:
        par.close()
    assert sent == [(True, 8), (True, 8), (True, 3)] * 2
    (s1, r1), (s2, r2) = out
    assert r1 == r2
    first = r1[0]
    assert first["dropped_failure"] == 1 and first["rejected_invalid"] == 1 and first["clients_reported"] == 17
    raiser, poisoner = tasks[3].client_id, tasks[10].client_id
    assert first["failed"] == [{"client": raiser, "reason": f"ValueError: client {raiser} broke"}]
    assert first["rejected"][0]["client"] == poisoner
    for k, v in s1.models["global"].items():
        assert torch.equal(v, s2.models["global"][k]), k
