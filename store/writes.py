"""Writing one task's results: ``write_task_result`` (a chunk of them: ``store.chunks``).

Everything one task produced in an iteration (trees with their nodes, trajectories with their steps,
pairs, ranked lists, judgments) is checked and coerced first (``_plan``, ``_Rows``), then written in
ONE transaction with bulk inserts (one ``executemany`` per table). Records refer to each other by
local keys; the store assigns database ids up front (SQLite: after the table's largest id, under the
write lock; PostgreSQL: from the table's sequence) so parents, children and pairs are linked without
reading rows back. A task is written at most once per iteration (a unique ``rollouts`` row).
"""

from __future__ import annotations

import json
import math
import operator
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, Table, insert, select
from sqlalchemy.exc import IntegrityError

from treeplay.store import schema as db
from treeplay.store.checks import (
    DONE,
    INT_MAX,
    INT_MIN,
    JUDGMENT_TARGETS,
    _bool,
    _db_errors,
    _float,
    _int,
    _json_text,
    _of_type,
    _order_tree,
    _str,
)
from treeplay.store.database import Store, StoreError
from treeplay.store.records import (
    ACTION_SPANS,
    PAIR_SOURCES,
    JudgmentRecord,
    NodeRecord,
    PairRecord,
    RankedItem,
    RankedListRecord,
    StepRecord,
    TaskResult,
    TrajectoryRecord,
    TreeRecord,
    WriteReceipt,
    check_action_spans,
)

# ----------------------------------------------------------------------------------------------
# Bulk-insert plumbing


def _allocate_ids(conn: Connection, wanted: dict[Table, int]) -> dict[Table, list[int]]:
    """Reserve fresh primary keys for the rows this transaction is about to insert (one query).

    SQLite: ids after each table's current largest; safe because write transactions hold the
    database's write lock from their start (BEGIN IMMEDIATE). PostgreSQL: values drawn from each
    column's sequence, which concurrent transactions never share.
    """
    wanted = {t: n for t, n in wanted.items() if n}
    if not wanted:
        return {}
    if conn.dialect.name == "postgresql":
        parts = [
            f"ARRAY(SELECT nextval(pg_get_serial_sequence('{t.name}', 'id')) FROM generate_series(1, {int(n)}))"
            for t, n in wanted.items()
        ]
        row = conn.exec_driver_sql("SELECT " + ", ".join(parts)).one()
        return {t: list(ids) for t, ids in zip(wanted, row, strict=True)}
    parts = [f"(SELECT coalesce(max(id), 0) FROM {t.name})" for t in wanted]
    row = conn.exec_driver_sql("SELECT " + ", ".join(parts)).one()
    return {t: list(range(last + 1, last + 1 + n)) for (t, n), last in zip(wanted.items(), row, strict=True)}


_INSERT_SQL: dict[tuple[str, str], tuple[str, Any]] = {}


def _insert_many(conn: Connection, table: Table, rows: list[dict[str, Any]]) -> None:
    """One ``executemany`` of plain INSERTs, straight to the driver (no per-row SQLAlchemy work).

    Rows hold every column of the table, JSON columns already serialised to text.
    """
    if not rows:
        return
    key = (conn.dialect.name, table.name)
    if key not in _INSERT_SQL:
        cols = [c.name for c in table.columns]
        mark = "?" if conn.dialect.name == "sqlite" else "%s"
        sql = (
            f"INSERT INTO {table.name} ({', '.join(f'{chr(34)}{c}{chr(34)}' for c in cols)}) "
            f"VALUES ({', '.join([mark] * len(cols))})"
        )
        _INSERT_SQL[key] = (sql, operator.itemgetter(*cols))
    sql, getter = _INSERT_SQL[key]
    conn.exec_driver_sql(sql, [getter(r) for r in rows])


# ----------------------------------------------------------------------------------------------
# Writing one task's results


@dataclass
class _Plan:
    """A TaskResult checked and turned into rows, with local keys still to be mapped to ids."""

    ordered_nodes: list[list[NodeRecord]]
    node_keys: list[set[int]]
    n_steps: list[int]


def _plan(result: TaskResult) -> _Plan:
    """Check a TaskResult's shape and cross-references before anything touches the database."""
    if not isinstance(result, TaskResult):
        raise StoreError(f"write_task_result expects a TaskResult, got {type(result).__name__}")
    _str(result.task_id, "TaskResult.task_id")
    if not result.task_id:
        raise StoreError("TaskResult.task_id must not be empty")
    for name in ("trees", "trajectories", "pairs", "ranked_lists", "judgments"):
        if not isinstance(getattr(result, name), list):
            raise StoreError(f"TaskResult.{name} must be a list, got {type(getattr(result, name)).__name__}")
    ordered, keys = [], []
    for t, tree in enumerate(result.trees):
        _of_type(tree, TreeRecord, f"trees[{t}]")
        if tree.task_id != result.task_id:
            raise StoreError(
                f"trees[{t}].task_id {tree.task_id!r} differs from the TaskResult's {result.task_id!r}"
            )
        nodes = _order_tree(tree, f"trees[{t}]")
        ordered.append(nodes)
        keys.append({n.key for n in nodes})
    n_steps = []
    for j, traj in enumerate(result.trajectories):
        _of_type(traj, TrajectoryRecord, f"trajectories[{j}]")
        if traj.task_id != result.task_id:
            raise StoreError(
                f"trajectories[{j}].task_id {traj.task_id!r} differs from the TaskResult's {result.task_id!r}"
            )
        if not isinstance(traj.steps, list):
            raise StoreError(f"trajectories[{j}].steps must be a list")
        n_steps.append(len(traj.steps))
    return _Plan(ordered, keys, n_steps)


def _node_ref(plan: _Plan, tree_index: Any, key: Any, where: str) -> tuple[int, int] | None:
    """Check that ``key`` names a node of tree ``tree_index``; return (tree index, key)."""
    if key is None:
        return None
    t = _int(tree_index, f"{where}.tree_index")
    k = _int(key, where, bounded=False)
    if not 0 <= t < len(plan.node_keys):
        raise StoreError(f"{where} refers to tree {t}, but the TaskResult has {len(plan.node_keys)} trees")
    if k not in plan.node_keys[t]:
        raise StoreError(f"{where} is node key {k}, which is not in trees[{t}]")
    return t, k


def write_task_result(store: Store, run_id: int, iteration: int, result: TaskResult) -> WriteReceipt:
    """Write everything one task produced in an iteration, in ONE transaction.

    Args:
        store: The open store.
        run_id: The run.
        iteration: The iteration index (started with ``start_iteration``, not finished).
        result: The task's trees, trajectories, pairs, ranked lists and judgments. Node keys are
            local to their tree; ``PairRecord.chosen_node``/``rejected_node`` and
            ``RankedItem.node`` are keys of ``result.trees[tree_index]``; judgment targets are
            described on ``JudgmentRecord``.

    Returns:
        The database ids given to every written row, in input order.

    Raises:
        StoreError: Bad input (named), an unknown or finished iteration, or the task was already
            written for this iteration. Nothing is written then.
    """
    plan = _plan(result)
    rows = _Rows(result, plan)  # all coercion and checks happen here, before the transaction
    with _db_errors(f"cannot write task {result.task_id!r} for iteration {iteration} of run {run_id}"):
        with store.write() as conn:
            return rows.write(conn, _int(run_id, "run_id"), _int(iteration, "iteration"))


def _check_takes_tasks(status: str | None, run_id: int, iteration: int) -> None:
    """The iteration a task is written for (its ``status``, None when there is no such row) must be
    started and not finished; the one rule for a task alone and for a chunk."""
    if status is None:
        raise StoreError(f"iteration {iteration} of run {run_id} was never started (call start_iteration)")
    if status == DONE:
        raise StoreError(f"iteration {iteration} of run {run_id} is finished; it takes no more tasks")


def _already_written(task_key: str, run_id: int, iteration: int) -> StoreError:
    """Why a task is refused a second write in one iteration (alone or in a chunk)."""
    return StoreError(f"task {task_key!r} was already written for iteration {iteration} of run {run_id}")


class _Rows:
    """The rows of one TaskResult, checked and coerced, ready to get ids and be inserted."""

    def __init__(self, result: TaskResult, plan: _Plan) -> None:
        self.result = result
        self.plan = plan
        self.environment = _str(result.environment, "TaskResult.environment")
        self.prompt = _str(result.prompt, "TaskResult.prompt")
        self.answer = _str(result.answer, "TaskResult.answer", optional=True)
        self.trees = [self._tree(t, tree) for t, tree in enumerate(result.trees)]
        self.nodes = [
            [self._node(t, i, n) for i, n in enumerate(nodes)] for t, nodes in enumerate(plan.ordered_nodes)
        ]
        self.trajectories = [self._trajectory(j, tr) for j, tr in enumerate(result.trajectories)]
        self.steps = [
            [self._step(j, s, step) for s, step in enumerate(tr.steps)]
            for j, tr in enumerate(result.trajectories)
        ]
        self.pairs = [self._pair(p, pair) for p, pair in enumerate(result.pairs)]
        self.lists = [self._ranked_list(r, rl) for r, rl in enumerate(result.ranked_lists)]
        self.judgments = [self._judgment(j, jd) for j, jd in enumerate(result.judgments)]

    # -- coercion, record by record -------------------------------------------------------------

    def _tree(self, t: int, tree: TreeRecord) -> dict[str, Any]:
        w = f"trees[{t}]"
        return {
            "environment": _str(tree.environment, f"{w}.environment") or self.environment,
            "prompt": _str(tree.prompt, f"{w}.prompt"),
            "policy_version": _int(tree.policy_version, f"{w}.policy_version"),
            "n_nodes": len(tree.nodes),
            "max_depth": max(_int(n.depth, f"{w}.nodes[].depth") for n in tree.nodes),
            "info": _json_text(tree.info, f"{w}.info"),
        }

    def _node(self, t: int, i: int, n: NodeRecord) -> dict[str, Any]:
        depth, visits, version = n.depth, n.visits, n.policy_version
        value, prior, reward = n.value, n.prior, n.reward
        step, correct = n.step, n.correct
        # Fast path for the common, well-typed node (this runs for every node of every tree).
        if (
            type(depth) is int
            and type(visits) is int
            and type(version) is int
            and INT_MIN <= depth <= INT_MAX
            and INT_MIN <= visits <= INT_MAX
            and INT_MIN <= version <= INT_MAX
            and type(value) is float
            and type(prior) is float
            and type(reward) is float
            and value == value
            and prior == prior
            and reward == reward
            and type(step) is str
            and "\x00" not in step
            and (n.terminal is True or n.terminal is False)
            and (n.selected is True or n.selected is False)
            and (correct is None or correct is True or correct is False)
            and n.error is None
            and n.info is None
        ):
            return {
                "key": n.key, "parent_key": n.parent_key, "step": step, "depth": depth, "visits": visits,
                "value": value, "prior": prior, "reward": reward, "terminal": n.terminal, "correct": correct,
                "selected": n.selected, "policy_version": version, "error": None, "info": None,
            }  # fmt: skip
        w = f"trees[{t}].node {n.key}"
        return {
            "key": n.key,
            "parent_key": n.parent_key,
            "step": _str(step, f"{w}.step"),
            "depth": _int(depth, f"{w}.depth"),
            "visits": _int(visits, f"{w}.visits"),
            "value": _float(value, f"{w}.value"),
            "prior": _float(prior, f"{w}.prior"),
            "reward": _float(reward, f"{w}.reward"),
            "terminal": _bool(n.terminal, f"{w}.terminal"),
            "correct": _bool(correct, f"{w}.correct", optional=True),
            "selected": _bool(n.selected, f"{w}.selected"),
            "policy_version": _int(version, f"{w}.policy_version"),
            "error": _str(n.error, f"{w}.error", optional=True),
            "info": _json_text(n.info, f"{w}.info"),
        }

    def _trajectory(self, j: int, tr: TrajectoryRecord) -> dict[str, Any]:
        w = f"trajectories[{j}]"
        return {
            "environment": _str(tr.environment, f"{w}.environment"),
            "agent_id": _str(tr.agent_id, f"{w}.agent_id"),
            "policy_version": _int(tr.policy_version, f"{w}.policy_version"),
            "outcome": _float(tr.outcome, f"{w}.outcome", optional=True),
            "status": _str(tr.status, f"{w}.status"),
            "error": _str(tr.error, f"{w}.error", optional=True),
            "info": _json_text(tr.info, f"{w}.info"),
        }

    def _step(self, j: int, s: int, step: StepRecord) -> dict[str, Any]:
        w = f"trajectories[{j}].steps[{s}]"
        _of_type(step, StepRecord, w)
        return {
            "index": _int(step.index, f"{w}.index"),
            "agent_id": _str(step.agent_id, f"{w}.agent_id"),
            "observation": _str(step.observation, f"{w}.observation"),
            "action": _str(step.action, f"{w}.action"),
            "reward": _float(step.reward, f"{w}.reward"),
            "credit": _float(step.credit, f"{w}.credit", optional=True),
            "rubric": _str(step.rubric, f"{w}.rubric", optional=True),
            "logprob": _float(step.logprob, f"{w}.logprob", optional=True),
            "info": _json_text(step.info, f"{w}.info"),
        }

    def _pair(self, p: int, pair: PairRecord) -> dict[str, Any]:
        w = f"pairs[{p}]"
        _of_type(pair, PairRecord, w)
        if pair.source not in PAIR_SOURCES:
            raise StoreError(f"{w}.source {pair.source!r} is not one of {', '.join(PAIR_SOURCES)}")
        if pair.task_id is not None and pair.task_id != self.result.task_id:
            raise StoreError(
                f"{w}.task_id {pair.task_id!r} differs from the TaskResult's {self.result.task_id!r}"
            )
        shared = _int(pair.shared_prefix_chars, f"{w}.shared_prefix_chars")
        if shared < 0:
            raise StoreError(f"{w}.shared_prefix_chars must be >= 0, got {shared}")
        spans = (pair.info or {}).get(ACTION_SPANS) if isinstance(pair.info, dict) else None
        if spans is not None:
            if not isinstance(spans, dict) or set(spans) != {"chosen", "rejected"}:
                raise StoreError(f"{w}.info[{ACTION_SPANS!r}] must map 'chosen' and 'rejected' to spans")
            for side in ("chosen", "rejected"):
                try:
                    check_action_spans(spans[side], len(getattr(pair, side)), f"{w}.info.{ACTION_SPANS}.{side}")
                except ValueError as e:
                    raise StoreError(str(e)) from None
        return {
            "prompt": _str(pair.prompt, f"{w}.prompt"),
            "chosen": _str(pair.chosen, f"{w}.chosen"),
            "rejected": _str(pair.rejected, f"{w}.rejected"),
            "source": pair.source,
            "margin": _float(pair.margin, f"{w}.margin", optional=True),
            "weight": _float(pair.weight, f"{w}.weight"),
            "label_smoothing": _float(pair.label_smoothing, f"{w}.label_smoothing"),
            "shared_prefix_chars": shared,
            "chosen_visits": _int(pair.chosen_visits, f"{w}.chosen_visits", optional=True),
            "rejected_visits": _int(pair.rejected_visits, f"{w}.rejected_visits", optional=True),
            "chosen_node_id": _node_ref(self.plan, pair.tree_index, pair.chosen_node, f"{w}.chosen_node"),
            "rejected_node_id": _node_ref(
                self.plan, pair.tree_index, pair.rejected_node, f"{w}.rejected_node"
            ),
            "info": _json_text(pair.info, f"{w}.info"),
        }

    def _ranked_list(self, r: int, rl: RankedListRecord) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        w = f"ranked_lists[{r}]"
        _of_type(rl, RankedListRecord, w)
        if rl.source not in PAIR_SOURCES:
            raise StoreError(f"{w}.source {rl.source!r} is not one of {', '.join(PAIR_SOURCES)}")
        if rl.task_id is not None and rl.task_id != self.result.task_id:
            raise StoreError(
                f"{w}.task_id {rl.task_id!r} differs from the TaskResult's {self.result.task_id!r}"
            )
        if not isinstance(rl.items, list):
            raise StoreError(f"{w}.items must be a list")
        spans = (rl.info or {}).get(ACTION_SPANS) if isinstance(rl.info, dict) else None
        if spans is not None:
            if not isinstance(spans, list) or len(spans) != len(rl.items):
                raise StoreError(f"{w}.info[{ACTION_SPANS!r}] must hold one spans list per item")
            for i, (item_spans, item) in enumerate(zip(spans, rl.items, strict=True)):
                try:
                    check_action_spans(item_spans, len(getattr(item, "text", "")), f"{w}.info.{ACTION_SPANS}[{i}]")
                except ValueError as e:
                    raise StoreError(str(e)) from None
        items = []
        for i, item in enumerate(rl.items):
            wi = f"{w}.items[{i}]"
            _of_type(item, RankedItem, wi)
            rewards = None
            if item.step_rewards is not None:
                if not isinstance(item.step_rewards, (list, tuple)):
                    raise StoreError(f"{wi}.step_rewards must be a list of numbers")
                rewards = [_float(x, f"{wi}.step_rewards[{k}]") for k, x in enumerate(item.step_rewards)]
                if any(math.isinf(x) for x in rewards):
                    raise StoreError(f"{wi}.step_rewards holds an infinity, which JSON cannot store")
            items.append(
                {
                    "position": i,
                    "text": _str(item.text, f"{wi}.text"),
                    "score": _float(item.score, f"{wi}.score"),
                    "step_rewards": None if rewards is None else json.dumps(rewards),
                    "node_id": _node_ref(self.plan, getattr(rl, "tree_index", 0), item.node, f"{wi}.node"),
                }
            )
        row = {
            "prompt": _str(rl.prompt, f"{w}.prompt"),
            "source": rl.source,
            "info": _json_text(rl.info, f"{w}.info"),
        }
        return row, items

    def _judgment(self, j: int, jd: JudgmentRecord) -> dict[str, Any]:
        w = f"judgments[{j}]"
        _of_type(jd, JudgmentRecord, w)
        kind = jd.target_kind
        if kind not in JUDGMENT_TARGETS:
            raise StoreError(f"{w}.target_kind {kind!r} is not one of {', '.join(JUDGMENT_TARGETS)}")
        key = _int(jd.target_key, f"{w}.target_key", optional=True, bounded=kind == "candidate")
        target: Any = key
        if kind != "candidate":
            if key is None:
                raise StoreError(f"{w} judges a {kind} but has no target_key")
            if kind == "node":
                target = _node_ref(self.plan, getattr(jd, "tree_index", 0), key, f"{w}.target_key")
            else:
                count = len(self.plan.n_steps) if kind == "trajectory" else sum(self.plan.n_steps)
                if not 0 <= key < count:
                    raise StoreError(
                        f"{w}.target_key {key} is out of range: the TaskResult has {count} {kind}s"
                    )
        return {
            "judge": _str(jd.judge, f"{w}.judge"),
            "target_kind": kind,
            "target_id": target,
            "target_text": _str(jd.target_text, f"{w}.target_text", optional=True),
            "score": _float(jd.score, f"{w}.score"),
            "rationale": _str(jd.rationale, f"{w}.rationale"),
            "info": _json_text(jd.info, f"{w}.info"),
        }

    # -- the transaction -------------------------------------------------------------------------

    def write(self, conn: Connection, run_id: int, iteration: int) -> WriteReceipt:
        result = self.result
        task = {"run_id": run_id, "environment": self.environment, "task_key": result.task_id}
        status, task_db_id = conn.execute(_ITERATION_AND_TASK, {**task, "iteration": iteration}).one()
        _check_takes_tasks(status, run_id, iteration)
        if task_db_id is None:
            task_db_id = self._insert_task(conn, task)
        try:
            # The unique (run, iteration, task) row: a second write of the task fails here, and the
            # whole transaction is rolled back.
            rollout_id = conn.execute(
                _INSERT_ROLLOUT,
                {"run_id": run_id, "iteration": iteration, "task_id": task_db_id, "written": db.utcnow()},
            ).scalar_one()
        except IntegrityError:
            raise _already_written(result.task_id, run_id, iteration) from None
        # Every id up front, in one query, so parents, children, pairs and judgments link directly.
        ids = _allocate_ids(conn, self.wanted())
        rows: dict[Table, list[dict[str, Any]]] = {t: [] for t in ROW_TABLES}
        receipt = self.fill(
            {"rollout_id": rollout_id, "run_id": run_id, "iteration": iteration, "task_id": task_db_id},
            {t: iter(v) for t, v in ids.items()},
            rows,
        )
        for table in ROW_TABLES:
            _insert_many(conn, table, rows[table])
        return receipt

    def wanted(self) -> dict[Table, int]:
        """How many rows (ids) this task needs per table."""
        return {
            db.Tree.__table__: len(self.trees),
            db.TreeNode.__table__: sum(len(n) for n in self.nodes),
            db.Trajectory.__table__: len(self.trajectories),
            db.Step.__table__: sum(len(s) for s in self.steps),
            db.PreferencePair.__table__: len(self.pairs),
            db.RankedList.__table__: len(self.lists),
            db.RankedItem.__table__: sum(len(items) for _, items in self.lists),
            db.Judgment.__table__: len(self.judgments),
        }

    def fill(
        self, common: dict[str, int], ids: dict[Table, Any], out: dict[Table, list[dict[str, Any]]]
    ) -> WriteReceipt:
        """Give this task's rows their ids (drawn from ``ids``), link them, and append them to ``out``
        (per table, in insertion order). ``common``: rollout_id, run_id, iteration, task_id."""
        none: Any = iter(())
        receipt = WriteReceipt(rollout_id=common["rollout_id"], task_db_id=common["task_id"])

        # Trees, then nodes with parents before children (the foreign key is checked per row).
        next_node = ids.get(db.TreeNode.__table__, none)
        for row, nodes in zip(self.trees, self.nodes, strict=True):
            tree_id = next(ids[db.Tree.__table__])
            row.update(common, id=tree_id)
            receipt.tree_ids.append(tree_id)
            key_to_id: dict[int, int] = {}
            for node in nodes:
                node_id = key_to_id[node["key"]] = next(next_node)
                parent = node["parent_key"]
                node["id"] = node_id
                node["tree_id"] = tree_id
                node["parent_id"] = None if parent is None else key_to_id[parent]
                out[db.TreeNode.__table__].append(node)
            receipt.node_ids.append(key_to_id)
        out[db.Tree.__table__].extend(self.trees)

        def node_ref(ref: tuple[int, int] | None) -> int | None:
            return None if ref is None else receipt.node_ids[ref[0]][ref[1]]

        # Trajectories and their steps.
        next_step = ids.get(db.Step.__table__, none)
        for row, steps in zip(self.trajectories, self.steps, strict=True):
            traj_id = next(ids[db.Trajectory.__table__])
            row.update(common, id=traj_id)
            receipt.trajectory_ids.append(traj_id)
            for step in steps:
                step["id"] = next(next_step)
                step["trajectory_id"] = traj_id
                out[db.Step.__table__].append(step)
            receipt.step_ids.append([step["id"] for step in steps])
        out[db.Trajectory.__table__].extend(self.trajectories)

        # Pairs.
        for row in self.pairs:
            row.update(common, id=next(ids[db.PreferencePair.__table__]))
            row["chosen_node_id"] = node_ref(row["chosen_node_id"])
            row["rejected_node_id"] = node_ref(row["rejected_node_id"])
            receipt.pair_ids.append(row["id"])
        out[db.PreferencePair.__table__].extend(self.pairs)

        # Ranked lists and their items.
        next_item = ids.get(db.RankedItem.__table__, none)
        for row, items in self.lists:
            row.update(common, id=next(ids[db.RankedList.__table__]))
            receipt.ranked_list_ids.append(row["id"])
            out[db.RankedList.__table__].append(row)
            for item in items:
                item["id"] = next(next_item)
                item["list_id"] = row["id"]
                item["node_id"] = node_ref(item["node_id"])
                out[db.RankedItem.__table__].append(item)

        # Judgments, their targets mapped to database ids.
        flat_steps = [i for step_ids in receipt.step_ids for i in step_ids]
        for row in self.judgments:
            row.update(common, id=next(ids[db.Judgment.__table__]))
            kind, target = row["target_kind"], row["target_id"]
            if kind == "node":
                row["target_id"] = node_ref(target)
            elif kind == "trajectory":
                row["target_id"] = receipt.trajectory_ids[target]
            elif kind == "step":
                row["target_id"] = flat_steps[target]
            receipt.judgment_ids.append(row["id"])
        out[db.Judgment.__table__].extend(self.judgments)
        return receipt

    def _insert_task(self, conn: Connection, task: dict[str, Any]) -> int:
        """Insert the task's row on its first write in this run; return its id."""
        values = {**task, "prompt": self.prompt, "answer": self.answer}
        if conn.dialect.name == "postgresql":
            # Another worker may insert the same task at the same moment (for another iteration).
            made = conn.execute(_INSERT_TASK_PG, values).scalar()
            return made if made is not None else conn.execute(_TASK_ID, task).scalar_one()
        return conn.execute(_INSERT_TASK, values).scalar_one()


def _prebuilt_statements() -> tuple[Any, ...]:
    """The write path's fixed statements, built once (building Core expressions per call is slow)."""
    from sqlalchemy import bindparam
    from sqlalchemy.dialects.postgresql import insert as pg_insert

    it, tk, ro = db.Iteration.__table__, db.Task.__table__, db.Rollout.__table__
    task_id = select(tk.c.id).where(
        tk.c.run_id == bindparam("run_id"),
        tk.c.environment == bindparam("environment"),
        tk.c.task_key == bindparam("task_key"),
    )
    status = select(it.c.status).where(
        it.c.run_id == bindparam("run_id"), it.c.index == bindparam("iteration")
    )
    return (
        select(status.scalar_subquery(), task_id.scalar_subquery()),
        task_id,
        insert(tk).returning(tk.c.id),
        pg_insert(tk).on_conflict_do_nothing().returning(tk.c.id),
        insert(ro).returning(ro.c.id),
    )


_ITERATION_AND_TASK, _TASK_ID, _INSERT_TASK, _INSERT_TASK_PG, _INSERT_ROLLOUT = _prebuilt_statements()

# The tables a task's rows go to, parents before children (foreign keys are checked per row).
ROW_TABLES = [
    db.Tree.__table__, db.TreeNode.__table__, db.Trajectory.__table__, db.Step.__table__,
    db.PreferencePair.__table__, db.RankedList.__table__, db.RankedItem.__table__, db.Judgment.__table__,
]  # fmt: skip
