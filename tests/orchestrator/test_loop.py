"""The loop under faults, on a real local Ray cluster, a real SQLite store and a real tiny model.

- a rollout worker SIGKILLed mid-iteration is restarted, gets the current weights back, and its
  chunk is re-run: every task is written exactly once;
- the orchestrator SIGKILLed mid-iteration: ``treeplay resume`` finishes the run, the finished
  iterations are not redone, and the store's counts match an uninterrupted run's;
- an update the learner's guard rails reject is not deployed.
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
from treeplay.store import queries
from treeplay.store.database import open_store

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def _small(tmp_path: Path, model: Path, *extra: str):
    return load_config(None, [
        f"model.path={model}", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/store.db",
        "rollout.tasks_per_iteration=48", "rollout.chunk_size=8", "eval.tasks=16", *extra,
    ])


def test_killed_worker_is_restarted_and_nothing_is_lost_or_duplicated(tmp_path, warm_model_dir):
    import ray

    from treeplay.orchestrator.loop import Loop

    cfg = _small(tmp_path, warm_model_dir, "rollout.num_workers=2")
    store = open_store(cfg.store.url)
    run_id = queries.start_run(store, "kill-worker", cfg.model_dump(mode="json"))
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    loop = Loop(cfg, store, run_id, Path(warm_model_dir), 0)
    try:
        # Iteration 0 as usual, so the workers serve v1 when one of them dies in iteration 1.
        queries.start_iteration(store, run_id, 0, 0)
        loop.rollout(0, env.tasks("train", 48, seed=1))
        _, updated = loop.learn(0)
        assert updated, "iteration 0 should have produced pairs and an update"
        loop.redeploy()
        queries.finish_iteration(store, run_id, 0)

        # 32 chunks: enough that the kill lands while the victim is busy with one.
        tasks = env.tasks("train", 256, seed=2)
        queries.start_iteration(store, run_id, 1, loop.version)
        victim = ray.get(loop.workers[0].info.remote())["pid"]
        killed_at: list[float] = []

        def kill_after_first_write() -> None:
            deadline = time.monotonic() + 120
            while not queries.completed_task_ids(store, run_id, 1) and time.monotonic() < deadline:
                time.sleep(0.01)
            # Kill it while it works on a chunk (not in the gap while the driver writes its last one).
            proc = psutil.Process(victim)
            while proc.cpu_percent(interval=0.05) < 50 and time.monotonic() < deadline:
                pass
            os.kill(victim, signal.SIGKILL)
            killed_at.append(time.monotonic())

        killer = threading.Thread(target=kill_after_first_write)
        killer.start()
        stats = loop.rollout(1, tasks)
        finished_at = time.monotonic()
        killer.join()

        assert killed_at and killed_at[0] < finished_at, "the worker must die mid-rollout"
        assert stats["chunk_reruns"] >= 1  # its chunk died with it and was run again
        assert stats["weights_reapplied"] >= 1  # it came back at v0 and was given v1 again
        assert queries.completed_task_ids(store, run_id, 1) == {t.id for t in tasks}
        trees = queries.list_trees(store, run_id, 1)
        assert len(trees) == len(tasks) == len({t.task_id for t in trees})
        infos = ray.get([w.info.remote() for w in loop.workers])
        assert infos[0]["pid"] != victim
        assert {i["version"] for i in infos} == {loop.version}
        prints = ray.get([w.fingerprint.remote() for w in loop.workers])
        assert len(set(prints)) == 1, "the restarted worker must serve the same weights as the others"
    finally:
        loop.shutdown()
        ray.shutdown()


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the orchestrator and everything it started (Ray's head processes included)."""
    sid = proc.pid
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                os.kill(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    proc.wait(timeout=30)


def _counts(store, run_id: int, iterations: int) -> dict:
    return {
        "finished": queries.finished_iterations(store, run_id),
        "trees": [len(queries.list_trees(store, run_id, i)) for i in range(iterations)],
        "trajectories_and_tasks": [len(queries.completed_task_ids(store, run_id, i)) for i in range(iterations)],
        "status": queries.get_run(store, run_id).status,
    }


def test_orchestrator_killed_mid_iteration_resumes_to_the_same_counts(tmp_path, warm_model_dir):
    treeplay = str(Path(sys.executable).parent / "treeplay")
    cfg = _small(tmp_path, warm_model_dir, "iterations=3", "name=crashy")
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}

    proc = subprocess.Popen([treeplay, "run", str(cfg_path)], cwd=tmp_path, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    store = open_store(cfg.store.url)
    deadline = time.monotonic() + 400
    run_id = None
    while time.monotonic() < deadline:
        runs = queries.list_runs(store)
        if runs:
            run_id = runs[0].id
            if 0 in queries.finished_iterations(store, run_id) and queries.completed_task_ids(store, run_id, 1):
                break
        assert proc.poll() is None, proc.stdout.read().decode()[-3000:]
        time.sleep(0.05)
    else:
        pytest.fail("the run never reached iteration 1")
    _kill_session(proc)
    before = _counts(store, run_id, 3)
    assert before["finished"] == [0] and before["status"] != "done"
    done_iter0 = queries.list_iterations(store, run_id)[0].finished

    out = subprocess.run([treeplay, "resume", "crashy", "--db", cfg.store.url], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["iterations"] == 2  # iterations 1 and 2 were run by the resume, 0 was kept
    resumed = _counts(store, run_id, 3)
    assert queries.list_iterations(store, run_id)[0].finished == done_iter0  # iteration 0 not redone

    # The same config run without interruption, in a store of its own.
    ref_url = f"sqlite:///{tmp_path}/ref.db"
    out = subprocess.run([treeplay, "run", str(cfg_path), f"store.url={ref_url}", "name=clean"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    ref_store = open_store(ref_url)
    ref = _counts(ref_store, queries.list_runs(ref_store)[0].id, 3)
    assert resumed == ref == {**ref, "finished": [0, 1, 2], "status": "done"}
