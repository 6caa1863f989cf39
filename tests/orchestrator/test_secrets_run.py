"""A real run on a real PostgreSQL server whose role needs a password: the password is used, and
found nowhere afterwards — not in any table, not in the inspector's API, not in what ``treeplay``
prints, not in Ray's session logs or the run's output folder — and the run resumes with the
password from the environment (libpq's PGPASSWORD), never from the store.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import sqlalchemy as sa
from typer.testing import CliRunner

from treeplay.orchestrator.cli import app
from treeplay.store import queries
from treeplay.store.database import StoreError, open_store

pytestmark = [pytest.mark.slow, pytest.mark.heavy, pytest.mark.postgres]

PASSWORD = "Pg7SecretOfTreeplayTests"


def _files_containing(folder: Path, needle: bytes) -> list[str]:
    hits = []
    for path in folder.rglob("*"):
        try:
            if path.is_file() and not path.is_symlink() and needle in path.read_bytes():
                hits.append(str(path))
        except OSError:
            pass  # sockets and files that vanish while Ray shuts down
    return hits


def test_regression_postgres_password_is_used_but_never_stored_shown_or_logged(
    tmp_path, postgres_server, tiny_model_dir, monkeypatch
):
    url = postgres_server.create_user_database("tp_secret_user", PASSWORD, "tp_secret_db")
    bare = url.replace(f":{PASSWORD}@", "@")
    # No password from anywhere but where the test puts it.
    monkeypatch.delenv("PGPASSWORD", raising=False)
    monkeypatch.setenv("PGPASSFILE", str(tmp_path / "no-pgpass"))
    with pytest.raises(StoreError, match="no password supplied"):
        open_store(bare)  # the server really checks the password

    treeplay = str(Path(sys.executable).parent / "treeplay")
    ray_tmp = Path(tempfile.mkdtemp(prefix="tpray-", dir="/tmp"))  # short: Ray's socket paths
    out_dir = tmp_path / "out"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_TMPDIR": str(ray_tmp), "TREEPLAY_STORE_URL": url}
    overrides = [
        f"model.path={tiny_model_dir}", f"output_dir={out_dir}", "name=secretive", "iterations=1",
        "rollout.tasks_per_iteration=8", "rollout.chunk_size=8", "eval.tasks=4", "ray.num_cpus=2",
    ]
    try:
        # The URL with the password comes from the environment (TREEPLAY_STORE_URL).
        ran = subprocess.run([treeplay, "demo", *overrides], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert ran.returncode == 0, ran.stderr[-3000:]

        # Resuming without a password fails with one line; with libpq's PGPASSWORD it works.
        no_pw = {k: v for k, v in env.items() if k != "TREEPLAY_STORE_URL"}
        failed = subprocess.run([treeplay, "resume", "secretive", "--db", bare], cwd=tmp_path, env=no_pw,
                                capture_output=True, text=True, timeout=120)
        assert failed.returncode == 2 and "no password supplied" in failed.stderr
        assert len(failed.stderr.strip().splitlines()) == 1
        resumed = subprocess.run([treeplay, "resume", "secretive", "--db", bare], cwd=tmp_path,
                                 env={**no_pw, "PGPASSWORD": PASSWORD}, capture_output=True, text=True, timeout=600)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert json.loads(resumed.stdout.strip().splitlines()[-1])["run"] == "secretive"

        printed = [ran.stdout, ran.stderr, failed.stdout, failed.stderr, resumed.stdout, resumed.stderr]
        assert f"--db {bare}" in ran.stderr  # the "inspect it" hint names the store, without the password
        for args in (["status"], ["status", "secretive"], ["status", "secretive", "--json"], ["runs"],
                     ["runs", "--json"], ["pairs", "secretive", "--json"],
                     ["export", "pairs", "secretive", "--format", "trl-jsonl"]):
            result = CliRunner().invoke(app, [*args, "--db", url])
            assert result.exit_code == 0, (args, result.output)
            printed += [result.stdout, result.stderr]
        upgraded = CliRunner().invoke(app, ["db", "upgrade", "--url", url])
        assert upgraded.exit_code == 0 and bare in upgraded.stderr + upgraded.stdout
        printed += [upgraded.stdout, upgraded.stderr]
        assert not [p for p in printed if PASSWORD in p]

        # Every table, every column, as PostgreSQL renders the whole row as text.
        store = open_store(url, create=False)
        try:
            run_id = queries.get_run(store, "secretive").id
            assert queries.get_run(store, run_id).config["store"]["url"] == bare
            assert queries.finished_iterations(store, run_id) == [0]
            with store.read() as conn:
                tables = conn.execute(sa.text(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'")).scalars().all()
                assert "runs" in tables and "tree_nodes" in tables
                leaks = {t: conn.execute(sa.text(f'SELECT count(*) FROM "{t}" AS r WHERE r::text LIKE :p'),
                                         {"p": f"%{PASSWORD}%"}).scalar() for t in tables}
            assert not any(leaks.values()), leaks
        finally:
            store.close()

        # The inspector's API, every route a run has.
        from fastapi.testclient import TestClient

        from treeplay.orchestrator.web.app import create_app

        with TestClient(create_app(url), base_url="http://127.0.0.1:8765") as client:
            detail = client.get("/api/runs/secretive")
            assert detail.status_code == 200 and detail.json()["config"]["store"]["url"] == bare
            bodies = [detail.text] + [
                client.get(f"/api/runs/{run_id}{tail}").text
                for tail in ("", "/iterations", "/metrics", "/trees", "/pairs")
            ] + [client.get("/api/runs").text]
            assert not [b for b in bodies if PASSWORD in b]

        # What the runs left on disk: Ray's session logs and the run's output folder.
        assert list(ray_tmp.rglob("*.out")) or list(ray_tmp.rglob("*.log")), "Ray wrote no logs where expected"
        assert _files_containing(ray_tmp, PASSWORD.encode()) == []
        assert _files_containing(out_dir, PASSWORD.encode()) == []
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
