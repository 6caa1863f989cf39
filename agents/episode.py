"""Plain (non-ReAct) episodes: a policy writes one action line at a time, the environment answers.

    traj = run_episode(env, policy, task, max_steps=8)
    trajs = run_episodes(lambda: make_environment("arithmetic", ops=2), policy, tasks)

``run_episodes`` runs many episodes in lock step and asks the policy for the next action of every
live episode in ONE ``generate`` call per step. The prompt of a step is
``transcript(task.prompt, steps_so_far)`` (``render`` replaces it). Environment calls are guarded
(``agents.guards``): one that raises, hangs or returns garbage fails its trajectory with the error
recorded. Environments flag unparseable actions with ``info["invalid"] = True``; the runner counts
them in ``trajectory.info["invalid_actions"]``.

Also here: conversion of trajectories to the store's row records (``trajectory_records``,
``task_result``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from treeplay.agents.base import Completion, Environment, Policy, Prompt, Step, Task, Trajectory, transcript
from treeplay.agents.guards import safe_reset, safe_score, safe_step
from treeplay.store.records import (
    JudgmentRecord,
    PairRecord,
    StepRecord,
    TaskResult,
    TrajectoryRecord,
    jsonable,
)

Render = Callable[[Task, Sequence[Step]], Prompt]


def default_render(task: Task, steps: Sequence[Step]) -> str:
    """The task prompt followed by the steps so far (``agents.base.transcript``)."""
    return transcript(task.prompt, steps)


def action_line(text: str) -> str:
    """An action is one line: the text up to the first newline, stripped of surrounding spaces.

    (Not ``store.database.first_line``, which finds the first non-empty line of an error message.)
    """
    return text.split("\n", 1)[0].strip()


@dataclass
class Episode:
    """A live episode: its environment instance and the trajectory being built."""

    env: Environment
    traj: Trajectory
    done: bool = False
    last_observation: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def fail(self, error: str) -> None:
        self.traj.status, self.traj.error, self.done = "failed", error, True
        self.traj.info["stop_reason"] = "error"


def start_episode(
    env: Environment, task: Task, step_timeout: float | None, policy_version: int = 0
) -> Episode:
    """Reset ``env`` on ``task`` (guarded) and wrap it as a live episode."""
    ep = Episode(env, Trajectory(task=task, policy_version=policy_version, info={"invalid_actions": 0}))
    obs, err = safe_reset(env, task, step_timeout)
    if err is not None:
        ep.fail(err)
    else:
        ep.last_observation = obs or ""
    return ep


def apply_action(ep: Episode, action: str, step_timeout: float | None, **step_fields: Any) -> Step | None:
    """Execute ``action`` in the episode (guarded), append the Step and return it."""
    result, err = safe_step(ep.env, action, step_timeout)
    index = len(ep.traj.steps)
    if result is None:
        ep.traj.steps.append(Step(index, action, "", 0.0, info={"error": err}, **step_fields))
        ep.fail(str(err))
        return ep.traj.steps[-1]
    step = Step(index, action, result.observation, result.reward, info=dict(result.info), **step_fields)
    ep.traj.steps.append(step)
    ep.last_observation = result.observation
    if result.info.get("invalid"):
        ep.traj.info["invalid_actions"] = ep.traj.info.get("invalid_actions", 0) + 1
    if err is not None:
        ep.fail(err)
    elif result.done:
        ep.done = True
        ep.traj.info["stop_reason"] = "done"
    return step


def finish_episode(ep: Episode, step_timeout: float | None) -> Trajectory:
    """Score the trajectory (0.0 when failed) and fill its summary info."""
    traj = ep.traj
    traj.info.setdefault("stop_reason", "max_steps")
    traj.info["total_reward"] = float(sum(s.reward for s in traj.steps))
    if traj.status == "failed":
        traj.outcome = 0.0
        return traj
    score, err = safe_score(ep.env, traj.task, traj, step_timeout)
    if err is not None:
        traj.status, traj.error, traj.outcome = "failed", err, 0.0
    else:
        traj.outcome = score
    return traj


def generate_guarded(
    policy: Policy, prompts: list[Prompt], n: int, **kwargs: Any
) -> tuple[list[list[Completion]] | None, str | None]:
    """``policy.generate`` that turns an exception or a wrongly shaped answer into an error string."""
    try:
        out = policy.generate(prompts, n=n, **kwargs)
    except Exception as e:  # noqa: BLE001 - a failing policy fails these episodes, not the run
        return None, f"policy generate raised {type(e).__name__}: {e}"
    if len(out) != len(prompts) or any(len(c) != n for c in out):
        return None, f"policy generate returned {len(out)} lists for {len(prompts)} prompts (n={n})"
    return out, None


def run_episodes(
    env_factory: Callable[[], Environment],
    policy: Policy,
    tasks: Sequence[Task],
    max_steps: int = 16,
    max_tokens: int = 48,
    temperature: float = 1.0,
    top_p: float = 1.0,
    stop: Sequence[str] | None = ("\n",),
    seed: int | None = None,
    step_timeout: float | None = 30.0,
    render: Render = default_render,
) -> list[Trajectory]:
    """Run one episode per task in lock step, batching the policy's calls across episodes.

    Args:
        env_factory: Makes a fresh environment instance per episode.
        policy: What writes the actions.
        tasks: One episode each; the result is in the same order.
        max_steps: Steps per episode at most (``info["stop_reason"] = "max_steps"`` if reached).
        max_tokens / temperature / top_p / stop: Sampling settings of every call.
        seed: Base seed; step ``t`` uses ``seed + t``.
        step_timeout: Seconds an environment call may take (None: no limit, no thread).
        render: Builds the prompt of a step from the task and the steps so far.

    Returns:
        Trajectories with ``outcome`` = ``env.score`` (0.0 for failed ones).
    """
    eps = [start_episode(env_factory(), t, step_timeout, getattr(policy, "version", 0)) for t in tasks]
    for t in range(max_steps):
        live = [e for e in eps if not e.done]
        if not live:
            break
        prompts = [render(e.traj.task, e.traj.steps) for e in live]
        outs, err = generate_guarded(
            policy,
            prompts,
            1,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            stop=list(stop) if stop else None,
            seed=None if seed is None else seed + t,
        )
        for i, e in enumerate(live):
            if outs is None:
                e.fail(str(err))
                continue
            c = outs[i][0]
            apply_action(e, action_line(c.text), step_timeout, logprob=c.logprob)
    return [finish_episode(e, step_timeout) for e in eps]


def run_episode(
    env: Environment, policy: Policy, task: Task, max_steps: int = 16, **kwargs: Any
) -> Trajectory:
    """One episode on ``env`` (see ``run_episodes`` for the keyword arguments)."""
    return run_episodes(lambda: env, policy, [task], max_steps=max_steps, **kwargs)[0]


# -- records for the store ---------------------------------------------------------------------------


def step_record(step: Step) -> StepRecord:
    """A ``Step`` as the store's ``StepRecord``."""
    return StepRecord(
        index=step.index,
        action=step.action,
        observation=step.observation,
        reward=step.reward,
        agent_id=step.agent_id,
        credit=step.credit,
        rubric=step.rubric,
        logprob=step.logprob,
        info=jsonable(step.info) or None,
    )


def trajectory_records(traj: Trajectory) -> list[TrajectoryRecord]:
    """The executed trajectory, then (multi-agent episodes) one record per agent of its proposals.

    Proposal records carry ``info["role"] = "proposals"`` and their steps' ``credit``; their
    outcome is the episode's outcome.
    """

    def record(steps: Sequence[Step], agent_id: str, info: dict[str, Any] | None) -> TrajectoryRecord:
        return TrajectoryRecord(
            task_id=traj.task.id,
            environment=traj.task.env,
            steps=[step_record(s) for s in steps],
            agent_id=agent_id,
            policy_version=traj.policy_version,
            outcome=traj.outcome,
            status=traj.status,
            error=traj.error,
            info=info,
        )

    by_agent: dict[str, list[Step]] = {}
    for p in traj.proposals:
        by_agent.setdefault(p.agent_id, []).append(p)
    out = [record(traj.steps, traj.agent_id, jsonable(traj.info) or None)]
    out += [record(steps, agent_id, {"role": "proposals"}) for agent_id, steps in by_agent.items()]
    return out


def task_result(
    task: Task,
    trajectories: Sequence[Trajectory] = (),
    pairs: Sequence[PairRecord] = (),
    judgments: Sequence[JudgmentRecord] = (),
) -> TaskResult:
    """Everything agents produced for one task, ready for ``store.queries.write_task_result``."""
    records = [r for t in trajectories for r in trajectory_records(t)]
    return TaskResult(
        task_id=task.id,
        environment=task.env,
        prompt=task.prompt,
        answer=task.answer,
        trajectories=records,
        pairs=list(pairs),
        judgments=list(judgments),
    )


def verify_completion(env: Environment, task: Task, completion: str, success: float = 1.0) -> bool:
    """Whether ``completion`` (actions, one per line) solves ``task`` in ``env``.

    Replays the lines from ``reset`` until the environment says the episode is done and checks that
    its reward there is at least ``success``; text after the end of the episode is ignored, as it
    would be in a real episode (a sampled completion often runs on past its last step). Environment
    errors count as not solved.
    """
    try:
        env.reset(task)
        for line in completion.split("\n"):
            if not line.strip():
                continue
            result = env.step(line)
            if result.done:
                return result.reward >= success
    except Exception:  # noqa: BLE001 - a broken environment means "not verified"
        return False
    return False
