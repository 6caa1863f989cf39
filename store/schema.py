"""The store's tables as a typed SQLAlchemy 2.x ORM (the same schema on SQLite and PostgreSQL).

One run holds iterations; in each iteration every task is written once (a ``Rollout`` row, unique per
(run, iteration, task)), together with everything it produced: trees and their nodes, trajectories and
their steps, preference pairs, ranked lists, judgments. Checkpoints and metrics hang off the run.

Choices worth knowing:

- Tasks belong to a run (unique per run, environment and task key), so runs never share or overwrite
  each other's task text.
- Rows written for a task carry ``run_id`` and the iteration *index* (``iteration``) next to the
  ``rollout_id`` they came from, so the hot reads (preference data for an iteration window, trees of
  an iteration) need no joins.
- Tree nodes are an adjacency list: ``parent_id`` points at the parent node (None at the root).
- JSON is used only for free-form data: a run's resolved config, iteration metrics and timings,
  checkpoint metrics, step rewards of a ranked item, and the ``info`` extras of records.
- Times are naive UTC datetimes (SQLite keeps no time zone; both backends then agree).

The ORM classes are for reading and for the naive baseline in ``bench/store.py``; the writes in
``store.queries`` go through Core bulk inserts on the same tables.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    ForeignKeyConstraint,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

# Fixed constraint names make migrations reproducible and equal on both backends.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_N_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# Python None is SQL NULL in JSON columns (not the JSON text 'null').
FreeJSON = JSON(none_as_null=True)


def utcnow() -> datetime:
    """The current UTC time as a naive datetime (what every time column holds)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    """Declarative base of every store table."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Run(Base):
    """One self-improvement run: its unique name, resolved config, status and why it stopped."""

    __tablename__ = "runs"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String, unique=True)
    config: Mapped[dict[str, Any]] = mapped_column(JSON)
    status: Mapped[str] = mapped_column(String(32), default="running")
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(DateTime)
    # One line saying why a run stopped early ("failed", "interrupted"); None while running or done.
    reason: Mapped[str | None] = mapped_column(Text)


class Iteration(Base):
    """One iteration of a run: rollout, judge, store, learn. ``index`` is unique within the run."""

    __tablename__ = "iterations"
    __table_args__ = (UniqueConstraint("run_id", "index"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    index: Mapped[int] = mapped_column(Integer)
    policy_version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(32), default="running")
    started: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    finished: Mapped[datetime | None] = mapped_column(DateTime)
    timings: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)


class Task(Base):
    """A task as a run saw it (prompt and gold answer); unique per (run, environment, task_key)."""

    __tablename__ = "tasks"
    __table_args__ = (UniqueConstraint("run_id", "environment", "task_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    environment: Mapped[str] = mapped_column(String)
    task_key: Mapped[str] = mapped_column(String)
    prompt: Mapped[str] = mapped_column(Text)
    answer: Mapped[str | None] = mapped_column(Text)


class Rollout(Base):
    """The fact that a task was written for an iteration. Unique, so a task is never written twice."""

    __tablename__ = "rollouts"
    __table_args__ = (
        UniqueConstraint("run_id", "iteration", "task_id"),
        ForeignKeyConstraint(
            ["run_id", "iteration"], ["iterations.run_id", "iterations.index"], ondelete="CASCADE"
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"))
    written: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class WrittenWithTask:
    """Columns of every row written by ``write_task_result``: which rollout, run and iteration."""

    rollout_id: Mapped[int] = mapped_column(ForeignKey("rollouts.id", ondelete="CASCADE"), index=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    iteration: Mapped[int] = mapped_column(Integer)


class Trajectory(WrittenWithTask, Base):
    """A whole episode of one agent on one task."""

    __tablename__ = "trajectories"
    __table_args__ = (Index(None, "run_id", "iteration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    environment: Mapped[str] = mapped_column(String)
    agent_id: Mapped[str] = mapped_column(String)
    policy_version: Mapped[int] = mapped_column(Integer)
    outcome: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(32))
    error: Mapped[str | None] = mapped_column(Text)
    info: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)

    steps: Mapped[list[Step]] = relationship(order_by="Step.id", passive_deletes=True)


class Step(Base):
    """One step of a trajectory: action, observation, reward, and what judges/critics added."""

    __tablename__ = "steps"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    trajectory_id: Mapped[int] = mapped_column(ForeignKey("trajectories.id", ondelete="CASCADE"), index=True)
    index: Mapped[int] = mapped_column(Integer)
    agent_id: Mapped[str] = mapped_column(String)
    observation: Mapped[str] = mapped_column(Text)
    action: Mapped[str] = mapped_column(Text)
    reward: Mapped[float] = mapped_column(Float)
    credit: Mapped[float | None] = mapped_column(Float)
    rubric: Mapped[str | None] = mapped_column(Text)
    logprob: Mapped[float | None] = mapped_column(Float)
    info: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)


class Tree(WrittenWithTask, Base):
    """A preference tree for one task; its nodes live in ``tree_nodes``."""

    __tablename__ = "trees"
    __table_args__ = (Index(None, "run_id", "iteration"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    environment: Mapped[str] = mapped_column(String)
    prompt: Mapped[str] = mapped_column(Text)
    policy_version: Mapped[int] = mapped_column(Integer)
    n_nodes: Mapped[int] = mapped_column(Integer)
    max_depth: Mapped[int] = mapped_column(Integer)
    info: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)

    nodes: Mapped[list[TreeNode]] = relationship(
        order_by="TreeNode.id", back_populates="tree", passive_deletes=True
    )


class TreeNode(Base):
    """A node of a preference tree (adjacency list): the step that leads here and its search stats."""

    __tablename__ = "tree_nodes"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tree_id: Mapped[int] = mapped_column(ForeignKey("trees.id", ondelete="CASCADE"), index=True)
    parent_id: Mapped[int | None] = mapped_column(ForeignKey("tree_nodes.id", ondelete="CASCADE"), index=True)
    step: Mapped[str] = mapped_column(Text)
    depth: Mapped[int] = mapped_column(Integer)
    visits: Mapped[int] = mapped_column(Integer)
    value: Mapped[float] = mapped_column(Float)
    prior: Mapped[float] = mapped_column(Float)
    reward: Mapped[float] = mapped_column(Float)
    terminal: Mapped[bool] = mapped_column(Boolean)
    correct: Mapped[bool | None] = mapped_column(Boolean)
    selected: Mapped[bool] = mapped_column(Boolean)
    policy_version: Mapped[int] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    info: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)

    tree: Mapped[Tree] = relationship(back_populates="nodes")
    parent: Mapped[TreeNode | None] = relationship(back_populates="children", remote_side=[id])
    children: Mapped[list[TreeNode]] = relationship(back_populates="parent", passive_deletes=True)


class PreferencePair(WrittenWithTask, Base):
    """A step- or response-level preference: ``chosen`` over ``rejected`` after ``prompt``."""

    __tablename__ = "preference_pairs"
    __table_args__ = (Index(None, "run_id", "iteration", "source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    chosen: Mapped[str] = mapped_column(Text)
    rejected: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    margin: Mapped[float | None] = mapped_column(Float)
    weight: Mapped[float] = mapped_column(Float)
    label_smoothing: Mapped[float] = mapped_column(Float)
    shared_prefix_chars: Mapped[int] = mapped_column(Integer)
    chosen_visits: Mapped[int | None] = mapped_column(Integer)
    rejected_visits: Mapped[int | None] = mapped_column(Integer)
    chosen_node_id: Mapped[int | None] = mapped_column(
        ForeignKey("tree_nodes.id", ondelete="SET NULL"), index=True
    )
    rejected_node_id: Mapped[int | None] = mapped_column(
        ForeignKey("tree_nodes.id", ondelete="SET NULL"), index=True
    )
    info: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)


class RankedList(WrittenWithTask, Base):
    """Scored responses to one prompt, for listwise learners (TPO); items in ``ranked_items``."""

    __tablename__ = "ranked_lists"
    __table_args__ = (Index(None, "run_id", "iteration", "source"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    task_id: Mapped[int] = mapped_column(ForeignKey("tasks.id", ondelete="CASCADE"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    source: Mapped[str] = mapped_column(String(16))
    info: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)


class RankedItem(Base):
    """One response of a ranked list, at ``position`` in the list as written."""

    __tablename__ = "ranked_items"
    __table_args__ = (UniqueConstraint("list_id", "position"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    list_id: Mapped[int] = mapped_column(ForeignKey("ranked_lists.id", ondelete="CASCADE"))
    position: Mapped[int] = mapped_column(Integer)
    text: Mapped[str] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)
    step_rewards: Mapped[list[float] | None] = mapped_column(FreeJSON)
    node_id: Mapped[int | None] = mapped_column(ForeignKey("tree_nodes.id", ondelete="SET NULL"), index=True)


class Judgment(WrittenWithTask, Base):
    """A judge's score of a target: ``target_kind`` names the table ``target_id`` points into
    ("trajectory", "node", "step"), or "candidate" for free text in ``target_text``."""

    __tablename__ = "judgments"
    __table_args__ = (Index(None, "target_kind", "target_id"), Index(None, "run_id", "iteration"))

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    judge: Mapped[str] = mapped_column(String)
    target_kind: Mapped[str] = mapped_column(String(16))
    target_id: Mapped[int | None] = mapped_column(Integer)
    target_text: Mapped[str | None] = mapped_column(Text)
    score: Mapped[float] = mapped_column(Float)
    rationale: Mapped[str] = mapped_column(Text)
    info: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)


class Checkpoint(Base):
    """Saved policy weights: which version, where (a URI), and how it scored."""

    __tablename__ = "checkpoints"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"), index=True)
    iteration: Mapped[int] = mapped_column(Integer)
    policy_version: Mapped[int] = mapped_column(Integer)
    uri: Mapped[str] = mapped_column(Text)
    metrics: Mapped[dict[str, Any] | None] = mapped_column(FreeJSON)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class Metric(Base):
    """One scalar of a run (per iteration, or run-wide when ``iteration`` is None); NaN is stored NULL.

    One row per (run, key, iteration): the unique index holds it for iterations (SQL counts NULLs as
    distinct, so for run-wide rows ``log_metrics``, which replaces a key's old row, holds it alone);
    led by (run_id, key), it also serves the per-key reads.
    """

    __tablename__ = "metrics"
    __table_args__ = (Index(None, "run_id", "key", "iteration", unique=True),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("runs.id", ondelete="CASCADE"))
    iteration: Mapped[int | None] = mapped_column(Integer)
    key: Mapped[str] = mapped_column(String)
    value: Mapped[float | None] = mapped_column(Float)
    created: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
