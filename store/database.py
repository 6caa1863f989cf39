"""Opening the store: engines and sessions for SQLite (the default) and PostgreSQL, and migrations.

    store = open_store("sqlite:///runs/treeplay.db")          # a file; made and migrated if new
    store = open_store("postgresql://user:pw@host:5432/treeplay")
    upgrade("sqlite:///runs/treeplay.db")                      # what `treeplay db upgrade` runs

SQLite files run in WAL mode with a busy timeout and foreign keys on; write transactions start with
``BEGIN IMMEDIATE`` so concurrent writers queue on the lock instead of failing with "database is
locked" halfway through. PostgreSQL URLs use the psycopg 3 driver.

A brand-new empty database is migrated to the newest schema when opened with ``create=True``; a
database whose schema is behind raises ``StoreError`` telling the user to run ``treeplay db upgrade``.
Every failure to open (unknown URL scheme, unreachable server, read-only file, old schema) is a
``StoreError`` with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, Engine, create_engine, event, inspect, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from treeplay.store.schema import Base

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 60_000
PG_CONNECT_TIMEOUT_S = 5
# Any constant: the key of the PostgreSQL advisory lock that serialises concurrent migrations.
PG_MIGRATION_LOCK = 0x74726565


class StoreError(Exception):
    """Anything the store refuses or cannot do, with a one-line message naming what is wrong."""


def first_line(error: BaseException) -> str:
    """The first non-empty line of an exception's message (drivers add SQL and hints below it)."""
    inner = getattr(error, "orig", None) or error
    for line in str(inner).splitlines():
        if line.strip():
            return line.strip()
    return type(inner).__name__


@dataclass
class Store:
    """An open store: the engine, a session factory, and which backend it is.

    Attributes:
        url: The URL as given (password included; use ``safe_url`` in messages).
        engine: The SQLAlchemy engine.
        sessions: A ``sessionmaker`` bound to the engine, for ORM work.
    """

    url: str
    engine: Engine
    sessions: sessionmaker[Session] = field(repr=False)

    @property
    def dialect(self) -> str:
        """``"sqlite"`` or ``"postgresql"``."""
        return self.engine.dialect.name

    @property
    def safe_url(self) -> str:
        """The URL with any password masked."""
        return self.engine.url.render_as_string(hide_password=True)

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A connection inside one write transaction: committed on success, rolled back on error.

        On SQLite the transaction takes the write lock up front (``BEGIN IMMEDIATE``), so a writer
        waits for others (up to the busy timeout) rather than failing after it has started.
        """
        with self.engine.connect() as conn:
            conn.execution_options(treeplay_write=True)
            with conn.begin():
                yield conn

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """A connection inside one read transaction (a consistent snapshot), rolled back at the end."""
        with self.engine.connect() as conn:
            with conn.begin():
                yield conn

    def close(self) -> None:
        """Release every pooled connection (the database itself is untouched)."""
        self.engine.dispose()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse_url(url: str) -> URL:
    """Validate a database URL and pick the driver: ``postgresql://`` means psycopg 3."""
    if not isinstance(url, str) or not url.strip():
        raise StoreError(f"database URL must be a non-empty string, got {url!r}")
    try:
        parsed = make_url(url.strip())
    except ArgumentError:
        raise StoreError(
            f"not a database URL: {url!r} (use sqlite:///path/to/file.db or postgresql://host/db)"
        ) from None
    shown = parsed.render_as_string(hide_password=True)
    backend, _, driver = parsed.drivername.partition("+")
    if backend == "postgres":
        backend = "postgresql"
    if backend == "sqlite":
        if driver not in ("", "pysqlite"):
            raise StoreError(f"unsupported SQLite driver {driver!r} in {shown!r}; use sqlite:///path")
        return parsed.set(drivername="sqlite")
    if backend == "postgresql":
        if driver not in ("", "psycopg"):
            raise StoreError(
                f"unsupported PostgreSQL driver {driver!r} in {shown!r}; treeplay uses psycopg 3 (postgresql://)"
            )
        return parsed.set(drivername="postgresql+psycopg")
    raise StoreError(
        f"unknown database URL scheme {parsed.drivername!r} in {shown!r}; use sqlite:///path or postgresql://..."
    )


def _sqlite_path(parsed: URL) -> Path | None:
    """The file of a SQLite URL, or None for an in-memory database."""
    database = parsed.database or ""
    if database in ("", ":memory:") or database.startswith("file:"):
        return None
    return Path(database).expanduser()


def _check_sqlite_file(path: Path) -> None:
    """Make the parent folder, and refuse a file or folder we cannot write, before SQLite does."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise StoreError(
            f"cannot create the folder {str(path.parent)!r} for the SQLite store: {e.strerror}"
        ) from None
    if path.is_dir():
        raise StoreError(f"SQLite store path {str(path)!r} is a folder, not a file")
    # Effective ids: what SQLite's open() will be judged by.
    effective = os.access in os.supports_effective_ids
    if path.exists() and not os.access(path, os.W_OK, effective_ids=effective):
        raise StoreError(f"SQLite store file {str(path)!r} is read-only")
    if not path.exists() and not os.access(path.parent, os.W_OK | os.X_OK, effective_ids=effective):
        raise StoreError(
            f"folder {str(path.parent)!r} is read-only; SQLite needs to create its file and WAL journal there"
        )


def _make_engine(parsed: URL) -> Engine:
    if parsed.get_backend_name() == "sqlite":
        path = _sqlite_path(parsed)
        if path is not None:
            _check_sqlite_file(path)
        engine = create_engine(parsed, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        is_memory = path is None

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Let SQLAlchemy's "begin" event below issue BEGIN itself (pysqlite's own is DEFERRED only).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            if not is_memory:
                cur.execute("PRAGMA journal_mode=WAL")
            # NORMAL is durable in WAL mode except for the last commits on power loss, and fast.
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA temp_store=MEMORY")
            cur.execute("PRAGMA cache_size=-32000")
            # Checkpoint the WAL every ~32 MB rather than every 4 MB: fewer stalls for bulk writers.
            cur.execute("PRAGMA wal_autocheckpoint=8000")
            cur.close()

        @event.listens_for(engine, "begin")
        def _on_begin(conn: Connection) -> None:
            mode = "IMMEDIATE" if conn.get_execution_options().get("treeplay_write") else "DEFERRED"
            conn.exec_driver_sql(f"BEGIN {mode}")

        return engine
    return create_engine(
        parsed,
        pool_pre_ping=True,
        connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S, "application_name": "treeplay"},
    )


def _connect_error(parsed: URL, error: BaseException) -> StoreError:
    """Turn a driver's failure to connect or lock into a one-line StoreError."""
    where = parsed.render_as_string(hide_password=True)
    msg = first_line(error)
    if "readonly" in msg or "read-only" in msg:
        return StoreError(f"SQLite store {parsed.database!r} is read-only ({msg})")
    if parsed.get_backend_name() == "postgresql":
        return StoreError(f"cannot connect to PostgreSQL at {where}: {msg}")
    return StoreError(f"cannot open the store at {where}: {msg}")


def _alembic_config(connection: Connection) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.attributes["connection"] = connection
    return cfg


def head_revision() -> str:
    """The newest schema revision this version of treeplay ships."""
    from alembic.script import ScriptDirectory

    cfg = _alembic_config(None)  # type: ignore[arg-type]
    head = ScriptDirectory.from_config(cfg).get_current_head()
    assert head is not None, "store/migrations/versions holds no revision"
    return head


def _current_revision(conn: Connection) -> str | None:
    from alembic.runtime.migration import MigrationContext

    return MigrationContext.configure(conn).get_current_revision()


def _our_tables(conn: Connection) -> set[str]:
    return set(inspect(conn).get_table_names()) & set(Base.metadata.tables)


def _migrate(conn: Connection, revision: str = "head") -> None:
    """Run Alembic on ``conn`` (already inside a write transaction that serialises migrations)."""
    from alembic import command

    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": PG_MIGRATION_LOCK})
    command.upgrade(_alembic_config(conn), revision)


def _check_schema(store: Store, parsed: URL, create: bool) -> None:
    """Migrate a new empty database (if ``create``), else insist that the schema is at head."""
    head = head_revision()
    hint = f"run `treeplay db upgrade --url {store.safe_url}`"
    with store.write() as conn:
        current = _current_revision(conn)
        if current == head:
            return
        if current is None:
            tables = _our_tables(conn)
            if tables:
                raise StoreError(
                    f"store at {store.safe_url} has treeplay tables but no schema revision; {hint}"
                )
            if not create:
                raise StoreError(f"store at {store.safe_url} has no treeplay schema; {hint}")
            _migrate(conn)
            return
    from alembic.script import ScriptDirectory

    scripts = ScriptDirectory.from_config(_alembic_config(None))  # type: ignore[arg-type]
    known = {s.revision for s in scripts.walk_revisions()}
    if current not in known:
        raise StoreError(
            f"store at {store.safe_url} is at schema revision {current}, unknown to this treeplay "
            f"(head {head}); it was made by a newer version"
        )
    raise StoreError(f"store at {store.safe_url} is at schema revision {current}, behind {head}; {hint}")


def open_store(url: str, *, create: bool = True) -> Store:
    """Open (and if new, create) the store at ``url``.

    Args:
        url: ``sqlite:///relative/path.db``, ``sqlite:////abs/path.db``, or
            ``postgresql://user:password@host:port/dbname``.
        create: Migrate a brand-new empty database to the newest schema. With False, a database
            without the schema is an error.

    Returns:
        The open ``Store``; ``close()`` it (or use it as a context manager) when done.

    Raises:
        StoreError: Unknown URL scheme, unreachable server, read-only file or folder, a schema
            behind this version (run ``treeplay db upgrade``), or one from a newer version.
    """
    parsed = _parse_url(url)
    engine = _make_engine(parsed)
    store = Store(url=url, engine=engine, sessions=sessionmaker(engine, expire_on_commit=False))
    try:
        _check_schema(store, parsed, create)
    except StoreError:
        engine.dispose()
        raise
    except (DBAPIError, SQLAlchemyError, OSError) as e:
        engine.dispose()
        raise _connect_error(parsed, e) from None
    return store


def upgrade(url: str, revision: str = "head") -> str:
    """Create or migrate the schema at ``url`` to ``revision`` (the newest by default).

    Args:
        url: A database URL as for ``open_store``.
        revision: Alembic revision to go to; ``"head"`` for the newest.

    Returns:
        The revision the database is at afterwards.

    Raises:
        StoreError: The URL or server is unusable, or the database holds a revision this version
            does not know.
    """
    parsed = _parse_url(url)
    engine = _make_engine(parsed)
    store = Store(url=url, engine=engine, sessions=sessionmaker(engine))
    try:
        with store.write() as conn:
            _migrate(conn, revision)
            current = _current_revision(conn)
    except StoreError:
        raise
    except (DBAPIError, SQLAlchemyError, OSError) as e:
        raise _connect_error(parsed, e) from None
    except Exception as e:  # Alembic reports unknown revisions with its own exception types.
        raise StoreError(f"cannot migrate the store at {store.safe_url}: {first_line(e)}") from None
    finally:
        engine.dispose()
    return current or ""
