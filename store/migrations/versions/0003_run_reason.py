"""Runs say why they stopped: a nullable one-line ``reason`` next to ``status`` ("failed: ...").

Before this revision a run that crashed after its row was written stayed "running" for ever, with
nothing in the store to say what went wrong.

Revision ID: 0003_run_reason
Revises: 0002_redact_secrets
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003_run_reason"
down_revision = "0002_redact_secrets"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("runs", sa.Column("reason", sa.Text(), nullable=True))


def downgrade() -> None:
    # SQLite before 3.35 cannot drop a column in place; batch mode copies the table there.
    with op.batch_alter_table("runs") as batch:
        batch.drop_column("reason")
