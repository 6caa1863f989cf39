"""A throwaway PostgreSQL server for tests and benchmarks: a temp cluster on a free 127.0.0.1 port.

    with PostgresServer() as server:
        url = server.create_database("store_test")   # postgresql://postgres@127.0.0.1:PORT/store_test
        url = server.create_user_database("alice", "pw", "alice_db")   # ...alice:pw@..., password checked

It uses Debian's server binaries (``initdb``, ``pg_ctl`` under /usr/lib/postgresql/<version>/bin, or on
PATH). PostgreSQL refuses to run as root, so as root the cluster belongs to the ``postgres`` OS user
(or ``nobody``). The cluster trusts local connections, skips fsync (test data), and is stopped and
deleted on exit. ``PostgresUnavailable`` says exactly what is missing when it cannot start. Roles made
with ``create_user_database`` are the exception to "trust": their password is checked (scram-sha-256).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

INSTALL_HINT = "`make test` installs Debian's postgresql as root"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server can be started here; the message says what is missing."""


def find_binaries() -> Path:
    """The folder holding ``initdb`` and ``pg_ctl`` (the newest installed version wins)."""
    on_path = shutil.which("initdb")
    if on_path and shutil.which("pg_ctl"):
        return Path(on_path).parent
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(Path(p).parent.parent.name) if Path(p).parent.parent.name.isdigit() else 0,
    )
    if not found:
        raise PostgresUnavailable(f"PostgreSQL server binaries (initdb) not found; {INSTALL_HINT}")
    return Path(found[-1]).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_user() -> pwd.struct_passwd | None:
    """The unprivileged OS user to run the server as when we are root (None when we are not)."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresUnavailable("running as root and neither a 'postgres' nor a 'nobody' OS user exists")


class PostgresServer:
    """A temporary PostgreSQL cluster; use as a context manager (or call start/stop).

    Attributes:
        url: Superuser URL of the ``postgres`` database, set once started.
    """

    def __init__(self) -> None:
        self.bin = find_binaries()
        self.user = _server_user()
        # As root the server user must reach the folder: /tmp is world-traversable, $TMPDIR may not be.
        parent = "/tmp" if self.user is not None and os.path.isdir("/tmp") else None
        self.root = Path(tempfile.mkdtemp(prefix="treeplay-pg-", dir=parent))
        self.data = self.root / "data"
        self.port = 0
        self.url = ""

    def _run(self, *args: str) -> subprocess.CompletedProcess[str]:
        kwargs: dict = {}
        if self.user is not None:
            kwargs = {"user": self.user.pw_uid, "group": self.user.pw_gid, "extra_groups": []}
        env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PGTZ": "UTC"}
        return subprocess.run(
            list(args), capture_output=True, text=True, env=env, cwd=self.root, timeout=120, **kwargs
        )

    def start(self) -> PostgresServer:
        """Make the cluster and start the server; raise PostgresUnavailable if that fails."""
        if self.user is not None:
            os.chown(self.root, self.user.pw_uid, self.user.pw_gid)
        done = self._run(
            str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres", "--auth=trust",
            "--encoding=UTF8", "--locale=C", "--no-sync",
        )  # fmt: skip
        if done.returncode != 0:
            self.remove()
            raise PostgresUnavailable(
                f"initdb failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
            )
        self.port = _free_port()
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off "
            "-c synchronous_commit=off -c full_page_writes=off -c max_connections=60"
        )
        done = self._run(
            str(self.bin / "pg_ctl"), "-D", str(self.data), "-o", options, "-l", str(self.root / "log"),
            "-w", "-t", "60", "start",
        )  # fmt: skip
        if done.returncode != 0:
            log = (self.root / "log").read_text(errors="replace") if (self.root / "log").exists() else ""
            self.remove()
            raise PostgresUnavailable(
                f"PostgreSQL did not start: {log.strip().splitlines()[-1:] or done.stderr}"
            )
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        return self

    def create_database(self, name: str) -> str:
        """Create an empty database (dropping one of that name) and return its URL."""
        import psycopg

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql://postgres@127.0.0.1:{self.port}/{name}"

    def create_user_database(self, user: str, password: str, name: str) -> str:
        """Create a login role whose password the server checks over TCP, and an empty database it
        owns (dropping one of that name); return the URL with the password in it."""
        import psycopg
        from psycopg import sql

        with psycopg.connect(
            f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True
        ) as c:
            c.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
            c.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(user)))
            c.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(user), sql.Literal(password)))
            c.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(sql.Identifier(name), sql.Identifier(user)))
            # The first matching pg_hba.conf line wins: this one comes before initdb's "trust" lines.
            hba = self.data / "pg_hba.conf"
            hba.write_text(f"host all {user} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
            c.execute("SELECT pg_reload_conf()")
        return f"postgresql://{user}:{password}@127.0.0.1:{self.port}/{name}"

    def stop(self) -> None:
        """Stop the server (fast) and delete the cluster."""
        if self.data.exists():
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        self.remove()

    def remove(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> PostgresServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
