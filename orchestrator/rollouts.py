"""What a rollout worker does with a chunk of tasks, per rollout mode, as plain functions.

    results, stats = run_rollouts(cfg, tasks, policy, env_factory, iteration=3, seed=17)

Modes (``rollout.mode``):
- ``mcts``: MCTS-DPO tree search batched across the chunk's tasks (``search.mcts.search_many``);
  each tree yields step-level pairs and ranked lists (``search.preferences.tree_result``).
- ``sample``: k independent episodes per task; correct-vs-wrong pairs (outcome-level DPO) and one
  ranked list of the task's distinct samples with the verifier's verdicts (what ``learner.algorithm
  = rft``, rejection-sampling fine-tuning, trains on).
- ``agent``: an agent program of the user's, in any framework, through the OpenAI-compatible
  gateway; sample or tree search over its calls (``agents.gateway.search``).
- ``react``, ``panel``, ``multi_agent``: the agents package (rubric-guided ReAct, a panel of peers,
  several agents whose credit a critic re-assigns, or ``rollout.critic=uniform``: the episode's outcome).

Held-out evaluation is here too (``evaluate``: one episode per task, played by the policy alone or,
with ``eval.agent=react``, by the ReAct agent; its answer refined by the SLHF follower first when
``eval.refine_rounds`` > 0, ``refine_answers``).

Every result is a ``store.records.TaskResult`` that the loop writes whole or not at all (a chunk's
tasks in one transaction, ``store.queries.write_task_results``); its pairs and ranked lists say in
``info["policy_version"]`` which weights made them (``stamp_version``), as its trees and trajectories
do in their own column. No Ray here: workers call these functions, and tests call them directly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from treeplay.agents.base import (
    Environment,
    Policy,
    Task,
    Trajectory,
    action_spans,
    step_segments,
    transcript,
)
from treeplay.agents.episode import (
    action_line,
    apply_action,
    finish_episode,
    generate_guarded,
    run_episodes,
    start_episode,
    task_result,
)
from treeplay.orchestrator.config import RunConfig
from treeplay.orchestrator.schedule import chunk_seed
from treeplay.store.records import (
    ACTION_SPANS,
    POLICY_VERSION,
    PairRecord,
    RankedItem,
    RankedListRecord,
    TaskResult,
)

EnvFactory = Callable[[], Environment]


def run_rollouts(
    cfg: RunConfig,
    tasks: Sequence[Task],
    policy: Policy,
    env_factory: EnvFactory,
    iteration: int = 0,
    seed: int | None = None,
) -> tuple[list[TaskResult], dict[str, float]]:
    """Run the configured rollout mode on ``tasks``.

    Returns:
        One TaskResult per task (same order) and summary stats (reward, solved fraction, pairs...).
    """
    seed = chunk_seed(cfg.seed, iteration) if seed is None else seed
    modes = {"mcts": _mcts, "sample": _sample, "react": _react, "panel": _panel, "multi_agent": _multi_agent,
             "agent": _agent}
    mode = modes.get(cfg.rollout.mode)
    if mode is None:
        raise ValueError(f"unknown rollout.mode '{cfg.rollout.mode}'")
    counted = TokenCounter(policy)
    results, stats = mode(cfg, tasks, counted, env_factory, seed)
    stats["generated_tokens"] = float(counted.generated_tokens)
    stamp_version(results, int(getattr(policy, "version", 0) or 0))
    return results, stats


def stamp_version(results: Sequence[TaskResult], version: int) -> None:
    """Record in each pair's and ranked list's ``info`` the weights version that produced it.

    Trees and trajectories carry the version in a column of their own; pairs and lists get it here,
    so that a learner can measure how stale its data is (``learners.guards.within_staleness``).
    """
    for r in results:
        for rec in [*r.pairs, *r.ranked_lists]:
            rec.info = {**(rec.info or {}), POLICY_VERSION: version}


class TokenCounter:
    """A policy that counts the tokens it generates (the generation budget a method spends).

    Everything but ``generate`` is the wrapped policy's own.
    """

    def __init__(self, policy: Policy) -> None:
        self._policy = policy
        self.generated_tokens = 0

    def generate(self, prompts, *args: Any, **kwargs: Any):
        out = self._policy.generate(prompts, *args, **kwargs)
        self.generated_tokens += sum(len(c.token_ids) for samples in out for c in samples)
        return out

    def __getattr__(self, name: str) -> Any:
        return getattr(self._policy, name)


@contextmanager
def _one_env(env_factory: EnvFactory) -> Iterator[Environment]:
    """An environment for code that needs one instance (the agent mode's verifier), closed after."""
    from treeplay.search.expansion import close_env

    env = env_factory()
    try:
        yield env
    finally:
        close_env(env)


def _agent(cfg, tasks, policy, env_factory, seed):
    from treeplay.agents.gateway.search import run_agent_rollouts

    with _one_env(env_factory) as env:
        return run_agent_rollouts(tasks, policy, env, cfg.rollout.agent, environment=cfg.env.name, seed=seed)


def _mcts(cfg, tasks, policy, env_factory, seed):
    from treeplay.search.mcts import search_many
    from treeplay.search.preferences import tree_result

    trees = search_many(tasks, env_factory, policy, cfg.search.model_copy(update={"seed": seed}))
    results = [
        tree_result(
            tree,
            task,
            filter_incorrect=cfg.rollout.pair_filter_incorrect,
            max_pairs=cfg.rollout.max_pairs_per_tree,
        )
        for tree, task in zip(trees, tasks, strict=True)
    ]
    nodes = sum(len(t) for t in trees)
    stats = {
        "tasks": float(len(tasks)),
        "solved": sum(bool(t.solved()) for t in trees) / max(1, len(trees)),
        "nodes": float(nodes),
        "pairs": float(sum(len(r.pairs) for r in results)),
        "lists": float(sum(len(r.ranked_lists) for r in results)),
    }
    return results, stats


def _rendered(t: Trajectory) -> tuple[str, list[list[int]]]:
    """An episode's steps as the policy saw them, and the character spans of its own actions."""
    segments = step_segments(t.steps)
    return "".join(x for x, _ in segments), [list(span) for span in action_spans(segments)]


def _verified(t: Trajectory) -> bool:
    return (t.outcome or 0.0) > 0.5 and t.status == "ok"


def _sample_list(task: Task, trajs: Sequence[Trajectory]) -> list[RankedListRecord]:
    """The task's distinct samples as one list scored by outcome, with the verifier's verdicts.

    Rejection-sampling fine-tuning trains on its verified-correct items (``learner.algorithm=rft``);
    a sample written twice is kept once (RFT de-duplicates reasoning paths).
    """
    seen: dict[str, tuple[Trajectory, list[list[int]]]] = {}
    for t in trajs:
        if t.status != "ok" or not t.steps:
            continue
        text, spans = _rendered(t)
        seen.setdefault(text, (t, spans))
    if not seen:
        return []
    items = [RankedItem(text=text, score=float(t.outcome or 0.0)) for text, (t, _) in seen.items()]
    return [RankedListRecord(
        prompt=task.prompt, items=items, source="sample", task_id=task.id,
        info={"correct": [_verified(t) for t, _ in seen.values()], ACTION_SPANS: [sp for _, sp in seen.values()],
              },
    )]


def _correct_vs_wrong(task: Task, trajs: Sequence[Trajectory], max_pairs: int) -> list[PairRecord]:
    """Pairs (correct sample, wrong sample) for one task, round-robin so each sample is used evenly.

    A response is the episode as the policy saw it (actions and the observations between them,
    ``agents.base.step_segments``); the pair's action spans say which characters the policy wrote.
    """
    good = [t for t in trajs if _verified(t)]
    bad = [t for t in trajs if (t.outcome or 0.0) <= 0.5]
    pairs = []
    for i in range(min(max_pairs, len(good) * len(bad))):
        g, b = good[i % len(good)], bad[(i // len(good) + i) % len(bad)]
        (chosen, chosen_spans), (rejected, rejected_spans) = _rendered(g), _rendered(b)
        pairs.append(PairRecord(
            prompt=task.prompt, chosen=chosen, rejected=rejected, source="sample",
            margin=(g.outcome or 0.0) - (b.outcome or 0.0), task_id=task.id,
            info={ACTION_SPANS: {"chosen": chosen_spans, "rejected": rejected_spans}},
        ))
    return pairs


def _sample(cfg, tasks, policy, env_factory, seed):
    k = cfg.rollout.samples_per_task
    expanded = [t for t in tasks for _ in range(k)]
    trajs = run_episodes(
        env_factory, policy, expanded, max_steps=cfg.rollout.max_steps,
        max_tokens=cfg.rollout.max_step_tokens, temperature=cfg.rollout.temperature, seed=seed,
    )
    results = []
    for i, task in enumerate(tasks):
        mine = trajs[i * k : (i + 1) * k]
        pairs = _correct_vs_wrong(task, mine, cfg.rollout.max_pairs_per_tree)
        result = task_result(task, mine, pairs)
        result.ranked_lists = _sample_list(task, mine)
        results.append(result)
    outcomes = [t.outcome or 0.0 for t in trajs]
    return results, {
        "tasks": float(len(tasks)),
        "reward": sum(outcomes) / max(1, len(outcomes)),
        "solved": sum(any(_verified(t) for t in trajs[i * k : (i + 1) * k]) for i in range(len(tasks)))
        / max(1, len(tasks)),
        "pairs": float(sum(len(r.pairs) for r in results)),
        "lists": float(sum(len(r.ranked_lists) for r in results)),
    }


def _by_task(tasks: Sequence[Task], pairs: Sequence[PairRecord]) -> dict[str, list[PairRecord]]:
    out: dict[str, list[PairRecord]] = {t.id: [] for t in tasks}
    for p in pairs:
        out.setdefault(p.task_id or "", []).append(p)
    return out


def _agent_stats(tasks, trajs, results) -> dict[str, float]:
    outcomes = [t.outcome or 0.0 for t in trajs]
    return {
        "tasks": float(len(tasks)),
        "reward": sum(outcomes) / max(1, len(outcomes)),
        "failed": float(sum(t.status != "ok" for t in trajs)),
        "pairs": float(sum(len(r.pairs) for r in results)),
    }


def _react(cfg, tasks, policy, env_factory, seed):
    """Rubric-guided ReAct (Co-ReAct) or plain ReAct; pairs from verify-and-retry steps."""
    from treeplay.agents.react import ReActAgent, rubric_pairs

    agent = ReActAgent(policy, config=dataclasses.replace(cfg.rollout.react, seed=seed))
    trajs = agent.run_many(env_factory, tasks)
    pairs = _by_task(tasks, rubric_pairs(trajs, agent.config))
    results = [task_result(t, [tr], pairs[t.id]) for t, tr in zip(tasks, trajs, strict=True)]
    return results, _agent_stats(tasks, trajs, results)


# Engines of panel peers that have their own checkpoint, built once per process (a rollout worker
# keeps them across chunks): (engine kind, model path, engine kwargs) -> engine.
_PEER_ENGINES: dict[tuple[str, str, str], Policy] = {}


def _peer_engine(cfg: RunConfig, name: str, path: str) -> Policy:
    """The engine of a panel peer with its own model, built like the worker's (same kind and kwargs)."""
    from pathlib import Path

    from treeplay.engines import make_engine

    key = (cfg.engine.kind, path, repr(sorted(cfg.engine.kwargs.items())))
    if key not in _PEER_ENGINES:
        if not Path(path).is_dir():
            raise ValueError(f"rollout.panel_peers: peer '{name}' has model_path '{path}', not a directory here")
        _PEER_ENGINES[key] = make_engine(cfg.engine.kind, path, seed=cfg.seed, **cfg.engine.kwargs)
    return _PEER_ENGINES[key]


def _panel(cfg, tasks, policy, env_factory, seed):
    """A panel of peers (Panel-of-Peers): every peer samples candidates and scores everyone's.

    The peers are ``rollout.panel_peers``, or ``num_agents`` peers on the worker's engine. A peer
    with a ``model_path`` writes and judges with its own engine (``_peer_engine``; its weights stay
    as loaded); peers on the same engine differ by their sampling seeds, and judge by sampling
    (``panel.judge_temperature``) -- greedy judges on one engine would count as one vote. When the
    tasks have answers, the environment joins as a judge (its ``verify(task, completion)``, or else
    the candidate's lines replayed from ``reset``, ``agents.episode.verify_completion``); it is a verifier: no peer vote can make a
    verified-wrong candidate the chosen side of a pair (agents/panel.py).
    """
    from treeplay.agents.episode import verify_completion
    from treeplay.agents.panel import ExactAnswerJudge, Peer, run_panel

    specs = [(p.name, p.model_path) for p in cfg.rollout.panel_peers] or [
        (f"peer-{i}", None) for i in range(cfg.rollout.num_agents)
    ]
    peers = [Peer(name, policy if path is None else _peer_engine(cfg, name, path)) for name, path in specs]
    judges = []
    if all(t.answer is not None for t in tasks):  # an exact verifier exists: the environment's own
        env = env_factory()
        verify = getattr(env, "verify", None)  # the environment's own check of a whole completion
        check = verify if callable(verify) else (lambda task, text: verify_completion(env, task, text))
        judges = [ExactAnswerJudge(check)]
    panel = run_panel(peers, tasks, dataclasses.replace(cfg.rollout.panel, seed=seed), judges=judges)
    results = [r.task_result() for r in panel]
    aggregates = [c.aggregate for r in panel for c in r.candidates if c.aggregate is not None]
    return results, {
        "tasks": float(len(tasks)),
        "reward": sum(aggregates) / max(1, len(aggregates)),
        "pairs": float(sum(len(r.pairs) for r in results)),
        "judgments": float(sum(len(r.judgments) for r in results)),
    }


def _multi_agent(cfg, tasks, policy, env_factory, seed):
    """Several agents propose each step, a vote executes one, a critic re-assigns credit.

    ``rollout.critic``: "policy" prompts the policy as the critic (CollabUIAgents' LLM critic);
    "step_check" uses the environment's exact step check (``info["step_ok"]``, e.g. arithmetic);
    both add clumsy negatives. "uniform" is the baseline without re-assignment: no critic, no
    clumsy negatives, every executed step credited with the episode's outcome (``OutcomeCredit``).
    """
    from treeplay.agents.credit import OutcomeCredit, PolicyCritic, StepCheckCritic, assign_credit
    from treeplay.agents.multi import Agent, run_multi_agent_episodes

    agents = [Agent(f"agent-{i}", policy) for i in range(cfg.rollout.num_agents)]
    trajs = run_multi_agent_episodes(
        env_factory, agents, tasks, max_steps=cfg.rollout.max_steps, max_tokens=cfg.rollout.max_step_tokens,
        temperature=cfg.rollout.temperature, seed=seed,
    )
    critics = {"step_check": lambda: StepCheckCritic(env_factory), "policy": lambda: PolicyCritic(policy),
               "uniform": OutcomeCredit}
    critic = critics[cfg.rollout.critic]()
    uniform = cfg.rollout.critic == "uniform"
    pairs = _by_task(tasks, assign_credit(trajs, critic, agents, clumsy=not uniform, seed=seed))
    results = [task_result(t, [tr], pairs[t.id]) for t, tr in zip(tasks, trajs, strict=True)]
    return results, _agent_stats(tasks, trajs, results)


EVAL_SEED_OFFSET = 12345  # held-out episodes are seeded apart from the rollouts: run seed + this
STEP_TIMEOUT_S = 30.0  # an environment call of a replayed refined answer (run_episodes' default)


def evaluate(
    cfg: RunConfig, tasks: Sequence[Task], policy: Policy, env_factory: EnvFactory, temperature: float = 0.0
) -> list[float]:
    """Outcome of one episode per held-out task (greedy at temperature 0).

    ``eval.agent = "program"`` runs the agent program of ``rollout.agent`` once per task through a
    gateway that samples every call at ``temperature``. ``eval.agent = "react"`` plays each episode with the ReAct agent (``rollout.react``, its actions
    at ``temperature``; the rubric generator and verifier keep their own settings), one task at a
    time; otherwise the episodes run in lock step, prompted with their transcripts. With
    ``eval.refine_rounds = k > 0`` (SLHF) the episode's answer is refined k times by the follower
    before it is scored (``refine_answers``).
    """
    if cfg.eval.agent == "program":
        from treeplay.agents.gateway.search import evaluate_agent_program

        with _one_env(env_factory) as env:
            return evaluate_agent_program(tasks, policy, env, cfg.rollout.agent, temperature,
                                          seed=cfg.seed + EVAL_SEED_OFFSET)
    if cfg.eval.agent == "react":
        from treeplay.agents.react import ReActAgent

        agent = ReActAgent(policy, config=dataclasses.replace(
            cfg.rollout.react, temperature=temperature, seed=cfg.seed + EVAL_SEED_OFFSET))
        return [float(t.outcome or 0.0) for t in agent.run_many(env_factory, tasks)]
    trajs = run_episodes(
        env_factory, policy, tasks, max_steps=cfg.rollout.max_steps,
        max_tokens=cfg.rollout.max_step_tokens, temperature=temperature, seed=cfg.seed + EVAL_SEED_OFFSET,
    )
    if cfg.eval.refine_rounds:
        trajs = refine_answers(cfg, trajs, policy, env_factory, temperature)
    return [float(t.outcome or 0.0) for t in trajs]


def refine_answers(
    cfg: RunConfig, trajs: Sequence[Trajectory], policy: Policy, env_factory: EnvFactory, temperature: float
) -> list[Trajectory]:
    """SLHF's inference-time refinement of finished episodes (``SLHFLearner.refine`` on the engine).

    The leader's answer is the episode as the policy wrote it (its steps rendered as in a
    transcript). Each of ``eval.refine_rounds`` rounds asks the policy with the follower prompt the
    SLHF learner trains on (``fill_follower_prompt``, template ``learner.slhf.follower_prompt``),
    showing only the latest answer, for one completion to EOS of at most ``learner.slhf.max_new_tokens``
    (fewer where the model's context has less room), at ``temperature``. The last answer is then
    played as an episode: its non-empty lines are the actions, from ``reset`` until the episode
    ends or ``rollout.max_steps`` (what the SLHF oracle does with an answer), and scored as any
    episode. An episode that failed, a follower prompt that does not fit the context, or a failed
    ``generate`` gives a failed trajectory (outcome 0) with the reason.

    Returns:
        One trajectory per input, in order: the refined answer's, with ``info["refined_from"]`` the
        leader's answer and ``info["refinements"]`` every follower answer.
    """
    from treeplay.learners.slhf import fill_follower_prompt, load_follower_template

    template = load_follower_template(cfg.learner.slhf.follower_prompt)
    answers = [transcript("", t.steps) for t in trajs]
    chains: list[list[str]] = [[] for _ in trajs]
    errors: list[str | None] = [(t.error or "the episode failed") if t.status != "ok" else None for t in trajs]
    for r in range(cfg.eval.refine_rounds):
        live = [i for i, e in enumerate(errors) if e is None]
        prompts = {i: fill_follower_prompt(template, trajs[i].task.prompt, answers[i]) for i in live}
        budgets: dict[int, list[int]] = {}
        for i, p in prompts.items():
            budget = _answer_budget(policy, p, cfg.learner.slhf.max_new_tokens)
            if budget < 1:
                errors[i] = "the follower prompt leaves no room for an answer in the model's context"
            else:
                budgets.setdefault(budget, []).append(i)
        for budget, idx in sorted(budgets.items()):
            outs, err = generate_guarded(
                policy, [prompts[i] for i in idx], 1, max_tokens=budget, temperature=temperature,
                seed=cfg.seed + EVAL_SEED_OFFSET + 1000 * (r + 1) + budget,
            )
            for n, i in enumerate(idx):
                if outs is None:
                    errors[i] = f"refinement round {r + 1}: {err}"
                else:
                    answers[i] = outs[n][0].text
                    chains[i].append(answers[i])
    out = []
    for t, answer, chain, error in zip(trajs, answers, chains, errors, strict=True):
        ep = start_episode(env_factory(), t.task, STEP_TIMEOUT_S, policy_version=t.policy_version)
        if error is not None:
            ep.fail(error)
        for line in (line for line in answer.split("\n") if line.strip()):
            if ep.done or len(ep.traj.steps) >= cfg.rollout.max_steps:
                break
            apply_action(ep, action_line(line), STEP_TIMEOUT_S)
        ep.traj.info.update(refined_from=transcript("", t.steps), refinements=chain)
        out.append(finish_episode(ep, STEP_TIMEOUT_S))
    return out


def _answer_budget(policy: Policy, prompt: str, limit: int) -> int:
    """``limit`` new tokens, or fewer where the prompt leaves less room in the engine's context
    (engines expose ``encode`` and ``max_len``; other policies get ``limit``)."""
    encode, max_len = getattr(policy, "encode", None), getattr(policy, "max_len", None)
    if not callable(encode) or not isinstance(max_len, int):
        return limit
    return min(limit, max_len - len(encode(prompt, prompt=True)))


