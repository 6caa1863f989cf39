"""Remove credentials from stored run configs: URL passwords (``store.url`` above all) and the values
of keys that name a credential (``api_key``, ``token``, ``password``...), by ``store.redact``'s rule.

Data only; the schema is unchanged. Earlier versions stored the resolved config as given, so a
PostgreSQL URL with a password sat in ``runs.config`` in clear and was served by the inspector.
There is no downgrade of the data: the removed secrets are gone.

Revision ID: 0002_redact_secrets
Revises: 0001_initial
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from treeplay.store.redact import redact

revision = "0002_redact_secrets"
down_revision = "0001_initial"
branch_labels = None
depends_on = None

# A lightweight table: only the columns this migration reads and writes, as they are at this revision.
runs = sa.table("runs", sa.column("id", sa.Integer), sa.column("config", sa.JSON))


def upgrade() -> None:
    conn = op.get_bind()
    for run_id, config in conn.execute(sa.select(runs.c.id, runs.c.config)).all():
        clean = redact(config)
        if clean != config:
            conn.execute(sa.update(runs).where(runs.c.id == run_id).values(config=clean))


def downgrade() -> None:
    pass
