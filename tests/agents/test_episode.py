"""Episode runners: batching, step limits, broken environments, multi-agent voting, store records."""

from __future__ import annotations

import time

from treeplay.agents.base import StepResult, Task
from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.agents.episode import run_episode, run_episodes, task_result, trajectory_records
from treeplay.agents.multi import Agent, majority_vote, run_multi_agent_episodes
from treeplay.agents.scripted import ScriptedPolicy


def reference_policy(tasks, wrong_agent_answer: int | None = None) -> ScriptedPolicy:
    """Writes the reference line for the state it sees (the number of lines after the prompt)."""
    refs = {t.prompt: t.reference.splitlines() for t in tasks}

    def respond(prompt: str, rng) -> str:
        for p, lines in refs.items():
            if prompt.endswith(p) or p in prompt:
                k = prompt[prompt.index(p) + len(p) :].count("\n")
                return lines[min(k, len(lines) - 1)] + "\n"
        return "?\n"

    return ScriptedPolicy(respond)


def test_run_episodes_batches_one_call_per_step():
    tasks = ArithmeticEnv(ops=2).tasks("train", 5, seed=0)
    policy = reference_policy(tasks)
    trajs = run_episodes(lambda: ArithmeticEnv(ops=2), policy, tasks, seed=1)
    assert [t.outcome for t in trajs] == [1.0] * 5
    assert [len(c.prompts) for c in policy.calls] == [5, 5]
    assert policy.calls[0].kwargs["stop"] == ["\n"]
    assert all(s.logprob is not None for t in trajs for s in t.steps)


def test_step_limit_and_garbage():
    task = ArithmeticEnv(ops=3).tasks("test", 1, seed=0)[0]
    traj = run_episode(ArithmeticEnv(ops=3), ScriptedPolicy(lambda p, r: "zzz\nmore"), task, max_steps=2)
    assert len(traj.steps) == 2 and traj.info["stop_reason"] == "max_steps"
    assert traj.outcome == 0.0 and traj.status == "ok" and traj.actions == ["zzz", "zzz"]


class BrokenEnv(ArithmeticEnv):
    def __init__(self, mode: str) -> None:
        super().__init__()
        self.mode = mode

    def step(self, action):
        if self.mode == "raise":
            raise RuntimeError("boom")
        if self.mode == "hang":
            time.sleep(3)
        if self.mode == "garbage":
            return {"obs": 1}
        return StepResult(observation=None, reward=float("nan"))


def test_broken_environments_give_failed_trajectories():
    tasks = ArithmeticEnv().tasks("train", 1, seed=0)
    for mode, fragment in [
        ("raise", "RuntimeError: boom"),
        ("hang", "timed out"),
        ("garbage", "not a StepResult"),
        ("none", "observation, not text"),
    ]:
        traj = run_episodes(
            lambda m=mode: BrokenEnv(m), ScriptedPolicy(lambda p, r: "1+1=2"), tasks, step_timeout=0.3
        )[0]
        assert traj.status == "failed" and fragment in traj.error, (mode, traj.error)


def test_failing_policy_fails_episodes():
    def respond(p, r):
        raise RuntimeError("engine died")

    traj = run_episode(ArithmeticEnv(), ScriptedPolicy(respond), ArithmeticEnv().tasks("train", 1, 0)[0])
    assert traj.status == "failed" and "engine died" in traj.error


def test_majority_vote_ties_are_deterministic():
    assert majority_vote([("a", "x"), ("b", "y"), ("c", " y ")])[:2] == ("y", "b")
    assert majority_vote([("a", "x"), ("b", "y")])[:2] == ("x", "a")
    assert majority_vote([("b", "y"), ("a", "x")])[:2] == ("y", "b")


def test_multi_agent_episode_records_all_proposals():
    tasks = ArithmeticEnv(ops=2).tasks("train", 3, seed=0)
    good = reference_policy(tasks)
    bad = ScriptedPolicy(lambda p, r: "1+1=3\n")
    agents = [Agent("a0", good), Agent("a1", good), Agent("a2", bad)]
    trajs = run_multi_agent_episodes(lambda: ArithmeticEnv(ops=2), agents, tasks)
    assert [len(c.prompts) for c in good.calls] == [3, 3] and [c.n for c in good.calls] == [2, 2]
    for traj in trajs:
        assert traj.outcome == 1.0 and traj.agent_id == "vote"
        assert len(traj.proposals) == 6
        assert {p.agent_id for p in traj.proposals if not p.info["executed"]} == {"a2"}
        assert traj.steps[0].agent_id == "a0" and traj.steps[0].info["votes"][traj.actions[0]] == 2
    records = trajectory_records(trajs[0])
    assert [r.agent_id for r in records] == ["vote", "a0", "a1", "a2"]
    result = task_result(tasks[0], trajs[:1])
    assert result.task_id == tasks[0].id and len(result.trajectories) == 4


def test_plain_task_without_env_extras():
    task = Task(id="t", prompt="2+2\n", answer="4", reference="2+2=4\n")
    traj = run_episode(ArithmeticEnv(), ScriptedPolicy(lambda p, r: "2+2=4"), task)
    assert traj.outcome == 1.0
