"""The streaming transport (hetfl.rounds): tasks submitted while others are out, results as they finish.

Driven directly, as a buffered asynchronous server will drive it: submit 3 tasks, take 1 result, submit 2
more, drain; on the in-process simulator and on worker processes the results equal those of the
synchronous round's path (every task submitted, results in task order) bit for bit.
"""

from __future__ import annotations

import os
from contextlib import contextmanager

import pytest
import torch

from hetfl.engines.simulator import Simulator
from hetfl.engines.workers import ParallelSimulator
from hetfl.errors import HetflError
from hetfl.rounds import synchronous
from hetfl.runner import prepare


def _setup(digits_cfg):
    exp = prepare(digits_cfg("data.num_clients=8", "algorithm.clients_per_round=5"))
    state = exp.algorithm.init_state(exp.ctx)
    tasks = exp.algorithm.configure_round(state, 1, [0, 2, 3, 5, 7], exp.ctx)
    return exp, tasks


def _streamed(engine, tasks):
    """Submit 3, take 1, submit 2 more, drain: ``{client: result}`` and the order results came in."""
    got, order = {}, []
    with engine.open() as session:
        for task in tasks[:3]:
            session.submit(task)
        assert session.in_flight == 3
        task, outcome = session.next_result()
        got[task.client_id] = outcome(task)
        order.append(task.client_id)
        assert session.in_flight == 2
        for task in tasks[3:]:
            session.submit(task)
        assert session.in_flight == 4
        while session.in_flight:
            task, outcome = session.next_result()
            got[task.client_id] = outcome(task)
            order.append(task.client_id)
        with pytest.raises(HetflError, match="no task is in flight"):
            session.next_result()
    return got, order


def _synchronous(engine, tasks):
    out = [(task.client_id, outcome(task)) for task, outcome in synchronous(engine, tasks)]
    assert [cid for cid, _ in out] == [t.client_id for t in tasks]  # handed back in task order
    return dict(out)


def _assert_same(a, b):
    assert a.keys() == b.keys()
    for cid in a:
        ra, rb = a[cid], b[cid]
        assert (ra.client_id, ra.num_samples, ra.metrics, ra.extra) == (rb.client_id, rb.num_samples, rb.metrics,
                                                                         rb.extra)
        assert ra.weights.keys() == rb.weights.keys()
        for k in ra.weights:
            assert torch.equal(ra.weights[k], rb.weights[k]), (cid, k)


def test_in_process_session_streams_like_the_synchronous_round(digits_cfg, one_thread):
    exp, tasks = _setup(digits_cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    got, order = _streamed(sim, tasks)
    assert order == [t.client_id for t in tasks]  # in process: a task runs when its outcome is called
    _assert_same(got, _synchronous(sim, tasks))


@pytest.mark.skipif(not os.sys.platform.startswith("linux"), reason="worker processes need fork (Linux)")
def test_worker_session_streams_like_the_synchronous_round(digits_cfg, one_thread):
    exp, tasks = _setup(digits_cfg)
    reference = _synchronous(Simulator(exp.algorithm, exp.federation, exp.ctx), tasks)
    par = ParallelSimulator(exp.algorithm, exp.federation, exp.ctx, workers=2)
    try:
        got, order = _streamed(par, tasks)
        assert sorted(order) == sorted(t.client_id for t in tasks)
        _assert_same(got, reference)
        _assert_same(_synchronous(par, tasks), reference)  # the synchronous path on workers, for good measure
    finally:
        par.close()


class _Reversed:
    """A session that finishes its tasks last-in first-out (a transport whose clients overtake each other)."""

    def __init__(self, run):
        self.run, self.queue = run, []

    @contextmanager
    def open(self):
        yield self

    @property
    def in_flight(self):
        return len(self.queue)

    def submit(self, task):
        self.queue.append(task)

    def next_result(self):
        return self.queue.pop(), self.run


def test_the_synchronous_round_hands_results_back_in_task_order(digits_cfg):
    exp, tasks = _setup(digits_cfg)
    sim = Simulator(exp.algorithm, exp.federation, exp.ctx)
    _assert_same(_synchronous(_Reversed(sim.run_client), tasks), _synchronous(sim, tasks))
