"""Pipelined runs (``rollout.max_staleness`` > 0) under faults, on a real local Ray cluster, a real
SQLite store and the warm-started tiny model.

- iterations overlap (iteration i+1's rollouts start before iteration i is recorded), and the data
  the learner trains on is never more than ``max_staleness`` versions behind it;
- a rollout worker SIGKILLed mid-chunk while the learner trains: its chunk is re-run on the
  restarted worker, every task of every iteration is written exactly once, and the run finishes;
- the orchestrator SIGKILLed while iterations overlap: ``treeplay resume`` keeps the finished work
  and ends in the state of an uninterrupted pipelined run, up to what overlap leaves open (which
  chunks ran on which version, and so the samples, losses and accuracies that follow from them);
- updates the guard rails reject (NaN / blown-up weights) are never deployed: every chunk of every
  iteration still runs on the starting weights.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest
import yaml

from treeplay.agents.registry import make_environment
from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.schedule import iteration_tasks
from treeplay.store import queries
from treeplay.store.database import open_store

# Each test runs whole Ray runs (and may build the session's warm-started model first).
pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.timeout(1800)]


def _pipelined(tmp_path: Path, model: Path, *extra: str):
    return load_config(None, [
        f"model.path={model}", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/store.db",
        "rollout.max_staleness=1", "rollout.tasks_per_iteration=48", "rollout.chunk_size=8", "eval.tasks=16",
        *extra,
    ])


def _every_task_once(store, run_id: int, cfg, iterations: int) -> None:
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    for index in range(iterations):
        wanted = {t.id for t in iteration_tasks(cfg, env, index)}  # the loop's own task draw
        assert queries.completed_task_ids(store, run_id, index) == wanted, index
        trees = queries.list_trees(store, run_id, index)
        assert len(trees) == len(wanted) == len({t.task_id for t in trees}), f"iteration {index}: a task written twice"


def _within_the_bound(store, run_id: int, bound: int) -> None:
    """The learner refused nothing (the pipeline never outran the bound) and trained on data at most
    ``bound`` versions old; each iteration's data came from the versions its row says."""
    for it in queries.list_iterations(store, run_id):
        m = it.metrics
        assert m["learn/stale_refused"] == 0.0, it.index
        assert m.get("learn/staleness_max", 0.0) <= bound, it.index
        versions = {int(v) for v in m["rollout/data_versions"] if v != "kept"}  # "kept": written before a resume
        assert not versions or min(versions) >= it.policy_version, (it.index, versions, it.policy_version)


def _rollout_workers() -> list[psutil.Process]:
    """This test's rollout worker processes (Ray titles them after the actor class); other Ray
    sessions on the machine are not descendants of this process."""
    out = []
    for p in psutil.Process(os.getpid()).children(recursive=True):
        try:
            if p.cmdline() and p.cmdline()[0].startswith("ray::RolloutWorker"):
                out.append(p)
        except psutil.Error:
            pass
    return out


def test_pipelined_run_survives_a_killed_worker_and_writes_every_task_once(tmp_path, warm_model_dir):
    import ray

    from treeplay.orchestrator.loop import launch_run

    # 32 chunks an iteration, two workers: a kill lands while a worker is busy with one.
    cfg = _pipelined(tmp_path, warm_model_dir, "rollout.num_workers=2", "rollout.tasks_per_iteration=256",
                     "iterations=3", "name=pipelined-kill")
    store = open_store(cfg.store.url)
    killed: dict[str, object] = {}

    def kill_a_busy_worker_in_iteration_1() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = queries.list_runs(store)
            if runs and queries.completed_task_ids(store, runs[0].id, 1):
                break
            time.sleep(0.02)
        # Mid-chunk, not between two chunks nor while loading weights: Ray titles a worker's process
        # "ray::RolloutWorker.rollout" while that method runs (a kill chosen by CPU use alone once
        # landed after a chunk had returned, and no chunk needed re-running).
        while time.monotonic() < deadline:
            for p in _rollout_workers():
                try:
                    if p.cmdline()[0].startswith("ray::RolloutWorker.rollout"):
                        killed["finished_before"] = queries.finished_iterations(store, queries.list_runs(store)[0].id)
                        os.kill(p.pid, signal.SIGKILL)
                        killed["pid"] = p.pid
                        return
                except psutil.Error:
                    pass
            time.sleep(0.005)

    killer = threading.Thread(target=kill_a_busy_worker_in_iteration_1, daemon=True)
    killer.start()
    try:
        report = launch_run(cfg)
    finally:
        killer.join(timeout=5)
        ray.shutdown()

    assert "pid" in killed, "no rollout worker was killed"
    run_id = report.run_id
    assert queries.get_run(store, run_id).status == "done"
    assert queries.finished_iterations(store, run_id) == [0, 1, 2]
    _every_task_once(store, run_id, cfg, 3)
    _within_the_bound(store, run_id, 1)
    assert sum(v for _, v in queries.metric_series(store, run_id)["rollout/chunk_reruns"]) >= 1
    assert report.iterations[-1].version >= 2, "the run should have learned"
    # The iterations overlapped: a later iteration's rollouts began before an earlier one was recorded.
    its = queries.list_iterations(store, run_id)
    assert any(later.started < earlier.finished for earlier, later in zip(its, its[1:], strict=False))


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the orchestrator and everything it started (Ray's head processes included)."""
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == proc.pid:
                os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    proc.wait(timeout=30)


def _state(store, run_id: int, iterations: int) -> dict:
    counts = queries.counts(store, run_id)
    latest = queries.latest_checkpoint(store, run_id)
    return {
        "finished": queries.finished_iterations(store, run_id),
        "trees": [len(queries.list_trees(store, run_id, i)) for i in range(iterations)],
        "tasks": [len(queries.completed_task_ids(store, run_id, i)) for i in range(iterations)],
        "status": queries.get_run(store, run_id).status,
        # One checkpoint row per deployed version, none twice (v0 is the starting model's).
        "checkpoints_per_version": counts["checkpoints"] / (latest.policy_version + 1),
    }


def test_pipelined_orchestrator_killed_mid_overlap_resumes_to_an_uninterrupted_runs_state(tmp_path, warm_model_dir):
    treeplay = str(Path(sys.executable).parent / "treeplay")
    cfg = _pipelined(tmp_path, warm_model_dir, "iterations=3", "name=crashy")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    proc = subprocess.Popen([treeplay, "run", str(cfg_path)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    store = open_store(cfg.store.url)
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        runs = queries.list_runs(store)
        # Iteration 1's rollouts are being written: iteration 0 is learning, evaluating or just done.
        if runs and queries.completed_task_ids(store, runs[0].id, 1):
            break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.02)
    else:
        pytest.fail("the run never reached iteration 1")
    _kill_session(proc)
    run_id = runs[0].id
    before = _state(store, run_id, 3)
    assert before["status"] != "done" and 0 < before["tasks"][1] <= 48
    kept_iterations = {it.index: it.finished for it in queries.list_iterations(store, run_id) if it.finished}

    out = subprocess.run([treeplay, "resume", "crashy", "--db", cfg.store.url], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["iterations"] == 3 - len(kept_iterations)
    resumed = _state(store, run_id, 3)
    for it in queries.list_iterations(store, run_id):  # finished work is kept, not redone
        if it.index in kept_iterations:
            assert it.finished == kept_iterations[it.index]
    _every_task_once(store, run_id, cfg, 3)
    _within_the_bound(store, run_id, 1)

    ref_url = f"sqlite:///{tmp_path}/ref.db"
    out = subprocess.run([treeplay, "run", str(cfg_path), f"store.url={ref_url}", "name=clean"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    ref_store = open_store(ref_url)
    clean = _state(ref_store, queries.list_runs(ref_store)[0].id, 3)
    assert resumed == clean == {**clean, "finished": [0, 1, 2], "status": "done", "checkpoints_per_version": 1.0}


def test_pipelined_run_never_deploys_a_rejected_update(tmp_path, warm_model_dir):
    """lr=1e30 blows the weights up on every step: the guard rails reject every iteration's update,
    so every chunk of every iteration, and every evaluation, runs on the starting weights."""
    import ray

    from treeplay.orchestrator.loop import launch_run

    cfg = _pipelined(tmp_path, warm_model_dir, "iterations=3", "learner.dpo.lr=1e30", "name=nan")
    try:
        report = launch_run(cfg)
    finally:
        ray.shutdown()
    store = open_store(cfg.store.url)
    run_id = report.run_id
    assert queries.get_run(store, run_id).status == "done"
    assert queries.latest_checkpoint(store, run_id).policy_version == 0
    for it in queries.list_iterations(store, run_id):
        assert it.metrics["learn/rejected_update"] == 1.0 and it.metrics["learn/no_update_reason"]
        assert it.metrics["policy_version"] == 0.0 and it.metrics["rollout/data_versions"] == {"0": 48}
        assert {t.policy_version for t in queries.list_trees(store, run_id, it.index)} == {0}
    assert report.accuracy_after == report.accuracy_before  # the served weights never changed
