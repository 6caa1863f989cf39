"""One metric row per (run, key, iteration): duplicates removed, then a unique index.

Before this revision ``log_metrics`` only appended, and the loop logs an iteration's metrics before
it marks the iteration finished. A crash between the two writes left the iteration unfinished, the
resumed run recorded it again, and the iteration then had two rows per key. Upgrading keeps the
newest row of each (run, iteration, key) (the value the resumed run measured, and the one the
iteration row's own ``metrics`` hold), then replaces the (run_id, key) index with a unique one on
(run_id, key, iteration), which still serves the reads by run and key.

The downgrade restores the old index; the removed duplicates are not restored.

Revision ID: 0004_one_metric_per_key
Revises: 0003_run_reason
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004_one_metric_per_key"
down_revision = "0003_run_reason"
branch_labels = None
depends_on = None

# A lightweight table: only the columns this migration reads, as they are at this revision.
metrics = sa.table(
    "metrics", sa.column("id", sa.Integer), sa.column("run_id", sa.Integer),
    sa.column("iteration", sa.Integer), sa.column("key", sa.String),
)


def upgrade() -> None:
    # GROUP BY puts NULL iterations (run-wide metrics) in one group on both backends, so run-wide
    # duplicates go too (``run_metrics`` already read only the newest of them).
    newest = sa.select(sa.func.max(metrics.c.id)).group_by(metrics.c.run_id, metrics.c.iteration, metrics.c.key)
    op.execute(sa.delete(metrics).where(metrics.c.id.not_in(newest)))
    op.drop_index("ix_metrics_run_id_key", table_name="metrics")
    op.create_index("ix_metrics_run_id_key_iteration", "metrics", ["run_id", "key", "iteration"], unique=True)


def downgrade() -> None:
    op.drop_index("ix_metrics_run_id_key_iteration", table_name="metrics")
    op.create_index("ix_metrics_run_id_key", "metrics", ["run_id", "key"], unique=False)
