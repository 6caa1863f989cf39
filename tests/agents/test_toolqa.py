"""ToolQA: tools, the safe calculator, time limits, invalid actions, broken tools, splits."""

from __future__ import annotations

import time

import pytest

from treeplay.agents.base import Step, Trajectory
from treeplay.agents.envs.toolqa import CalculatorError, ToolQAEnv, calculate
from treeplay.agents.episode import run_episode
from treeplay.agents.scripted import ScriptedPolicy


@pytest.mark.parametrize(
    "expr, value",
    [("1+2*3", 7), ("(1+2)*3", 9), ("59770//690", 86), ("-5+2", -3), ("7/2", 3.5), ("1,000+1", 1001)],
)
def test_calculator(expr, value):
    assert calculate(expr) == value


@pytest.mark.parametrize(
    "expr",
    [
        "__import__('os').system('true')",
        "open('x')",
        "a+1",
        "2**10",
        "1/0",
        "[1,2]",
        "(1).real",
        "",
        "9" * 300,
        "lambda: 1",
    ],
)
def test_calculator_refuses(expr):
    with pytest.raises(CalculatorError):
        calculate(expr)


def test_tasks_need_two_to_four_calls_and_reference_solves_them():
    env = ToolQAEnv(n_entities=30, kb_seed=1)
    tasks = env.tasks("train", 40, seed=0)
    assert {t.meta["kind"] for t in tasks} == {"ratio", "sum2", "diff2", "sum3"}
    for task in tasks:
        assert 2 <= task.meta["min_tool_calls"] <= 4
        env.reset(task)
        results = [env.step(a) for a in task.reference.splitlines()]
        assert results[-1].done and results[-1].reward == 1.0
        assert not any(r.done for r in results[:-1])
    assert [t.prompt for t in tasks] == [t.prompt for t in env.tasks("train", 40, seed=0)]
    test = {t.prompt for t in env.tasks("test", 40, seed=0)}
    assert not test & {t.prompt for t in tasks}


def test_tools_and_invalid_actions():
    env = ToolQAEnv(n_entities=10)
    task = env.tasks("test", 1, seed=0)[0]
    env.reset(task)
    assert env.step("lookup[area]").observation.startswith("No page open")
    name = next(iter(env.kb))
    page = env.step(f"search[{name.lower()}]")
    assert page.observation.startswith(f"{name}: population")
    assert env.step("lookup[area]").observation == f"area of {name}: {env.kb[name]['area']}"
    assert "Calculator error" in env.step("calculate[__import__('os')]").observation
    bad = env.step("please search for it")
    assert bad.observation.startswith("Invalid action:") and bad.info["invalid"] and bad.reward == -0.1
    assert "unknown tool" in env.step("browse[x]").observation
    wrong = env.step("answer[0.5]")
    assert wrong.done and wrong.reward == 0.0
    traj = Trajectory(task, [Step(0, f"answer[{task.answer}]")])
    assert env.score(task, traj) == 1.0


def test_hanging_and_raising_tools_fail_the_trajectory_not_the_run():
    env = ToolQAEnv(n_entities=10, tool_timeout=0.2)
    env.tools["search"] = lambda arg: time.sleep(5) or "late"
    task = env.tasks("train", 1, seed=0)[0]
    policy = ScriptedPolicy.replay(["search[x]\n"])
    t0 = time.monotonic()
    traj = run_episode(env, policy, task, max_steps=5)
    assert time.monotonic() - t0 < 2
    assert traj.status == "failed" and "timed out" in traj.error and traj.outcome == 0.0

    env.tools["search"] = lambda arg: 1 / 0
    traj = run_episode(env, ScriptedPolicy.replay(["search[x]\n"]), task)
    assert traj.status == "failed" and "ZeroDivisionError" in traj.error

    env.tools["search"] = lambda arg: 42
    traj = run_episode(env, ScriptedPolicy.replay(["search[x]\n"]), task)
    assert traj.status == "failed" and "not text" in traj.error


def test_invalid_actions_are_counted_on_the_trajectory():
    env = ToolQAEnv(n_entities=10)
    task = env.tasks("train", 1, seed=0)[0]
    policy = ScriptedPolicy.replay(["hmm\n", "search[\n", f"answer[{task.answer}]\n"])
    traj = run_episode(env, policy, task, max_steps=5)
    assert traj.status == "ok" and traj.outcome == 1.0
    assert traj.info["invalid_actions"] == 2
    assert [s.reward for s in traj.steps] == [-0.1, -0.1, 1.0]
