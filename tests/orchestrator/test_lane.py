"""The pipelined loop's plain parts, without Ray: the lane that runs each iteration's second half
(learn, redeploy, evaluate, record) in order, and the progress line that shows what each worker
serves and what the learner trains on."""

from __future__ import annotations

import threading
import time

import pytest

from treeplay.orchestrator.loop import Lane
from treeplay.orchestrator.reporting import live_line


def test_a_synchronous_lane_runs_each_second_half_at_once():
    done = []
    lane = Lane(background=False)
    lane.submit(0, lambda: done.append(0))
    assert done == [0] and lane.wait_for(5) < 0.1


def test_a_background_lane_keeps_iteration_order_and_gates_on_the_bound():
    """Second halves run one at a time in submission order; wait_for(i) returns once every half up to
    i is done (what the driver calls before iteration i+1+k's rollouts), and not before."""
    order, release = [], threading.Event()

    def half(i: int):
        def work() -> None:
            if i == 0:
                release.wait(10)
            order.append(i)
        return work

    lane = Lane(background=True)
    try:
        for i in range(3):
            lane.submit(i, half(i))
        blocked = threading.Thread(target=lane.wait_for, args=(1,))
        blocked.start()
        time.sleep(0.2)
        assert blocked.is_alive() and order == []  # iteration 0 holds everything behind it
        release.set()
        blocked.join(10)
        assert not blocked.is_alive() and order[:2] == [0, 1]
        lane.wait_for(2)
        assert order == [0, 1, 2]
    finally:
        lane.close()


def test_a_failed_second_half_stops_the_rollouts_early():
    lane = Lane(background=True)
    try:
        lane.submit(0, lambda: 1 / 0)
        deadline = time.monotonic() + 10
        while not lane.futures[0].done() and time.monotonic() < deadline:
            time.sleep(0.01)
        with pytest.raises(ZeroDivisionError):
            lane.check()  # called after each chunk of the next iteration's rollouts
        with pytest.raises(ZeroDivisionError):
            lane.wait_for(0)
    finally:
        lane.close()


def test_the_progress_line_shows_worker_versions_and_what_the_learner_trains_on():
    stats = [{"tasks": 8.0, "solved": 0.5, "pairs": 12.0, "nodes": 80.0}]
    line = live_line(3, stats, 2.0, [4, 5], "learner: iter 2 at v5 on data from v4-v5 (staleness <= 1)")
    assert line.startswith("iter 3 rollouts | workers v4 v5 | solved 50% | 12 pairs")
    assert line.endswith("learner: iter 2 at v5 on data from v4-v5 (staleness <= 1)")
    assert "learner" not in live_line(3, stats, 2.0, [5])  # a synchronous run's learner is never busy then
