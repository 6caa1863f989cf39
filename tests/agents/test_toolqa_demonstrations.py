"""ToolQA's warm-start demonstrations: they solve the task, they are the agent's own prompts, and
the rubrics and verdicts in them read back through the project's parsers.

The strongest check is an oracle policy that knows nothing but the demonstrations (a lookup from
prompt to completion): the ReAct agent, plain or rubric-guided, with or without a retry, and the
plain episode runner that sampling and evaluation use, must solve every task with it. Any prompt the
agent sends that no demonstration holds fails the test, so a change to how the agent renders a
prompt that the demonstrations do not follow is caught here.
"""

from __future__ import annotations

import json

import pytest

from treeplay.agents.base import Demonstration
from treeplay.agents.envs.toolqa import QUESTION_KINDS, ToolQAEnv
from treeplay.agents.episode import run_episodes
from treeplay.agents.react import ReActAgent, ReActConfig
from treeplay.agents.rubrics import format_score, has_rubric_lines, parse_rubric, parse_verdict
from treeplay.agents.scripted import ScriptedPolicy

ALL = ("actions", "rubrics", "verdicts")
RUBRIC_PROMPT = "You write a short rubric"
VERIFIER_PROMPT = "Check a proposed agent action"


def env_and_tasks(n: int = 12, kinds=QUESTION_KINDS):
    env = ToolQAEnv(n_entities=20, kinds=kinds)
    return env, env.tasks("train", n, seed=3)


def oracle(demos: list[Demonstration], wrong_first: bool = False) -> ScriptedPolicy:
    """A policy that answers every prompt with its demonstration's completion, and fails loudly on a
    prompt no demonstration has. With ``wrong_first`` it answers a rubric-guided act prompt first
    with the wrong action a verdict demonstration rejected there, so the verifier fails it once."""
    table: dict[str, str] = {}
    for d in demos:
        for prefix, text in d.targets():
            assert table.setdefault(prefix, text) == text, "one prompt, two completions"
    wrong: dict[str, str] = {}
    if wrong_first:
        for d in demos:
            if "[Rubric Feedback:" in d.prompt:  # the retry prompt: strip the failed action and feedback
                head, rest = d.prompt.split("[Rubric Feedback:", 1)
                failed = head.rstrip("\n").rsplit("\n", 1)[1]
                guided = head[: -len(failed) - 1] + rest.split("]", 1)[1]
                wrong[guided] = failed
    used: set[str] = set()

    def respond(prompt: str, rng) -> str:
        if prompt in wrong and prompt not in used:
            used.add(prompt)
            return wrong[prompt] + "\n"
        assert prompt in table, f"the agent sent a prompt no demonstration holds:\n{prompt}"
        return table[prompt]

    return ScriptedPolicy(respond)


def test_actions_replay_to_the_correct_answer_through_the_environment():
    env, tasks = env_and_tasks()
    for task in tasks:
        [demo] = env.demonstrations([task])  # the whole episode, its observations as context lines
        assert not demo.ends and demo.prompt == task.prompt
        actions = [text for _, text in demo.targets()]
        assert all(a.endswith("\n") and a.count("\n") == 1 for a in actions)
        assert len(actions) == task.meta["min_tool_calls"] + 1  # the shortest solution
        play = ToolQAEnv(n_entities=20)
        play.reset(task)
        results = [play.step(a.strip()) for a in actions]
        assert results[-1].done and results[-1].reward == 1.0 and not any(r.done for r in results[:-1])


@pytest.mark.parametrize("rubrics", [False, True])
def test_the_agent_sends_only_demonstrated_prompts_and_solves_every_task(rubrics):
    env, tasks = env_and_tasks()
    config = ReActConfig(max_steps=6, rubrics=rubrics, temperature=0.0)
    demos = env.demonstrations(tasks, kinds=ALL, react=config)
    policy = oracle(demos)
    trajs = ReActAgent(policy, config=config).run_many(lambda: ToolQAEnv(n_entities=20), tasks)
    assert [t.outcome for t in trajs] == [1.0] * len(tasks)
    sent = [p for c in policy.calls for p in c.prompts]
    assert any(p.startswith(RUBRIC_PROMPT) for p in sent) == rubrics
    assert any(p.startswith(VERIFIER_PROMPT) for p in sent) == rubrics
    assert all(t.info["retries"] == 0 for t in trajs)


def test_a_rejected_action_is_retried_with_the_demonstrated_feedback():
    env, tasks = env_and_tasks()
    config = ReActConfig(max_steps=6, temperature=0.0)
    demos = env.demonstrations(tasks, kinds=ALL, react=config)
    trajs = ReActAgent(oracle(demos, wrong_first=True), config=config).run_many(
        lambda: ToolQAEnv(n_entities=20), tasks
    )
    assert [t.outcome for t in trajs] == [1.0] * len(tasks)
    # Every step but the first had a rubric, failed the verifier once and was retried.
    assert [t.info["retries"] for t in trajs] == [len(t.steps) - 1 for t in trajs]
    assert all(s.info["failed_action"] != s.action for t in trajs for s in t.steps[1:])


def test_plain_episodes_of_sampling_and_evaluation_get_the_same_prompts():
    # rollout.mode=sample and evaluation prompt with transcript(task.prompt, steps): with empty
    # instructions, the plain ReAct agent's act prompt.
    env, tasks = env_and_tasks()
    demos = env.demonstrations(tasks, react=ReActConfig(max_steps=6))
    trajs = run_episodes(lambda: ToolQAEnv(n_entities=20), oracle(demos), tasks, max_steps=6, temperature=0.0)
    assert [t.outcome for t in trajs] == [1.0] * len(tasks)


def test_rubrics_and_verdicts_read_back_through_the_parsers():
    env, tasks = env_and_tasks(16)
    demos = env.demonstrations(tasks, kinds=("rubrics", "verdicts"), react=ReActConfig(max_steps=6))
    rubrics = [d for d in demos if d.prompt.startswith(RUBRIC_PROMPT)]
    verdicts = [d for d in demos if d.prompt.startswith(VERIFIER_PROMPT)]
    assert rubrics and verdicts and all(d.ends for d in rubrics + verdicts)
    for d in rubrics:
        assert has_rubric_lines(d.completion)
        r = parse_rubric(d.completion)
        assert 2 <= len(r.criteria) <= 5 and not r.dropped
        assert r.render() == d.completion  # what the agent injects is what the generator wrote
        assert abs(r.raw_weight_sum - 1) < 1e-9 and format_score(r) >= 0.5
    passed = failed = 0
    for d in verdicts:
        v = parse_verdict(d.completion)
        assert v.parsed and json.loads(d.completion)["pass"] == v.passed
        action = d.prompt.split("Proposed action:\n", 1)[1].split("\n", 1)[0]
        solution = [s.action for t in tasks for s in env.solution(t)]
        if v.passed:
            passed += 1
            assert v.weighted_score == 1.0 and action in solution
        else:
            failed += 1
            assert v.weighted_score < 0.6 and v.feedback
    assert passed == failed  # one verdict on the solution's action, one on a wrong action, per step
    # Every mistake the demonstrations teach occurs: a wrong entity, a repeated search, a premature
    # answer, a wrong operator or operand, a wrong value.
    feedback = " ".join(parse_verdict(d.completion).feedback for d in verdicts)
    for needle in ("the entity the question still needs", "was searched already", "Do not answer yet",
                   "the question asks for", "with the numbers the question asks for", "the result of the calculation"):
        assert needle in feedback


def test_only_the_kinds_asked_for_and_prompts_that_fit():
    env, tasks = env_and_tasks(4)
    task = tasks[0]
    steps = len(env.solution(task))
    assert len(env.demonstrations([task])) == 1
    assert len(env.demonstrations([task], kinds=["rubrics"])) == 2 * (steps - 1)
    assert len(env.demonstrations([task], kinds=["verdicts"])) == 3 * (steps - 1)
    with pytest.raises(ValueError, match="kinds must be among"):
        env.demonstrations([task], kinds=["essays"])
    # A rubric-generator prompt never fits 600 characters: the agent would not send it, so no such
    # example, and a mix that asks for rubrics and gets none says why.
    with pytest.raises(ValueError, match="no rubrics prompt fits max_prompt_chars=600"):
        env.demonstrations(tasks, kinds=["actions", "rubrics"], react=ReActConfig(max_prompt_chars=600))
    short = env.demonstrations(tasks, kinds=["actions"], react=ReActConfig(max_prompt_chars=600))
    assert short and all(len(prefix) <= 600 for d in short for prefix, _ in d.targets())


def test_a_cut_transcript_gives_one_demonstration_per_step_with_the_agents_prompt():
    # Under a limit that cuts the middle of long transcripts, an episode's later prompts are not its
    # first prompt plus the steps: each step is then its own demonstration, with the cut prompt.
    env, tasks = env_and_tasks(8, kinds=("sum3",))
    config = ReActConfig(max_steps=6, max_prompt_chars=260, rubrics=False, temperature=0.0)
    demos = env.demonstrations(tasks, react=config)
    assert len(demos) > len(tasks) and any("characters cut" in d.prompt for d in demos)
    assert all(not d.context and d.completion.count("\n") == 1 for d in demos)
    policy = oracle(demos)
    trajs = ReActAgent(policy, config=config).run_many(lambda: ToolQAEnv(n_entities=20), tasks)
    assert [t.outcome for t in trajs] == [1.0] * len(tasks)


def test_an_episode_demonstration_is_tokenized_as_the_engine_tokenizes_each_prompt():
    # With a BPE split as Qwen2's (configs/react.yaml), the tokens before each action in the one
    # sequence of a whole episode are the tokens of that step's prompt encoded on its own.
    from treeplay.engines.bpe import train_bpe_tokenizer
    from treeplay.orchestrator.warmstart import _encode

    env, tasks = env_and_tasks(30)
    demos = env.demonstrations(tasks)
    tok = train_bpe_tokenizer([d.prompt + d.completion for d in demos], 600, pretokenizer="qwen2")
    checked = 0
    for demo, (ids, mask) in zip(demos, _encode(tok, demos), strict=True):
        starts = [i for i in range(len(mask)) if mask[i] and (i == 0 or not mask[i - 1])]
        for start, (prefix, text) in zip(starts, demo.targets(), strict=True):
            assert ids[:start] == tok(prefix, add_special_tokens=False).input_ids
            assert tok.decode(ids[start : start + len(tok(text, add_special_tokens=False).input_ids)]) == text
            checked += 1
    assert checked > len(tasks) * 2


def test_evaluation_with_the_react_agent_uses_rubric_guidance():
    from treeplay.orchestrator.config import ConfigError, load_config
    from treeplay.orchestrator.rollouts import evaluate

    env, tasks = env_and_tasks(6)
    overrides = ["env.name=toolqa", "env.kwargs={n_entities: 20}", "rollout.max_steps=6", "rollout.react.max_steps=6"]
    demos = env.demonstrations(tasks, kinds=ALL, react=load_config(None, overrides).rollout.react)
    for agent, guided in (("plain", False), ("react", True)):
        cfg = load_config(None, [*overrides, f"eval.agent={agent}"])
        policy = oracle(demos)
        assert evaluate(cfg, tasks, policy, lambda: ToolQAEnv(n_entities=20), temperature=0.0) == [1.0] * len(tasks)
        sent = [p for c in policy.calls for p in c.prompts]
        assert any(p.startswith(VERIFIER_PROMPT) for p in sent) == guided
    with pytest.raises(ConfigError, match="eval.refine_rounds"):
        load_config(None, ["eval.agent=react", "eval.refine_rounds=1", "learner.algorithm=slhf"])
