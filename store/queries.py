"""The store's read/write API: what the loop, the learners and the inspector call.

This module gathers the API in one place; the code lives in the modules named below, and every
caller imports it from here (``from treeplay.store import queries``).

Writes (``store.writes``, ``store.chunks`` and ``store.runs``):

- ``start_run`` (the config is stored without credentials: ``store.redact``) / ``finish_run`` /
  ``reopen_run``, ``start_iteration`` / ``finish_iteration``;
- ``write_task_result``: everything one task produced in an iteration (trees with their nodes,
  trajectories with their steps, pairs, ranked lists, judgments) in ONE transaction, with bulk
  inserts (one ``executemany`` per table). Records refer to each other by local keys; the store
  assigns database ids up front (SQLite: after the table's largest id, under the write lock;
  PostgreSQL: from the table's sequence) so parents, children and pairs are linked without reading
  rows back. A task is written at most once per iteration (a unique ``rollouts`` row).
- ``write_task_results`` (``store.chunks``): a chunk of tasks in one transaction, one statement per
  table for the whole chunk, each task still whole or not at all.
- ``record_checkpoint``, ``log_metrics``.

Reads (``store.runs`` for runs, iterations, checkpoints, metrics and counts; ``store.reads`` for
the rest): ``preference_data`` (pairs and ranked lists of an iteration and a replay window, what a
learner trains on), ``completed_task_ids`` and ``finished_iterations`` (resume), ``list_runs``,
``list_iterations``, ``list_trees``, ``load_tree``, ``list_pairs``, ``list_trajectories``,
``judgments_for``, ``latest_checkpoint``, ``metric_series``, ``counts``, and the inspector's
node-at-a-time readers (``get_tree``, ``tree_root``, ``get_node``, ``child_nodes``, ``node_path``,
``pairs_of_nodes``, ``trees_of_nodes``, ``tree_pairs``).

What they take and return are the dataclasses of ``store.records`` (``TaskResult`` and the row
records; ``RunInfo``, ``IterationInfo``, ``TreeSummary``, ``CheckpointInfo``, ``WriteReceipt``,
``NodeView``), re-exported here.

Bad input (a record of the wrong type, an unknown pair source, NaN where a number is required, a
tree with a cycle or a dangling parent, ...) raises ``StoreError`` with a one-line message naming the
offending field, before anything is written (the checks are in ``store.checks``).
"""

from __future__ import annotations

from treeplay.store.checks import DONE, INT_MAX, INT_MIN, JUDGMENT_TARGETS, RUNNING
from treeplay.store.chunks import write_task_results
from treeplay.store.database import Store, StoreError, first_line
from treeplay.store.reads import (
    child_nodes,
    get_node,
    get_tree,
    judgments_for,
    list_judgments,
    list_pairs,
    list_ranked_lists,
    list_trajectories,
    list_trees,
    load_tree,
    node_path,
    pairs_of_nodes,
    preference_data,
    tree_pairs,
    tree_root,
    trees_of_nodes,
)
from treeplay.store.records import (
    ACTION_SPANS,
    PAIR_SOURCES,
    CheckpointInfo,
    IterationInfo,
    JudgmentRecord,
    NodeRecord,
    NodeView,
    PairRecord,
    PreferenceData,
    RankedItem,
    RankedListRecord,
    RunInfo,
    StepRecord,
    TaskResult,
    TrajectoryRecord,
    TreeRecord,
    TreeSummary,
    WriteReceipt,
    check_action_spans,
)
from treeplay.store.redact import redact
from treeplay.store.runs import (
    completed_task_ids,
    counts,
    finish_iteration,
    finish_run,
    finished_iterations,
    get_run,
    latest_checkpoint,
    list_iterations,
    list_runs,
    log_metrics,
    metric_series,
    record_checkpoint,
    reopen_run,
    run_metrics,
    start_iteration,
    start_run,
)
from treeplay.store.writes import write_task_result

__all__ = [
    # constants
    "ACTION_SPANS",
    "DONE",
    "INT_MAX",
    "INT_MIN",
    "JUDGMENT_TARGETS",
    "PAIR_SOURCES",
    "RUNNING",
    # the store and its error
    "Store",
    "StoreError",
    "first_line",
    "redact",
    # records
    "CheckpointInfo",
    "IterationInfo",
    "JudgmentRecord",
    "NodeRecord",
    "NodeView",
    "PairRecord",
    "PreferenceData",
    "RankedItem",
    "RankedListRecord",
    "RunInfo",
    "StepRecord",
    "TaskResult",
    "TrajectoryRecord",
    "TreeRecord",
    "TreeSummary",
    "WriteReceipt",
    "check_action_spans",
    # runs, iterations, checkpoints, metrics
    "completed_task_ids",
    "counts",
    "finish_iteration",
    "finish_run",
    "finished_iterations",
    "get_run",
    "latest_checkpoint",
    "list_iterations",
    "list_runs",
    "log_metrics",
    "metric_series",
    "record_checkpoint",
    "reopen_run",
    "run_metrics",
    "start_iteration",
    "start_run",
    # writing a task's results
    "write_task_result",
    "write_task_results",
    # reading
    "child_nodes",
    "get_node",
    "get_tree",
    "judgments_for",
    "list_judgments",
    "list_pairs",
    "list_ranked_lists",
    "list_trajectories",
    "list_trees",
    "load_tree",
    "node_path",
    "pairs_of_nodes",
    "preference_data",
    "tree_pairs",
    "tree_root",
    "trees_of_nodes",
]
