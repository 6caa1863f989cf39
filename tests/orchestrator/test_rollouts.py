"""Every rollout mode on the real tiny model, written to a real SQLite store (no Ray here)."""

from __future__ import annotations

import pytest

from treeplay.agents.registry import environment_factory
from treeplay.engines import make_engine
from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.reporting import rollout_summary
from treeplay.orchestrator.rollouts import evaluate, run_rollouts
from treeplay.search.preferences import label_smoothing
from treeplay.store import queries
from treeplay.store.database import open_store


@pytest.fixture(scope="module")
def engine(warm_model_dir):
    eng = make_engine("hf", warm_model_dir, seed=0, num_threads=1)
    yield eng
    eng.close()


def _run(mode: str, engine, tmp_path, *overrides: str, n: int = 12):
    cfg = load_config(None, [f"rollout.mode={mode}", *overrides])
    factory = environment_factory(cfg.env.name, **cfg.env.kwargs)
    tasks = factory().tasks("train", n, seed=3)
    results, stats = run_rollouts(cfg, tasks, engine, factory, iteration=0, seed=11)
    assert [r.task_id for r in results] == [t.id for t in tasks]
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    run_id = queries.start_run(store, mode, cfg.model_dump(mode="json"))
    queries.start_iteration(store, run_id, 0, 0)
    queries.write_task_results(store, run_id, 0, results)
    return cfg, factory, tasks, results, stats, queries.counts(store, run_id)


def test_mcts_mode_writes_trees_whose_pairs_prefer_correct_steps(engine, tmp_path):
    cfg, factory, tasks, results, stats, counts = _run("mcts", engine, tmp_path, n=24)
    assert counts["trees"] == 24 and counts["tree_nodes"] > 24
    env = factory()
    by_id = {t.id: t for t in tasks}
    pairs = [p for r in results for p in r.pairs]
    assert pairs, "a warm-started model should both solve and fail some of 24 tasks"
    for p in pairs:
        task = by_id[p.task_id]
        assert env.verify(task, p.chosen) and not env.verify(task, p.rejected)
        # MCTS-DPO's alpha: 0 when the rejected sibling was never visited, at most 0.5
        assert p.label_smoothing == label_smoothing(p.chosen_visits, p.rejected_visits) and 0 <= p.label_smoothing <= 0.5
    assert counts["preference_pairs"] == len(pairs)
    assert 0 < stats["solved"] <= 1


def test_sample_mode_pairs_correct_over_wrong_samples(engine, tmp_path):
    cfg, factory, tasks, results, stats, counts = _run("sample", engine, tmp_path, "rollout.samples_per_task=6")
    assert counts["trajectories"] == 12 * 6
    env = factory()
    by_id = {t.id: t for t in tasks}
    assert stats["pairs"] == sum(len(r.pairs) for r in results) > 0
    for r in results:
        for p in r.pairs:
            assert env.verify(by_id[p.task_id], p.chosen) and not env.verify(by_id[p.task_id], p.rejected)


def test_multi_agent_mode_credits_every_proposal(engine, tmp_path):
    cfg, factory, tasks, results, stats, counts = _run(
        "multi_agent", engine, tmp_path, "rollout.critic=step_check", "rollout.num_agents=3")
    # One executed trajectory per task plus one record per agent with its proposals.
    assert counts["trajectories"] >= 12 * (1 + 3)
    credited = [s for r in results for t in r.trajectories for s in t.steps if s.credit is not None]
    assert credited and all(0.0 <= s.credit <= 1.0 for s in credited)
    assert all(p.source == "credit" for r in results for p in r.pairs)


def test_panel_mode_stores_every_judgment(engine, tmp_path):
    cfg, factory, tasks, results, stats, counts = _run(
        "panel", engine, tmp_path, "rollout.num_agents=2", "rollout.panel.n_candidates=2",
        "rollout.panel.max_tokens=12", "rollout.panel.judge_max_tokens=16", "rollout.panel.max_prompt_chars=120",
        n=4)
    # 2 peers x 2 candidates = 4 candidates per task; every peer and the exact judge score each one.
    assert counts["ranked_lists"] == 4
    assert counts["judgments"] >= 4 * 4 * 3
    assert stats["judgments"] == counts["judgments"]


def test_panel_mode_peers_with_their_own_models(engine, tiny_model_dir, tmp_path):
    from treeplay.orchestrator import rollouts

    peers = f"rollout.panel_peers=[{{name: self}}, {{name: other, model_path: '{tiny_model_dir}'}}]"
    overrides = (peers, "rollout.panel.n_candidates=2", "rollout.panel.max_tokens=12",
                 "rollout.panel.judge_max_tokens=16")
    cfg, factory, tasks, results, stats, counts = _run("panel", engine, tmp_path, *overrides, n=4)
    key = next(k for k in rollouts._PEER_ENGINES if k[1] == str(tiny_model_dir))
    other = rollouts._PEER_ENGINES[key]
    try:
        assert other is not engine and other.version == 0
        aggregates = [j for r in results for j in r.judgments if j.judge == "panel"]
        assert {j.info["author"] for r in results for j in r.judgments if j.judge == "exact"} == {"self", "other"}
        env = factory()
        by_id = {t.id: t for t in tasks}
        for r in results:
            for p in r.pairs:  # the exact verifier's class decides what may be chosen
                assert env.verify(by_id[p.task_id], p.chosen)
        assert all(j.info["verified"] is not None for j in aggregates)
        # A second chunk reuses the peer's engine instead of loading the model again.
        _run("panel", engine, tmp_path / "again", *overrides, n=2)
        assert rollouts._PEER_ENGINES[key] is other
        bad = f"rollout.panel_peers=[{{name: gone, model_path: '{tmp_path}/missing'}}]"
        with pytest.raises(ValueError, match="peer 'gone' has model_path .*missing', not a directory"):
            _run("panel", engine, tmp_path / "bad", bad, n=1)
    finally:
        rollouts._PEER_ENGINES.pop(key).close()


def test_react_mode_records_failures_instead_of_crashing(engine, tmp_path):
    # The tiny model's 128-character context cannot hold a rubric prompt: every episode must come
    # back as a failed trajectory with the engine's error, and the chunk must still be written.
    cfg, factory, tasks, results, stats, counts = _run(
        "react", engine, tmp_path, "env.name=toolqa", "env.kwargs={}", "rollout.react.max_steps=2", n=3)
    trajs = [t for r in results for t in r.trajectories]
    assert counts["trajectories"] == len(trajs) == 3
    assert all(t.status == "failed" and "context" in (t.error or "") for t in trajs)


def test_evaluate_greedy_is_deterministic(engine):
    cfg = load_config(None)
    factory = environment_factory(cfg.env.name, **cfg.env.kwargs)
    tasks = factory().tasks("test", 40, seed=0)
    a, b = evaluate(cfg, tasks, engine, factory, 0.0), evaluate(cfg, tasks, engine, factory, 0.0)
    assert a == b and len(a) == 40 and set(a) <= {0.0, 1.0}


def test_rollout_summary_weights_rates_by_tasks():
    s = rollout_summary([{"tasks": 1.0, "solved": 1.0, "pairs": 2.0}, {"tasks": 3.0, "solved": 0.0, "pairs": 1.0}])
    assert s == {"tasks": 4.0, "solved": 0.25, "pairs": 3.0}


def test_unknown_mode_is_a_clear_error(engine):
    cfg = load_config(None)
    cfg.rollout.__dict__["mode"] = "dance"  # bypass validation to reach the runtime check
    with pytest.raises(ValueError, match="unknown rollout.mode 'dance'"):
        run_rollouts(cfg, [], engine, lambda: None)


def test_verify_completion_replays_the_episode_and_ignores_what_follows_its_end():
    from treeplay.agents.episode import verify_completion
    from treeplay.agents.registry import make_environment

    arith = make_environment("arithmetic", ops=2, digits=1)
    task = arith.tasks("test", 1, seed=0)[0]
    assert verify_completion(arith, task, task.reference)
    assert not verify_completion(arith, task, "1+1=3\n3+1=9")
    assert verify_completion(arith, task, task.reference + "7x!q\n99")  # junk after the last step

    class NoVerify:
        """Arithmetic without its verify method: the replay path must give the same verdicts."""

        name = "plain"

        def __init__(self):
            self.inner = make_environment("arithmetic", ops=2, digits=1)

        def tasks(self, split, n, seed):
            return self.inner.tasks(split, n, seed)

        def reset(self, task):
            return self.inner.reset(task)

        def step(self, action):
            return self.inner.step(action)

        def score(self, task, trajectory):
            return self.inner.score(task, trajectory)

    plain = NoVerify()
    assert verify_completion(plain, task, task.reference)
    assert not verify_completion(plain, task, "1+1=3\n3+1=9")
    assert not verify_completion(plain, task, "")


def test_generate_with_stops_survives_every_row_ending_in_eos(tiny_model_dir):
    """Regression: when all rows hit EOS on the same step, the stop-string check had no rows to
    decode and crashed (batch_decode([]) returns [''])."""
    eng = make_engine("hf", tiny_model_dir, seed=0, num_threads=1)
    prompt = "Question: What is the population of Raia divided by its area (integer division)?\n"
    for seed in range(12):
        out = eng.generate([prompt], n=1, seed=seed, max_tokens=16, temperature=0.7, stop=["\n"])
        assert len(out) == 1 and len(out[0]) == 1


def test_pairs_and_lists_say_which_weights_made_them(tiny_model_dir):
    """run_rollouts stamps the policy's version on every pair and ranked list it returns."""
    from treeplay.agents.registry import make_environment
    from treeplay.store.records import POLICY_VERSION

    cfg = load_config(None, ["rollout.mode=sample", "rollout.samples_per_task=4"])
    engine = make_engine("hf", str(tiny_model_dir), seed=0)
    engine.version = 3
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    results, _ = run_rollouts(cfg, env.tasks("train", 4, seed=1), engine,
                              environment_factory(cfg.env.name, **cfg.env.kwargs))
    stamped = [rec.info[POLICY_VERSION] for r in results for rec in [*r.pairs, *r.ranked_lists]]
    assert stamped and set(stamped) == {3}
    assert all(t.policy_version == 3 for r in results for t in r.trajectories)


def test_regression_panel_verifier_is_the_environment():
    """The panel's verifier asks the environment whether a candidate solves the task. It used to
    compare the candidate's last number with ``task.answer``: on an environment whose answers are not
    numbers (here every episode is solved, answer 'any') every candidate was 'verified wrong'."""
    from tests.orchestrator.fixed_outcome_env import FixedOutcomeEnv
    from treeplay.agents.scripted import ScriptedPolicy
    from treeplay.orchestrator.config import load_config
    from treeplay.orchestrator.rollouts import run_rollouts

    cfg = load_config(None, ["rollout.mode=panel"])
    policy = ScriptedPolicy(lambda prompt, rng: "helpfulness: 3\n" if prompt.startswith("Score") else "x\n")
    for solved in (True, False):
        tasks = FixedOutcomeEnv(solved=solved).tasks("train", 2, 0)
        results, _ = run_rollouts(cfg, tasks, policy, lambda s=solved: FixedOutcomeEnv(solved=s), seed=1)
        scores = {j.score for r in results for j in r.judgments if j.judge == "exact"}
        assert scores == {1.0 if solved else 0.0}, solved
