"""Alembic environment of the store: runs migrations on a connection that ``store.database`` hands in.

``store.database.upgrade`` builds the Alembic config in code (no alembic.ini) and passes an open
connection in ``config.attributes["connection"]``, inside a transaction that holds the migration lock.
Without one (plain ``alembic -x url=...`` use while developing), a connection is made from the
``sqlalchemy.url`` option.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import create_engine

from treeplay.store.schema import Base

config = context.config


def _run(connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        # SQLite cannot ALTER most things; batch mode rebuilds the table instead.
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


connection = config.attributes.get("connection")
if connection is not None:
    _run(connection)
else:
    engine = create_engine(config.get_main_option("sqlalchemy.url"))
    with engine.connect() as conn:
        _run(conn)
    engine.dispose()
