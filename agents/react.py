"""ReAct with rubrics (Co-ReAct, docs/algorithms.md section 5) as a LangGraph ``StateGraph``.

One step of the loop::

    rubric --> act --> verify --(fail, first time)--> retry --> act
                          \\--(pass, or already retried)--> observe --(done / step limit)--> END
                                                              \\--> rubric (next step)

- **rubric**: from the second step on, or at every step with ``rubric_first_step`` (Co-ReAct writes
  one at each decision step). The rubric generator gets the question, the trajectory,
  the tools and a phase hint keyed on the number of tool calls so far (``rubrics.phase_hint``).
  No line matching the rubric marker: one retry at temperature 0; still nothing usable: the step
  goes on without a rubric.
- **act**: the generator continues ``context + injection(rubric)``; the action is the first line.
- **verify**: the verifier scores the action against the rubric and answers JSON
  ``{pass, weighted_score, feedback}``; pass iff weighted_score >= 0.6; unreadable output passes.
- **retry** (at most once): the generator continues
  ``context + failed_action + "\\n" + [Rubric Feedback: ...] + injection(rubric)``; only the retried
  action is kept (the failed one never enters the context).
- **observe**: the action runs in the environment (guarded). An empty action, or one that does not
  match ``action_pattern``, becomes an ``Invalid action`` observation with ``invalid_penalty`` and is
  counted; environments may flag invalid actions themselves (``info["invalid"]``). The rubric is
  stored on the Step and dropped from the context: it serves this one step.

``ReActConfig(rubrics=False)`` is plain ReAct on the same tasks (rubric, verify and retry skipped).
Under ``max_prompt_chars`` every prompt keeps its instructions, question, rubric and action whole;
only the middle of the earlier steps' transcript is cut, with a marker (``agents.prompt_files.fit``).
A prompt whose fixed parts do not fit is never sent: the episode fails with that reason.
Generator, verifier and rubric generator are ``Policy`` objects, possibly the same one.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypedDict

from langgraph.graph import END, START, StateGraph

from treeplay.agents.base import Environment, Policy, Step, Task, Trajectory, transcript
from treeplay.agents.batching import LockstepBatcher
from treeplay.agents.episode import (
    Episode,
    action_line,
    apply_action,
    finish_episode,
    generate_guarded,
    start_episode,
)
from treeplay.agents.prompt_files import Cut, Part, PromptTooLong, fill_fit, fit, load_prompt
from treeplay.agents.rubrics import (
    VERIFY_THRESHOLD,
    Rubric,
    Verdict,
    feedback_suffix,
    has_rubric_lines,
    injection,
    parse_rubric,
    parse_verdict,
    phase_hint,
)
from treeplay.store.records import PairRecord

DEFAULT_TOOLS = "search[name], lookup[attribute], calculate[expression], answer[value]"


@dataclass
class ReActConfig:
    """Settings of a ReAct agent.

    Attributes:
        max_steps: Actions per episode at most (Co-ReAct: 10 tool calls); also the phase hints' max.
        rubrics: False = plain ReAct.
        rubric_first_step: Also write a rubric before the first action, as Co-ReAct does (a rubric
            at each decision step). Off by default: the toolqa warm start's demonstrations have no
            first-step rubric, so a warm-started generator has never seen one there.
        max_tokens / temperature: The generator's sampling (Co-ReAct's agent: temperature 0.7).
        rubric_max_tokens / rubric_temperature: The rubric generator's (spec: temperature 0).
        verify_max_tokens: The verifier's budget (greedy).
        verify_threshold: Pass iff weighted score >= this.
        invalid_penalty: Reward of an action the agent rejects as unparseable.
        action_pattern: Regex an action must fully match (None: only empty actions are invalid).
        instructions: Text put before the context in generator prompts.
        tools_text: Tool descriptions shown to the rubric generator.
        max_prompt_chars: Longest prompt sent to a policy (small models). Only the middle of the
            transcript of earlier steps is ever cut (``agents.prompt_files.fit``); a prompt whose
            instructions, question, rubric and action do not fit fails the episode with that reason.
        step_timeout: Seconds an environment call may take.
        seed: Base seed of generate calls (None: the policies' own).
        parallel_episodes: ``run_many`` plays this many episodes at once, their policy calls batched
            in lock step (``agents.batching``); 1 plays them one after another.
    """

    max_steps: int = 10
    rubrics: bool = True
    rubric_first_step: bool = False
    max_tokens: int = 64
    temperature: float = 0.7
    rubric_max_tokens: int = 256
    rubric_temperature: float = 0.0
    verify_max_tokens: int = 128
    verify_threshold: float = VERIFY_THRESHOLD
    invalid_penalty: float = -0.1
    action_pattern: str | None = None
    instructions: str = ""
    tools_text: str = DEFAULT_TOOLS
    max_prompt_chars: int | None = None
    step_timeout: float | None = 30.0
    seed: int | None = None
    parallel_episodes: int = 32


# -- the prompts (one rendering, shared by the agent and the warm start's demonstrations) -------------


def act_prompt(
    config: ReActConfig,
    task: Task,
    steps: Sequence[Step],
    rubric: Rubric | None = None,
    retry: tuple[str, str] | None = None,
) -> str:
    """The generator's prompt for the next action: instructions, question, earlier steps, then a
    retry's failed action and feedback (``retry = (failed_action, feedback)``) and the injected rubric.

    Only the earlier steps may lose their middle (``max_prompt_chars``); the question, a retry's
    feedback and the rubric are what the next action must answer to. With no rubric, no retry and
    empty instructions this is ``transcript(task.prompt, steps)``, what plain episodes are prompted with.

    Raises:
        PromptTooLong: The fixed parts do not fit ``config.max_prompt_chars``.
    """
    parts: list[Part] = [config.instructions, task.prompt, Cut(transcript("", steps))]
    if retry is not None:
        parts.append(retry[0] + "\n" + feedback_suffix(retry[1]))
    if rubric:
        parts.append(injection(rubric))
    return fit(parts, config.max_prompt_chars, "act prompt")


def rubric_prompt(config: ReActConfig, task: Task, steps: Sequence[Step]) -> str:
    """The rubric generator's prompt for the action after ``steps`` (the phase hint counts the
    valid tool calls among them).

    Raises:
        PromptTooLong: The fixed parts do not fit ``config.max_prompt_chars``.
    """
    n_calls = sum(1 for s in steps if not s.info.get("invalid"))
    return fill_fit(
        load_prompt("rubric_generator.txt"),
        config.max_prompt_chars,
        "rubric generator prompt",
        tools=config.tools_text,
        question=task.prompt.strip(),
        trajectory=Cut(transcript("", steps).strip() or "(none)"),
        phase_hint=phase_hint(n_calls, config.max_steps),
    )


def verifier_prompt(config: ReActConfig, task: Task, steps: Sequence[Step], rubric: Rubric, action: str) -> str:
    """The verifier's prompt: ``action`` (proposed after ``steps``) checked against ``rubric``.

    Raises:
        PromptTooLong: The fixed parts do not fit ``config.max_prompt_chars``.
    """
    done = transcript("", steps).rstrip()
    head = config.instructions + task.prompt
    return fill_fit(
        load_prompt("rubric_verifier.txt"),
        config.max_prompt_chars,
        "rubric verifier prompt",
        rubric=rubric.render(),
        context=[head.lstrip(), Cut(done)] if done else head.strip(),
        action=action,
        threshold=f"{config.verify_threshold:g}",
    )


class ReActState(TypedDict, total=False):
    """The graph's state: the live episode plus what the current step has produced so far."""

    episode: Episode
    rubric: Rubric | None
    action: str
    logprob: float | None
    verdict: Verdict | None
    failed_action: str | None
    retried: bool


class ReActAgent:
    """A rubric-guided ReAct agent.

    Args:
        generator: Writes actions.
        verifier: Checks actions against rubrics (default: the rubric generator, as in Co-ReAct).
        rubric_generator: Writes rubrics (default: the generator).
        config: Settings.
    """

    def __init__(
        self,
        generator: Policy,
        verifier: Policy | None = None,
        rubric_generator: Policy | None = None,
        config: ReActConfig | None = None,
    ) -> None:
        self.generator = generator
        self.rubric_generator = rubric_generator or generator
        self.verifier = verifier or self.rubric_generator
        self.config = config or ReActConfig()
        self._pattern = re.compile(self.config.action_pattern) if self.config.action_pattern else None
        self.graph = self._build()

    # -- plumbing ----------------------------------------------------------------------------------

    @staticmethod
    def _fitted(ep: Episode, build: Callable[[], str]) -> str | None:
        """``build()`` (a prompt within ``max_prompt_chars``), or None after failing the episode with
        the reason when its fixed parts do not fit: a small model is never run on a mangled prompt."""
        try:
            return build()
        except PromptTooLong as e:
            ep.fail(str(e))
            return None

    def _generate(self, policy: Policy, ep: Episode, prompt: str, k: int, **kw: Any) -> str | None:
        """One completion's text, or None after failing the episode."""
        seed = self.config.seed
        outs, err = generate_guarded(
            policy,
            [prompt],
            1,
            seed=None if seed is None else seed + 7 * len(ep.traj.steps) + k,
            **kw,
        )
        if outs is None:
            ep.fail(str(err))
            return None
        c = outs[0][0]
        ep.extra["logprob"] = c.logprob
        return c.text

    def _context(self, ep: Episode) -> str:
        return self.config.instructions + transcript(ep.traj.task.prompt, ep.traj.steps)

    @staticmethod
    def _count(ep: Episode, key: str) -> None:
        ep.traj.info[key] = ep.traj.info.get(key, 0) + 1

    # -- nodes ---------------------------------------------------------------------------------------

    def _rubric(self, state: ReActState) -> dict[str, Any]:
        ep = state["episode"]
        fresh = {"rubric": None, "verdict": None, "failed_action": None, "retried": False}
        if not self.config.rubrics or (not ep.traj.steps and not self.config.rubric_first_step):
            return fresh
        prompt = self._fitted(ep, lambda: rubric_prompt(self.config, ep.traj.task, ep.traj.steps))
        if prompt is None:
            return fresh
        kw = {"max_tokens": self.config.rubric_max_tokens, "temperature": self.config.rubric_temperature}
        text = self._generate(self.rubric_generator, ep, prompt, 1, **kw)
        if text is not None and not has_rubric_lines(text):
            self._count(ep, "rubric_retries")
            text = self._generate(self.rubric_generator, ep, prompt, 2, **{**kw, "temperature": 0.0})
        if text is None:
            return fresh
        rubric = parse_rubric(text, known_text=self._context(ep))
        if not rubric:
            self._count(ep, "rubric_parse_failures")
            return fresh
        self._count(ep, "rubrics")
        return {**fresh, "rubric": rubric}

    def _act(self, state: ReActState) -> dict[str, Any]:
        ep = state["episode"]
        retry = (state.get("failed_action") or "", state["verdict"].feedback) if state.get("retried") else None
        prompt = self._fitted(
            ep, lambda: act_prompt(self.config, ep.traj.task, ep.traj.steps, state.get("rubric"), retry)
        )
        if prompt is None:
            return {"action": "", "logprob": None}
        text = self._generate(
            self.generator,
            ep,
            prompt,
            3 + int(bool(state.get("retried"))),
            max_tokens=self.config.max_tokens,
            temperature=self.config.temperature,
            stop=["\n"],
        )
        return {"action": action_line(text or ""), "logprob": ep.extra.get("logprob")}

    def _verify(self, state: ReActState) -> dict[str, Any]:
        ep = state["episode"]
        rubric = state.get("rubric")
        if not rubric or state.get("retried") or ep.done:
            return {}
        prompt = self._fitted(
            ep,
            lambda: verifier_prompt(self.config, ep.traj.task, ep.traj.steps, rubric, state.get("action", "")),
        )
        if prompt is None:
            return {}
        text = self._generate(
            self.verifier, ep, prompt, 5, max_tokens=self.config.verify_max_tokens, temperature=0.0
        )
        verdict = parse_verdict(text or "", self.config.verify_threshold)
        if not verdict.parsed:
            self._count(ep, "verifier_parse_failures")
        return {"verdict": verdict}

    def _retry(self, state: ReActState) -> dict[str, Any]:
        self._count(state["episode"], "retries")
        return {"retried": True, "failed_action": state.get("action", "")}

    def _observe(self, state: ReActState) -> dict[str, Any]:
        ep = state["episode"]
        action = state.get("action", "")
        rubric = state.get("rubric")
        verdict = state.get("verdict")
        info: dict[str, Any] = {"retried": bool(state.get("retried"))}
        if state.get("retried"):
            info["failed_action"] = state.get("failed_action")
        if verdict is not None:
            info["verdict"] = {
                "pass": verdict.passed,
                "weighted_score": verdict.weighted_score,
                "feedback": verdict.feedback,
                "parsed": verdict.parsed,
            }
        fields = {"rubric": rubric.render() if rubric else None, "logprob": state.get("logprob")}
        if not action or (self._pattern is not None and not self._pattern.fullmatch(action)):
            reason = "empty action" if not action else "does not match the action format"
            step = Step(
                len(ep.traj.steps),
                action,
                f"Invalid action: {reason}.",
                self.config.invalid_penalty,
                info={**info, "invalid": True},
                **fields,
            )
            ep.traj.steps.append(step)
            self._count(ep, "invalid_actions")
            return {}
        step = apply_action(ep, action, self.config.step_timeout, **fields)
        if step is not None:
            step.info.update(info)
        return {}

    # -- graph ---------------------------------------------------------------------------------------

    def _build(self):
        g = StateGraph(ReActState)
        g.add_node("rubric", self._rubric)
        g.add_node("act", self._act)
        g.add_node("verify", self._verify)
        g.add_node("retry", self._retry)
        g.add_node("observe", self._observe)
        g.add_edge(START, "rubric")
        g.add_conditional_edges("rubric", lambda s: END if s["episode"].done else "act", ["act", END])
        g.add_conditional_edges("act", lambda s: END if s["episode"].done else "verify", ["verify", END])
        g.add_conditional_edges("verify", self._after_verify, ["retry", "observe", END])
        g.add_edge("retry", "act")
        g.add_conditional_edges("observe", self._after_observe, ["rubric", END])
        return g.compile()

    @staticmethod
    def _after_verify(state: ReActState) -> str:
        if state["episode"].done:
            return END
        verdict = state.get("verdict")
        if verdict is not None and not verdict.passed and not state.get("retried"):
            return "retry"
        return "observe"

    def _after_observe(self, state: ReActState) -> str:
        ep = state["episode"]
        return END if ep.done or len(ep.traj.steps) >= self.config.max_steps else "rubric"

    # -- running -------------------------------------------------------------------------------------

    def run(self, env: Environment, task: Task) -> Trajectory:
        """One episode of ``task`` on ``env``; failures are recorded on the trajectory."""
        ep = start_episode(env, task, self.config.step_timeout, getattr(self.generator, "version", 0))
        for key in (
            "retries",
            "rubrics",
            "rubric_retries",
            "rubric_parse_failures",
            "verifier_parse_failures",
        ):
            ep.traj.info.setdefault(key, 0)
        ep.traj.info["mode"] = "react+rubrics" if self.config.rubrics else "react"
        if not ep.done:
            self.graph.invoke({"episode": ep}, {"recursion_limit": 8 * self.config.max_steps + 10})
        return finish_episode(ep, self.config.step_timeout)

    def run_many(self, env_factory: Callable[[], Environment], tasks: Sequence[Task]) -> list[Trajectory]:
        """One episode per task, each on a fresh environment instance, in task order.

        Up to ``config.parallel_episodes`` episodes run at once as threads; every policy call waits
        until each running episode waits for one too, then the calls go to the policies as batches
        (``agents.batching.LockstepBatcher``: one ``generate`` per policy and sampling settings, which
        calls share a batch independent of thread timing).
        """
        if self.config.parallel_episodes <= 1 or len(tasks) <= 1:
            return [self.run(env_factory(), t) for t in tasks]
        batcher = LockstepBatcher()
        wrapped: dict[int, Policy] = {}

        def batched(policy: Policy) -> Policy:
            return wrapped.setdefault(id(policy), batcher.policy(policy))

        agent = copy.copy(self)
        agent.generator, agent.rubric_generator, agent.verifier = (
            batched(self.generator), batched(self.rubric_generator), batched(self.verifier))
        agent.graph = agent._build()
        return batcher.run(tasks, lambda task: agent.run(env_factory(), task), self.config.parallel_episodes)


def rubric_pairs(
    trajectories: Sequence[Trajectory], config: ReActConfig | None = None, require_success: bool = True
) -> list[PairRecord]:
    """Pairs from verify-and-retry: at a retried step, the kept action over the failed one.

    The prompt is the policy's plain act prompt at that step (``act_prompt`` with no rubric and no
    retry: the instructions, the question and the earlier steps, cut to ``max_prompt_chars`` the way
    the agent cuts it): the policy learns to write unguided what it wrote with the rubric's help, in
    the context it sees when it acts. With ``require_success`` only episodes that ended with a
    positive outcome contribute, so the retry is backed by the environment's verifier and not only
    by the rubric. A step whose plain prompt cannot be built gives no pair.
    """
    config = config or ReActConfig()
    pairs = []
    for traj in trajectories:
        if require_success and not (traj.outcome or 0) > 0:
            continue
        for i, s in enumerate(traj.steps):
            failed = s.info.get("failed_action")
            if not s.info.get("retried") or failed is None or failed == s.action:
                continue
            try:
                prompt = act_prompt(config, traj.task, traj.steps[:i])
            except PromptTooLong:
                continue
            pairs.append(
                PairRecord(
                    prompt=prompt,
                    chosen=s.action + "\n",
                    rejected=failed + "\n",
                    source="rubric",
                    task_id=traj.task.id,
                    info={"step": i, "rubric": s.rubric, "verdict": s.info.get("verdict")},
                )
            )
    return pairs
