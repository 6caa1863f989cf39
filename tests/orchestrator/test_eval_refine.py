"""Held-out evaluation with SLHF's inference-time refinement (``eval.refine_rounds``).

On the real arithmetic environment with scripted policies (the follower's answer is chosen, so the
outcome must be the refined answer's), and on the warm-started tiny model through the real HF
engine (the follower prompt really reaches the engine and fits its 128-character context).
"""

from __future__ import annotations

import pytest

from treeplay.agents.base import transcript
from treeplay.agents.envs.arithmetic import ArithmeticEnv
from treeplay.agents.scripted import ScriptedPolicy
from treeplay.learners.slhf import fill_follower_prompt, load_follower_template
from treeplay.orchestrator.config import ConfigError, load_config
from treeplay.orchestrator.rollouts import evaluate

FOLLOWER_LINE = "Improve the previous answer."


def _cfg(*overrides: str):
    return load_config(None, ["learner.algorithm=slhf", *overrides])


def _tasks(n: int = 4, ops: int = 1):
    return ArithmeticEnv(ops=ops, digits=2 if ops == 1 else 1).tasks("test", n, seed=5)


def _refining_policy(tasks, wrong_rounds: int = 0) -> ScriptedPolicy:
    """Leads with a wrong answer (1+1=3); the follower answers 9+9=17 (also wrong) to it when
    ``wrong_rounds``, and the task's reference to anything else."""
    refs = {t.prompt: t.reference for t in tasks}

    def respond(prompt: str, rng) -> str:
        if FOLLOWER_LINE not in prompt:
            return "1+1=3\n"
        assert prompt.count(FOLLOWER_LINE) == 1, "the follower sees only the latest answer, not the chain"
        task_prompt = next(p for p in refs if prompt.startswith(p))
        return "9+9=17\n" if wrong_rounds and "1+1=3" in prompt else refs[task_prompt]

    return ScriptedPolicy(respond)


def test_refine_rounds_scores_the_follower_answer_with_the_learners_prompt():
    tasks = _tasks()
    policy = _refining_policy(tasks)
    env_factory = lambda: ArithmeticEnv(ops=1, digits=2)  # noqa: E731

    assert evaluate(_cfg(), tasks, policy, env_factory) == [0.0] * len(tasks)
    assert all(FOLLOWER_LINE not in p for c in policy.calls for p in c.prompts)  # 0 rounds: unchanged

    policy.calls.clear()
    assert evaluate(_cfg("eval.refine_rounds=1"), tasks, policy, env_factory) == [1.0] * len(tasks)
    follower_calls = [c for c in policy.calls if any(FOLLOWER_LINE in p for p in c.prompts)]
    assert len(follower_calls) == 1
    template = load_follower_template()
    # The very text the SLHF learner trains its follower on: the task prompt and the leader's answer.
    assert follower_calls[0].prompts == [fill_follower_prompt(template, t.prompt, "1+1=3\n") for t in tasks]
    assert follower_calls[0].kwargs["stop"] is None  # the follower writes to EOS, as in training
    assert follower_calls[0].kwargs["max_tokens"] == _cfg().learner.slhf.max_new_tokens


def test_two_rounds_refine_the_latest_answer_and_a_wrong_refinement_counts_as_wrong():
    tasks = _tasks(3)
    policy = _refining_policy(tasks, wrong_rounds=1)
    env_factory = lambda: ArithmeticEnv(ops=1, digits=2)  # noqa: E731
    # One round: the follower's answer (9+9=17) is wrong, whatever the leader said.
    assert evaluate(_cfg("eval.refine_rounds=1"), tasks, policy, env_factory) == [0.0] * 3
    policy.calls.clear()
    assert evaluate(_cfg("eval.refine_rounds=2"), tasks, policy, env_factory, temperature=1.0) == [1.0] * 3
    rounds = [c for c in policy.calls if any(FOLLOWER_LINE in p for p in c.prompts)]
    assert [len(c.prompts) for c in rounds] == [3, 3]
    assert all("9+9=17\n" in p and "1+1=3" not in p for p in rounds[1].prompts)


def test_failed_refinement_fails_the_episode():
    tasks = _tasks(2)
    calls = []

    def respond(prompt: str, rng) -> str:
        calls.append(prompt)
        if FOLLOWER_LINE in prompt:
            raise RuntimeError("engine down")
        return tasks[0].reference if prompt == tasks[0].prompt else tasks[1].reference

    scores = evaluate(_cfg("eval.refine_rounds=1"), tasks, ScriptedPolicy(respond),
                      lambda: ArithmeticEnv(ops=1, digits=2))
    # Right before refinement, but the round failed: not scored as the leader's answer.
    assert scores == [0.0, 0.0] and any(FOLLOWER_LINE in p for p in calls)


def test_refine_rounds_needs_slhf():
    with pytest.raises(ConfigError, match="eval.refine_rounds.*learner.algorithm=slhf .*'dpo'"):
        load_config(None, ["eval.refine_rounds=1"])
    with pytest.raises(ConfigError, match="eval.refine_rounds"):
        load_config(None, ["learner.algorithm=slhf", "eval.refine_rounds=-1"])
    assert load_config(None, ["learner.algorithm=slhf", "eval.refine_rounds=2"]).eval.refine_rounds == 2


class Recording:
    """The real engine, with every generate request written down (everything else is the engine's)."""

    def __init__(self, engine) -> None:
        self._engine = engine
        self.requests: list[tuple[list, dict]] = []

    def generate(self, prompts, *args, **kwargs):
        self.requests.append((list(prompts), dict(kwargs)))
        return self._engine.generate(prompts, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._engine, name)


@pytest.fixture(scope="module")
def engine(warm_model_dir):
    from treeplay.engines import make_engine

    eng = make_engine("hf", warm_model_dir, seed=0, num_threads=1)
    yield eng
    eng.close()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tiny_model_follower_runs_on_the_engine_and_its_answer_is_scored(engine, temperature):
    cfg = _cfg("eval.refine_rounds=1")
    env_factory = lambda: ArithmeticEnv(ops=1, digits=2)  # noqa: E731
    tasks = ArithmeticEnv(ops=1, digits=2).tasks("test", 12, seed=7)
    plain = Recording(engine)
    before = evaluate(_cfg(), tasks, plain, env_factory, temperature=temperature)
    assert len(plain.requests) == 1  # one step per task, no follower

    refining = Recording(engine)
    after = evaluate(cfg, tasks, refining, env_factory, temperature=temperature)
    leader, follower = refining.requests[0], refining.requests[1:]
    # The leader's episode is the unrefined evaluation's, request for request.
    assert leader == plain.requests[0]
    prompts = [p for req, _ in follower for p in req]
    assert len(prompts) == len(tasks) and all(FOLLOWER_LINE in p for p in prompts)
    for req, kwargs in follower:
        assert kwargs["temperature"] == temperature and kwargs.get("stop") is None
        # the budget fits the 128-character context: the engine would refuse anything longer
        assert all(len(engine.encode(p, prompt=True)) + kwargs["max_tokens"] <= engine.max_len for p in req)
    # The outcome is the follower's answer's: replay each refined answer in a fresh environment.
    answers = {}
    template = load_follower_template()
    for req, kwargs in follower:
        outs = engine.generate(req, n=1, max_tokens=kwargs["max_tokens"], temperature=temperature,
                               seed=kwargs["seed"])
        answers.update({p: o[0].text for p, o in zip(req, outs, strict=True)})
    env = ArithmeticEnv(ops=1, digits=2)
    leader_outs = engine.generate(leader[0], **leader[1])
    for task, score, lead in zip(tasks, after, leader_outs, strict=True):
        leader_answer = transcript("", [(lead[0].text.split("\n")[0].strip(), "")])
        refined = answers[fill_follower_prompt(template, task.prompt, leader_answer)]
        assert score == float(env.verify(task, refined))
    assert len(after) == len(before)
