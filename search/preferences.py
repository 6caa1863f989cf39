"""What a learner keeps of a search tree: step-level pairs (DPO), ranked lists (TPO), and pair selection.

- ``step_pairs``: MCTS-DPO's pairs. Walk the selected path; at each level the children of the path
  node are the alternatives for the next step. Chosen = the highest-Q child, rejected = the lowest
  (or the second best with ``choose_worst=False``). Each candidate is its step plus any forced
  single-child continuation below it; the prompt is the transcript up to the branching point. A
  candidate's text includes the environment's observations between its steps (the context the policy
  saw), and ``info["action_spans"]`` marks the characters the policy wrote: learners train on those
  only (the action mask; see ``store.records.ACTION_SPANS``). When the tree kept token ids (a search
  run token in, token out), ``info["tokens"]`` carries the prompt's and both responses' ids with the
  token spans the policy wrote (``PreferenceTree.response_tokens``); ranked lists carry the same. The
  pair carries MCTS-DPO's visit-count label smoothing ``α = 1 / (N_w/N_l + 1)`` (clipped to ≤ 0.5),
  with Q and N read as they were when the search committed that level's step (``node_stats``),
  the length of the shared text prefix (so a learner can start the loss at the divergence), the Q
  gap as margin, and its provenance (tree index, node keys, task id).
- ``ranked_lists``: for listwise learners (TPO, LiPO): at each branching point of the selected path,
  every child with its best-ranked branch below it, scored by the child's Q (at commit), with
  per-step rewards. Siblings are ranked as the authors' trainer sorts them: Q, then the commit
  policy, then r, then v, then N (``_order_keys``).
- ``tree_result``: bundles a tree and everything derived from it as one ``TaskResult`` (one store
  transaction).
- ``smallest_margin_first`` ("Not All Preference Pairs Are Created Equal": spend the budget on the
  pairs the current policy separates least) and ``curriculum`` (Curry-DPO: easy → hard by margin).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from treeplay.agents.base import Task, action_spans
from treeplay.search.tree import PreferenceTree
from treeplay.store.records import ACTION_SPANS, PairRecord, RankedItem, RankedListRecord, TaskResult


def forced_end(tree: PreferenceTree, node: int) -> int:
    """Follow single-child links down from ``node``; the last node of that forced chain."""
    while len(kids := tree.children(node)) == 1:
        node = kids[0]
    return node


def label_smoothing(chosen_visits: float, rejected_visits: float, max_alpha: float = 0.5) -> float:
    """MCTS-DPO's conservative-DPO weight ``α = 1/(N_w/N_l + 1) = N_l/(N_w + N_l)``, clipped to ≤ 0.5.

    Only the chosen count is floored at 1 (the authors' ``calculate_preference_confidence``,
    ``1/(1 + N_l/max(1, N_w))``, with ``α = min(1 − confidence, 0.5)``): a rejected step that was
    never visited gives α = 0, full trust in the pair; equal visits give 0.5, the clip, so a pair
    never pushes towards its rejected side. A chosen step visited much more than its rejected
    sibling gets α near 0.

    This is the formula's one definition: the MCTS-DPO loss applies it to tensors of visit counts
    (``learners.losses.visit_alpha``).
    """
    n_l = max(0.0, float(rejected_visits))
    return min(max_alpha, n_l / (max(1.0, float(chosen_visits)) + n_l))


def _alternatives(tree: PreferenceTree, parent: int, include_errors: bool) -> list[int]:
    return [c for c in tree.children(parent) if include_errors or not tree[c]["error"]]


def node_stats(tree: PreferenceTree, node: int, when: str = "commit") -> tuple[float, int]:
    """A node's ``(Q, N)`` as a pair sees them.

    ``when="commit"`` (MCTS-DPO's rule): the values kept when the search committed the step among
    the node and its siblings (``commit_value``, ``commit_visits``); a node never compared at a
    commit (a hand-built tree, a level below the search's last commit) falls back to the final
    values. ``when="final"``: the finished tree's values.
    """
    d = tree[node]
    if when == "commit" and d.get("commit_visits") is not None:
        return float(d["commit_value"]), int(d["commit_visits"])
    if when not in ("commit", "final"):
        raise ValueError(f"unknown pair statistics {when!r}; expected 'commit' or 'final'")
    return float(d["value"]), int(d["visits"])


def _order_keys(tree: PreferenceTree, kids: list[int], when: str) -> dict[int, tuple[float, ...]]:
    """The authors' ranking of siblings: by Q, then the commit policy π (at temperature 0 the share
    of the most-visited children: 1/k for each of k tied leaders, 0 for the rest), then r, then
    the value estimate v, then N."""
    stats = {c: node_stats(tree, c, when) for c in kids}
    top = max(n for _, n in stats.values())
    leaders = sum(1 for _, n in stats.values() if n == top)
    return {
        c: (q, (1.0 / leaders if n == top else 0.0), float(tree[c]["reward"]), float(tree[c]["estimate"]), float(n))
        for c, (q, n) in stats.items()
    }


def _response(tree: PreferenceTree, end: int, parent: int) -> tuple[str, list[list[int]]]:
    """The text from ``parent`` down to ``end`` (observations included, as the policy saw them) and
    the character spans of it the policy wrote (its actions)."""
    segments = tree.continuation_segments(end, parent)
    return "".join(t for t, _ in segments), [list(span) for span in action_spans(segments)]


def step_pairs(
    tree: PreferenceTree,
    filter_incorrect: bool = True,
    choose_worst: bool = True,
    max_pairs: int = 8,
    *,
    tree_index: int = 0,
    include_errors: bool = False,
    min_margin: float = 0.0,
    stats: str = "commit",
) -> list[PairRecord]:
    """Step-level preference pairs along the selected path of a searched tree.

    Args:
        tree: A tree after search (its selected path marked).
        filter_incorrect: Return no pairs unless the selected path ends in a correct terminal node
            (MCTS-DPO's ``--filter``).
        choose_worst: Rejected = lowest-Q alternative; otherwise the second best.
        max_pairs: At most this many pairs, from the root down.
        tree_index: Index of this tree in the ``TaskResult`` the pairs are written with.
        include_errors: Also pair against children whose step failed (empty step, environment error).
            Off by default: an environment crash says nothing about the step.
        min_margin: Keep a pair only if Q(chosen) − Q(rejected) exceeds this (equal Q is no preference).
        stats: ``"commit"`` (default, MCTS-DPO's): rank, label and weigh the siblings by their Q and N
            at the moment the search committed that level's step; ``"final"``: by the finished
            tree's (see ``node_stats``).

    Returns:
        ``PairRecord``s with ``source="mcts"``.
    """
    if filter_incorrect and not tree.solved():
        return []
    pairs: list[PairRecord] = []
    for parent in tree.selected_path():
        if len(pairs) >= max_pairs:
            break
        alts = _alternatives(tree, parent, include_errors)
        if len(alts) < 2:
            continue
        keys = _order_keys(tree, alts, stats)
        alts.sort(key=keys.__getitem__)
        chosen, rejected = alts[-1], alts[0] if choose_worst else alts[-2]
        (q_w, n_w), (q_l, n_l) = node_stats(tree, chosen, stats), node_stats(tree, rejected, stats)
        margin = q_w - q_l
        if margin <= min_margin:
            continue
        chosen_text, chosen_spans = _response(tree, forced_end(tree, chosen), parent)
        rejected_text, rejected_spans = _response(tree, forced_end(tree, rejected), parent)
        pairs.append(
            PairRecord(
                prompt=tree.text(parent),
                chosen=chosen_text,
                rejected=rejected_text,
                source="mcts",
                margin=margin,
                label_smoothing=label_smoothing(n_w, n_l),
                shared_prefix_chars=len(os.path.commonprefix([chosen_text, rejected_text])),
                chosen_node=chosen,
                rejected_node=rejected,
                chosen_visits=n_w,
                rejected_visits=n_l,
                tree_index=tree_index,
                task_id=tree.task_id,
                info={
                    "parent_node": parent,
                    "depth": int(tree[parent]["depth"]),
                    "chosen_q": q_w,
                    "rejected_q": q_l,
                    "pair_stats": stats,
                    "chosen_end": forced_end(tree, chosen),
                    "rejected_end": forced_end(tree, rejected),
                    "chosen_correct": tree[forced_end(tree, chosen)]["correct"],
                    "rejected_correct": tree[forced_end(tree, rejected)]["correct"],
                    ACTION_SPANS: {"chosen": chosen_spans, "rejected": rejected_spans},
                },
            )
        )
        if (ids := tree.response_tokens(parent, [forced_end(tree, chosen), forced_end(tree, rejected)])) is not None:
            pairs[-1].info["tokens"] = ids  # token in, token out: what the policy was given and wrote
    return pairs


def best_branch(tree: PreferenceTree, node: int, stats: str = "commit") -> list[int]:
    """``node`` and then, at each level below it, the highest-ranked child (``_order_keys``), down to
    a leaf."""
    out = [node]
    while kids := tree.children(out[-1]):
        keys = _order_keys(tree, kids, stats)
        out.append(max(kids, key=keys.__getitem__))
    return out


def ranked_lists(
    tree: PreferenceTree,
    *,
    tree_index: int = 0,
    min_items: int = 2,
    max_lists: int = 8,
    include_errors: bool = False,
    filter_incorrect: bool = False,
    stats: str = "commit",
) -> list[RankedListRecord]:
    """Ranked lists for TPO: at each branching point of the selected path, the alternatives' branches.

    Each item is one child of the branching node followed by its best-Q branch to a leaf (so the
    items share the prompt and differ from their first step on), scored by the child's Q, with
    the per-step rewards ``r`` along the branch. Items are sorted best first.

    Args:
        tree: A tree after search.
        tree_index: Index of this tree in the ``TaskResult`` (kept in ``info`` for provenance).
        min_items: Skip branching points with fewer alternatives.
        max_lists: At most this many lists, from the root down.
        include_errors: Also list children whose step failed.
        filter_incorrect: Return nothing unless the selected path ends correct.
        stats: Which Q scores the items: at the level's commit (default) or in the finished tree
            (see ``node_stats``).
    """
    if filter_incorrect and not tree.solved():
        return []
    lists: list[RankedListRecord] = []
    for parent in tree.selected_path():
        if len(lists) >= max_lists:
            break
        alts = _alternatives(tree, parent, include_errors)
        if len(alts) < min_items:
            continue
        items, spans, ends = [], [], []
        keys = _order_keys(tree, alts, stats)
        for child in sorted(alts, key=keys.__getitem__, reverse=True):
            branch = best_branch(tree, child, stats)
            ends.append(branch[-1])
            text, item_spans = _response(tree, branch[-1], parent)
            spans.append(item_spans)
            items.append(
                RankedItem(
                    text=text,
                    score=keys[child][0],
                    step_rewards=[float(tree[n]["reward"]) for n in branch],
                    node=child,
                )
            )
        lists.append(
            RankedListRecord(
                prompt=tree.text(parent),
                items=items,
                source="mcts",
                task_id=tree.task_id,
                info={
                    "tree_index": tree_index,
                    "parent_node": parent,
                    "depth": int(tree[parent]["depth"]),
                    "end_nodes": ends,
                    "correct": [tree[e]["correct"] for e in ends],
                    ACTION_SPANS: spans,
                },
            )
        )
        if (ids := tree.response_tokens(parent, ends)) is not None:
            lists[-1].info["tokens"] = ids
    return lists


def tree_result(
    tree: PreferenceTree,
    task: Task | None = None,
    *,
    pairs: bool = True,
    lists: bool = True,
    filter_incorrect: bool = True,
    choose_worst: bool = True,
    max_pairs: int = 8,
) -> TaskResult:
    """One task's tree with its pairs and ranked lists, ready for ``queries.write_task_result``.

    Args:
        tree: The searched tree (written as ``trees[0]``; pairs and lists point at it).
        task: The task, for its answer and environment name; optional.
        pairs: Include ``step_pairs``.
        lists: Include ``ranked_lists`` (not filtered by correctness: a list ranks right and wrong
            branches by their values, which is informative either way).
        filter_incorrect, choose_worst, max_pairs: Passed to ``step_pairs``.
    """
    env = (task.env if task is not None else "") or tree.environment
    return TaskResult(
        task_id=tree.task_id or (task.id if task is not None else ""),
        environment=env,
        prompt=tree.prompt,
        answer=task.answer if task is not None else None,
        trees=[tree.to_record(environment=env)],
        pairs=step_pairs(tree, filter_incorrect, choose_worst, max_pairs, tree_index=0) if pairs else [],
        ranked_lists=ranked_lists(tree, tree_index=0) if lists else [],
    )


def smallest_margin_first(
    pairs: Sequence[PairRecord], margins: Sequence[float], budget: int
) -> list[PairRecord]:
    """Keep the ``budget`` pairs with the smallest implicit-reward margin ``|r_θ(y_w) − r_θ(y_l)|``.

    Yang et al. ("Not All Preference Pairs Are Created Equal") find the pairs the current DPO policy
    separates least are the most useful. The margins need the policy and its reference, so the caller
    computes them (``β·[logπ/π_ref(y_w) − logπ/π_ref(y_l)]``) and passes them aligned with ``pairs``.

    Raises:
        ValueError: If ``margins`` and ``pairs`` differ in length or ``budget`` is negative.
    """
    if len(margins) != len(pairs):
        raise ValueError(f"got {len(margins)} margins for {len(pairs)} pairs")
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")
    order = sorted(range(len(pairs)), key=lambda i: abs(float(margins[i])))
    return [pairs[i] for i in order[:budget]]


def curriculum(
    pairs: Sequence[PairRecord], n_stages: int, margins: Sequence[float] | None = None
) -> list[list[PairRecord]]:
    """Curry-DPO: split pairs into ``n_stages`` from easy (large margin) to hard (small margin).

    Args:
        pairs: The pairs to order.
        n_stages: Number of stages (iterations); stage sizes differ by at most one.
        margins: Difficulty margins aligned with ``pairs``; defaults to ``pair.margin`` (the Q gap
            for MCTS pairs). A pair without a margin counts as hardest.

    Raises:
        ValueError: If ``n_stages < 1`` or ``margins`` has the wrong length.
    """
    if n_stages < 1:
        raise ValueError(f"n_stages must be >= 1, got {n_stages}")
    if margins is None:
        margins = [p.margin if p.margin is not None else float("-inf") for p in pairs]
    if len(margins) != len(pairs):
        raise ValueError(f"got {len(margins)} margins for {len(pairs)} pairs")
    order = sorted(range(len(pairs)), key=lambda i: -float(margins[i]))
    size, extra = divmod(len(order), n_stages)
    stages, start = [], 0
    for s in range(n_stages):
        end = start + size + (1 if s < extra else 0)
        stages.append([pairs[i] for i in order[start:end]])
        start = end
    return stages


__all__ = [
    "best_branch",
    "curriculum",
    "forced_end",
    "label_smoothing",
    "node_stats",
    "ranked_lists",
    "smallest_margin_first",
    "step_pairs",
    "tree_result",
]
