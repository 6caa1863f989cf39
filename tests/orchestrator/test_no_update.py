"""Iterations with nothing to learn from: no update, the reason on record, and the run finishes.

Real local Ray, a real SQLite store and the tiny random-init model, on ``fixed_outcome_env`` (this
directory): every episode is solved, or none is, whatever the policy writes. MCTS then finds no
preference pair (all alternatives tie) and only ranked lists whose items tie.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from treeplay.orchestrator.config import load_config
from treeplay.store import queries
from treeplay.store.database import open_store

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

TESTS = Path(__file__).resolve().parent


def _run_fixed_outcome(tmp_path: Path, model: Path, solved: bool, algorithm: str):
    cfg = load_config(None, [
        f"model.path={model}", "warm_start.enabled=false", f"output_dir={tmp_path}",
        f"store.url=sqlite:///{tmp_path}/store.db", "env.name=fixed_outcome_env:FixedOutcomeEnv",
        f"env.kwargs.solved={str(solved).lower()}", "iterations=2", "rollout.tasks_per_iteration=8",
        "rollout.chunk_size=8", "eval.tasks=4", f"learner.algorithm={algorithm}", "name=fixed",
    ])
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    # The CLI, its Ray workers and its learner all import the environment: PYTHONPATH reaches them.
    path = os.pathsep.join(p for p in (str(TESTS), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONPATH": path}
    treeplay = str(Path(sys.executable).parent / "treeplay")
    out = subprocess.run([treeplay, "run", str(cfg_path)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    store = open_store(cfg.store.url)
    run = queries.list_runs(store)[0]
    assert run.status == "done"
    assert queries.finished_iterations(store, run.id) == [0, 1]
    iterations = queries.list_iterations(store, run.id)
    assert [it.n_tasks for it in iterations] == [8, 8]
    for it in iterations:
        assert it.policy_version == 0 and it.metrics["policy_version"] == 0.0
        assert it.metrics["learn/pairs"] == 0.0
    assert queries.latest_checkpoint(store, run.id).policy_version == 0  # nothing new was saved
    return [it.metrics["learn/no_update_reason"] for it in iterations]


@pytest.mark.parametrize("algorithm", ["dpo", "tpo"])
def test_regression_run_finishes_when_all_solved(tmp_path, tiny_model_dir, algorithm):
    """A policy that solved every task left no pair: DPO raised inside the learner actor, the CLI
    exited 2 and the run stayed 'running' (TPO likewise, on lists whose items all tie)."""
    reasons = _run_fixed_outcome(tmp_path, tiny_model_dir, True, algorithm)
    expected = {"dpo": "no preference pairs", "tpo": "nothing to train on: TPOLearner"}[algorithm]
    assert all(r.startswith(expected) for r in reasons), reasons


def test_regression_run_finishes_when_none_solved(tmp_path, tiny_model_dir):
    """The same with a policy that solves nothing (TPO's tied lists are the same case as above)."""
    reasons = _run_fixed_outcome(tmp_path, tiny_model_dir, False, "dpo")
    assert all(r.startswith("no preference pairs") for r in reasons), reasons
