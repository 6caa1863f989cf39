"""Search over an agent program treeplay did not write: its calls through the gateway form a tree.

The agent program is a callable ``run(task, base_url)`` (sync or async) that talks to the gateway
with any OpenAI client and returns its final answer (or posts its reward itself). Every call it
makes is one node: siblings share the prompt their calls were given, and differ in what the policy
answered.

- ``sample`` mode: ``episodes`` live episodes per task, all from the root. Whole episodes are
  compared: correct-vs-wrong pairs (outcome-level DPO) and one ranked list per task (RFT, TPO).
- ``tree`` mode: after ``width`` live episodes, each expansion picks a node by UCT
  (``Q + c·sqrt(N_parent)/(1+N)``; calls carry no prior) and re-runs the unchanged agent program
  ``width`` times with a *replay table*: the calls on the path to that node are answered from the
  tree (the same tokens, no generation), the next call is sampled, the rest of the episode is live.
  Rewards back up along each episode's path (visits and mean reward per node), and siblings that
  share a prompt give step pairs (best Q vs worst Q, MCTS-DPO's visit-count alpha), trained on the
  ids the policy was given and wrote.

A replayed call whose request differs from the recorded one (an agent program that is not
deterministic given its model's answers) is generated instead and recorded as a divergence: its
node gets the request's own prompt, so it never merges into the recorded node and is never paired
with siblings of another prompt. A call whose history did not extend what was served (the gateway's
drift detection) is likewise its own node with its own prompt.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import inspect
import math
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from treeplay.agents.base import Environment, Policy, Task
from treeplay.agents.gateway.config import AgentConfig, load_callable
from treeplay.agents.gateway.server import Call, Episode, GatewayServer
from treeplay.engines.contract import decode
from treeplay.store.records import (
    ACTION_SPANS,
    NodeRecord,
    PairRecord,
    RankedItem,
    RankedListRecord,
    StepRecord,
    TaskResult,
    TrajectoryRecord,
    TreeRecord,
)


# ------------------------------------------------------------------------------------ the call tree
@dataclass
class Node:
    key: int
    parent: int | None
    call: Call | None  # None at the root
    depth: int
    children: dict[tuple, int] = field(default_factory=dict)
    visits: int = 0
    value_sum: float = 0.0
    ended: list[float] = field(default_factory=list)  # rewards of episodes whose last call this was

    @property
    def q(self) -> float:
        return self.value_sum / self.visits if self.visits else 0.0


@dataclass
class Run:
    """One finished episode: its calls, answer, reward and the path of node keys it took."""

    sid: str
    calls: list[Call]
    branches: list[Any]
    answer: str | None
    reward: float | None
    error: str | None
    path: list[int] = field(default_factory=list)


class CallTree:
    """The tree of one task's calls; nodes are keyed by (prompt ids, completion ids)."""

    def __init__(self) -> None:
        self.nodes: list[Node] = [Node(0, None, None, 0)]
        self.runs: list[Run] = []

    def add(self, run: Run) -> None:
        at = self.nodes[0]
        path = [0]
        for call in run.calls:
            key = (tuple(call.prompt_ids), tuple(call.completion_ids))
            child = at.children.get(key)
            if child is None:
                child = len(self.nodes)
                self.nodes.append(Node(child, at.key, call, at.depth + 1))
                at.children[key] = child
            at = self.nodes[child]
            path.append(child)
        run.path = path
        self.runs.append(run)
        if run.reward is None:  # a failed episode: its calls are kept, it backs nothing up
            return
        at.ended.append(run.reward)
        for k in path:
            self.nodes[k].visits += 1
            self.nodes[k].value_sum += run.reward

    def select(self, width: int, c: float) -> Node | None:
        """The node to expand next: descend by UCT through nodes with ``width`` children already;
        None when every reachable node is exhausted."""
        node = self.nodes[0]
        while True:
            if len(node.children) < width and (node.key == 0 or not self._ends_here(node)):
                return node
            options = [self.nodes[k] for k in node.children.values() if not self._exhausted(self.nodes[k], width)]
            if not options:
                return None
            node = max(options, key=lambda n: n.q + c * math.sqrt(max(1, node.visits)) / (1 + n.visits))

    def _ends_here(self, node: Node) -> bool:
        # An episode that ended after this call: re-running it would end there again.
        return bool(node.ended) and not node.children

    def _exhausted(self, node: Node, width: int) -> bool:
        if self._ends_here(node):
            return True
        if len(node.children) < width:
            return False
        return all(self._exhausted(self.nodes[k], width) for k in node.children.values())

    def replay_for(self, node: Node) -> list[Call]:
        calls: list[Call] = []
        while node.call is not None:
            calls.append(node.call)
            node = self.nodes[node.parent]  # type: ignore[index]
        return calls[::-1]


# --------------------------------------------------------------------------------------- running
class AgentSearch:
    """Runs an agent program on tasks through a gateway server and searches over its calls.

    Args:
        server: A started ``GatewayServer`` whose engine is the policy being trained.
        agent: ``fn(task, base_url)``, sync or async; its return value is the final answer.
        env: The environment the tasks come from (its ``verify(task, answer)`` is the default reward).
        config: ``AgentConfig``.
    """

    def __init__(self, server: GatewayServer, agent: Callable[..., Any], env: Environment | None,
                 config: AgentConfig) -> None:
        self.server = server
        self.gateway = server.gateway
        self.agent = agent
        self.env = env
        self.cfg = config
        self.reward_fn = load_callable(config.reward, "agent.reward") if config.reward else None

    # one episode -------------------------------------------------------------------------------
    def _episode(self, task: Task, replay: list[Call] | None) -> Run:
        sid = uuid.uuid4().hex
        ep: Episode = self.gateway.open(sid, replay=replay, max_calls=self.cfg.max_calls, live=True)
        answer, error = None, None
        try:
            out = self.agent(task, self.server.session_url(sid))
            if inspect.isawaitable(out):
                out = asyncio.run(_awaited(out))
            answer = None if out is None else str(out)
        except Exception as e:  # noqa: BLE001 - an agent program's failure is recorded, not fatal
            error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
        reward = None
        if error is None:
            reward = ep.reward if ep.reward is not None else self._score(task, answer)
        self.gateway.close(sid)
        return Run(sid, list(ep.calls), list(ep.conversation.branches), answer, reward, error)

    def _score(self, task: Task, answer: str | None) -> float:
        if self.reward_fn is not None:
            value = float(self.reward_fn(task, answer))
            if not math.isfinite(value):
                raise ValueError(f"agent.reward returned {value} for task {task.id!r}")
            return value
        verify = getattr(self.env, "verify", None)
        if verify is None:
            raise ValueError("the environment has no verify(task, answer): name agent.reward, or post rewards")
        return 1.0 if answer is not None and verify(task, answer) else 0.0

    def _wave(self, jobs: list[tuple[int, Task, list[Call] | None]]) -> list[tuple[int, Run]]:
        with concurrent.futures.ThreadPoolExecutor(max_workers=self.cfg.concurrency,
                                                   thread_name_prefix="treeplay-agent") as pool:
            futures = [(i, pool.submit(self._episode, task, replay)) for i, task, replay in jobs]
            return [(i, f.result()) for i, f in futures]

    # a chunk of tasks --------------------------------------------------------------------------
    def run(self, tasks: Sequence[Task], environment: str = "") -> list[TaskResult]:
        """Search every task; returns one TaskResult per task, in order."""
        trees = [CallTree() for _ in tasks]
        used = [0] * len(tasks)
        first = self.cfg.episodes if self.cfg.search == "sample" else min(self.cfg.width, self.cfg.episodes)
        jobs = [(i, t, None) for i, t in enumerate(tasks) for _ in range(first)]
        while jobs:
            for i, run in self._wave(jobs):
                trees[i].add(run)
                used[i] += 1
            jobs = []
            if self.cfg.search != "tree":
                break
            for i, task in enumerate(tasks):
                left = self.cfg.episodes - used[i]
                node = trees[i].select(self.cfg.width, self.cfg.c_uct) if left > 0 else None
                if node is None:
                    continue
                replay = trees[i].replay_for(node)
                k = min(left, max(1, self.cfg.width - len(node.children)))
                jobs += [(i, task, replay)] * k
        return [self._result(task, tree, environment) for task, tree in zip(tasks, trees, strict=True)]

    # records -----------------------------------------------------------------------------------
    def _result(self, task: Task, tree: CallTree, environment: str) -> TaskResult:
        tok = self.gateway.tokenizer
        nodes = []
        for n in tree.nodes:
            call = n.call
            mean_lp = (sum(call.logprobs) / len(call.logprobs)) if call is not None and call.logprobs else 0.0
            ended = n.ended and not n.children
            nodes.append(NodeRecord(
                key=n.key, parent_key=n.parent, step=call.text if call is not None else "", depth=n.depth,
                visits=n.visits, value=n.q, prior=math.exp(mean_lp) if math.isfinite(mean_lp) else 0.0,
                reward=(sum(n.ended) / len(n.ended)) if ended else 0.0, terminal=bool(ended),
                correct=(sum(n.ended) / len(n.ended) >= self.cfg.success) if ended else None,
                info=None if call is None else {
                    "prompt_tokens": len(call.prompt_ids), "completion_tokens": len(call.completion_ids),
                    "finish_reason": call.finish_reason, "branch": call.branch,
                    **({"drift": call.drift} if call.drift else {}),
                    **({"divergence": call.divergence} if call.divergence else {}),
                },
            ))
        prompt = decode(tok, tree.runs[0].calls[0].prompt_ids) if tree.runs and tree.runs[0].calls else task.prompt
        result = TaskResult(task_id=task.id, environment=environment, prompt=task.prompt, answer=task.answer,
                            trees=[TreeRecord(task_id=task.id, prompt=prompt, nodes=nodes, environment=environment,
                                              info={"agent_search": self.cfg.search, "episodes": len(tree.runs)})])
        for run in tree.runs:
            result.trajectories.append(TrajectoryRecord(
                task_id=task.id, environment=environment, outcome=run.reward,
                status="ok" if run.error is None else "failed", error=run.error,
                steps=[StepRecord(index=c.index, action=c.text, logprob=float(sum(c.logprobs)) if c.logprobs else None,
                                  info={"replayed": c.replayed, **({"drift": c.drift} if c.drift else {}),
                                        **({"divergence": c.divergence} if c.divergence else {})})
                       for c in run.calls],
                info={"answer": run.answer, "branches": len(run.branches), "nodes": run.path},
            ))
        whole = [w for w in (self._whole(run) for run in tree.runs) if w is not None]
        if self.cfg.search == "tree":
            result.pairs = self._step_pairs(task, tree)
        else:
            result.pairs = self._outcome_pairs(task, whole)
        result.ranked_lists = self._ranked_list(task, whole)
        return result

    def _whole(self, run: Run) -> tuple[Run, list[int], list[int], list[tuple[int, int]]] | None:
        """An episode as one sequence (prompt ids, response ids, policy spans), when it has one
        branch and a reward; None otherwise (a drifted episode is not one sequence)."""
        if run.reward is None or len(run.branches) != 1 or not run.calls:
            return None
        branch = run.branches[0]
        start = len(run.calls[0].prompt_ids)
        mask = branch.mask[start:]
        spans, i = [], 0
        while i < len(mask):
            if mask[i]:
                j = i
                while j < len(mask) and mask[j]:
                    j += 1
                spans.append((i, j))
                i = j
            else:
                i += 1
        return run, branch.ids[:start], branch.ids[start:], spans

    def _char_spans(self, ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
        tok = self.gateway.tokenizer
        return [(len(decode(tok, ids[:a])), len(decode(tok, ids[:b]))) for a, b in spans]

    def _outcome_pairs(self, task: Task, whole: list) -> list[PairRecord]:
        tok = self.gateway.tokenizer
        by_prompt: dict[tuple, list] = {}
        for w in whole:
            by_prompt.setdefault(tuple(w[1]), []).append(w)
        pairs = []
        for group in by_prompt.values():
            good = [w for w in group if w[0].reward >= self.cfg.success]
            bad = [w for w in group if w[0].reward < self.cfg.success]
            for i in range(min(self.cfg.max_pairs, len(good) * len(bad))):
                g, b = good[i % len(good)], bad[(i // len(good) + i) % len(bad)]
                pairs.append(PairRecord(
                    prompt=decode(tok, g[1]), chosen=decode(tok, g[2]), rejected=decode(tok, b[2]), source="sample",
                    margin=g[0].reward - b[0].reward, task_id=task.id,
                    info={ACTION_SPANS: {"chosen": self._char_spans(g[2], g[3]), "rejected": self._char_spans(b[2], b[3])},
                          "tokens": {"prompt": g[1], "responses": [g[2], b[2]], "spans": [g[3], b[3]]}}))
        return pairs

    def _ranked_list(self, task: Task, whole: list) -> list[RankedListRecord]:
        tok = self.gateway.tokenizer
        if not whole:
            return []
        prompt_ids = whole[0][1]
        seen: dict[tuple, Any] = {}
        for w in whole:
            if w[1] == prompt_ids:
                seen.setdefault(tuple(w[2]), w)
        items = list(seen.values())
        return [RankedListRecord(
            prompt=decode(tok, prompt_ids), source="sample", task_id=task.id,
            items=[RankedItem(text=decode(tok, w[2]), score=float(w[0].reward)) for w in items],
            info={"correct": [w[0].reward >= self.cfg.success for w in items],
                  ACTION_SPANS: [self._char_spans(w[2], w[3]) for w in items],
                  "tokens": {"prompt": prompt_ids, "responses": [w[2] for w in items], "spans": [w[3] for w in items]}})]

    def _step_pairs(self, task: Task, tree: CallTree) -> list[PairRecord]:
        from treeplay.search.preferences import label_smoothing

        tok = self.gateway.tokenizer
        pairs = []
        for parent in tree.nodes:
            groups: dict[tuple, list[Node]] = {}
            for key, k in parent.children.items():
                child = tree.nodes[k]
                if child.visits > 0:
                    groups.setdefault(key[0], []).append(child)
            for prompt_ids, kids in groups.items():
                if len(kids) < 2:
                    continue
                kids.sort(key=lambda n: (-n.q, -n.visits, n.key))
                best, worst = kids[0], kids[-1]
                if best.q - worst.q <= self.cfg.min_margin:
                    continue
                ids = list(prompt_ids)
                c_ids, r_ids = list(best.call.completion_ids), list(worst.call.completion_ids)  # type: ignore[union-attr]
                chosen, rejected = decode(tok, c_ids), decode(tok, r_ids)
                pairs.append(PairRecord(
                    prompt=decode(tok, ids), chosen=chosen, rejected=rejected, source="mcts",
                    margin=best.q - worst.q, label_smoothing=label_smoothing(best.visits, worst.visits),
                    chosen_node=best.key, rejected_node=worst.key, chosen_visits=best.visits,
                    rejected_visits=worst.visits, task_id=task.id,
                    info={"parent_node": parent.key, "depth": parent.depth, "chosen_q": best.q, "rejected_q": worst.q,
                          ACTION_SPANS: {"chosen": [(0, len(chosen))], "rejected": [(0, len(rejected))]},
                          "tokens": {"prompt": ids, "responses": [c_ids, r_ids],
                                     "spans": [[(0, len(c_ids))], [(0, len(r_ids))]]}}))
        return pairs


async def _awaited(awaitable: Any) -> Any:
    return await awaitable


def run_agent_rollouts(tasks: Sequence[Task], policy: Any, env: Environment | None, config: AgentConfig,
                       environment: str = "", seed: int = 0) -> tuple[list[TaskResult], dict[str, float]]:
    """Start a gateway in front of ``policy``, search the agent program over ``tasks``, stop it."""
    from treeplay.agents.gateway.server import Gateway

    agent = load_callable(config.entry, "agent.entry")
    gateway = Gateway(policy, default_max_tokens=config.max_tokens, seed=seed, template=config.template)
    with GatewayServer(gateway) as server:
        results = AgentSearch(server, agent, env, config).run(tasks, environment)
    runs = [t for r in results for t in r.trajectories]
    rewards = [t.outcome for t in runs if t.outcome is not None]
    calls = [s for t in runs for s in t.steps]
    return results, {
        "tasks": float(len(tasks)),
        "episodes": float(len(runs)),
        "failed": float(sum(t.status != "ok" for t in runs)),
        "reward": sum(rewards) / max(1, len(rewards)),
        "solved": sum(any((t.outcome or 0.0) >= config.success for t in r.trajectories) for r in results)
        / max(1, len(results)),
        "calls": float(len(calls)),
        "replayed_calls": float(sum(bool((s.info or {}).get("replayed")) for s in calls)),
        "drifts": float(sum("drift" in (s.info or {}) for s in calls)),
        "divergences": float(sum("divergence" in (s.info or {}) for s in calls)),
        "pairs": float(sum(len(r.pairs) for r in results)),
        "lists": float(sum(len(r.ranked_lists) for r in results)),
        "engine_batches": float(gateway.batcher.calls),
        "mean_engine_batch": sum(gateway.batcher.batch_sizes) / max(1, len(gateway.batcher.batch_sizes)),
    }


def evaluate_agent_program(tasks: Sequence[Task], policy: Policy, env: Environment | None, config: AgentConfig,
                           temperature: float, seed: int = 0) -> list[float]:
    """Held-out evaluation of the agent program itself: one episode per task through a gateway that
    samples every call at ``temperature`` (0: greedy) whatever the program asks, scored as rollouts
    are (a posted reward, else ``agent.reward``, else the environment's verifier). An episode that
    fails scores 0. Nothing is searched and nothing is recorded."""
    from treeplay.agents.gateway.server import Gateway

    agent = load_callable(config.entry, "agent.entry")
    gateway = Gateway(policy, default_max_tokens=config.max_tokens, seed=seed, template=config.template,
                      temperature=temperature)
    with GatewayServer(gateway) as server:
        search = AgentSearch(server, agent, env, config)
        runs = search._wave([(i, task, None) for i, task in enumerate(tasks)])
    return [float(run.reward or 0.0) if run.error is None else 0.0 for _, run in sorted(runs, key=lambda r: r[0])]
