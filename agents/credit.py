"""Credit re-assignment for multi-agent episodes (CollabUIAgents, docs/algorithms.md section 7).

    trajs = run_multi_agent_episodes(env_factory, agents, tasks)
    pairs = assign_credit(trajs, PolicyCritic(critic_policy), agents=agents)   # clumsy negatives on
    # every proposal now has Step.credit in [0, 1]; pairs are PairRecord(source="credit")

1. **Clumsy negatives** (``add_clumsy_proposals``): at every executed state each agent is asked
   again behind the "very clumsy agent" prompt (``credit_clumsy.txt``) for a plausible but wrong
   action; these join ``trajectory.proposals`` as ``<agent_id>:clumsy`` with ``info["clumsy"]``.
2. **Critic**: every proposal at every state gets a credit in [0, 1].
   ``PolicyCritic`` asks a policy (``credit_critic.txt``) with proposals labelled ``agent_1..k`` and
   reads ``agent_i: s`` pairs after ``Score:`` (clipped to [0, 1]; a missing or garbled score leaves
   the credit None; a prompt whose instructions, question and proposals do not fit
   ``max_prompt_chars`` -- only the middle of the earlier steps is ever cut -- is not sent, and its
   proposals keep credit None with the reason in ``info["credit_error"]``); ``StepCheckCritic`` replays the state in a fresh environment and credits 1.0 if
   the environment reports the step correct (``info["step_ok"]``, e.g. arithmetic) -- meaningful
   even with a tiny model. ``OutcomeCredit`` is the baseline without re-assignment (used without
   clumsy negatives): no critic, every executed step is credited with the episode's outcome.
   An executed Step's credit is the mean credit of the proposals equal to it.
3. **Pairs** (``credit_pairs``), per (state, agent), same prompt (the state's transcript): if the
   agent's own proposal has credit >= ``high``, it is chosen over the lowest-credit alternative at
   the state (preferring the agent's own clumsy action); otherwise the best proposal at the state is
   chosen over the agent's. A pair needs a credit margin >= ``min_margin``; duplicates are merged.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from treeplay.agents.base import Environment, Policy, Step, Trajectory, transcript
from treeplay.agents.episode import apply_action, generate_guarded, start_episode
from treeplay.agents.multi import Agent, normalise_action, propose
from treeplay.agents.prompt_files import Cut, PromptTooLong, fill_fit, load_prompt
from treeplay.store.records import PairRecord

CLUMSY_SUFFIX = ":clumsy"
_SCORE = re.compile(r"agent[_\s-]*(\d+)\s*[:=]\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


@dataclass
class CreditState:
    """One state to score: a trajectory, the step index, and the proposals made there."""

    traj: Trajectory
    index: int
    proposals: list[Step]

    @property
    def prompt(self) -> str:
        """The state as the agents saw it."""
        return transcript(self.traj.task.prompt, self.traj.steps[: self.index])


class Critic(Protocol):
    """Scores every proposal of every state in [0, 1] (None = no usable score)."""

    def score_states(self, states: Sequence[CreditState]) -> list[list[float | None]]: ...


def parse_critic_scores(text: str, k: int) -> list[float | None]:
    """``agent_i: s`` scores for agents 1..k from untrusted text, clipped to [0, 1].

    Only the part after the last ``Score:`` is read when there is one; the first score of an agent
    counts; other numbers are ignored.
    """
    text = str(text)
    cut = text.lower().rfind("score:")
    body = text[cut:] if cut >= 0 else text
    out: list[float | None] = [None] * k
    for m in _SCORE.finditer(body):
        i = int(m.group(1)) - 1
        if 0 <= i < k and out[i] is None:
            out[i] = min(1.0, max(0.0, float(m.group(2))))
    return out


class PolicyCritic:
    """An LLM critic: one ``generate`` call (greedy) for all states of a batch.

    Args:
        policy: The critic model.
        max_tokens: Budget of its answer.
        max_prompt_chars: Longest prompt (small models): the middle of the earlier steps may be cut,
            the instructions, question and proposals never (``agents.prompt_files.fit``).
    """

    def __init__(self, policy: Policy, max_tokens: int = 128, max_prompt_chars: int | None = None) -> None:
        self.policy = policy
        self.max_tokens = max_tokens
        self.max_prompt_chars = max_prompt_chars

    def prompt(self, state: CreditState) -> str:
        """The critic's prompt for ``state``; ``PromptTooLong`` if its fixed parts do not fit."""
        labels = [f"agent_{i + 1}" for i in range(len(state.proposals))]
        question = state.traj.task.prompt
        steps = transcript("", state.traj.steps[: state.index]).rstrip()
        return fill_fit(
            load_prompt("credit_critic.txt"),
            self.max_prompt_chars,
            "credit critic prompt",
            state=[question.lstrip(), Cut(steps)] if steps else question.strip(),
            proposals="\n".join(f"{lab}: {p.action}" for lab, p in zip(labels, state.proposals, strict=True)),
            score_template="{" + ", ".join(f"{lab}: <0-1>" for lab in labels) + "}",
        )

    def score_states(self, states: Sequence[CreditState]) -> list[list[float | None]]:
        out: list[list[float | None]] = [[None] * len(s.proposals) for s in states]
        prompts: dict[int, str] = {}
        for k, s in enumerate(states):
            try:
                prompts[k] = self.prompt(s)
            except PromptTooLong as e:
                _no_credit(s, str(e))
        if not prompts:
            return out
        outs, err = generate_guarded(
            self.policy, list(prompts.values()), 1, max_tokens=self.max_tokens, temperature=0.0
        )
        for n, k in enumerate(prompts):
            if outs is None:
                _no_credit(states[k], str(err))
            else:
                out[k] = parse_critic_scores(outs[n][0].text, len(states[k].proposals))
        return out


def _no_credit(state: CreditState, reason: str) -> None:
    """Record on every proposal of ``state`` why the critic gave it no credit."""
    for p in state.proposals:
        p.info["credit_error"] = reason


class StepCheckCritic:
    """A verifier-backed critic: replays the state in a fresh environment and steps each proposal.

    Credit is 1.0 if the step result's ``info[key]`` is true, else 0.0 (None if the environment
    fails). Costs one replay per proposal; meant for small environments with exact step checks.

    Args:
        env_factory: Makes fresh environment instances.
        key: The info flag that says a step is correct.
        step_timeout: Seconds an environment call may take.
    """

    def __init__(
        self, env_factory: Callable[[], Environment], key: str = "step_ok", step_timeout: float | None = 10.0
    ) -> None:
        self.env_factory = env_factory
        self.key = key
        self.step_timeout = step_timeout

    def _check(self, state: CreditState, action: str) -> float | None:
        ep = start_episode(self.env_factory(), state.traj.task, self.step_timeout)
        for s in state.traj.steps[: state.index]:
            if ep.done:
                return None
            apply_action(ep, s.action, self.step_timeout)
        if ep.done:
            return None
        step = apply_action(ep, action, self.step_timeout)
        if ep.traj.status == "failed" or step is None:
            return None
        return 1.0 if step.info.get(self.key) else 0.0

    def score_states(self, states: Sequence[CreditState]) -> list[list[float | None]]:
        return [[self._check(s, p.action) for p in s.proposals] for s in states]


class OutcomeCredit:
    """Uniform credit, the baseline credit re-assignment is measured against: no critic.

    Every proposal equal to the executed action at a state (after ``normalise_action``) gets the
    episode's outcome (clipped to [0, 1]), at every step alike, so each executed step, and every
    agent that voted for it, is credited with the outcome. A proposal the vote passed over gets
    ``1 - outcome``: the outcome is all this baseline knows, so the road not taken counts as worse
    than the executed action in an episode that succeeded and as better in one that failed. Within
    a failed episode a correct first step is therefore blamed with the rest, which is what a critic
    that scores each step is meant to fix. A failed trajectory (an environment or policy error) has
    no outcome to share: its proposals keep credit None.
    """

    def score_states(self, states: Sequence[CreditState]) -> list[list[float | None]]:
        out: list[list[float | None]] = []
        for s in states:
            if s.traj.status != "ok" or s.traj.outcome is None:
                out.append([None] * len(s.proposals))
                continue
            outcome = min(1.0, max(0.0, float(s.traj.outcome)))
            executed = normalise_action(s.traj.steps[s.index].action)
            out.append([outcome if normalise_action(p.action) == executed else 1.0 - outcome for p in s.proposals])
        return out


def credit_states(trajectories: Sequence[Trajectory]) -> list[CreditState]:
    """Every executed state that has proposals, in order."""
    out = []
    for traj in trajectories:
        by_index: dict[int, list[Step]] = {}
        for p in traj.proposals:
            by_index.setdefault(p.index, []).append(p)
        out += [CreditState(traj, i, ps) for i, ps in sorted(by_index.items()) if i < len(traj.steps)]
    return out


def add_clumsy_proposals(
    trajectories: Sequence[Trajectory],
    agents: Sequence[Agent],
    max_tokens: int = 48,
    temperature: float = 1.0,
    seed: int | None = None,
) -> int:
    """Ask each agent, behind the clumsy prompt, for a wrong action at every executed state.

    Returns:
        How many clumsy proposals were added (a failing policy adds none).
    """
    states = [(traj, t) for traj in trajectories for t in range(len(traj.steps))]
    if not states or not agents:
        return 0
    clumsy = [
        Agent(
            a.agent_id + CLUMSY_SUFFIX,
            a.policy,
            load_prompt("credit_clumsy.txt") + a.prompt_prefix,
            a.temperature,
        )
        for a in agents
    ]
    prompts = [transcript(traj.task.prompt, traj.steps[:t]) for traj, t in states]
    table, _ = propose(clumsy, prompts, max_tokens, temperature, ("\n",), seed)
    if table is None:
        return 0
    added = 0
    for (traj, t), row in zip(states, table, strict=True):
        for aid, act, lp in row:
            traj.proposals.append(
                Step(t, act, agent_id=aid, logprob=lp, info={"clumsy": True, "executed": False})
            )
            added += 1
    return added


def assign_credit(
    trajectories: Sequence[Trajectory],
    critic: Critic,
    agents: Sequence[Agent] | None = None,
    clumsy: bool = True,
    high: float = 0.5,
    min_margin: float = 0.25,
    seed: int | None = None,
) -> list[PairRecord]:
    """Clumsy negatives (if ``agents`` and ``clumsy``), critic credits on every proposal and
    executed step, then per (state, agent) pairs.

    Returns:
        ``PairRecord(source="credit")`` for all trajectories.
    """
    if clumsy and agents:
        add_clumsy_proposals(trajectories, agents, seed=seed)
    states = credit_states(trajectories)
    for state, credits in zip(states, critic.score_states(states), strict=True):
        for p, c in zip(state.proposals, credits, strict=True):
            p.credit = c
        executed = state.traj.steps[state.index]
        same = [
            p.credit
            for p in state.proposals
            if p.credit is not None and normalise_action(p.action) == normalise_action(executed.action)
        ]
        executed.credit = sum(same) / len(same) if same else None
    return [pair for traj in trajectories for pair in credit_pairs(traj, high, min_margin)]


def credit_pairs(traj: Trajectory, high: float = 0.5, min_margin: float = 0.25) -> list[PairRecord]:
    """Per (state, agent) preference pairs from credited proposals (see the module docstring)."""
    pairs: dict[tuple[str, str, str], PairRecord] = {}
    for state in credit_states([traj]):
        scored = [p for p in state.proposals if p.credit is not None]
        if len(scored) < 2:
            continue
        prompt = state.prompt
        for own in (p for p in scored if not p.info.get("clumsy")):
            others = [
                p
                for p in scored
                if p is not own and normalise_action(p.action) != normalise_action(own.action)
            ]
            if not others:
                continue
            if own.credit >= high:
                mine = [p for p in others if p.agent_id == own.agent_id + CLUMSY_SUFFIX]
                rejected = min(mine or others, key=lambda p: p.credit)
                if mine and own.credit - rejected.credit < min_margin:
                    rejected = min(others, key=lambda p: p.credit)
                chosen = own
            else:
                chosen, rejected = max(others, key=lambda p: p.credit), own
            margin = chosen.credit - rejected.credit
            if margin < min_margin:
                continue
            key = (prompt, chosen.action, rejected.action)
            if key in pairs:
                pairs[key].info["agents"].append(own.agent_id)
                continue
            pairs[key] = PairRecord(
                prompt=prompt,
                chosen=chosen.action + "\n",
                rejected=rejected.action + "\n",
                source="credit",
                margin=margin,
                shared_prefix_chars=len(os.path.commonprefix([chosen.action, rejected.action])),
                task_id=traj.task.id,
                info={
                    "agents": [own.agent_id],
                    "step": state.index,
                    "chosen_agent": chosen.agent_id,
                    "rejected_agent": rejected.agent_id,
                    "rejected_clumsy": bool(rejected.info.get("clumsy")),
                },
            )
    return list(pairs.values())
