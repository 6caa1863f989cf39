"""The store's read/write API: what the loop, the learners and the inspector call.

Writes:

- ``start_run`` (the config is stored without credentials: ``store.redact``) / ``finish_run``,
  ``start_iteration`` / ``finish_iteration``;
- ``write_task_result``: everything one task produced in an iteration (trees with their nodes,
  trajectories with their steps, pairs, ranked lists, judgments) in ONE transaction, with bulk
  inserts (one ``executemany`` per table). Records refer to each other by local keys; the store
  assigns database ids up front (SQLite: after the table's largest id, under the write lock;
  PostgreSQL: from the table's sequence) so parents, children and pairs are linked without reading
  rows back. A task is written at most once per iteration (a unique ``rollouts`` row).
- ``record_checkpoint``, ``log_metrics``.

Reads: ``preference_data`` (pairs and ranked lists of an iteration and a replay window, what a
learner trains on), ``completed_task_ids`` and ``finished_iterations`` (resume), ``list_runs``,
``list_iterations``, ``list_trees``, ``load_tree``, ``list_pairs``, ``list_trajectories``,
``judgments_for``, ``latest_checkpoint``, ``metric_series``, ``counts``.

Bad input (a record of the wrong type, an unknown pair source, NaN where a number is required, a
tree with a cycle or a dangling parent, ...) raises ``StoreError`` with a one-line message naming the
offending field, before anything is written.
"""

from __future__ import annotations

import json
import math
import operator
from collections import defaultdict, deque
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import Connection, Table, func, insert, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError

from store import schema as db
from store.database import Store, StoreError, first_line
from store.redact import redact
from store.records import (
    ACTION_SPANS,
    PAIR_SOURCES,
    JudgmentRecord,
    NodeRecord,
    PairRecord,
    PreferenceData,
    RankedItem,
    RankedListRecord,
    StepRecord,
    TaskResult,
    TrajectoryRecord,
    TreeRecord,
    check_action_spans,
)

INT_MIN, INT_MAX = -(2**31), 2**31 - 1
JUDGMENT_TARGETS = ("trajectory", "node", "step", "candidate")
DONE = "done"
RUNNING = "running"


# ----------------------------------------------------------------------------------------------
# What the readers return (besides the records of store.records)


@dataclass
class RunInfo:
    """A run as stored: its id, unique name, resolved config, status, times (naive UTC), and the
    one-line reason it stopped early (None unless it "failed" or was "interrupted")."""

    id: int
    name: str
    config: dict[str, Any]
    status: str
    created: datetime
    finished: datetime | None
    reason: str | None = None


@dataclass
class IterationInfo:
    """An iteration as stored, with how many tasks have been written for it."""

    id: int
    run_id: int
    index: int
    policy_version: int
    status: str
    started: datetime
    finished: datetime | None
    timings: dict[str, Any] | None
    metrics: dict[str, Any] | None
    n_tasks: int = 0


@dataclass
class TreeSummary:
    """One stored tree without its nodes (for listings)."""

    id: int
    run_id: int
    iteration: int
    task_id: str
    environment: str
    prompt: str
    policy_version: int
    n_nodes: int
    max_depth: int


@dataclass
class CheckpointInfo:
    """A checkpoint row: which policy version was saved where, after which iteration."""

    id: int
    run_id: int
    iteration: int
    policy_version: int
    uri: str
    metrics: dict[str, Any] | None
    created: datetime


@dataclass
class WriteReceipt:
    """The database ids ``write_task_result`` gave to what it wrote, in the order of the input.

    Attributes:
        rollout_id: The row that marks the task as written for the iteration.
        task_db_id: The task's row.
        tree_ids: One id per ``TaskResult.trees`` entry.
        node_ids: Per tree, a map from the node's local key to its database id.
        trajectory_ids: One id per trajectory.
        step_ids: Per trajectory, the ids of its steps.
        pair_ids, ranked_list_ids, judgment_ids: One id per record.
    """

    rollout_id: int
    task_db_id: int
    tree_ids: list[int] = field(default_factory=list)
    node_ids: list[dict[int, int]] = field(default_factory=list)
    trajectory_ids: list[int] = field(default_factory=list)
    step_ids: list[list[int]] = field(default_factory=list)
    pair_ids: list[int] = field(default_factory=list)
    ranked_list_ids: list[int] = field(default_factory=list)
    judgment_ids: list[int] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------
# Checking and coercing input: each helper names the offending field in its error.


def _int(value: Any, where: str, *, optional: bool = False, bounded: bool = True) -> int | None:
    if type(value) is int and INT_MIN <= value <= INT_MAX:
        return value
    if value is None and optional:
        return None
    if isinstance(value, bool):
        raise StoreError(f"{where} must be an integer, got a bool")
    try:
        number = operator.index(value)
    except TypeError:
        raise StoreError(f"{where} must be an integer, got {type(value).__name__} {value!r:.60}") from None
    if bounded and not INT_MIN <= number <= INT_MAX:
        raise StoreError(f"{where} is {number}, outside the 32-bit integer range of the store's columns")
    return number


def _float(value: Any, where: str, *, optional: bool = False, nan_ok: bool = False) -> float | None:
    if type(value) is float and (value == value or nan_ok):
        return value
    if value is None and optional:
        return None
    if isinstance(value, (bool, str, bytes)) or value is None:
        raise StoreError(f"{where} must be a number, got {type(value).__name__} {value!r:.60}")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise StoreError(f"{where} must be a number, got {type(value).__name__} {value!r:.60}") from None
    if number != number and not nan_ok:
        raise StoreError(f"{where} is NaN")
    return number


def _bool(value: Any, where: str, *, optional: bool = False) -> bool | None:
    if value is None and optional:
        return None
    if value is True or value is False:
        return value
    if type(value).__name__ == "bool_":  # numpy's bool
        return bool(value)
    raise StoreError(f"{where} must be a bool, got {type(value).__name__} {value!r:.60}")


def _str(value: Any, where: str, *, optional: bool = False) -> str | None:
    if type(value) is str and "\x00" not in value:
        return value
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise StoreError(f"{where} must be a string, got {type(value).__name__} {value!r:.60}")
    if "\x00" in value:
        raise StoreError(f"{where} contains a NUL character, which PostgreSQL cannot store")
    return value


def _json(value: Any, where: str) -> Any:
    if value is None:
        return None
    try:
        json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{where} is not JSON-serialisable without NaN: {e}") from None
    return value


def _json_text(value: Any, where: str) -> str | None:
    """``value`` serialised for a JSON column written with raw ``executemany`` (None stays NULL)."""
    if value is None:
        return None
    try:
        return json.dumps(value, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise StoreError(f"{where} is not JSON-serialisable without NaN: {e}") from None


def _clean_floats(values: Mapping[str, Any] | None, where: str) -> dict[str, Any] | None:
    """A dict of named numbers for a JSON column: NaN becomes None (JSON has no NaN)."""
    if values is None:
        return None
    if not isinstance(values, Mapping):
        raise StoreError(f"{where} must be a dict, got {type(values).__name__}")
    out: dict[str, Any] = {}
    for key, v in values.items():
        if isinstance(v, float) and v != v:
            v = None
        elif type(v).__module__ == "numpy":
            v = v.item()
            v = None if isinstance(v, float) and v != v else v
        out[str(key)] = v
    return _json(out, where)


def _of_type(value: Any, kind: type, where: str) -> None:
    if not isinstance(value, kind):
        raise StoreError(f"{where} must be a {kind.__name__}, got {type(value).__name__}")


def _order_tree(tree: TreeRecord, where: str) -> list[NodeRecord]:
    """The tree's nodes with parents before children (breadth first), after checking its shape.

    Raises:
        StoreError: Not exactly one root, a duplicate key, a parent key that is not in the tree,
            or a cycle (nodes that cannot be reached from the root).
    """
    if not isinstance(tree.nodes, list) or not tree.nodes:
        raise StoreError(f"{where} has no nodes (a tree needs exactly one root)")
    children: dict[int, list[NodeRecord]] = defaultdict(list)
    keys: set[int] = set()
    roots: list[NodeRecord] = []
    for i, node in enumerate(tree.nodes):
        if not isinstance(node, NodeRecord):
            raise StoreError(f"{where}.nodes[{i}] must be a NodeRecord, got {type(node).__name__}")
        key = _int(node.key, f"{where}.nodes[{i}].key", bounded=False)
        if key in keys:
            raise StoreError(f"{where} has two nodes with key {key}")
        keys.add(key)
        parent = _int(node.parent_key, f"{where}.nodes[{i}].parent_key", optional=True, bounded=False)
        if parent is None:
            roots.append(node)
        else:
            children[parent].append(node)
    if len(roots) != 1:
        raise StoreError(f"{where} has {len(roots)} roots (nodes with parent_key None); it needs exactly one")
    for parent in children:
        if parent not in keys:
            child = children[parent][0].key
            raise StoreError(f"{where}: node {child} has parent_key {parent}, which is not in the tree")
    ordered: list[NodeRecord] = []
    queue = deque(roots)
    while queue:
        node = queue.popleft()
        ordered.append(node)
        queue.extend(children.get(node.key, ()))
    if len(ordered) != len(tree.nodes):
        stuck = sorted(keys - {n.key for n in ordered})[:5]
        raise StoreError(f"{where} has a cycle: nodes {stuck} cannot be reached from the root")
    return ordered


# ----------------------------------------------------------------------------------------------
# Plumbing


@contextmanager
def _db_errors(what: str) -> Iterator[None]:
    """Turn driver/SQLAlchemy errors into a one-line StoreError saying what we were doing."""
    try:
        yield
    except StoreError:
        raise
    except SQLAlchemyError as e:
        raise StoreError(f"{what}: {first_line(e)}") from None


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


def _run_row(conn: Connection, run_id: int) -> Any:
    row = conn.execute(select(db.Run.__table__).where(db.Run.id == run_id)).first()
    if row is None:
        raise StoreError(f"no run with id {run_id}")
    return row


def _run_info(row: Any) -> RunInfo:
    return RunInfo(row.id, row.name, row.config, row.status, row.created, row.finished, row.reason)


# ----------------------------------------------------------------------------------------------
# Runs and iterations


def start_run(store: Store, name: str, config: dict[str, Any]) -> int:
    """Create a run and return its id.

    Args:
        store: The open store.
        name: A name no other run in this store has.
        config: The resolved run config (JSON-serialisable). It is stored without credentials
            (``store.redact``: URL passwords and the values of keys such as ``api_key`` or
            ``token``), so whoever can read the store cannot read them.

    Raises:
        StoreError: The name is taken, or the config is not JSON.
    """
    _str(name, "run name")
    if not name.strip():
        raise StoreError("run name must not be empty")
    if not isinstance(config, Mapping):
        raise StoreError(f"run config must be a dict, got {type(config).__name__}")
    config = _json(redact(dict(config)), "run config")
    with _db_errors(f"cannot start run {name!r}"), store.write() as conn:
        taken = conn.execute(select(db.Run.id).where(db.Run.name == name)).scalar()
        if taken is not None:
            raise StoreError(
                f"a run named {name!r} already exists (id {taken}); pick another name or resume it"
            )
        try:
            return conn.execute(
                insert(db.Run.__table__).returning(db.Run.id),
                {"name": name, "config": config, "status": RUNNING, "created": db.utcnow()},
            ).scalar_one()
        except IntegrityError:
            raise StoreError(f"a run named {name!r} already exists; pick another name or resume it") from None


def finish_run(store: Store, run_id: int, status: str = DONE, reason: str | None = None) -> None:
    """Mark a run finished (``status`` "done", "failed", "interrupted", ...) and stamp its finish time.

    Args:
        reason: Why it stopped early, kept as one line (the first line of what is given); None for a
            run that finished normally.
    """
    _str(status, "run status")
    if reason is not None:
        lines = [s.strip() for s in _str(reason, "run reason").splitlines() if s.strip()]
        reason = lines[0] if lines else "(no message)"
    with _db_errors(f"cannot finish run {run_id}"), store.write() as conn:
        _run_row(conn, run_id)
        conn.execute(
            update(db.Run.__table__)
            .where(db.Run.id == run_id)
            .values(status=status, finished=db.utcnow(), reason=reason)
        )


def reopen_run(store: Store, run_id: int) -> None:
    """A run that is being resumed is running again: no finish time, no reason."""
    with _db_errors(f"cannot reopen run {run_id}"), store.write() as conn:
        _run_row(conn, run_id)
        conn.execute(
            update(db.Run.__table__)
            .where(db.Run.id == run_id)
            .values(status=RUNNING, finished=None, reason=None)
        )


def get_run(store: Store, run: int | str) -> RunInfo:
    """A run by id (int) or by name (str).

    Raises:
        StoreError: No such run.
    """
    table = db.Run.__table__
    if isinstance(run, str):
        clause = db.Run.name == run
    else:
        clause = db.Run.id == _int(run, "run")
    with _db_errors("cannot read runs"), store.read() as conn:
        row = conn.execute(select(table).where(clause)).first()
    if row is None:
        raise StoreError(f"no run {run!r} in the store at {store.safe_url}")
    return _run_info(row)


def list_runs(store: Store) -> list[RunInfo]:
    """Every run, oldest first."""
    with _db_errors("cannot read runs"), store.read() as conn:
        rows = conn.execute(select(db.Run.__table__).order_by(db.Run.id)).all()
    return [_run_info(r) for r in rows]


def start_iteration(store: Store, run_id: int, index: int, policy_version: int) -> int:
    """Start iteration ``index`` of a run and return its id; resume it if it is unfinished.

    An iteration that exists and is not "done" (it was interrupted or failed) is returned as it is,
    with the tasks already written for it kept (see ``completed_task_ids``); its status goes back
    to "running".

    Raises:
        StoreError: No such run, or that iteration is already finished.
    """
    index = _int(index, "iteration index")
    policy_version = _int(policy_version, "policy_version")
    table = db.Iteration.__table__
    with _db_errors(f"cannot start iteration {index} of run {run_id}"), store.write() as conn:
        _run_row(conn, run_id)
        row = conn.execute(
            select(table.c.id, table.c.status).where(table.c.run_id == run_id, table.c.index == index)
        ).first()
        if row is not None:
            if row.status == DONE:
                raise StoreError(f"iteration {index} of run {run_id} is already finished")
            if row.status != RUNNING:
                conn.execute(update(table).where(table.c.id == row.id).values(status=RUNNING, finished=None))
            return row.id
        return conn.execute(
            insert(table).returning(table.c.id),
            {
                "run_id": run_id,
                "index": index,
                "policy_version": policy_version,
                "status": RUNNING,
                "started": db.utcnow(),
            },
        ).scalar_one()


def finish_iteration(
    store: Store,
    run_id: int,
    index: int,
    metrics: dict[str, float] | None = None,
    timings: dict[str, float] | None = None,
    status: str = DONE,
) -> None:
    """Mark an iteration finished (or "failed"), with its summary metrics and phase timings.

    NaN values in ``metrics``/``timings`` are stored as null (JSON has no NaN).

    Raises:
        StoreError: The iteration was never started.
    """
    _str(status, "iteration status")
    metrics = _clean_floats(metrics, "iteration metrics")
    timings = _clean_floats(timings, "iteration timings")
    table = db.Iteration.__table__
    with _db_errors(f"cannot finish iteration {index} of run {run_id}"), store.write() as conn:
        done = conn.execute(
            update(table)
            .where(table.c.run_id == run_id, table.c.index == index)
            .values(status=status, finished=db.utcnow(), metrics=metrics, timings=timings)
        )
        if done.rowcount == 0:
            raise StoreError(f"iteration {index} of run {run_id} was never started")


def finished_iterations(store: Store, run_id: int) -> list[int]:
    """Indices of the run's iterations whose status is "done", ascending."""
    table = db.Iteration.__table__
    with _db_errors("cannot read iterations"), store.read() as conn:
        rows = conn.execute(
            select(table.c.index)
            .where(table.c.run_id == run_id, table.c.status == DONE)
            .order_by(table.c.index)
        )
        return [r[0] for r in rows]


def list_iterations(store: Store, run_id: int) -> list[IterationInfo]:
    """The run's iterations in index order, each with its number of written tasks."""
    it, ro = db.Iteration.__table__, db.Rollout.__table__
    n_tasks = (
        select(func.count()).where(ro.c.run_id == it.c.run_id, ro.c.iteration == it.c.index).scalar_subquery()
    )
    with _db_errors("cannot read iterations"), store.read() as conn:
        rows = conn.execute(
            select(it, n_tasks.label("n_tasks")).where(it.c.run_id == run_id).order_by(it.c.index)
        ).all()
    return [
        IterationInfo(
            r.id,
            r.run_id,
            r.index,
            r.policy_version,
            r.status,
            r.started,
            r.finished,
            r.timings,
            r.metrics,
            r.n_tasks,
        )
        for r in rows
    ]


def completed_task_ids(store: Store, run_id: int, iteration: int) -> set[str]:
    """Task ids (``Task.id``, the task keys) already written for an iteration: what resume skips."""
    ro, tk = db.Rollout.__table__, db.Task.__table__
    with _db_errors("cannot read written tasks"), store.read() as conn:
        rows = conn.execute(
            select(tk.c.task_key)
            .join(ro, ro.c.task_id == tk.c.id)
            .where(ro.c.run_id == run_id, ro.c.iteration == iteration)
        )
        return {r[0] for r in rows}


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


def write_task_results(
    store: Store, run_id: int, iteration: int, results: Sequence[TaskResult]
) -> list[WriteReceipt]:
    """Write several tasks' results, one transaction per task (a failure keeps the earlier ones)."""
    return [write_task_result(store, run_id, iteration, r) for r in results]


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
        if status is None:
            raise StoreError(
                f"iteration {iteration} of run {run_id} was never started (call start_iteration)"
            )
        if status == DONE:
            raise StoreError(f"iteration {iteration} of run {run_id} is finished; it takes no more tasks")
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
            raise StoreError(
                f"task {result.task_id!r} was already written for iteration {iteration} of run {run_id}"
            ) from None
        common = {"rollout_id": rollout_id, "run_id": run_id, "iteration": iteration, "task_id": task_db_id}
        receipt = WriteReceipt(rollout_id=rollout_id, task_db_id=task_db_id)

        # Every id up front, in one query, so parents, children, pairs and judgments link directly.
        tables = {
            db.Tree.__table__: len(self.trees),
            db.TreeNode.__table__: sum(len(n) for n in self.nodes),
            db.Trajectory.__table__: len(self.trajectories),
            db.Step.__table__: sum(len(s) for s in self.steps),
            db.PreferencePair.__table__: len(self.pairs),
            db.RankedList.__table__: len(self.lists),
            db.RankedItem.__table__: sum(len(items) for _, items in self.lists),
            db.Judgment.__table__: len(self.judgments),
        }
        ids = _allocate_ids(conn, tables)
        tree_ids, node_ids, traj_ids, step_ids, pair_ids, list_ids, item_ids, judgment_ids = (
            ids.get(t, []) for t in tables
        )

        # Trees, then nodes with parents before children (the foreign key is checked per row).
        node_rows: list[dict[str, Any]] = []
        next_node = iter(node_ids)
        for tree_id, row, nodes in zip(tree_ids, self.trees, self.nodes, strict=True):
            row.update(common, id=tree_id)
            key_to_id: dict[int, int] = {}
            for node in nodes:
                node_id = key_to_id[node["key"]] = next(next_node)
                parent = node["parent_key"]
                node["id"] = node_id
                node["tree_id"] = tree_id
                node["parent_id"] = None if parent is None else key_to_id[parent]
                node_rows.append(node)
            receipt.node_ids.append(key_to_id)
        receipt.tree_ids = tree_ids
        _insert_many(conn, db.Tree.__table__, self.trees)
        _insert_many(conn, db.TreeNode.__table__, node_rows)

        def node_ref(ref: tuple[int, int] | None) -> int | None:
            return None if ref is None else receipt.node_ids[ref[0]][ref[1]]

        # Trajectories and their steps.
        step_rows = []
        next_step = iter(step_ids)
        for traj_id, row, steps in zip(traj_ids, self.trajectories, self.steps, strict=True):
            row.update(common, id=traj_id)
            for step in steps:
                step["id"] = next(next_step)
                step["trajectory_id"] = traj_id
                step_rows.append(step)
            receipt.step_ids.append([step["id"] for step in steps])
        receipt.trajectory_ids = traj_ids
        _insert_many(conn, db.Trajectory.__table__, self.trajectories)
        _insert_many(conn, db.Step.__table__, step_rows)

        # Pairs.
        for pair_id, row in zip(pair_ids, self.pairs, strict=True):
            row.update(common, id=pair_id)
            row["chosen_node_id"] = node_ref(row["chosen_node_id"])
            row["rejected_node_id"] = node_ref(row["rejected_node_id"])
        receipt.pair_ids = pair_ids
        _insert_many(conn, db.PreferencePair.__table__, self.pairs)

        # Ranked lists and their items.
        list_rows, item_rows = [], []
        next_item = iter(item_ids)
        for list_id, (row, items) in zip(list_ids, self.lists, strict=True):
            row.update(common, id=list_id)
            list_rows.append(row)
            for item in items:
                item["id"] = next(next_item)
                item["list_id"] = list_id
                item["node_id"] = node_ref(item["node_id"])
                item_rows.append(item)
        receipt.ranked_list_ids = list_ids
        _insert_many(conn, db.RankedList.__table__, list_rows)
        _insert_many(conn, db.RankedItem.__table__, item_rows)

        # Judgments, their targets mapped to database ids.
        flat_steps = step_ids
        for judgment_id, row in zip(judgment_ids, self.judgments, strict=True):
            row.update(common, id=judgment_id)
            kind, target = row["target_kind"], row["target_id"]
            if kind == "node":
                row["target_id"] = node_ref(target)
            elif kind == "trajectory":
                row["target_id"] = traj_ids[target]
            elif kind == "step":
                row["target_id"] = flat_steps[target]
        receipt.judgment_ids = judgment_ids
        _insert_many(conn, db.Judgment.__table__, self.judgments)
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
# Checkpoints and metrics


def record_checkpoint(
    store: Store,
    run_id: int,
    iteration: int,
    policy_version: int,
    uri: str,
    metrics: dict[str, Any] | None = None,
) -> int:
    """Record that ``policy_version`` was saved at ``uri`` after ``iteration``; return the row id."""
    row = {
        "run_id": _int(run_id, "run_id"),
        "iteration": _int(iteration, "iteration"),
        "policy_version": _int(policy_version, "policy_version"),
        "uri": _str(uri, "checkpoint uri"),
        "metrics": _clean_floats(metrics, "checkpoint metrics"),
        "created": db.utcnow(),
    }
    ck = db.Checkpoint.__table__
    with _db_errors(f"cannot record checkpoint of run {run_id}"), store.write() as conn:
        _run_row(conn, run_id)
        return conn.execute(insert(ck).returning(ck.c.id), row).scalar_one()


def latest_checkpoint(store: Store, run_id: int) -> CheckpointInfo | None:
    """The run's most recently recorded checkpoint, or None."""
    ck = db.Checkpoint.__table__
    with _db_errors("cannot read checkpoints"), store.read() as conn:
        r = conn.execute(select(ck).where(ck.c.run_id == run_id).order_by(ck.c.id.desc()).limit(1)).first()
    if r is None:
        return None
    return CheckpointInfo(r.id, r.run_id, r.iteration, r.policy_version, r.uri, r.metrics, r.created)


def log_metrics(store: Store, run_id: int, iteration: int | None, metrics: Mapping[str, float]) -> None:
    """Append scalar metrics (one bulk insert); ``iteration`` None means run-wide. NaN is kept as NaN."""
    iteration = _int(iteration, "iteration", optional=True)
    if not isinstance(metrics, Mapping):
        raise StoreError(f"metrics must be a dict of numbers, got {type(metrics).__name__}")
    now = db.utcnow()
    rows = []
    for key, value in metrics.items():
        _str(key, "metric name")
        number = _float(value, f"metric {key!r}", nan_ok=True)
        # SQLite cannot hold NaN (it reads back NULL); store NULL on both backends, read back NaN.
        value = None if number != number else number
        rows.append({"run_id": run_id, "iteration": iteration, "key": key, "value": value, "created": now})
    if not rows:
        return
    with _db_errors(f"cannot log metrics of run {run_id}"), store.write() as conn:
        _run_row(conn, run_id)
        conn.execute(insert(db.Metric.__table__), rows)


def metric_series(store: Store, run_id: int) -> dict[str, list[tuple[int, float]]]:
    """Per metric name, its (iteration, value) points in iteration order (run-wide ones left out)."""
    mt = db.Metric.__table__
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with _db_errors("cannot read metrics"), store.read() as conn:
        rows = conn.execute(
            select(mt.c.key, mt.c.iteration, mt.c.value)
            .where(mt.c.run_id == run_id, mt.c.iteration.is_not(None))
            .order_by(mt.c.key, mt.c.iteration, mt.c.id)
        )
        for key, iteration, value in rows:
            series[key].append((iteration, float("nan") if value is None else value))
    return dict(series)


def run_metrics(store: Store, run_id: int) -> dict[str, float]:
    """Run-wide metrics (logged with iteration None); the latest value of each name."""
    mt = db.Metric.__table__
    with _db_errors("cannot read metrics"), store.read() as conn:
        rows = conn.execute(
            select(mt.c.key, mt.c.value)
            .where(mt.c.run_id == run_id, mt.c.iteration.is_(None))
            .order_by(mt.c.id)
        )
        return {k: float("nan") if v is None else v for k, v in rows}


# ----------------------------------------------------------------------------------------------
# Counting (resume and fault tests)


def counts(store: Store, run_id: int) -> dict[str, int]:
    """Rows per table that belong to a run (one query)."""
    t = {
        m.__tablename__: m.__table__
        for m in (
            db.Iteration,
            db.Task,
            db.Rollout,
            db.Trajectory,
            db.Tree,
            db.PreferencePair,
            db.RankedList,
            db.Judgment,
            db.Checkpoint,
            db.Metric,
        )
    }
    st, tn, ri = db.Step.__table__, db.TreeNode.__table__, db.RankedItem.__table__
    tj, tr, rl = t["trajectories"], t["trees"], t["ranked_lists"]
    parts = {
        name: select(func.count()).select_from(table).where(table.c.run_id == run_id)
        for name, table in t.items()
    }
    parts["steps"] = (
        select(func.count())
        .select_from(st.join(tj, tj.c.id == st.c.trajectory_id))
        .where(tj.c.run_id == run_id)
    )
    parts["tree_nodes"] = (
        select(func.count()).select_from(tn.join(tr, tr.c.id == tn.c.tree_id)).where(tr.c.run_id == run_id)
    )
    parts["ranked_items"] = (
        select(func.count()).select_from(ri.join(rl, rl.c.id == ri.c.list_id)).where(rl.c.run_id == run_id)
    )
    query = select(*(q.scalar_subquery().label(name) for name, q in parts.items()))
    with _db_errors("cannot count rows"), store.read() as conn:
        row = conn.execute(query).one()
    return dict(row._mapping)


# ----------------------------------------------------------------------------------------------
# Reading trees a node at a time (the inspector: large trees load their children on demand)


@dataclass
class NodeView:
    """One stored tree node with where it sits: its tree and how many children it has.

    ``node.key`` = ``node.db_id`` = the node's database id; ``node.parent_key`` is the parent's id.
    """

    tree_id: int
    node: NodeRecord
    n_children: int


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


def tree_pairs(store: Store, tree_id: int) -> list[PairRecord]:
    """Pairs whose chosen or rejected node belongs to the tree, in write order."""
    pp, tn = db.PreferencePair.__table__, db.TreeNode.__table__
    in_tree = select(tn.c.id).where(tn.c.tree_id == _int(tree_id, "tree id"))
    with _db_errors(f"cannot read the pairs of tree {tree_id}"), store.read() as conn:
        return _select_pairs(conn, pp.c.chosen_node_id.in_(in_tree) | pp.c.rejected_node_id.in_(in_tree))
