"""Queued chunks (``rollout.chunks_per_worker``) on a real local Ray cluster with a real tiny model:
with 2, a worker's next chunk is already waiting in its queue when one ends (no round trip through
the driver between them), every chunk still comes back exactly once on the version it names, and
new weights reach a worker only once its queue is empty; with 1, a chunk is sent only after the
previous one came back. Also the lane's lower CPU priority (``ray.lane_nice``) in a pipelined run.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from treeplay.agents.registry import make_environment
from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.reporting import worker_idle_s

pytestmark = pytest.mark.timeout(600)


def _fleet(tmp_path: Path, model: Path, *extra: str):
    from treeplay.orchestrator.workers import Fleet

    cfg = load_config(None, [
        f"model.path={model}", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/store.db",
        "rollout.mode=sample", "rollout.samples_per_task=2", "rollout.max_steps=1", "rollout.max_step_tokens=6",
        "rollout.chunk_size=4", "eval.tasks=4", *extra,
    ])
    return cfg, Fleet(cfg, Path(model), 0, run_id=1)


def _chunks(cfg, n_tasks: int = 40) -> list[tuple[int, list, int]]:
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    tasks = env.tasks("train", n_tasks, seed=0)
    size = cfg.rollout.chunk_size
    return [(c, tasks[i:i + size], 1000 + c) for c, i in enumerate(range(0, n_tasks, size))]


def _stream(fleet, cfg, chunks) -> list:
    tally: dict[str, float] = {}
    done = list(fleet.stream(chunks, 0, tally))
    assert sorted(d.chunk for d in done) == [c for c, _, _ in chunks], "every chunk back exactly once"
    assert tally.get("chunk_reruns", 0.0) == 0.0
    return done


def test_queued_chunks_reach_the_worker_before_the_previous_one_ends(tmp_path, tiny_model_dir):
    import ray

    cfg, fleet = _fleet(tmp_path, tiny_model_dir, "rollout.chunks_per_worker=2")
    try:
        chunks = _chunks(cfg)
        done = sorted(_stream(fleet, cfg, chunks), key=lambda d: d.started)
        # The worker runs its chunks back to back: each one after the first was sent before the one
        # before it finished (it was waiting in the worker's queue), but the last, which is sent
        # only when it is the one chunk left for the one worker.
        queued_early = [nxt.sent < prev.finished for prev, nxt in zip(done, done[1:], strict=False)]
        assert all(queued_early[:-1]), queued_early
        assert all(d.version == 0 for d in done)
    finally:
        fleet.shutdown()
        ray.shutdown()

    cfg1, fleet1 = _fleet(tmp_path, tiny_model_dir, "rollout.chunks_per_worker=1")
    try:
        done = sorted(_stream(fleet1, cfg1, _chunks(cfg1)), key=lambda d: d.started)
        # One at a time: a chunk is only sent once the previous one came back.
        assert all(nxt.sent >= prev.finished for prev, nxt in zip(done, done[1:], strict=False))
    finally:
        fleet1.shutdown()
        ray.shutdown()


def test_new_weights_wait_for_the_workers_queue_to_empty(tmp_path, tiny_model_dir):
    """Weights published while chunks are queued (what the lane does mid-rollout in a pipelined run):
    the queued chunks still run on, and are reported with, the version they were sent for; the
    worker takes the new version once its queue is empty, and every later chunk runs on it. The
    worker's own check (it refuses a chunk sent for another version than it serves) never fires."""
    import ray
    from transformers import AutoModelForCausalLM

    from treeplay.orchestrator.weights import to_payload

    cfg, fleet = _fleet(tmp_path, tiny_model_dir, "rollout.chunks_per_worker=2", "rollout.max_staleness=1",
                        "ray.lane_nice=0")
    try:
        chunks = _chunks(cfg)
        stream = fleet.stream(chunks, 0, {})
        done = [next(stream)]  # chunks 1 and 2 wait in the worker's queue by now
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        fleet._served = (1, ray.put(to_payload(1, model.state_dict())))  # what a successful train publishes
        done += list(stream)
        assert sorted(d.chunk for d in done) == [c for c, _, _ in chunks]
        versions = [d.version for d in sorted(done, key=lambda d: d.started)]
        assert versions == [0, 0, 0] + [1] * (len(chunks) - 3), versions
        assert fleet.worker_versions() == [1]
    finally:
        fleet.shutdown()
        ray.shutdown()


@pytest.mark.skipif(not hasattr(os, "getpriority"), reason="Unix niceness only")
def test_a_pipelined_runs_learner_and_evaluator_yield_the_cores_to_rollouts(tmp_path, tiny_model_dir):
    import ray

    cfg, fleet = _fleet(tmp_path, tiny_model_dir, "rollout.max_staleness=1", "ray.lane_nice=7")
    try:
        # Ray starts its worker processes at a niceness of its own (15); the lane goes 7 below that.
        rollout = ray.get(fleet.workers[0].niceness.remote())
        assert rollout < 19
        assert ray.get(fleet.learner.niceness.remote()) == min(19, rollout + 7)
        assert ray.get(fleet.evaluator.niceness.remote()) == min(19, rollout + 7)
    finally:
        fleet.shutdown()
        ray.shutdown()


def test_worker_idle_time_counts_the_gaps_between_one_workers_chunks():
    spans = {0: [(10.0, 12.0), (12.5, 14.0), (14.0, 15.0)], 1: [(11.0, 13.0), (13.0, 16.0)]}
    assert worker_idle_s(spans) == pytest.approx(0.5)
    assert worker_idle_s({0: [(3.0, 4.0)]}) == 0.0


def test_regression_evaluate_checks_every_workers_version_in_one_round(tmp_path, tiny_model_dir, monkeypatch):
    """Fleet.evaluate asked each rollout worker for its version with a blocking call of its own
    before splitting the held-out tasks (n round trips, one after the other). Now the versions come
    back in one round, then the scores in a second; a worker that is behind still gets the weights."""
    import ray

    from treeplay.orchestrator import workers

    cfg, fleet = _fleet(tmp_path, tiny_model_dir, "rollout.num_workers=2")
    rounds: list[int] = []
    real_get = ray.get

    def counting_get(refs, *args, **kwargs):
        rounds.append(len(refs) if isinstance(refs, list) else 1)
        return real_get(refs, *args, **kwargs)

    try:
        held_out = make_environment(cfg.env.name, **cfg.env.kwargs).tasks("test", 6, seed=0)
        monkeypatch.setattr(workers.ray, "get", counting_get)
        scores = fleet.evaluate(held_out, 0.0)
        assert len(scores) == 6
        assert rounds == [2, 2], rounds  # versions of both workers, then both workers' scores
        assert fleet.worker_versions() == [0, 0]
    finally:
        monkeypatch.undo()
        fleet.shutdown()
        ray.shutdown()
