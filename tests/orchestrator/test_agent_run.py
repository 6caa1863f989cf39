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


def _agent_run(tmp_path: Path, model: Path, *extra: str):
    """configs/agent.yaml for one iteration on a local Ray cluster; returns the store and run id."""
    import ray

    from treeplay.orchestrator.loop import launch_run

    cfg = load_config(ROOT / "configs" / "agent.yaml", [
        f"model.path={model}", f"output_dir={tmp_path}", f"store.url=sqlite:///{tmp_path}/store.db",
        "iterations=1", *extra,
    ])
    try:
        report = launch_run(cfg)
    finally:
        ray.shutdown()
    store = open_store(cfg.store.url)
    assert queries.get_run(store, report.run_id).status == "done"
    return store, report.run_id


def test_a_langgraph_agent_tree_run_makes_step_pairs_and_updates_the_policy(tmp_path, warm_model_dir):
    store, run_id = _agent_run(tmp_path, warm_model_dir, "rollout.tasks_per_iteration=32", "rollout.chunk_size=16",
                               "eval.tasks=16")
    trees = queries.list_trees(store, run_id, 0)
    assert len(trees) == 32
    data = queries.preference_data(store, run_id, 0)
    assert data.pairs and all(p.source == "mcts" and p.info.get("tokens") for p in data.pairs)
    (it,) = queries.list_iterations(store, run_id)
    # The tiny model never calls the tool, so an episode is one call: the tree is as wide as
    # agent.width at its root and nothing is replayed (tests/agents/test_gateway.py covers replays).
    assert it.metrics["rollout/episodes"] >= 32 * 2 and it.metrics["rollout/mean_engine_batch"] > 1
    assert it.metrics["learn/rejected_update"] == 0.0 and queries.latest_checkpoint(store, run_id).policy_version == 1


def test_a_two_call_agent_on_ray_replays_recorded_calls_and_pairs_siblings_below_the_root(tmp_path, warm_model_dir):
    """An agent program that always makes two calls (a thought, then the answer): on real Ray, tree
    mode re-runs it with a replay table, so the first call is answered from the tree while the second
    is sampled, and step pairs come from siblings at both depths. Held-out tasks are played by the
    program itself (eval.agent=program)."""
    store, run_id = _agent_run(
        tmp_path, warm_model_dir, "rollout.tasks_per_iteration=16", "rollout.chunk_size=16", "eval.tasks=8",
        "rollout.agent.entry=tests.helpers.gateway_agents:two_call_agent",
        "rollout.agent.reward=tests.helpers.gateway_agents:digit_share_reward",
        "rollout.agent.episodes=6", "rollout.agent.width=2")
    (it,) = queries.list_iterations(store, run_id)
    m = it.metrics
    assert m["rollout/calls"] == 2 * m["rollout/episodes"]  # every episode made both calls
    assert m["rollout/replayed_calls"] > 0 and m["rollout/divergences"] == 0
    trajs = queries.list_trajectories(store, run_id)
    replayed = [t for t in trajs if t.steps and t.steps[0].info.get("replayed")]
    assert replayed and all(not t.steps[1].info.get("replayed") for t in replayed)
    data = queries.preference_data(store, run_id, 0)
    depths = [p.info.get("depth") for p in data.pairs]
    assert any(d == 0 for d in depths) and any(d == 1 for d in depths), depths  # first and second calls
    assert "eval/accuracy_greedy" in m
