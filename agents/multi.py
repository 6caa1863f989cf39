"""Multi-agent mode for any environment: several agents propose each step, a vote picks the action.

    agents = [Agent("a0", policy), Agent("a1", policy), Agent("a2", other_policy)]
    trajs = run_multi_agent_episodes(env_factory, agents, tasks, max_steps=4)

At every step each agent sees the same state (``render(task, executed_steps)``, behind its own
``prompt_prefix``) and proposes one action line. The executed action is the majority vote over
normalised proposals (whitespace collapsed); a tie goes to the tied action proposed by the
earliest agent in ``agents`` order, so the outcome is deterministic. The trajectory's ``steps``
are the executed actions (``agent_id`` = the first agent that proposed the winner,
``info["votes"]`` = the tally); ``trajectory.proposals`` holds every agent's Step at every step
for credit re-assignment (``agents.credit``).

Calls are batched: agents that share a policy object, prefix and temperature are served by ONE
``generate`` call per step with ``n`` = the number of such agents, across all live episodes.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from treeplay.agents.base import Environment, Policy, Step, Task, Trajectory
from treeplay.agents.episode import (
    Render,
    action_line,
    apply_action,
    default_render,
    finish_episode,
    generate_guarded,
    start_episode,
)

VOTE_AGENT_ID = "vote"


@dataclass
class Agent:
    """One voice in a multi-agent episode.

    Attributes:
        agent_id: Recorded on its proposals.
        policy: What writes its actions (several agents may share one).
        prompt_prefix: Text put before the state (a persona, or the clumsy role of ``agents.credit``).
        temperature: Sampling temperature; None uses the runner's.
    """

    agent_id: str
    policy: Policy
    prompt_prefix: str = ""
    temperature: float | None = None


def normalise_action(action: str) -> str:
    """The form proposals are compared in: surrounding space stripped, inner runs of spaces collapsed."""
    return " ".join(action.split())


def majority_vote(proposals: Sequence[tuple[str, str]]) -> tuple[str, str, dict[str, int]]:
    """Pick the executed action from ``(agent_id, action)`` proposals in agent order.

    Returns:
        (action, agent_id of its first proposer, tally of normalised actions).
    """
    if not proposals:
        raise ValueError("majority_vote needs at least one proposal")
    tally = Counter(normalise_action(a) for _, a in proposals)
    best = max(tally.values())
    for agent_id, action in proposals:  # agent order breaks ties
        if tally[normalise_action(action)] == best:
            return action, agent_id, dict(tally)
    raise AssertionError("unreachable")


def propose(
    agents: Sequence[Agent],
    prompts: list,
    max_tokens: int,
    temperature: float,
    stop: Sequence[str] | None,
    seed: int | None,
) -> tuple[list[list[tuple[str, str, float | None]]] | None, str | None]:
    """Every agent's proposal for every prompt: ``out[i]`` = [(agent_id, action, logprob)] in agent order."""
    groups: dict[tuple[int, str, float | None], list[int]] = {}
    for k, a in enumerate(agents):
        groups.setdefault((id(a.policy), a.prompt_prefix, a.temperature), []).append(k)
    table: list[list[tuple[str, str, float | None] | None]] = [[None] * len(agents) for _ in prompts]
    for (_, prefix, temp), members in groups.items():
        policy = agents[members[0]].policy
        texts = [prefix + p if isinstance(p, str) else p for p in prompts]
        outs, err = generate_guarded(
            policy,
            texts,
            len(members),
            max_tokens=max_tokens,
            temperature=temperature if temp is None else temp,
            stop=list(stop) if stop else None,
            seed=seed,
        )
        if outs is None:
            return None, err
        for i, comps in enumerate(outs):
            for k, c in zip(members, comps, strict=True):
                table[i][k] = (agents[k].agent_id, action_line(c.text), c.logprob)
    return [[x for x in row if x is not None] for row in table], None


def run_multi_agent_episodes(
    env_factory: Callable[[], Environment],
    agents: Sequence[Agent],
    tasks: Sequence[Task],
    max_steps: int = 16,
    max_tokens: int = 48,
    temperature: float = 1.0,
    stop: Sequence[str] | None = ("\n",),
    seed: int | None = None,
    step_timeout: float | None = 30.0,
    render: Render = default_render,
) -> list[Trajectory]:
    """Run one voted multi-agent episode per task (arguments as in ``agents.episode.run_episodes``).

    Returns:
        Trajectories with ``agent_id = "vote"``, executed ``steps`` and all ``proposals``.
    """
    if not agents:
        raise ValueError("run_multi_agent_episodes needs at least one agent")
    if len({a.agent_id for a in agents}) != len(agents):
        raise ValueError("agent ids must be distinct")
    eps = [
        start_episode(env_factory(), t, step_timeout, getattr(agents[0].policy, "version", 0)) for t in tasks
    ]
    for e in eps:
        e.traj.agent_id = VOTE_AGENT_ID
        e.traj.info["agents"] = [a.agent_id for a in agents]
    for t in range(max_steps):
        live = [e for e in eps if not e.done]
        if not live:
            break
        prompts = [render(e.traj.task, e.traj.steps) for e in live]
        table, err = propose(
            agents, prompts, max_tokens, temperature, stop, None if seed is None else seed + t
        )
        for i, e in enumerate(live):
            if table is None:
                e.fail(str(err))
                continue
            action, winner, tally = majority_vote([(aid, act) for aid, act, _ in table[i]])
            for aid, act, lp in table[i]:
                executed = normalise_action(act) == normalise_action(action)
                e.traj.proposals.append(Step(t, act, agent_id=aid, logprob=lp, info={"executed": executed}))
            step = apply_action(e, action, step_timeout, agent_id=winner)
            if step is not None:
                step.info["votes"] = tally
    return [finish_episode(e, step_timeout) for e in eps]
