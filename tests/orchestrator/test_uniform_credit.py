"""Uniform credit (``rollout.critic=uniform``): the multi-agent baseline without credit re-assignment.

Scripted agents on the real arithmetic environment pin down the credits and pairs; the real tiny
model in ``multi_agent`` rollout mode shows the config choice reaching the episodes and the store.
"""

from __future__ import annotations

import pytest

from treeplay.agents.credit import OutcomeCredit, StepCheckCritic, assign_credit
from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.agents.multi import Agent, run_multi_agent_episodes
from treeplay.agents.scripted import ScriptedPolicy
from treeplay.orchestrator.config import ConfigError, load_config


def _two_step_episodes(second_right: bool):
    """Two-step chains; agents a0 and a1 vote the right first step, a2 proposes a wrong one. At the
    second step a0 and a1 agree on the right step (``second_right``) or on a wrong one, a2 differs."""
    tasks = ArithmeticEnv(ops=2, digits=1).tasks("train", 3, seed=1)
    refs = {t.prompt: t.reference.splitlines() for t in tasks}

    def step_of(prompt: str) -> tuple[list[str], int]:
        task = next(p for p in refs if prompt.startswith(p))
        return refs[task], prompt[len(task):].count("\n")

    def majority(prompt: str, rng) -> str:
        lines, k = step_of(prompt)
        return lines[k] + "\n" if k == 0 or second_right else "0+0=1\n"

    def loner(prompt: str, rng) -> str:
        _, k = step_of(prompt)
        return "1+1=3\n" if k == 0 else "2+2=5\n"

    agents = [Agent("a0", ScriptedPolicy(majority)), Agent("a1", ScriptedPolicy(majority)),
              Agent("a2", ScriptedPolicy(loner))]
    trajs = run_multi_agent_episodes(lambda: ArithmeticEnv(ops=2, digits=1), agents, tasks, max_steps=2)
    return tasks, agents, trajs


@pytest.mark.parametrize("second_right", [True, False])
def test_every_executed_step_gets_the_outcome(second_right):
    tasks, agents, trajs = _two_step_episodes(second_right)
    assert [t.outcome for t in trajs] == [1.0 if second_right else 0.0] * len(tasks)
    outcome = trajs[0].outcome
    pairs = assign_credit(trajs, OutcomeCredit(), agents, clumsy=False)
    for traj in trajs:
        assert [s.credit for s in traj.steps] == [outcome, outcome]  # the first, right step too
        for p in traj.proposals:
            assert p.credit == (outcome if p.agent_id in ("a0", "a1") else 1.0 - outcome)
    # One pair per state (the majority's action against a2's, merged over the agents that gave it).
    assert len(pairs) == 2 * len(tasks) and {p.source for p in pairs} == {"credit"}
    for p in pairs:
        majority_side = p.chosen if second_right else p.rejected
        assert majority_side not in ("1+1=3\n", "2+2=5\n")
        assert p.margin == 1.0 and sorted(p.info["agents"]) == ["a0", "a1", "a2"]


def test_uniform_credit_blames_a_right_step_that_a_critic_credits():
    # A failed episode whose first step was right: uniform credit prefers a2's wrong first step over
    # it; the exact step check keeps the right one chosen. That difference is what re-assignment adds.
    tasks, agents, trajs = _two_step_episodes(second_right=False)
    uniform = assign_credit(trajs, OutcomeCredit(), agents, clumsy=False)
    _, _, again = _two_step_episodes(second_right=False)
    checked = assign_credit(again, StepCheckCritic(lambda: ArithmeticEnv(ops=2, digits=1)), agents, clumsy=False)
    first = {t.id: t.reference.splitlines()[0] + "\n" for t in tasks}
    u = [p for p in uniform if p.info["step"] == 0]
    c = [p for p in checked if p.info["step"] == 0]
    assert u and all(p.rejected == first[p.task_id] and p.chosen == "1+1=3\n" for p in u)
    assert c and all(p.chosen == first[p.task_id] and p.rejected == "1+1=3\n" for p in c)


def test_failed_episode_has_no_credit():
    tasks, agents, trajs = _two_step_episodes(second_right=True)
    trajs[0].status, trajs[0].error = "failed", "environment raised"
    assign_credit(trajs, OutcomeCredit(), agents, clumsy=False)
    assert all(p.credit is None for p in trajs[0].proposals)
    assert all(p.credit is not None for t in trajs[1:] for p in t.proposals)


def test_config_choice():
    assert load_config(None, ["rollout.critic=uniform"]).rollout.critic == "uniform"
    with pytest.raises(ConfigError, match="rollout.critic"):
        load_config(None, ["rollout.critic=outcome"])


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    from treeplay.engines import make_engine

    eng = make_engine("hf", tiny_model_dir, seed=0, num_threads=1)
    yield eng
    eng.close()


def test_multi_agent_mode_with_uniform_credit_on_the_tiny_model(engine, tmp_path):
    from treeplay.agents.registry import environment_factory
    from treeplay.orchestrator.rollouts import run_rollouts
    from treeplay.store import queries
    from treeplay.store.database import open_store

    cfg = load_config(None, ["rollout.mode=multi_agent", "rollout.critic=uniform", "rollout.num_agents=3",
                             "rollout.max_steps=2", "rollout.max_step_tokens=8", "env.kwargs={ops: 2, digits: 1}"])
    factory = environment_factory(cfg.env.name, **cfg.env.kwargs)
    tasks = factory().tasks("train", 8, seed=3)
    results, stats = run_rollouts(cfg, tasks, engine, factory, iteration=0, seed=11)
    store = open_store(f"sqlite:///{tmp_path}/s.db")
    run_id = queries.start_run(store, "uniform", cfg.model_dump(mode="json"))
    queries.start_iteration(store, run_id, 0, 0)
    queries.write_task_results(store, run_id, 0, results)
    assert queries.counts(store, run_id)["trajectories"] >= 8 * (1 + 3)
    for r in results:
        executed = r.trajectories[0]
        proposals = [s for t in r.trajectories[1:] for s in t.steps]
        assert proposals and not any(s.agent_id.endswith(":clumsy") for s in proposals)  # no clumsy negatives
        if executed.status == "ok":
            assert all(s.credit == executed.outcome for s in executed.steps)
        for p in r.pairs:
            assert p.source == "credit" and p.margin == pytest.approx(1.0)
    # The random-init model rarely agrees with itself, so there are alternatives to pair against.
    assert stats["pairs"] == sum(len(r.pairs) for r in results) > 0
