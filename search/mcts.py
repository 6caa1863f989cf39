"""MCTS over reasoning steps (MCTS-DPO), batched across many trees at once.

One tree per task; a node is a partial solution, an edge one step (an environment action, one line).
Per tree the search follows MCTS-DPO (Xie et al. 2024; our account: docs/algorithms.md §2):

1. **Select** from the current search root by PUCT,
   ``Q(s,a) + c_puct · p(a|s) · sqrt(N(s)) / (1 + N(s,a))``, with the length-normalised prior
   ``p = exp(Σ log π(a) / L^λ)`` (L = tokens of the step, λ = ``length_penalty``).
2. **Expand** the leaf: sample ``root_width`` (tree root) or ``width`` candidate steps from the policy
   (stop at a newline), drop empty and near-duplicate steps (normalised text), keep at most
   ``breadth_limit``; step each candidate in the environment (replaying the path from ``reset``).
3. **Evaluate** every new child at once, no rollouts: value ``v = C / max(depth_parent − 3, 1)``
   where C is the policy's own probability that the partial solution is correct (self-evaluation,
   optional; when C is 0 or off, ``v = v_parent``), plus the outcome O (+1 correct / −1 wrong) at
   terminal nodes. The edge reward is the value increment ``r = v − v_parent`` and a new child
   starts at ``Q = V(parent) + r``, ``N = 0``.
4. Keep **expanding greedily** (PUCT among the new children) until a terminal node or ``depth_limit``
   steps below the search root, then **back up**: leaf ``Q = r + γV``; every ancestor
   ``V = Σ max(1,N_c)·Q_c / Σ max(1,N_c)`` over all its children, ``N += 1``, ``Q = r + γV``.
5. **Receding horizon**: after ``iterations`` iterations (× ``first_root_multiplier`` at the tree
   root) commit the root to the child with the largest ``N_c·(1 + gap_c)`` (gap = max − min visits
   among c's children; ties by Q then V), keep every child's N and Q as they are at that moment
   (``commit_visits``, ``commit_value``: the pair statistics), mark it ``selected`` and repeat until the root is terminal
   or ``max_depth`` is reached.

**Batching across trees** is the point of this module: ``search_many`` advances every active tree to
its next expansion, then makes ONE ``policy.generate`` call carrying the leaves of all trees
(``n`` = the widest k asked for in the wave; narrower requests use the first k samples) and ONE
``policy.score`` call for all self-evaluations of the wave. Without it MCTS is a chain of tiny calls.
Its settings and the per-tree search state are ``search/state.py``; this module holds the formulas of selection (``puct``), the schedule (which leaf each
tree needs next, backup, root commits) and the driver; the wave itself (steps 2 and 3: candidates,
environments, self-evaluation, new children) is ``search/expansion.py``.

**Token in, token out.** With a policy that tokenizes (``encode``/``align``, as both engines do), the
tree keeps token ids: the prompt's at the root, each step's as the policy sampled them (plus the
characters a stop string cut out of a straddling token, and the newline, tokenized alone; see
``contract.align_ids``) and each observation's. Every expansion prompts the policy with the ids of
its path (``agents.base.TokenIds``), never with re-tokenized text, so a step is generated in exactly
the context the learner will score it in, whatever a merging tokenizer would make of the text.
Policies without ``encode`` (scripted test policies) get text, as before.

Robustness: an empty step, a step holding a NUL byte (a byte-level model can sample one), a policy error or an environment exception becomes a terminal child with
``error`` set (failed outcome, no environment reward); the search goes on. Nothing loops forever:
each iteration ends at a terminal node or the depth limit, each root gets a fixed number of
iterations, the committed path stops at ``max_depth``, and ``time_limit_s`` stops the whole batch
(trees then commit greedily along what was already expanded).

Deviations from the MCTS-DPO code, with reasons, are listed in docs/search.md and commented in the code.

Example:
    >>> trees = search_many(tasks, lambda: ArithmeticEnv(ops=2), engine, MCTSConfig(iterations=4))
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

from treeplay.agents.base import Environment, Policy, Task
from treeplay.search.expansion import close_env, expand_wave
from treeplay.search.state import MCTSConfig, TreeRun
from treeplay.search.tree import PreferenceTree


def puct(q: float, p: float, parent_visits: int, visits: int, c_puct: float) -> float:
    """PUCT score of a child.

    ``sqrt(max(N_parent, 1))``: the reference code backs up after every expansion of the greedy
    chain, so a freshly expanded node already has N = 1 when its children are compared; we back up
    once per iteration, and the floor keeps the prior in play at that first comparison.
    """
    return q + c_puct * p * math.sqrt(max(parent_visits, 1)) / (1 + visits)


def search_many(
    tasks: Sequence[Task],
    env_factory: Callable[[], Environment],
    policy: Policy,
    config: MCTSConfig | None = None,
) -> list[PreferenceTree]:
    """Search a tree per task, all at once, batching every policy call across the trees.

    Args:
        tasks: The problems; one tree each, in this order.
        env_factory: Returns a fresh environment instance (instances are reused via ``reset``).
        policy: Samples candidate steps (``generate``) and, with ``self_eval``, scores verdicts.
        config: Search settings; defaults to ``MCTSConfig()``.

    Returns:
        One ``PreferenceTree`` per task with the committed path marked ``selected``; search
        statistics are in ``tree.info["search"]``.
    """
    cfg = config or MCTSConfig()
    start = time.monotonic()
    version = int(getattr(policy, "version", 0) or 0)
    tokens = policy if callable(getattr(policy, "encode", None)) and callable(getattr(policy, "align", None)) else None
    runs = []
    for i, task in enumerate(tasks):
        tree = PreferenceTree(task.prompt, task_id=task.id, environment=task.env, policy_version=version)
        tree[tree.root]["selected"] = True
        if tokens is not None:
            tree[tree.root]["token_ids"] = list(tokens.encode(task.prompt, prompt=True))
        runs.append(TreeRun(i, task, tree, tree.root, cfg.iterations * cfg.first_root_multiplier, tokens=tokens))

    waves = generate_calls = score_calls = 0
    while True:
        requests = [(run, node) for run in runs if (node := _next_expansion(run, cfg)) is not None]
        if not requests:
            break
        if cfg.time_limit_s is not None and time.monotonic() - start >= cfg.time_limit_s:
            for run, _ in requests:
                run.stopped = "time_limit"
            break
        calls = expand_wave(requests, env_factory, policy, cfg, waves, version)
        generate_calls += calls[0]
        score_calls += calls[1]
        waves += 1

    elapsed = time.monotonic() - start
    for run in runs:
        if run.stopped:
            _commit_greedily(run)
        run.tree.info["search"] = {
            "stopped": run.stopped,
            "expansions": run.expansions,
            "env_steps": run.env_steps,
            "nodes": len(run.tree),
            "waves": waves,
            "generate_calls": generate_calls,
            "score_calls": score_calls,
            "batch_trees": len(runs),
            "seconds": round(elapsed, 4),
            "solved": run.tree.solved(),
        }
        run.tree.info["config"] = cfg.model_dump()
        for env in [*run.parked.values(), *run.free]:
            close_env(env)
        run.parked.clear()
        run.free.clear()
    return [run.tree for run in runs]


def search(
    task: Task, env_factory: Callable[[], Environment], policy: Policy, config: MCTSConfig | None = None
) -> PreferenceTree:
    """One tree, unbatched: ``search_many([task], ...)[0]``."""
    return search_many([task], env_factory, policy, config)[0]


# --------------------------------------------------------------------------------- schedule
def _stops_chain(tree: PreferenceTree, node: int, root: int, cfg: MCTSConfig) -> bool:
    d = tree[node]
    return bool(d["terminal"]) or d["depth"] - tree[root]["depth"] >= cfg.depth_limit


def _puct_child(tree: PreferenceTree, node: int, cfg: MCTSConfig) -> int:
    n_parent = tree[node]["visits"]
    return max(
        tree.children(node),
        key=lambda c: puct(tree[c]["value"], tree[c]["prior"], n_parent, tree[c]["visits"], cfg.c_puct),
    )


def _next_expansion(run: TreeRun, cfg: MCTSConfig) -> int | None:
    """Advance one tree (backups, root commits) to the next node it needs expanded; None when done."""
    tree = run.tree
    while not run.done:
        if run.path is None:
            if run.iters_left <= 0:
                _commit(run, cfg)
                continue
            run.iters_left -= 1
            path = [run.root]
            while tree.children(path[-1]) and not _stops_chain(tree, path[-1], run.root, cfg):
                path.append(_puct_child(tree, path[-1], cfg))
            run.path = path
        leaf = run.path[-1]
        if _stops_chain(tree, leaf, run.root, cfg):
            _backup(tree, run.path, cfg.gamma)
            run.path = None
        elif leaf in run.expanded:
            if not tree.children(leaf):  # cannot happen (expansion always adds a child); stay safe
                tree[leaf].update(terminal=True, correct=False, error="expansion produced no children")
                continue
            run.path.append(_puct_child(tree, leaf, cfg))
        else:
            return leaf
    return None


def _commit(run: TreeRun, cfg: MCTSConfig) -> None:
    """Receding horizon: move the search root to its most visited child (visits × (1 + gap))."""
    tree = run.tree
    kids = tree.children(run.root)
    if tree[run.root]["terminal"] or not kids:
        run.done = True
        return

    def key(c: int) -> tuple[float, float, float]:
        grand = [tree[g]["visits"] for g in tree.children(c)]
        gap = (max(grand) - min(grand)) if grand else 0
        return (tree[c]["visits"] * (1 + gap), tree[c]["value"], tree[c]["V"])

    best = max(kids, key=key)
    _snapshot(tree, kids)
    tree[best]["selected"] = True
    run.root = best
    run.iters_left = cfg.iterations
    if tree[best]["terminal"] or tree[best]["depth"] >= cfg.max_depth:
        run.done = True


def _snapshot(tree: PreferenceTree, kids: list[int]) -> None:
    """Keep each child's N and Q as they are when the step among them is committed.

    MCTS-DPO makes a level's pair from these numbers (the authors' trainer records the children's
    Q and N right after each search, before the next one starts below the committed child), not
    from the finished tree, where the committed child keeps gaining visits and value from the
    searches below it and its unselected siblings stay as they were.
    """
    for c in kids:
        tree[c]["commit_visits"] = int(tree[c]["visits"])
        tree[c]["commit_value"] = float(tree[c]["value"])


def _commit_greedily(run: TreeRun) -> None:
    """After a time-out: follow the same rule along what is already expanded, with no new calls."""
    tree = run.tree
    node = run.root
    while kids := tree.children(node):
        _snapshot(tree, kids)
        node = max(kids, key=lambda c: (tree[c]["visits"], tree[c]["value"], tree[c]["V"]))
        tree[node]["selected"] = True
    run.root = node
    run.done = True


def _backup(tree: PreferenceTree, path: list[int], gamma: float) -> None:
    """MCTS-DPO backup along ``path`` (search root first), once per iteration."""
    leaf = tree[path[-1]]
    leaf["value"] = leaf["reward"] + gamma * leaf["V"]
    leaf["visits"] += 1
    for n in reversed(path[:-1]):
        d = tree[n]
        kids = [tree[c] for c in tree.children(n)]
        weights = [max(1, k["visits"]) for k in kids]
        d["V"] = sum(w * k["value"] for w, k in zip(weights, kids, strict=True)) / sum(weights)
        d["visits"] += 1
        if n != tree.root:  # the tree root has no incoming step, hence no Q
            d["value"] = d["reward"] + gamma * d["V"]


__all__ = ["puct", "search", "search_many"]
