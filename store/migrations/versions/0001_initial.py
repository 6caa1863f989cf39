"""Initial schema: runs, iterations, tasks, rollouts, trajectories, steps, trees, tree nodes,
preference pairs, ranked lists and items, judgments, checkpoints, metrics.

Revision ID: 0001_initial
Revises: (none)
Create Date: 2026-11-23
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001_initial"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "runs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(), nullable=False),
        sa.Column("config", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.Column("finished", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runs")),
        sa.UniqueConstraint("name", name=op.f("uq_runs_name")),
    )
    op.create_table(
        "checkpoints",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("uri", sa.Text(), nullable=False),
        sa.Column("metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_checkpoints_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_checkpoints")),
    )
    op.create_index(op.f("ix_checkpoints_run_id"), "checkpoints", ["run_id"], unique=False)

    op.create_table(
        "iterations",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("started", sa.DateTime(), nullable=False),
        sa.Column("finished", sa.DateTime(), nullable=True),
        sa.Column("timings", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("metrics", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_iterations_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_iterations")),
        sa.UniqueConstraint("run_id", "index", name=op.f("uq_iterations_run_id_index")),
    )
    op.create_table(
        "metrics",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=True),
        sa.Column("key", sa.String(), nullable=False),
        sa.Column("value", sa.Float(), nullable=True),
        sa.Column("created", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_metrics_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_metrics")),
    )
    op.create_index(op.f("ix_metrics_run_id_key"), "metrics", ["run_id", "key"], unique=False)

    op.create_table(
        "tasks",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        sa.Column("task_key", sa.String(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("answer", sa.Text(), nullable=True),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_tasks_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tasks")),
        sa.UniqueConstraint(
            "run_id", "environment", "task_key", name=op.f("uq_tasks_run_id_environment_task_key")
        ),
    )
    op.create_table(
        "rollouts",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("written", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id", "iteration"],
            ["iterations.run_id", "iterations.index"],
            name=op.f("fk_rollouts_run_id_iteration_iterations"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_rollouts_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_rollouts_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rollouts")),
        sa.UniqueConstraint(
            "run_id", "iteration", "task_id", name=op.f("uq_rollouts_run_id_iteration_task_id")
        ),
    )
    op.create_table(
        "judgments",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("judge", sa.String(), nullable=False),
        sa.Column("target_kind", sa.String(length=16), nullable=False),
        sa.Column("target_id", sa.Integer(), nullable=True),
        sa.Column("target_text", sa.Text(), nullable=True),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("rationale", sa.Text(), nullable=False),
        sa.Column("info", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_judgments_rollout_id_rollouts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_judgments_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_judgments")),
    )
    op.create_index(op.f("ix_judgments_rollout_id"), "judgments", ["rollout_id"], unique=False)
    op.create_index(op.f("ix_judgments_run_id_iteration"), "judgments", ["run_id", "iteration"], unique=False)
    op.create_index(
        op.f("ix_judgments_target_kind_target_id"), "judgments", ["target_kind", "target_id"], unique=False
    )

    op.create_table(
        "ranked_lists",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("info", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_ranked_lists_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_ranked_lists_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_ranked_lists_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ranked_lists")),
    )
    op.create_index(op.f("ix_ranked_lists_rollout_id"), "ranked_lists", ["rollout_id"], unique=False)
    op.create_index(
        op.f("ix_ranked_lists_run_id_iteration_source"),
        "ranked_lists",
        ["run_id", "iteration", "source"],
        unique=False,
    )
    op.create_index(op.f("ix_ranked_lists_task_id"), "ranked_lists", ["task_id"], unique=False)

    op.create_table(
        "trajectories",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("outcome", sa.Float(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("info", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_trajectories_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_trajectories_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_trajectories_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trajectories")),
    )
    op.create_index(op.f("ix_trajectories_rollout_id"), "trajectories", ["rollout_id"], unique=False)
    op.create_index(
        op.f("ix_trajectories_run_id_iteration"), "trajectories", ["run_id", "iteration"], unique=False
    )
    op.create_index(op.f("ix_trajectories_task_id"), "trajectories", ["task_id"], unique=False)

    op.create_table(
        "trees",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("environment", sa.String(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("n_nodes", sa.Integer(), nullable=False),
        sa.Column("max_depth", sa.Integer(), nullable=False),
        sa.Column("info", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["rollout_id"], ["rollouts.id"], name=op.f("fk_trees_rollout_id_rollouts"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_trees_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_trees_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_trees")),
    )
    op.create_index(op.f("ix_trees_rollout_id"), "trees", ["rollout_id"], unique=False)
    op.create_index(op.f("ix_trees_run_id_iteration"), "trees", ["run_id", "iteration"], unique=False)
    op.create_index(op.f("ix_trees_task_id"), "trees", ["task_id"], unique=False)

    op.create_table(
        "steps",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("trajectory_id", sa.Integer(), nullable=False),
        sa.Column("index", sa.Integer(), nullable=False),
        sa.Column("agent_id", sa.String(), nullable=False),
        sa.Column("observation", sa.Text(), nullable=False),
        sa.Column("action", sa.Text(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=False),
        sa.Column("credit", sa.Float(), nullable=True),
        sa.Column("rubric", sa.Text(), nullable=True),
        sa.Column("logprob", sa.Float(), nullable=True),
        sa.Column("info", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["trajectory_id"],
            ["trajectories.id"],
            name=op.f("fk_steps_trajectory_id_trajectories"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_steps")),
    )
    op.create_index(op.f("ix_steps_trajectory_id"), "steps", ["trajectory_id"], unique=False)

    op.create_table(
        "tree_nodes",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("tree_id", sa.Integer(), nullable=False),
        sa.Column("parent_id", sa.Integer(), nullable=True),
        sa.Column("step", sa.Text(), nullable=False),
        sa.Column("depth", sa.Integer(), nullable=False),
        sa.Column("visits", sa.Integer(), nullable=False),
        sa.Column("value", sa.Float(), nullable=False),
        sa.Column("prior", sa.Float(), nullable=False),
        sa.Column("reward", sa.Float(), nullable=False),
        sa.Column("terminal", sa.Boolean(), nullable=False),
        sa.Column("correct", sa.Boolean(), nullable=True),
        sa.Column("selected", sa.Boolean(), nullable=False),
        sa.Column("policy_version", sa.Integer(), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("info", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["parent_id"],
            ["tree_nodes.id"],
            name=op.f("fk_tree_nodes_parent_id_tree_nodes"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["tree_id"], ["trees.id"], name=op.f("fk_tree_nodes_tree_id_trees"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_tree_nodes")),
    )
    op.create_index(op.f("ix_tree_nodes_parent_id"), "tree_nodes", ["parent_id"], unique=False)
    op.create_index(op.f("ix_tree_nodes_tree_id"), "tree_nodes", ["tree_id"], unique=False)

    op.create_table(
        "preference_pairs",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("rollout_id", sa.Integer(), nullable=False),
        sa.Column("run_id", sa.Integer(), nullable=False),
        sa.Column("iteration", sa.Integer(), nullable=False),
        sa.Column("task_id", sa.Integer(), nullable=False),
        sa.Column("prompt", sa.Text(), nullable=False),
        sa.Column("chosen", sa.Text(), nullable=False),
        sa.Column("rejected", sa.Text(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("margin", sa.Float(), nullable=True),
        sa.Column("weight", sa.Float(), nullable=False),
        sa.Column("label_smoothing", sa.Float(), nullable=False),
        sa.Column("shared_prefix_chars", sa.Integer(), nullable=False),
        sa.Column("chosen_visits", sa.Integer(), nullable=True),
        sa.Column("rejected_visits", sa.Integer(), nullable=True),
        sa.Column("chosen_node_id", sa.Integer(), nullable=True),
        sa.Column("rejected_node_id", sa.Integer(), nullable=True),
        sa.Column("info", sa.JSON(none_as_null=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["chosen_node_id"],
            ["tree_nodes.id"],
            name=op.f("fk_preference_pairs_chosen_node_id_tree_nodes"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["rejected_node_id"],
            ["tree_nodes.id"],
            name=op.f("fk_preference_pairs_rejected_node_id_tree_nodes"),
            ondelete="SET NULL",
        ),
        sa.ForeignKeyConstraint(
            ["rollout_id"],
            ["rollouts.id"],
            name=op.f("fk_preference_pairs_rollout_id_rollouts"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.id"], name=op.f("fk_preference_pairs_run_id_runs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_preference_pairs_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_preference_pairs")),
    )
    op.create_index(
        op.f("ix_preference_pairs_chosen_node_id"), "preference_pairs", ["chosen_node_id"], unique=False
    )
    op.create_index(
        op.f("ix_preference_pairs_rejected_node_id"), "preference_pairs", ["rejected_node_id"], unique=False
    )
    op.create_index(op.f("ix_preference_pairs_rollout_id"), "preference_pairs", ["rollout_id"], unique=False)
    op.create_index(
        op.f("ix_preference_pairs_run_id_iteration_source"),
        "preference_pairs",
        ["run_id", "iteration", "source"],
        unique=False,
    )
    op.create_index(op.f("ix_preference_pairs_task_id"), "preference_pairs", ["task_id"], unique=False)

    op.create_table(
        "ranked_items",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("list_id", sa.Integer(), nullable=False),
        sa.Column("position", sa.Integer(), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("score", sa.Float(), nullable=False),
        sa.Column("step_rewards", sa.JSON(none_as_null=True), nullable=True),
        sa.Column("node_id", sa.Integer(), nullable=True),
        sa.ForeignKeyConstraint(
            ["list_id"],
            ["ranked_lists.id"],
            name=op.f("fk_ranked_items_list_id_ranked_lists"),
            ondelete="CASCADE",
        ),
        sa.ForeignKeyConstraint(
            ["node_id"],
            ["tree_nodes.id"],
            name=op.f("fk_ranked_items_node_id_tree_nodes"),
            ondelete="SET NULL",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_ranked_items")),
        sa.UniqueConstraint("list_id", "position", name=op.f("uq_ranked_items_list_id_position")),
    )
    op.create_index(op.f("ix_ranked_items_node_id"), "ranked_items", ["node_id"], unique=False)


def downgrade() -> None:
    op.drop_index(op.f("ix_ranked_items_node_id"), table_name="ranked_items")

    op.drop_table("ranked_items")
    op.drop_index(op.f("ix_preference_pairs_task_id"), table_name="preference_pairs")
    op.drop_index(op.f("ix_preference_pairs_run_id_iteration_source"), table_name="preference_pairs")
    op.drop_index(op.f("ix_preference_pairs_rollout_id"), table_name="preference_pairs")
    op.drop_index(op.f("ix_preference_pairs_rejected_node_id"), table_name="preference_pairs")
    op.drop_index(op.f("ix_preference_pairs_chosen_node_id"), table_name="preference_pairs")

    op.drop_table("preference_pairs")
    op.drop_index(op.f("ix_tree_nodes_tree_id"), table_name="tree_nodes")
    op.drop_index(op.f("ix_tree_nodes_parent_id"), table_name="tree_nodes")

    op.drop_table("tree_nodes")
    op.drop_index(op.f("ix_steps_trajectory_id"), table_name="steps")

    op.drop_table("steps")
    op.drop_index(op.f("ix_trees_task_id"), table_name="trees")
    op.drop_index(op.f("ix_trees_run_id_iteration"), table_name="trees")
    op.drop_index(op.f("ix_trees_rollout_id"), table_name="trees")

    op.drop_table("trees")
    op.drop_index(op.f("ix_trajectories_task_id"), table_name="trajectories")
    op.drop_index(op.f("ix_trajectories_run_id_iteration"), table_name="trajectories")
    op.drop_index(op.f("ix_trajectories_rollout_id"), table_name="trajectories")

    op.drop_table("trajectories")
    op.drop_index(op.f("ix_ranked_lists_task_id"), table_name="ranked_lists")
    op.drop_index(op.f("ix_ranked_lists_run_id_iteration_source"), table_name="ranked_lists")
    op.drop_index(op.f("ix_ranked_lists_rollout_id"), table_name="ranked_lists")

    op.drop_table("ranked_lists")
    op.drop_index(op.f("ix_judgments_target_kind_target_id"), table_name="judgments")
    op.drop_index(op.f("ix_judgments_run_id_iteration"), table_name="judgments")
    op.drop_index(op.f("ix_judgments_rollout_id"), table_name="judgments")

    op.drop_table("judgments")
    op.drop_table("rollouts")
    op.drop_table("tasks")
    op.drop_index(op.f("ix_metrics_run_id_key"), table_name="metrics")

    op.drop_table("metrics")
    op.drop_table("iterations")
    op.drop_index(op.f("ix_checkpoints_run_id"), table_name="checkpoints")

    op.drop_table("checkpoints")
    op.drop_table("runs")
