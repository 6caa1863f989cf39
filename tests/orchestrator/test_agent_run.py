"""configs/agent.yaml as a whole run on a real local Ray cluster: a LangGraph agent program, the
gateway in the rollout worker, tree search over its calls, step pairs, and a deployed update."""

from __future__ import annotations

from pathlib import Path

import pytest

from treeplay.orchestrator.config import load_config
from treeplay.store import queries
from treeplay.store.database import open_store

pytestmark = [pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[2]


def test_a_langgraph_agent_tree_run_makes_step_pairs_and_updates_the_policy(tmp_path, warm_model_dir):
    import ray

    from treeplay.orchestrator.loop import launch_run

    cfg = load_config(ROOT / "configs" / "agent.yaml", [
        f"model.path={warm_model_dir}", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/store.db",
        "iterations=1", "rollout.tasks_per_iteration=32", "rollout.chunk_size=16", "eval.tasks=16",
    ])
    try:
        report = launch_run(cfg)
    finally:
        ray.shutdown()
    store = open_store(cfg.store.url)
    run_id = report.run_id
    assert queries.get_run(store, run_id).status == "done"
    trees = queries.list_trees(store, run_id, 0)
    assert len(trees) == 32
    data = queries.preference_data(store, run_id, 0)
    assert data.pairs and all(p.source == "mcts" and p.info.get("tokens") for p in data.pairs)
    (it,) = queries.list_iterations(store, run_id)
    # The tiny model never calls the tool, so an episode is one call: the tree is as wide as
    # agent.width at its root and nothing is replayed (tests/agents/test_gateway.py covers replays).
    assert it.metrics["rollout/episodes"] >= 32 * 2 and it.metrics["rollout/mean_engine_batch"] > 1
    assert it.metrics["learn/rejected_update"] == 0.0 and queries.latest_checkpoint(store, run_id).policy_version == 1
