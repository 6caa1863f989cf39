"""Opening the store and migrating it: URL errors, unreachable servers, read-only files, schemas
behind head, Alembic migrations that match the ORM, and `treeplay db upgrade` (typer's CliRunner)."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import tempfile
import textwrap
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from typer.testing import CliRunner

import treeplay.store.database as database
from treeplay.orchestrator.cli import app
from treeplay.store.database import StoreError, head_revision, open_store, upgrade
from treeplay.store.schema import Base

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("mysql://u:secret@host/db", "unknown database URL scheme 'mysql'"),
        ("runs/treeplay.db", "not a database URL"),
        ("sqlite+aiosqlite:///x.db", "unsupported SQLite driver"),
        ("postgresql+asyncpg://h/db", "unsupported PostgreSQL driver"),
        ("", "non-empty string"),
    ],
)
def test_bad_urls(url, message):
    with pytest.raises(StoreError, match=message) as caught:
        open_store(url)
    assert "secret" not in str(caught.value) and "\n" not in str(caught.value)


def test_unreachable_server_fails_fast():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    start = time.monotonic()
    with pytest.raises(StoreError, match=f"cannot connect to PostgreSQL at .*127.0.0.1:{port}") as caught:
        open_store(f"postgresql://user:hunter2@127.0.0.1:{port}/treeplay")
    assert time.monotonic() - start < 10
    assert "hunter2" not in str(caught.value) and "\n" not in str(caught.value)


def test_sqlite_file_is_created_with_parent_folders(tmp_path):
    path = tmp_path / "a" / "b" / "store.db"
    with open_store(f"sqlite:///{path}") as store:
        assert store.dialect == "sqlite"
        with store.read() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA foreign_keys").scalar() == 1
            assert conn.exec_driver_sql("PRAGMA busy_timeout").scalar() >= 10_000
    assert path.exists()


@contextmanager
def _unprivileged():
    """Act as 'nobody' when we are root (root ignores file permissions); as ourselves otherwise."""
    if os.geteuid() != 0:
        yield
        return
    nobody = pwd.getpwnam("nobody")
    os.setegid(nobody.pw_gid)
    os.seteuid(nobody.pw_uid)
    try:
        yield
    finally:
        os.seteuid(0)
        os.setegid(0)


def test_read_only_file_and_folder():
    root = Path(tempfile.mkdtemp(prefix="treeplay-ro-"))  # world-traversable, unlike pytest's tmp_path
    root.chmod(0o755)
    path = root / "store.db"
    try:
        open_store(f"sqlite:///{path}").close()
        for leftover in root.glob("store.db-*"):
            leftover.unlink()
        path.chmod(0o444)
        locked = root / "locked"
        locked.mkdir(mode=0o555)
        locked.chmod(0o555)
        with _unprivileged():
            with pytest.raises(StoreError, match="store.db' is read-only") as caught:
                open_store(f"sqlite:///{path}")
            assert "\n" not in str(caught.value)
            with pytest.raises(StoreError, match="folder .*locked.* is read-only"):
                open_store(f"sqlite:///{locked}/other.db")
            with pytest.raises(StoreError, match="cannot create the folder"):
                open_store(f"sqlite:///{locked}/sub/other.db")
    finally:
        shutil.rmtree(root, ignore_errors=True)


def test_schema_behind_head_says_to_upgrade(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    open_store(url).close()
    # A newer treeplay: the shipped migrations plus one more revision.
    newer = tmp_path / "migrations"
    shutil.copytree(database.MIGRATIONS_DIR, newer)
    (newer / "versions" / "0002_test.py").write_text(
        textwrap.dedent(
            f'''
            """A test revision that adds an index."""
            from alembic import op

            revision = "0002_test"
            down_revision = "{head_revision()}"
            branch_labels = None
            depends_on = None


            def upgrade() -> None:
                op.create_index("ix_test_runs_status", "runs", ["status"])


            def downgrade() -> None:
                op.drop_index("ix_test_runs_status", table_name="runs")
            '''
        )
    )
    monkeypatch.setattr(database, "MIGRATIONS_DIR", newer)
    assert head_revision() == "0002_test"
    with pytest.raises(
        StoreError, match=r"behind 0002_test; run `treeplay db upgrade --url sqlite:///"
    ) as caught:
        open_store(url)
    assert "\n" not in str(caught.value)
    assert upgrade(url) == "0002_test"
    open_store(url).close()
    # And the other way round: a store made by the newer version is refused by the older one.
    monkeypatch.setattr(database, "MIGRATIONS_DIR", REPO / "store" / "migrations")
    with pytest.raises(StoreError, match="unknown to this treeplay"):
        open_store(url)


def test_existing_tables_without_revision_or_create_false(tmp_path):
    url = f"sqlite:///{tmp_path / 'store.db'}"
    with pytest.raises(StoreError, match="has no treeplay schema; run `treeplay db upgrade"):
        open_store(url, create=False)
    open_store(url).close()
    engine = create_engine(url)
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM alembic_version"))
    engine.dispose()
    with pytest.raises(StoreError, match="has treeplay tables but no schema revision"):
        open_store(url)


def test_migration_from_empty_matches_the_orm(store_url):
    assert upgrade(store_url) == head_revision()
    assert upgrade(store_url) == head_revision()  # idempotent
    with open_store(store_url, create=False) as store, store.read() as conn:
        assert set(inspect(conn).get_table_names()) == set(Base.metadata.tables) | {"alembic_version"}
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []


def test_regression_upgrade_keeps_one_metric_per_key(store_url):
    """A store from before revision 0004 holds an iteration's metrics twice (a resume after a crash
    between logging them and finishing the iteration); upgrading keeps the newest row of each
    (run, iteration, key) and then refuses a second one. The downgrade goes back cleanly."""
    from datetime import datetime

    import sqlalchemy as sa

    from treeplay.store import queries

    assert upgrade(store_url, "0003_run_reason") == "0003_run_reason"
    engine = create_engine(store_url.replace("postgresql://", "postgresql+psycopg://"))
    at = datetime(2026, 1, 1)
    with engine.begin() as conn:
        run_id = conn.execute(text("INSERT INTO runs (name, config, status, created) "
                                   "VALUES ('old', '{}', 'done', :at) RETURNING id"), {"at": at}).scalar_one()
        rows = [(0, "acc", 0.25), (0, "tokens", 8.0), (None, "loss", 2.0), (0, "acc", 0.75), (None, "loss", 1.5),
                (1, "acc", 0.5)]
        for iteration, key, value in rows:
            conn.execute(text("INSERT INTO metrics (run_id, iteration, key, value, created) "
                              "VALUES (:r, :i, :k, :v, :at)"), {"r": run_id, "i": iteration, "k": key, "v": value, "at": at})
    assert upgrade(store_url) == head_revision()
    with open_store(store_url, create=False) as store:
        assert queries.metric_series(store, run_id) == {"acc": [(0, 0.75), (1, 0.5)], "tokens": [(0, 8.0)]}
        assert queries.run_metrics(store, run_id) == {"loss": 1.5}
        assert queries.counts(store, run_id)["metrics"] == 4
    with pytest.raises(sa.exc.IntegrityError), engine.begin() as conn:
        conn.execute(text("INSERT INTO metrics (run_id, iteration, key, value, created) "
                          "VALUES (:r, 0, 'acc', 0.0, :at)"), {"r": run_id, "at": at})
    from alembic import command

    with engine.begin() as conn:
        command.downgrade(database._alembic_config(conn), "0003_run_reason")
        assert [ix["name"] for ix in inspect(conn).get_indexes("metrics")] == ["ix_metrics_run_id_key"]
    engine.dispose()
    assert upgrade(store_url) == head_revision()


def test_cli_db_upgrade(tmp_path):
    runner = CliRunner()
    url = f"sqlite:///{tmp_path / 'cli' / 'store.db'}"
    done = runner.invoke(app, ["db", "upgrade", "--url", url])
    assert done.exit_code == 0, done.output
    assert head_revision() in done.output
    open_store(url, create=False).close()
    bad = runner.invoke(app, ["db", "upgrade", "--url", "oracle://x/y"])
    assert bad.exit_code == 2
    assert "unknown database URL scheme 'oracle'" in bad.output
