"""ReAct with rubrics: graph logic with scripted policies, and the rubric parsing/reward functions."""

from __future__ import annotations

import dataclasses
import json
import math
import re

import pytest

from treeplay.agents.base import StepResult, Task
from treeplay.agents.envs.toolqa import ToolQAEnv
from treeplay.agents.prompt_files import Cut, PromptTooLong, fill_fit, fit, load_prompt
from treeplay.agents.react import DEFAULT_TOOLS, ReActAgent, ReActConfig, rubric_pairs
from treeplay.agents.rubrics import (
    format_score,
    injection,
    parse_rubric,
    parse_verdict,
    phase_hint,
    repetition_rate,
    rubric_reward,
    spearman,
)
from treeplay.agents.scripted import ScriptedPolicy

RUBRIC_MARK = "[Rubric for next action]"


def env_and_task(kind: str = "sum2"):
    env = ToolQAEnv(n_entities=12, kinds=(kind,))
    return env, env.tasks("train", 1, seed=0)[0]


def judge_policy(
    fail_actions: set[str] = frozenset(), rubric_texts: list[str] | None = None, verdict_text=None
):
    """Rubric generator + verifier in one: numbered rubrics per call, a pass/fail verdict per action."""
    state = {"rubrics": 0}

    def respond(prompt: str, rng) -> str:
        if prompt.startswith("You write a short rubric"):
            state["rubrics"] += 1
            k = state["rubrics"]
            if rubric_texts is not None:
                return rubric_texts[min(k - 1, len(rubric_texts) - 1)]
            return f"1. [0.7] use the tool for fact R{k}\n2. [0.3] keep the argument short R{k}"
        if prompt.startswith("Check a proposed agent action"):
            if verdict_text is not None:
                return verdict_text
            action = prompt.rsplit("Proposed action:\n", 1)[1].split("\n", 1)[0]
            ok = action not in fail_actions
            return json.dumps(
                {"pass": ok, "weighted_score": 1.0 if ok else 0.3, "feedback": "search the other place"}
            )
        raise AssertionError(f"unexpected prompt {prompt[:40]!r}")

    return ScriptedPolicy(respond)


def reference_actions(task) -> list[str]:
    return [a + "\n" for a in task.reference.splitlines()]


def act_prompts(policy: ScriptedPolicy) -> list[str]:
    return [c.prompts[0] for c in policy.calls if c.method == "generate"]


def test_rubric_is_injected_for_the_next_step_only():
    env, task = env_and_task()
    gen = ScriptedPolicy.replay(reference_actions(task))
    judge = judge_policy()
    traj = ReActAgent(gen, rubric_generator=judge, config=ReActConfig(max_steps=6)).run(env, task)
    assert traj.outcome == 1.0 and len(traj.steps) == 4
    prompts = act_prompts(gen)
    assert RUBRIC_MARK not in prompts[0]  # no rubric at the first step
    assert "R1" in prompts[1] and prompts[1].count(RUBRIC_MARK) == 1
    assert "R2" in prompts[2] and "R1" not in prompts[2]  # the old rubric left the context
    assert prompts[1].endswith(
        injection(parse_rubric("1. [0.7] use the tool for fact R1\n2. [0.3] keep the argument short R1"))
    )
    assert traj.steps[0].rubric is None and "R1" in traj.steps[1].rubric
    assert traj.info["rubrics"] == 3 and traj.info["retries"] == 0
    assert "phase" not in prompts[1].lower()  # the phase hint goes to the rubric generator only


def test_retry_when_verify_fails_keeps_only_the_retried_action():
    env, task = env_and_task()
    ref = reference_actions(task)
    gen = ScriptedPolicy.replay([ref[0], "search[Nowhere]\n", ref[1], ref[2], ref[3]])
    judge = judge_policy(fail_actions={"search[Nowhere]"})
    traj = ReActAgent(gen, rubric_generator=judge).run(env, task)
    assert traj.outcome == 1.0 and traj.actions == [a.strip() for a in ref]
    assert traj.info["retries"] == 1
    step = traj.steps[1]
    assert step.info["retried"] and step.info["failed_action"] == "search[Nowhere]"
    prompts = act_prompts(gen)
    retry_prompt = prompts[2]
    assert (
        "search[Nowhere]\n[Rubric Feedback: search the other place. Please reconsider your action.]"
        in retry_prompt
    )
    assert retry_prompt.rstrip().endswith("[End Rubric — follow these criteria for your next action]")
    assert all("Nowhere" not in p for p in prompts[3:])
    verify_calls = [c for c in judge.calls if c.prompts[0].startswith("Check")]
    assert len(verify_calls) == 3  # steps 2, 3, 4; the retried action is not verified again
    pairs = rubric_pairs([traj])
    assert len(pairs) == 1 and pairs[0].source == "rubric"
    assert (pairs[0].chosen, pairs[0].rejected) == (ref[1], "search[Nowhere]\n")
    assert pairs[0].prompt == task.prompt + ref[0] + traj.steps[0].observation + "\n"


def test_retry_at_most_once():
    env, task = env_and_task()
    gen = ScriptedPolicy.replay(["search[A]\n", "search[B]\n", "search[C]\n"])
    judge = judge_policy(fail_actions={"search[B]", "search[C]"})
    traj = ReActAgent(gen, rubric_generator=judge, config=ReActConfig(max_steps=2)).run(env, task)
    assert traj.actions == ["search[A]", "search[C]"] and traj.info["retries"] == 1


def test_step_limit_is_respected():
    env, task = env_and_task()
    gen = ScriptedPolicy(lambda p, r: "lookup[area]\n")
    traj = ReActAgent(gen, rubric_generator=judge_policy(), config=ReActConfig(max_steps=3)).run(env, task)
    assert len(traj.steps) == 3 and traj.info["stop_reason"] == "max_steps" and traj.outcome == 0.0


def test_invalid_actions_are_observed_penalised_and_counted():
    env, task = env_and_task()
    gen = ScriptedPolicy.replay(["\n", "let me think\n", "calc[1]\n", f"answer[{task.answer}]\n"])
    config = ReActConfig(rubrics=False, action_pattern=r"\w+\[.*\]")
    traj = ReActAgent(gen, config=config).run(env, task)
    assert traj.outcome == 1.0 and traj.info["invalid_actions"] == 3
    assert [s.observation.startswith("Invalid action") for s in traj.steps] == [True, True, True, False]
    assert traj.steps[0].reward == -0.1 and traj.steps[2].reward == -0.1  # agent's check, then the env's


def test_plain_react_never_calls_the_rubric_generator():
    env, task = env_and_task()
    gen = ScriptedPolicy.replay(reference_actions(task))
    judge = judge_policy()
    traj = ReActAgent(gen, rubric_generator=judge, config=ReActConfig(rubrics=False)).run(env, task)
    assert traj.outcome == 1.0 and judge.calls == [] and traj.info["mode"] == "react"
    assert all(RUBRIC_MARK not in p for p in act_prompts(gen))


def test_garbled_verifier_passes_and_unparseable_rubric_is_retried_once():
    env, task = env_and_task()
    gen = ScriptedPolicy.replay(reference_actions(task))
    judge = judge_policy(verdict_text="I think it is fine!!", rubric_texts=["no rubric here", "1. [0.9] ok"])
    traj = ReActAgent(gen, rubric_generator=judge).run(env, task)
    assert traj.outcome == 1.0
    assert traj.info["rubric_retries"] == 1 and traj.info["verifier_parse_failures"] == 3
    judge = judge_policy(rubric_texts=["nothing", "still nothing", "1. [-2] negative only"])
    gen = ScriptedPolicy.replay(reference_actions(task))
    traj = ReActAgent(gen, rubric_generator=judge).run(env, task)
    assert traj.outcome == 1.0 and traj.info["rubric_parse_failures"] == 3 and traj.info["rubrics"] == 0
    assert all(RUBRIC_MARK not in p for p in act_prompts(gen))


def test_failing_generator_fails_the_trajectory():
    env, task = env_and_task()
    traj = ReActAgent(ScriptedPolicy.replay([])).run(env, task)
    assert traj.status == "failed" and "ran out" in traj.error


# -- rubric parsing and reward ----------------------------------------------------------------------


def test_parse_rubric_is_defensive():
    text = "Here you go:\n1. [0.5] calls search\n2.[0.3]   names Borvia\n3. [abc] junk\n4. [0] zero\n5. [-1] neg\n6. [0.2] see https://x.y/z"
    r = parse_rubric(text, known_text="nothing")
    assert [c.text for c in r.criteria] == ["calls search", "names Borvia"]
    assert math.isclose(sum(c.weight for c in r.criteria), 1.0)
    assert [c.raw_weight for c in r.criteria] == [0.5, 0.3]
    assert len(r.dropped) == 5
    assert parse_rubric("6. [0.2] see https://x.y/z", known_text="https://x.y/z").criteria
    assert not parse_rubric("") and not parse_rubric("1. [nan] x")


@pytest.mark.parametrize(
    "text, passed, parsed",
    [
        ('{"pass": true, "weighted_score": 0.59, "feedback": ""}', False, True),
        ('noise {"pass": false, "weighted_score": 0.6} noise', True, True),
        ('{"pass": false, "feedback": "x"}', False, True),
        ("{not json}", True, False),
        ('{"weighted_score": "high"}', True, False),
        ("", True, False),
    ],
)
def test_parse_verdict(text, passed, parsed):
    v = parse_verdict(text)
    assert (v.passed, v.parsed) == (passed, parsed)


def test_phase_hints():
    assert phase_hint(2, 10).startswith("early")
    assert phase_hint(3, 10).startswith("mid") and phase_hint(6, 10).startswith("mid")
    assert phase_hint(7, 10).startswith("late")


def test_spearman_and_ties():
    assert spearman([1, 2, 3, 4], [1, 2, 3, 4]) == pytest.approx(1.0)
    assert spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert math.isnan(spearman([1, 1, 1, 1], [1, 2, 3, 4]))


def test_rubric_reward_by_hand():
    good = "1. [0.5] calls search\n2. [0.3] names the place\n3. [0.2] short argument"
    assert format_score(parse_rubric(good)) == 1.0
    assert rubric_reward(good, [1, 2, 3, 4], [1, 2, 3, 4], n_atomic=3) == pytest.approx(1.0)
    # two criteria with raw weights 0.8: F = 0; rho = -1: S = 0; A = 1/2
    two = "1. [0.5] calls search\n2. [0.3] names the place"
    assert rubric_reward(two, [4, 3, 2, 1], [1, 2, 3, 4], n_atomic=1) == pytest.approx(0.15 * 0.5)
    # constant judge ranks: S = 0.5
    assert rubric_reward(good, [1, 1, 1, 1], [1, 2, 3, 4], n_atomic=0) == pytest.approx(0.75 * 0.5 + 0.10)
    # fewer than 2 criteria: S = A = 0, F = 0.5 * [weights sum to 1]
    assert rubric_reward("1. [1.0] one", [1, 2, 3, 4], [1, 2, 3, 4], n_atomic=1) == pytest.approx(0.05)
    loop = "a b c d " * 4
    assert repetition_rate(loop) == pytest.approx(1 - 4 / 13)
    assert rubric_reward(good + "\n" + loop * 2, [1, 2, 3, 4], [1, 2, 3, 4], 3) == 0.0  # 25/42 > 0.40


# -- prompts under max_prompt_chars: only the transcript's middle is cut -----------------------------

CUT = re.compile(r"\n\[\.\.\. \d+ characters cut \.\.\.\]\n")
QUESTION = "Which tool finds the population of Maror? Answer with a number.\n"
INSTRUCTIONS = "You solve questions with tools, one action per line.\n"


class LongObservationEnv:
    """Every action is answered with a long observation, so transcripts outgrow a small limit."""

    name = "long-observations"

    def tasks(self, split, n, seed):
        return [Task(id=f"q{i}", prompt=QUESTION, answer="1") for i in range(n)]

    def reset(self, task):
        self.t = 0
        return task.prompt

    def step(self, action):
        self.t += 1
        return StepResult(f"page {self.t}: " + "lorem ipsum " * 25 + f"end of page {self.t}")

    def score(self, task, trajectory):
        return 0.0


def long_episode(limit: int | None):
    """A 5-step episode with rubrics, verify and one retry; the prompts each policy was given."""
    env = LongObservationEnv()
    task = env.tasks("train", 1, 0)[0]
    gen = ScriptedPolicy(lambda p, r: "search[Maror]\n")

    def respond(prompt: str, rng) -> str:
        # Told apart by their ends, so a prompt that lost its head would still be answered (and seen).
        if "Proposed action:\n" in prompt:
            return json.dumps({"pass": False, "weighted_score": 0.3, "feedback": "search the other place"})
        return "1. [0.7] use the tool for the fact asked\n2. [0.3] keep the argument short"

    judge = ScriptedPolicy(respond)
    config = ReActConfig(max_steps=5, max_prompt_chars=limit, instructions=INSTRUCTIONS)
    traj = ReActAgent(gen, rubric_generator=judge, config=config).run(env, task)
    judged = [c.prompts[0] for c in judge.calls]
    rubric_prompts = [p for p in judged if "Proposed action:\n" not in p]
    verify_prompts = [p for p in judged if "Proposed action:\n" in p]
    return traj, rubric_prompts, verify_prompts, act_prompts(gen)


def test_regression_truncation_keeps_rubric_generator():
    limit = 1500
    traj, rubric_prompts, _, _ = long_episode(limit)
    assert traj.status == "ok", traj.error
    assert len(rubric_prompts) == 4  # steps 2-5
    for p in rubric_prompts:
        assert len(p) <= limit
        assert p.startswith(load_prompt("rubric_generator.txt").split("{", 1)[0])  # instructions + examples
        assert "Examples (one per tool):" in p and QUESTION.strip() in p and DEFAULT_TOOLS in p
        assert "Phase: " in p and p.endswith("Rubric for the next action:\n")
    assert CUT.search(rubric_prompts[-1]) and "end of page 4" in rubric_prompts[-1]  # newest step kept


def test_regression_truncation_keeps_rubric_verifier():
    limit = 1500
    traj, _, verify_prompts, _ = long_episode(limit)
    assert traj.status == "ok" and verify_prompts, traj.error
    rubric = traj.steps[-1].rubric
    for p in verify_prompts:
        assert len(p) <= limit
        assert p.startswith(load_prompt("rubric_verifier.txt").split("{", 1)[0])
        assert INSTRUCTIONS.strip() in p and QUESTION.strip() in p
        assert "Proposed action:\nsearch[Maror]\n" in p and p.rstrip().endswith('"feedback": "what to change"}')
    assert f"Rubric:\n{rubric}\n" in verify_prompts[-1] and CUT.search(verify_prompts[-1])


def test_regression_truncation_keeps_act_prompt():
    limit = 1500
    traj, _, _, prompts = long_episode(limit)
    assert traj.status == "ok", traj.error
    assert traj.info["retries"] >= 1  # a retry prompt carries the failed action and the feedback
    retry = [p for p in prompts if "[Rubric Feedback:" in p]
    assert retry and "search[Maror]\n[Rubric Feedback: search the other place." in retry[-1]
    for p in prompts:
        assert len(p) <= limit and p.startswith(INSTRUCTIONS + QUESTION)
    last = prompts[-1]
    assert CUT.search(last) and "end of page 4" in last  # the newest observation survives
    assert last.rstrip().endswith("[End Rubric — follow these criteria for your next action]")
    assert traj.steps[-1].rubric in last


def test_prompt_whose_fixed_parts_do_not_fit_fails_the_episode_with_the_reason():
    # react.yaml used to say 300: a rubric generator prompt cannot fit that, so the episode fails at
    # the first rubric instead of running the rubric generator on the prompt's last 300 characters.
    traj, rubric_prompts, verify_prompts, prompts = long_episode(300)
    assert traj.status == "failed" and len(traj.steps) == 1 and len(prompts) == 1
    assert rubric_prompts == [] and verify_prompts == []
    assert traj.error.startswith("rubric generator prompt does not fit") and "max_prompt_chars=300" in traj.error


def test_untouched_prompts_under_no_limit():
    traj, rubric_prompts, _, prompts = long_episode(None)
    assert traj.status == "ok" and not any(CUT.search(p) for p in rubric_prompts + prompts)
    assert "page 1: lorem" in prompts[-1]


def test_fit_cuts_only_the_middle_of_the_transcript_and_says_how_much():
    steps = "".join(f"step {i}\n" for i in range(100))
    text = fit(["INSTRUCTIONS\n", Cut(steps), "CANDIDATE"], 200)
    assert len(text) <= 200 and text.startswith("INSTRUCTIONS\nstep 0\n") and text.endswith("step 99\nCANDIDATE")
    kept = CUT.split(text)
    n = int(re.search(r"(\d+) characters cut", text).group(1))
    assert len(kept[0]) + len(kept[1]) - len("INSTRUCTIONS\n") - len("CANDIDATE") + n == len(steps)
    assert fit(["a", Cut("b")], 2) == "ab" and fit(["a", Cut("b")], None) == "ab"
    with pytest.raises(PromptTooLong, match="judge prompt does not fit: .* take 9 characters"):
        fit(["INSTRUCTIONS"[:9], Cut(steps)], 8, "judge prompt")
    assert fill_fit("{a}|{b}", 100, a="{b}", b="x") == "{b}|x"  # values are not filled again


def _run_tokenizer(cfg):
    """The tokenizer a run of ``cfg`` builds for its tiny model (orchestrator.run_start.prepare_model),
    or None for the character tokenizer (one position per character)."""
    if cfg.model.tiny.tokenizer != "bpe":
        return None
    from treeplay.agents.registry import make_environment
    from treeplay.engines.bpe import train_bpe_tokenizer
    from treeplay.orchestrator.run_start import tokenizer_corpus

    t = cfg.model.tiny
    corpus = tokenizer_corpus(cfg, make_environment(cfg.env.name, **cfg.env.kwargs))
    return train_bpe_tokenizer(corpus, t.vocab_size, pretokenizer=t.pretokenizer)


@pytest.mark.slow
def test_shipped_react_config_fits_its_prompts_into_the_tiny_model():
    """Every prompt of configs/react.yaml, plus the longest answer, fits the model's positions, counted
    in the run's own tokens (a BPE model's prompt is far fewer tokens than characters)."""
    from pathlib import Path

    from treeplay.orchestrator.config import load_config

    cfg = load_config(Path(__file__).parents[2] / "configs" / "react.yaml")
    react = cfg.rollout.react
    longest_answer = max(react.max_tokens, react.rubric_max_tokens, react.verify_max_tokens)
    assert cfg.model.path is None
    tok = _run_tokenizer(cfg)
    env = ToolQAEnv(**cfg.env.kwargs)
    tasks = env.tasks("train", 6, seed=0)
    gen = ScriptedPolicy(lambda p, r: "search[Nowhere]\n")
    judge = judge_policy(rubric_texts=["1. [0.6] search a place named\n2. [0.4] short argument"])
    trajs = ReActAgent(gen, rubric_generator=judge, config=react).run_many(lambda: ToolQAEnv(**cfg.env.kwargs), tasks)
    assert all(t.status == "ok" for t in trajs), [t.error for t in trajs]
    assert all(len(t.steps) == react.max_steps for t in trajs)
    prompts = [p for pol in (gen, judge) for c in pol.calls for p in c.prompts]
    assert max(len(p) for p in prompts) <= react.max_prompt_chars
    lengths = [len(p) if tok is None else len(tok(p, add_special_tokens=False).input_ids) for p in prompts]
    assert max(lengths) + longest_answer <= cfg.model.tiny.max_positions


def test_regression_rubric_pairs_are_prompted_as_the_plain_policy_acts():
    """A rubric pair's prompt is the act prompt the unguided policy is given at that step: with
    its instructions and, under ``max_prompt_chars``, the same cut. The old pairs used the bare
    transcript (no instructions, never cut): a context the policy is never prompted with."""
    env, task = env_and_task()
    ref = reference_actions(task)
    cfg = ReActConfig(instructions="Answer with one tool call per line.\n")
    gen = ScriptedPolicy.replay([ref[0], "search[Nowhere]\n", ref[1], ref[2], ref[3]])
    judge = judge_policy(fail_actions={"search[Nowhere]"})
    traj = ReActAgent(gen, rubric_generator=judge, config=cfg).run(env, task)
    assert traj.outcome == 1.0
    (pair,) = rubric_pairs([traj], cfg)
    # the same episode played by plain ReAct: what the policy is prompted with at step 1
    plain_gen = ScriptedPolicy.replay(ref)
    plain = ReActAgent(plain_gen, config=dataclasses.replace(cfg, rubrics=False)).run(env, task)
    assert plain.outcome == 1.0
    assert pair.prompt == act_prompts(plain_gen)[1]
    assert pair.prompt.startswith(cfg.instructions + task.prompt)
    assert pair.prompt.endswith(traj.steps[0].observation + "\n")


def test_rubric_first_step_writes_a_rubric_before_the_first_action():
    """Co-ReAct writes a rubric at each decision step; ``rubric_first_step`` includes the first."""
    env, task = env_and_task()
    gen = ScriptedPolicy.replay(reference_actions(task))
    judge = judge_policy()
    config = ReActConfig(max_steps=6, rubric_first_step=True)
    traj = ReActAgent(gen, rubric_generator=judge, config=config).run(env, task)
    assert traj.outcome == 1.0 and len(traj.steps) == 4
    prompts = act_prompts(gen)
    assert "R1" in prompts[0] and prompts[0].count(RUBRIC_MARK) == 1
    assert "R2" in prompts[1] and "R1" not in prompts[1]
    assert traj.steps[0].rubric is not None and traj.info["rubrics"] == 4
