"""Reading what was written: preference data, trees, trajectories, judgments, and trees a node at a time.

``preference_data`` (pairs and ranked lists of an iteration and a replay window, what a learner
trains on), ``list_pairs``, ``list_ranked_lists``, ``list_trees``, ``load_tree``,
``list_trajectories``, ``judgments_for``, ``list_judgments``; for the inspector, which loads large
trees' children on demand: ``get_tree``, ``tree_root``, ``get_node``, ``child_nodes``,
``node_path``, ``pairs_of_nodes``, ``tree_pairs``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, func, select

from treeplay.store import schema as db
from treeplay.store.checks import JUDGMENT_TARGETS, _db_errors, _int
from treeplay.store.database import Store, StoreError
from treeplay.store.records import (
    PAIR_SOURCES,
    JudgmentRecord,
    NodeRecord,
    NodeView,
    PairRecord,
    PreferenceData,
    RankedItem,
    RankedListRecord,
    StepRecord,
    TrajectoryRecord,
    TreeRecord,
    TreeSummary,
)

# ----------------------------------------------------------------------------------------------
# Reading preference data, trees, trajectories, judgments


def _pair_record(r: Any) -> PairRecord:
    return PairRecord(
        prompt=r.prompt,
        chosen=r.chosen,
        rejected=r.rejected,
        source=r.source,
        margin=r.margin,
        weight=r.weight,
        label_smoothing=r.label_smoothing,
        shared_prefix_chars=r.shared_prefix_chars,
        chosen_node=r.chosen_node_id,
        rejected_node=r.rejected_node_id,
        chosen_visits=r.chosen_visits,
        rejected_visits=r.rejected_visits,
        task_id=r.task_key,
        info=r.info,
        db_id=r.id,
        iteration=r.iteration,
    )


def _select_pairs(conn: Connection, *conditions: Any) -> list[PairRecord]:
    pp, tk = db.PreferencePair.__table__, db.Task.__table__
    rows = conn.execute(
        select(pp, tk.c.task_key)
        .join(tk, tk.c.id == pp.c.task_id)
        .where(*conditions)
        .order_by(pp.c.iteration, pp.c.id)
    )
    return [_pair_record(r) for r in rows]


def _select_ranked_lists(conn: Connection, *conditions: Any) -> list[RankedListRecord]:
    rl, ri, tk = db.RankedList.__table__, db.RankedItem.__table__, db.Task.__table__
    lists = conn.execute(
        select(rl, tk.c.task_key)
        .join(tk, tk.c.id == rl.c.task_id)
        .where(*conditions)
        .order_by(rl.c.iteration, rl.c.id)
    ).all()
    if not lists:
        return []
    items: dict[int, list[RankedItem]] = defaultdict(list)
    wanted = select(rl.c.id).where(*conditions)
    for r in conn.execute(select(ri).where(ri.c.list_id.in_(wanted)).order_by(ri.c.list_id, ri.c.position)):
        items[r.list_id].append(
            RankedItem(text=r.text, score=r.score, step_rewards=r.step_rewards, node=r.node_id)
        )
    return [
        RankedListRecord(
            prompt=r.prompt,
            items=items[r.id],
            source=r.source,
            task_id=r.task_key,
            info=r.info,
            db_id=r.id,
            iteration=r.iteration,
        )
        for r in lists
    ]


def _check_sources(sources: Sequence[str] | None) -> list[str] | None:
    if sources is None:
        return None
    if isinstance(sources, str):
        sources = [sources]
    unknown = [s for s in sources if s not in PAIR_SOURCES]
    if unknown:
        raise StoreError(f"unknown preference source(s) {unknown}; known: {', '.join(PAIR_SOURCES)}")
    return list(sources)


def preference_data(
    store: Store, run_id: int, iteration: int, replay: int = 0, sources: Sequence[str] | None = None
) -> PreferenceData:
    """What a learner trains on after ``iteration``: pairs and ranked lists of iterations
    ``iteration - replay`` .. ``iteration`` (oldest first, then in write order).

    Args:
        store: The open store.
        run_id: The run.
        iteration: The newest iteration to include.
        replay: How many earlier iterations to include as well (0 = this one only).
        sources: Only these pair/list sources (see ``PAIR_SOURCES``); None = all.

    Returns:
        Records with ``db_id`` and ``iteration`` set; node references are tree-node database ids.
    """
    replay = _int(replay, "replay")
    if replay < 0:
        raise StoreError(f"replay must be >= 0, got {replay}")
    wanted = _check_sources(sources)
    pp, rl = db.PreferencePair.__table__, db.RankedList.__table__

    def window(t: Table) -> list[Any]:
        cond = [t.c.run_id == run_id, t.c.iteration.between(iteration - replay, iteration)]
        if wanted is not None:
            cond.append(t.c.source.in_(wanted))
        return cond

    with _db_errors("cannot read preference data"), store.read() as conn:
        return PreferenceData(
            pairs=_select_pairs(conn, *window(pp)), ranked_lists=_select_ranked_lists(conn, *window(rl))
        )


def list_pairs(
    store: Store, run_id: int, iteration: int | None = None, source: str | None = None
) -> list[PairRecord]:
    """A run's preference pairs, optionally of one iteration and/or one source, in write order."""
    pp = db.PreferencePair.__table__
    cond = [pp.c.run_id == run_id]
    if iteration is not None:
        cond.append(pp.c.iteration == iteration)
    if source is not None:
        cond.append(pp.c.source == _check_sources([source])[0])
    with _db_errors("cannot read pairs"), store.read() as conn:
        return _select_pairs(conn, *cond)


def list_ranked_lists(store: Store, run_id: int, iteration: int | None = None) -> list[RankedListRecord]:
    """A run's ranked lists (with items), optionally of one iteration, in write order."""
    rl = db.RankedList.__table__
    cond = [rl.c.run_id == run_id] + ([rl.c.iteration == iteration] if iteration is not None else [])
    with _db_errors("cannot read ranked lists"), store.read() as conn:
        return _select_ranked_lists(conn, *cond)


def _tree_summary(r: Any) -> TreeSummary:
    return TreeSummary(
        r.id,
        r.run_id,
        r.iteration,
        r.task_key,
        r.environment,
        r.prompt,
        r.policy_version,
        r.n_nodes,
        r.max_depth,
    )


def _select_trees(conn: Connection, *conditions: Any) -> list[TreeSummary]:
    tr, tk = db.Tree.__table__, db.Task.__table__
    rows = conn.execute(
        select(tr, tk.c.task_key).join(tk, tk.c.id == tr.c.task_id).where(*conditions).order_by(tr.c.id)
    )
    return [_tree_summary(r) for r in rows]


def list_trees(store: Store, run_id: int, iteration: int | None = None) -> list[TreeSummary]:
    """Summaries (no nodes) of a run's trees, optionally of one iteration, in write order."""
    tr = db.Tree.__table__
    cond = [tr.c.run_id == run_id] + ([tr.c.iteration == iteration] if iteration is not None else [])
    with _db_errors("cannot read trees"), store.read() as conn:
        return _select_trees(conn, *cond)


def _node_record(r: Any) -> NodeRecord:
    """A tree_nodes row as a NodeRecord keyed by database ids."""
    return NodeRecord(
        key=r.id, parent_key=r.parent_id, step=r.step, depth=r.depth, visits=r.visits, value=r.value,
        prior=r.prior, reward=r.reward, terminal=r.terminal, correct=r.correct, selected=r.selected,
        policy_version=r.policy_version, error=r.error, info=r.info, db_id=r.id,
    )  # fmt: skip


def load_tree(store: Store, tree_id: int) -> TreeRecord:
    """A whole tree (two queries: the tree, then all its nodes).

    Returns:
        A TreeRecord whose nodes have ``key`` = ``db_id`` = the node's database id and
        ``parent_key`` = the parent's database id; parents come before children.

    Raises:
        StoreError: No such tree.
    """
    tr, tn, tk = db.Tree.__table__, db.TreeNode.__table__, db.Task.__table__
    with _db_errors(f"cannot read tree {tree_id}"), store.read() as conn:
        head = conn.execute(
            select(tr, tk.c.task_key).join(tk, tk.c.id == tr.c.task_id).where(tr.c.id == tree_id)
        ).first()
        if head is None:
            raise StoreError(f"no tree with id {tree_id}")
        rows = conn.execute(select(tn).where(tn.c.tree_id == tree_id).order_by(tn.c.id))
        nodes = [_node_record(r) for r in rows]
    return TreeRecord(
        task_id=head.task_key,
        prompt=head.prompt,
        nodes=nodes,
        environment=head.environment,
        policy_version=head.policy_version,
        info=head.info,
        db_id=head.id,
    )


def list_trajectories(store: Store, run_id: int, iteration: int | None = None) -> list[TrajectoryRecord]:
    """A run's trajectories with their steps, optionally of one iteration, in write order."""
    tj, st, tk = db.Trajectory.__table__, db.Step.__table__, db.Task.__table__
    cond = [tj.c.run_id == run_id] + ([tj.c.iteration == iteration] if iteration is not None else [])
    with _db_errors("cannot read trajectories"), store.read() as conn:
        rows = conn.execute(
            select(tj, tk.c.task_key).join(tk, tk.c.id == tj.c.task_id).where(*cond).order_by(tj.c.id)
        ).all()
        steps: dict[int, list[StepRecord]] = defaultdict(list)
        if rows:
            wanted = select(tj.c.id).where(*cond)
            for s in conn.execute(select(st).where(st.c.trajectory_id.in_(wanted)).order_by(st.c.id)):
                steps[s.trajectory_id].append(
                    StepRecord(
                        index=s.index,
                        action=s.action,
                        observation=s.observation,
                        reward=s.reward,
                        agent_id=s.agent_id,
                        credit=s.credit,
                        rubric=s.rubric,
                        logprob=s.logprob,
                        info=s.info,
                    )
                )
    return [
        TrajectoryRecord(
            task_id=r.task_key,
            environment=r.environment,
            steps=steps[r.id],
            agent_id=r.agent_id,
            policy_version=r.policy_version,
            outcome=r.outcome,
            status=r.status,
            error=r.error,
            info=r.info,
            db_id=r.id,
        )
        for r in rows
    ]


def _judgment_record(r: Any) -> JudgmentRecord:
    return JudgmentRecord(
        judge=r.judge,
        score=r.score,
        target_kind=r.target_kind,
        target_key=r.target_id,
        target_text=r.target_text,
        rationale=r.rationale,
        info=r.info,
        db_id=r.id,
        iteration=r.iteration,
    )


def judgments_for(store: Store, target_kind: str, target_id: int) -> list[JudgmentRecord]:
    """Every judgment of one target (``target_kind`` "trajectory"/"node"/"step" and its database id)."""
    if target_kind not in JUDGMENT_TARGETS:
        raise StoreError(f"target_kind {target_kind!r} is not one of {', '.join(JUDGMENT_TARGETS)}")
    jd = db.Judgment.__table__
    with _db_errors("cannot read judgments"), store.read() as conn:
        rows = conn.execute(
            select(jd).where(jd.c.target_kind == target_kind, jd.c.target_id == target_id).order_by(jd.c.id)
        )
        return [_judgment_record(r) for r in rows]


def list_judgments(store: Store, run_id: int, iteration: int | None = None) -> list[JudgmentRecord]:
    """A run's judgments, optionally of one iteration, in write order (``target_key`` = target's db id)."""
    jd = db.Judgment.__table__
    cond = [jd.c.run_id == run_id] + ([jd.c.iteration == iteration] if iteration is not None else [])
    with _db_errors("cannot read judgments"), store.read() as conn:
        return [_judgment_record(r) for r in conn.execute(select(jd).where(*cond).order_by(jd.c.id))]


# ----------------------------------------------------------------------------------------------
# Reading trees a node at a time (the inspector: large trees load their children on demand)


def _node_views(conn: Connection, *conditions: Any) -> list[NodeView]:
    tn = db.TreeNode.__table__
    kids = db.TreeNode.__table__.alias("kids")
    n_children = select(func.count()).where(kids.c.parent_id == tn.c.id).scalar_subquery()
    rows = conn.execute(select(tn, n_children.label("n_children")).where(*conditions).order_by(tn.c.id))
    return [NodeView(r.tree_id, _node_record(r), r.n_children) for r in rows]


def get_tree(store: Store, tree_id: int) -> TreeSummary:
    """One tree's summary (no nodes).

    Raises:
        StoreError: No such tree.
    """
    with _db_errors(f"cannot read tree {tree_id}"), store.read() as conn:
        found = _select_trees(conn, db.Tree.__table__.c.id == _int(tree_id, "tree id"))
    if not found:
        raise StoreError(f"no tree with id {tree_id}")
    return found[0]


def tree_root(store: Store, tree_id: int) -> NodeView:
    """The root node of a tree, with its number of children.

    Raises:
        StoreError: No such tree.
    """
    tn = db.TreeNode.__table__
    with _db_errors(f"cannot read tree {tree_id}"), store.read() as conn:
        views = _node_views(conn, tn.c.tree_id == _int(tree_id, "tree id"), tn.c.parent_id.is_(None))
    if not views:
        raise StoreError(f"no tree with id {tree_id}")
    return views[0]


def get_node(store: Store, node_id: int) -> NodeView:
    """One tree node by database id.

    Raises:
        StoreError: No such node.
    """
    tn = db.TreeNode.__table__
    with _db_errors(f"cannot read node {node_id}"), store.read() as conn:
        views = _node_views(conn, tn.c.id == _int(node_id, "node id"))
    if not views:
        raise StoreError(f"no tree node with id {node_id}")
    return views[0]


def child_nodes(store: Store, node_id: int) -> list[NodeView]:
    """The direct children of a node, in write order (empty for a leaf or an unknown id)."""
    tn = db.TreeNode.__table__
    with _db_errors(f"cannot read the children of node {node_id}"), store.read() as conn:
        return _node_views(conn, tn.c.parent_id == _int(node_id, "node id"))


def node_path(store: Store, node_id: int) -> list[NodeRecord]:
    """The nodes from the tree's root down to ``node_id`` (both included), in one recursive query.

    Raises:
        StoreError: No such node.
    """
    tn = db.TreeNode.__table__
    up = select(tn.c.id, tn.c.parent_id).where(tn.c.id == _int(node_id, "node id")).cte("up", recursive=True)
    up = up.union_all(select(tn.c.id, tn.c.parent_id).join(up, tn.c.id == up.c.parent_id))
    with _db_errors(f"cannot read the path to node {node_id}"), store.read() as conn:
        views = _node_views(conn, tn.c.id.in_(select(up.c.id)))
    if not views:
        raise StoreError(f"no tree node with id {node_id}")
    return sorted((v.node for v in views), key=lambda n: n.depth)


def pairs_of_nodes(store: Store, node_ids: Sequence[int]) -> list[PairRecord]:
    """Pairs whose chosen or rejected node is one of ``node_ids``, in write order."""
    pp = db.PreferencePair.__table__
    ids = [_int(i, "node id") for i in node_ids]
    if not ids:
        return []
    with _db_errors("cannot read pairs"), store.read() as conn:
        return _select_pairs(conn, pp.c.chosen_node_id.in_(ids) | pp.c.rejected_node_id.in_(ids))


def trees_of_nodes(store: Store, node_ids: Sequence[int]) -> dict[int, int]:
    """``{node id: id of the tree it is in}`` for those of ``node_ids`` that exist (500 ids a query)."""
    tn = db.TreeNode.__table__
    ids = sorted({_int(i, "node id") for i in node_ids})
    found: dict[int, int] = {}
    with _db_errors("cannot read the trees of nodes"), store.read() as conn:
        for i in range(0, len(ids), 500):
            part = ids[i : i + 500]
            found.update(conn.execute(select(tn.c.id, tn.c.tree_id).where(tn.c.id.in_(part))).tuples().all())
    return found


def tree_pairs(store: Store, tree_id: int) -> list[PairRecord]:
    """Pairs whose chosen or rejected node belongs to the tree, in write order."""
    pp, tn = db.PreferencePair.__table__, db.TreeNode.__table__
    in_tree = select(tn.c.id).where(tn.c.tree_id == _int(tree_id, "tree id"))
    with _db_errors(f"cannot read the pairs of tree {tree_id}"), store.read() as conn:
        return _select_pairs(conn, pp.c.chosen_node_id.in_(in_tree) | pp.c.rejected_node_id.in_(in_tree))
