"""ReAct episodes played as threads whose policy calls are batched in lock step (agents/batching.py).

Real parts: the toolqa environment, LangGraph agents, a policy that answers from the environment's
own demonstrations (so an episode's course depends only on its prompts), and a tiny HF model sampled
at temperature 1 for reproducibility under threads.
"""

from __future__ import annotations

import dataclasses
import threading

import pytest

from treeplay.agents.batching import LockstepBatcher
from treeplay.agents.envs.toolqa import ToolQAEnv
from treeplay.agents.react import ReActAgent, ReActConfig
from treeplay.agents.scripted import ScriptedPolicy

KINDS = ["actions", "rubrics", "verdicts"]


def _oracle(env: ToolQAEnv, tasks, config: ReActConfig) -> ScriptedPolicy:
    """Answers every prompt the demonstrations know as they do; anything else with a wrong answer."""
    table: dict[str, str] = {}
    for d in env.demonstrations(tasks, kinds=KINDS, react=config):
        for prefix, text in d.targets():
            table.setdefault(prefix, text)
    return ScriptedPolicy(lambda prompt, rng: table.get(prompt, "answer[0]\n"))


def _summary(trajs):
    return [(t.task.id, t.status, t.outcome, [(s.action, s.observation, s.rubric) for s in t.steps]) for t in trajs]


def test_batched_episodes_equal_sequential_ones_in_far_fewer_calls():
    env = ToolQAEnv(n_entities=20)
    tasks = env.tasks("train", 12, seed=3)
    config = ReActConfig(max_steps=6, max_tokens=40, rubric_max_tokens=200, verify_max_tokens=200, temperature=0.0)
    one_by_one = _oracle(env, tasks, config)
    seq = ReActAgent(one_by_one, config=dataclasses.replace(config, parallel_episodes=1)).run_many(
        lambda: ToolQAEnv(n_entities=20), tasks)
    batched_policy = _oracle(env, tasks, config)
    batched = ReActAgent(batched_policy, config=config).run_many(lambda: ToolQAEnv(n_entities=20), tasks)

    assert _summary(batched) == _summary(seq)
    assert sum(t.outcome == 1.0 for t in seq) == len(tasks)  # the oracle solves every task
    assert all(len(c.prompts) == 1 for c in one_by_one.calls)
    n_prompts = sum(len(c.prompts) for c in batched_policy.calls)
    assert n_prompts == len(one_by_one.calls)  # the same prompts were asked...
    assert len(batched_policy.calls) * 4 <= n_prompts  # ...in a quarter of the calls or fewer
    assert max(len(c.prompts) for c in batched_policy.calls) == len(tasks)  # the first round: every task


def test_a_failing_prompt_fails_only_its_own_episode():
    env = ToolQAEnv(n_entities=20)
    tasks = env.tasks("train", 6, seed=3)
    config = ReActConfig(max_steps=6, max_tokens=40, rubric_max_tokens=200, verify_max_tokens=200, temperature=0.0)
    oracle = _oracle(env, tasks, config)
    bad = tasks[2].prompt

    def respond(prompt: str, rng) -> str:
        if bad in prompt:
            raise RuntimeError("this prompt breaks the model")
        return oracle.respond(prompt, rng)

    trajs = ReActAgent(ScriptedPolicy(respond), config=config).run_many(lambda: ToolQAEnv(n_entities=20), tasks)
    assert [t.status for t in trajs] == ["ok", "ok", "failed", "ok", "ok", "ok"]
    assert "this prompt breaks the model" in (trajs[2].error or "")
    assert all(t.outcome == 1.0 for i, t in enumerate(trajs) if i != 2)


def test_sampled_episodes_are_reproducible_under_threads(tmp_path):
    from treeplay.engines import make_engine
    from treeplay.engines.tiny import build_tiny_model

    engine = make_engine("hf", build_tiny_model(tmp_path / "m", 32, 1, 2, max_positions=512), num_threads=1)
    env = ToolQAEnv(n_entities=20)
    tasks = env.tasks("train", 10, seed=5)
    config = ReActConfig(max_steps=3, max_tokens=8, rubric_max_tokens=12, verify_max_tokens=12, temperature=1.0,
                         max_prompt_chars=480, seed=11, parallel_episodes=4)
    runs = [_summary(ReActAgent(engine, config=config).run_many(lambda: ToolQAEnv(n_entities=20), tasks))
            for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]
    assert len({tuple(s[3]) for s in runs[0] if s[3]}) > 1  # sampled: the episodes differ


def test_an_exception_in_one_item_is_raised_after_the_others_end():
    batcher = LockstepBatcher()
    policy = batcher.policy(ScriptedPolicy(lambda prompt, rng: prompt.upper()))
    done: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> str:
        [[c]] = policy.generate([f"item {i}"], max_tokens=20)
        if i == 3:
            raise ValueError("item 3 is broken")
        [[d]] = policy.generate([c.text + "!"], max_tokens=20)
        with lock:
            done.append(i)
        return d.text

    with pytest.raises(ValueError, match="item 3 is broken"):
        batcher.run(list(range(8)), work, parallel=4)
    assert 3 not in done and {0, 1, 2} <= set(done)  # the running ones finished; no deadlock
    assert batcher.run(list(range(5)), lambda i: policy.generate([str(i)], max_tokens=5)[0][0].text, parallel=2) == [
        "0", "1", "2", "3", "4"]
