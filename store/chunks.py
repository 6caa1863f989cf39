"""Writing a chunk of tasks at once: ``write_task_results``.

The loop writes the results of a chunk of rollouts (128 tasks in the demo) as they come back. Task by
task, each in its own transaction, that is some ten statements and a commit per task; here the whole
chunk shares one transaction and one statement per table:

1. every task is checked and coerced before the transaction (``store.writes._Rows``); a bad one is
   left out;
2. one query says whether the iteration takes tasks, one which of the chunk's tasks the run already
   has, one which of those this iteration already wrote (those, and a task that comes twice in the
   chunk, are left out: a task is written at most once per iteration);
3. one query reserves the ids of every row of the chunk (as ``write_task_result`` does for one task),
   the rows are linked in memory, and each table gets one ``executemany``.

One task is still written whole or not at all. Should another writer add one of these tasks between
the check and the insert (the SQLite write lock rules that out; on PostgreSQL the unique ``rollouts``
row catches it), the chunk's transaction is rolled back and the tasks are written one by one, a
savepoint each, so that only the task written elsewhere is left out. The first task left out is then
raised as a ``StoreError`` naming it; the others are in the store.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection, Table, select
from sqlalchemy.exc import IntegrityError

from treeplay.store import schema as db
from treeplay.store.checks import _db_errors, _int
from treeplay.store.database import Store, StoreError
from treeplay.store.records import TaskResult, WriteReceipt
from treeplay.store.writes import (
    ROW_TABLES,
    _allocate_ids,
    _already_written,
    _check_takes_tasks,
    _insert_many,
    _plan,
    _Rows,
)


def write_task_results(
    store: Store, run_id: int, iteration: int, results: Sequence[TaskResult]
) -> list[WriteReceipt]:
    """Write several tasks' results (a chunk) in ONE transaction, one ``executemany`` per table.

    Returns:
        The receipts of the tasks written, in input order.

    Raises:
        StoreError: The iteration was never started or is finished (nothing written), or the first
            task that was left out (bad input, or already written for this iteration), by name; the
            other tasks are in the store.
    """
    run_id, iteration = _int(run_id, "run_id"), _int(iteration, "iteration")
    planned, failures = _planned(results)
    receipts: list[WriteReceipt] = []
    if planned:
        with _db_errors(f"cannot write {len(planned)} tasks for iteration {iteration} of run {run_id}"):
            try:
                with store.write() as conn:
                    receipts, refused = _write_chunk(conn, run_id, iteration, planned)
            except IntegrityError:  # another writer got there between our check and our insert
                planned, _ = _planned(results)  # afresh: linking the rows filled in their ids
                with store.write() as conn:
                    receipts, refused = _write_one_by_one(conn, run_id, iteration, planned)
        failures.update(refused)
    if failures:
        raise failures[min(failures)]  # the first in input order
    return receipts


def _planned(results: Sequence[TaskResult]) -> tuple[list[tuple[int, _Rows]], dict[int, StoreError]]:
    """Each result checked and coerced (before any transaction), with its position; or why not."""
    planned, failures = [], {}
    for i, r in enumerate(results):
        try:
            planned.append((i, _Rows(r, _plan(r))))
        except StoreError as e:
            failures[i] = e
    return planned, failures


def _write_chunk(
    conn: Connection, run_id: int, iteration: int, planned: list[tuple[int, _Rows]]
) -> tuple[list[WriteReceipt], dict[int, StoreError]]:
    it, tk, ro = db.Iteration.__table__, db.Task.__table__, db.Rollout.__table__
    status = conn.execute(select(it.c.status).where(it.c.run_id == run_id, it.c.index == iteration)).scalar()
    _check_takes_tasks(status, run_id, iteration)
    keys = sorted({rows.result.task_id for _, rows in planned})
    known = {
        (r.environment, r.task_key): r.id
        for r in conn.execute(
            select(tk.c.id, tk.c.environment, tk.c.task_key).where(tk.c.run_id == run_id, tk.c.task_key.in_(keys))
        )
    }
    written = set(
        conn.execute(
            select(ro.c.task_id).where(
                ro.c.run_id == run_id, ro.c.iteration == iteration, ro.c.task_id.in_(sorted(known.values()))
            )
        ).scalars()
    )
    todo: list[_Rows] = []
    refused: dict[int, StoreError] = {}
    seen: set[tuple[str, str]] = set()
    for i, rows in planned:
        key = (rows.environment, rows.result.task_id)
        if key in seen or known.get(key) in written:
            refused[i] = _already_written(rows.result.task_id, run_id, iteration)
        else:
            seen.add(key)
            todo.append(rows)
    new = [rows for rows in todo if (rows.environment, rows.result.task_id) not in known]

    # Every id of the chunk in one query: new tasks, rollouts, and each task's own rows.
    wanted: dict[Table, int] = {tk: len(new), ro: len(todo)}
    for rows in todo:
        for table, n in rows.wanted().items():
            wanted[table] = wanted.get(table, 0) + n
    ids = {t: iter(v) for t, v in _allocate_ids(conn, wanted).items()}
    task_rows = []
    for rows in new:
        task_id = next(ids[tk])
        known[(rows.environment, rows.result.task_id)] = task_id
        task_rows.append({"id": task_id, "run_id": run_id, "environment": rows.environment,
                          "task_key": rows.result.task_id, "prompt": rows.prompt, "answer": rows.answer})
    rollout_rows: list[dict[str, Any]] = []
    out: dict[Table, list[dict[str, Any]]] = {t: [] for t in ROW_TABLES}
    receipts = []
    now = db.utcnow()
    for rows in todo:
        common = {"rollout_id": next(ids[ro]), "run_id": run_id, "iteration": iteration,
                  "task_id": known[(rows.environment, rows.result.task_id)]}
        rollout_rows.append({"id": common["rollout_id"], "run_id": run_id, "iteration": iteration,
                             "task_id": common["task_id"], "written": now})
        receipts.append(rows.fill(common, ids, out))
    _insert_many(conn, tk, task_rows)
    _insert_many(conn, ro, rollout_rows)
    for table in ROW_TABLES:
        _insert_many(conn, table, out[table])
    return receipts, refused


def _write_one_by_one(
    conn: Connection, run_id: int, iteration: int, planned: list[tuple[int, _Rows]]
) -> tuple[list[WriteReceipt], dict[int, StoreError]]:
    """The careful way: a savepoint per task, so that a task that fails is rolled back alone."""
    receipts, refused = [], {}
    for i, rows in planned:
        try:
            with conn.begin_nested():
                receipts.append(rows.write(conn, run_id, iteration))
        except StoreError as e:
            refused[i] = e
    return receipts, refused
