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
  the length of the shared text prefix (so a learner can start the loss at the divergence), the Q
  gap as margin, and its provenance (tree index, node keys, task id).
- ``ranked_lists``: for listwise learners (TPO, LiPO): at each branching point of the selected path,
  every child with its best-Q branch below it, scored by the child's Q, with per-step rewards.
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
    """MCTS-DPO's conservative-DPO weight ``α = 1/(N_w/N_l + 1)`` with ``max(1, N)``, clipped to ≤ 0.5.

    A chosen step visited much more than the rejected one gets α near 0 (trust the pair); equal visits
    give 0.5, the clip (``max_alpha``), so that a pair never pushes towards its rejected side. Counts
    below 1 are read as 1: an unvisited sibling still counts once, as in the authors' code.

    This is the formula's one definition: the MCTS-DPO loss applies it to tensors of visit counts
    (``orchestrator.learners.losses.visit_alpha``).
    """
    ratio = max(1, chosen_visits) / max(1, rejected_visits)
    return min(max_alpha, 1.0 / (ratio + 1.0))


def _alternatives(tree: PreferenceTree, parent: int, include_errors: bool) -> list[int]:
    return [c for c in tree.children(parent) if include_errors or not tree[c]["error"]]


def _order_key(tree: PreferenceTree, n: int) -> tuple[float, float, float, float, int]:
    d = tree[n]
    return (d["value"], d["prior"], d["reward"], d["estimate"], d["visits"])


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

    Returns:
        ``PairRecord``s with ``source="mcts"``.
    """
    if filter_incorrect and not tree.solved():
        return []
    pairs: list[PairRecord] = []
    for parent in tree.selected_path():
        if len(pairs) >= max_pairs:
            break
        alts = sorted(_alternatives(tree, parent, include_errors), key=lambda n: _order_key(tree, n))
        if len(alts) < 2:
            continue
        chosen, rejected = alts[-1], alts[0] if choose_worst else alts[-2]
        margin = float(tree[chosen]["value"] - tree[rejected]["value"])
        if margin <= min_margin:
            continue
        chosen_text, chosen_spans = _response(tree, forced_end(tree, chosen), parent)
        rejected_text, rejected_spans = _response(tree, forced_end(tree, rejected), parent)
        n_w, n_l = int(tree[chosen]["visits"]), int(tree[rejected]["visits"])
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
                    "chosen_q": float(tree[chosen]["value"]),
                    "rejected_q": float(tree[rejected]["value"]),
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


def best_branch(tree: PreferenceTree, node: int) -> list[int]:
    """``node`` and then, at each level below it, the highest-Q child, down to a leaf."""
    out = [node]
    while kids := tree.children(out[-1]):
        out.append(max(kids, key=lambda n: _order_key(tree, n)))
    return out


def ranked_lists(
    tree: PreferenceTree,
    *,
    tree_index: int = 0,
    min_items: int = 2,
    max_lists: int = 8,
    include_errors: bool = False,
    filter_incorrect: bool = False,
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
        items, spans = [], []
        for child in sorted(alts, key=lambda n: _order_key(tree, n), reverse=True):
            branch = best_branch(tree, child)
            text, item_spans = _response(tree, branch[-1], parent)
            spans.append(item_spans)
            items.append(
                RankedItem(
                    text=text,
                    score=float(tree[child]["value"]),
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
                    "end_nodes": [best_branch(tree, it.node)[-1] for it in items if it.node is not None],
                    "correct": [
                        tree[best_branch(tree, it.node)[-1]]["correct"] for it in items if it.node is not None
                    ],
                    ACTION_SPANS: spans,
                },
            )
        )
        ends = [best_branch(tree, it.node)[-1] for it in items if it.node is not None]
        if len(ends) == len(items) and (ids := tree.response_tokens(parent, ends)) is not None:
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
    "ranked_lists",
    "smallest_margin_first",
    "step_pairs",
    "tree_result",
]
