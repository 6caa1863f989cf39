"""Runs, iterations, checkpoints and metrics: the bookkeeping the loop writes around the results.

``start_run`` (the config is stored without credentials: ``store.redact``), ``finish_run``,
``reopen_run``, ``get_run``, ``list_runs``; ``start_iteration``, ``finish_iteration``,
``finished_iterations``, ``list_iterations``, ``completed_task_ids`` (what resume skips);
``record_checkpoint``, ``latest_checkpoint``; ``log_metrics``, ``metric_series``, ``run_metrics``;
and ``counts`` (rows per table of a run, for resume and fault tests).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from sqlalchemy import Connection, delete, func, insert, select, update
from sqlalchemy.exc import IntegrityError

from treeplay.store import schema as db
from treeplay.store.checks import DONE, RUNNING, _clean_floats, _db_errors, _float, _int, _json, _str
from treeplay.store.database import Store, StoreError
from treeplay.store.records import CheckpointInfo, IterationInfo, RunInfo
from treeplay.store.redact import redact


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
    """Record scalar metrics; ``iteration`` None means run-wide. NaN is kept as NaN.

    A run holds one value per (iteration, key): logging a key again replaces its value (in one
    transaction), so an iteration recorded twice (a resume after a crash between ``log_metrics``
    and ``finish_iteration``) keeps one point per key, the newest. Keys not logged again are kept.
    """
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
    mt = db.Metric.__table__
    same_iteration = mt.c.iteration.is_(None) if iteration is None else mt.c.iteration == iteration
    with _db_errors(f"cannot log metrics of run {run_id}"), store.write() as conn:
        _run_row(conn, run_id)
        conn.execute(delete(mt).where(mt.c.run_id == run_id, same_iteration, mt.c.key.in_([r["key"] for r in rows])))
        conn.execute(insert(mt), rows)


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
