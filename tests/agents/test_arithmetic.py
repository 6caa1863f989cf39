"""ArithmeticEnv: the exact task format, deterministic disjoint splits, the verifier, garbage safety."""

from __future__ import annotations

import pytest

from treeplay.agents.base import Step, Trajectory, transcript
from treeplay.agents.envs.arithmetic import ArithmeticEnv, final_answer, solve
from treeplay.agents.registry import make_environment


def test_format_of_prompt_answer_reference():
    value, ref = solve("47+38-12")
    assert (value, ref) == (73, "47+38=85\n85-12=73\n")
    env = ArithmeticEnv(ops=2)
    for t in env.tasks("train", 20, seed=1):
        assert t.prompt.endswith("\n") and "\n" not in t.prompt[:-1]
        assert t.answer == str(solve(t.prompt)[0])
        lines = t.reference.split("\n")
        assert len(lines) == 3 and lines[-1] == ""  # two lines, each ending in "\n"
        assert final_answer(lines[1]) == int(t.answer)
        assert t.env == "arithmetic" and t.split == "train"


def test_tasks_are_deterministic_and_splits_disjoint():
    env = ArithmeticEnv(ops=1, digits=2)
    a = env.tasks("train", 200, seed=3)
    b = env.tasks("train", 200, seed=3)
    assert [t.prompt for t in a] == [t.prompt for t in b]
    assert [t.prompt for t in env.tasks("train", 200, seed=4)] != [t.prompt for t in a]
    train = {t.prompt for s in range(3) for t in env.tasks("train", 300, seed=s)}
    test = {t.prompt for s in range(3) for t in env.tasks("test", 300, seed=s)}
    val = {t.prompt for s in range(3) for t in env.tasks("validation", 300, seed=s)}
    assert train and test and val and not (train & test) and not (val & train) and not (val & test)
    assert len({t.id for t in a}) == len(a)


def test_non_negative_running_values_and_knobs():
    env = ArithmeticEnv(ops=3, digits=2, operators="-")
    for t in env.tasks("train", 50, seed=0):
        for line in t.reference.splitlines():
            assert final_answer(line) >= 0
    neg = ArithmeticEnv(ops=2, operators="-", allow_negative=True).tasks("train", 100, seed=0)
    assert any(int(t.answer) < 0 for t in neg)
    assert all("*" in t.prompt for t in ArithmeticEnv(operators="*").tasks("test", 10, seed=0))
    with pytest.raises(ValueError):
        ArithmeticEnv(operators="/")
    with pytest.raises(ValueError):
        env.tasks("valid", 1, 0)


def test_episode_rewards_and_score():
    env = ArithmeticEnv(ops=2)
    task = env.tasks("test", 1, seed=0)[0]
    assert env.reset(task) == task.prompt
    steps = []
    for i, line in enumerate(task.reference.splitlines()):
        r = env.step(line)
        steps.append(Step(i, line, r.observation, r.reward, info=r.info))
        assert r.info["step_ok"]
    assert [s.reward for s in steps] == [0.0, 1.0]
    assert r.done
    traj = Trajectory(task, steps)
    assert env.score(task, traj) == 1.0
    assert transcript(task.prompt, steps) == task.prompt + task.reference
    assert env.demonstrations([task]) == [(task.prompt, task.reference)]
    assert env.verify(task, task.reference) and not env.verify(task, "1+1=2\n")


@pytest.mark.parametrize(
    "junk", ["", "???", "=", "1+1=", "a=b=c", "x" * 10_000, "12=\n=34", "9" * 400 + "+1=2"]
)
def test_garbage_actions_never_raise(junk):
    env = ArithmeticEnv(ops=2)
    task = env.tasks("train", 1, seed=0)[0]
    env.reset(task)
    r1 = env.step(junk)
    r2 = env.step(junk)
    assert (r1.done, r2.done) == (False, True)
    assert r2.reward == 0.0 and r1.info["step_ok"] is False
    assert env.step("more").done  # stepping past the end is harmless
    assert env.score(task, Trajectory(task, [Step(0, junk)])) == 0.0


def test_wrong_final_answer_scores_zero():
    env = make_environment("arithmetic", ops=1)
    task = env.tasks("train", 1, seed=0)[0]
    env.reset(task)
    r = env.step(f"{task.prompt.strip()}={int(task.answer) + 1}")
    assert r.done and r.reward == 0.0 and r.info["arith_ok"] is False
