"""A multi-node run on one machine: real Ray nodes as separate processes, a real PostgreSQL store.

The cluster is shaped like ray_cluster.yaml in miniature: a head node that carries the ``learner``
resource (and the driver), and two worker nodes that carry ``rollout`` slots. Each node is its own
raylet and object store, started the way Ray's ``cluster_utils.Cluster`` does, so removing one kills
its processes exactly as losing a host would.

- the learner gets its own bundle on the head, the two rollout workers land on different nodes, and
  a new weights version is in the object store of every worker's node after a redeploy;
- a full run that learns, with one rollout node removed mid-run: every iteration finishes, every
  task is written exactly once per iteration, and the run is ``done``;
- a run the cluster can never place (configs/gpu.yaml's GPUs, more rollout workers than rollout
  slots, a learner bigger than the learner node) is refused at once with one line, and nothing is
  written;
- ray_cluster.yaml and its on-prem variant pass Ray's own launcher schema, every shell command in
  them parses with ``bash -n``, and the head's database commands, rehearsed against a throwaway
  PostgreSQL server, give the store the documented default password (and a changed one).
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import yaml

from treeplay.agents.registry import make_environment
from treeplay.orchestrator.config import load_config
from treeplay.orchestrator.schedule import iteration_tasks
from treeplay.store import queries
from treeplay.store.database import open_store

pytestmark = [pytest.mark.cluster, pytest.mark.slow, pytest.mark.heavy]

ROOT = Path(__file__).resolve().parents[2]
TASKS = 256
NODE_MEMORY = {"object_store_memory": 200 * 1024**2}


@pytest.fixture(scope="module")
def cluster():
    """Head (1 CPU, learner slot) + two rollout nodes (2 CPUs, 2 rollout slots each: room for the
    rollout worker of a lost node)."""
    import ray
    from ray.cluster_utils import Cluster

    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"learner": 1}, "include_dashboard": False, **NODE_MEMORY})
    for _ in range(2):
        c.add_node(num_cpus=2, resources={"rollout": 2}, **NODE_MEMORY)
    c.wait_for_nodes()
    yield c
    ray.shutdown()
    c.shutdown()
    # Cluster() wrote its address to /tmp/ray/ray_current_cluster; a stale one makes a later plain
    # ray.init() on this machine hang, so remove it (when it is still ours).
    address_file = Path(ray._private.utils.get_ray_address_file(None))
    if address_file.is_file() and address_file.read_text().strip() == c.address:
        address_file.unlink()


def _cfg(tmp_path: Path, model: Path, address: str, store_url: str, *extra: str):
    return load_config(None, [
        f"model.path={model}", f"output_dir={tmp_path}", f"store.url={store_url}", f"ray.address={address}",
        "rollout.num_workers=2", "rollout.tasks_per_iteration=48", "rollout.chunk_size=8", "eval.tasks=16",
        *extra,
    ])


def _bundle_nodes() -> dict[int, str]:
    """Bundle index -> node id of the (single) live placement group of this driver."""
    from ray.util import placement_group_table

    groups = [g for g in placement_group_table().values() if g["state"] in ("CREATED", "RESCHEDULING")]
    assert len(groups) == 1, groups
    return dict(groups[0]["bundles_to_node_id"])


def test_learner_and_rollouts_on_separate_nodes_and_weights_reach_every_node(cluster, tmp_path, warm_model_dir,
                                                                             postgres_server):
    import ray
    from ray.experimental import get_object_locations

    from treeplay.orchestrator.loop import Loop

    url = postgres_server.create_database("cluster_placement")
    cfg = _cfg(tmp_path, warm_model_dir, cluster.address, url)
    store = open_store(url)
    run_id = queries.start_run(store, "placement", cfg.model_dump(mode="json"))
    loop = Loop(cfg, store, run_id, Path(warm_model_dir), 0)
    try:
        head = cluster.head_node.node_id
        worker_nodes = [i["node"] for i in loop.worker_info]
        assert len(set(worker_nodes)) == 2, "the two rollout workers must run on different nodes"
        assert head not in worker_nodes
        bundles = _bundle_nodes()
        assert bundles[0] == head, "the learner's bundle belongs on the node with the learner resource"
        assert {bundles[1], bundles[2]} == set(worker_nodes)

        env = make_environment(cfg.env.name, **cfg.env.kwargs)
        queries.start_iteration(store, run_id, 0, 0)
        loop.rollout(0, env.tasks("train", 16, seed=3))
        _, updated = loop.learn(0)
        assert updated
        loop.redeploy()
        # One payload object, read by every node that serves it: each worker node's object store
        # now holds a copy (workers on one node would share it), the learner's node the original.
        where = get_object_locations([loop.weights_ref])[loop.weights_ref]
        assert set(worker_nodes) <= set(where["node_ids"]), where
        assert len(where["node_ids"]) == len(set(where["node_ids"]))
        infos = ray.get([w.info.remote() for w in loop.workers])
        assert {i["version"] for i in infos} == {loop.version} == {1}
    finally:
        loop.shutdown()


def test_run_survives_losing_a_rollout_node(cluster, tmp_path, warm_model_dir, postgres_server):
    from treeplay.orchestrator.loop import launch_run

    url = postgres_server.create_database("cluster_node_loss")
    # Enough work per iteration (32 chunks, a few seconds) that the node goes while rollouts are in
    # flight: the tiny model answers 48 tasks in a fraction of a second.
    cfg = _cfg(tmp_path, warm_model_dir, cluster.address, url, "iterations=3", "name=node-loss",
               f"rollout.tasks_per_iteration={TASKS}")
    store = open_store(url)
    lost: dict[str, object] = {}

    def remove_a_rollout_node_in_iteration_1() -> None:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            runs = queries.list_runs(store)
            if runs and queries.completed_task_ids(store, runs[0].id, 1):
                lost["bundles_before"] = _bundle_nodes()
                node = sorted(cluster.worker_nodes, key=lambda n: n.node_id)[0]
                lost["node"] = node.node_id
                t0 = time.monotonic()
                cluster.remove_node(node)
                lost["remove_s"] = time.monotonic() - t0
                lost["written_before"] = len(queries.completed_task_ids(store, runs[0].id, 1))
                # Look at the placement while the run is alive (it is released when the run ends):
                # once iteration 2 writes, the lost worker has been restarted somewhere.
                while time.monotonic() < deadline and not queries.completed_task_ids(store, runs[0].id, 2):
                    time.sleep(0.05)
                lost["bundles_after"] = _bundle_nodes()
                return
            time.sleep(0.05)

    remover = threading.Thread(target=remove_a_rollout_node_in_iteration_1, daemon=True)
    t0 = time.monotonic()
    remover.start()
    report = launch_run(cfg)
    remover.join(timeout=5)
    seconds = time.monotonic() - t0

    assert "node" in lost, "the run finished before a node could be removed"
    assert lost["node"] in set(lost["bundles_before"].values()), "the removed node held a rollout worker"
    run_id = report.run_id
    assert queries.get_run(store, run_id).status == "done"
    assert queries.finished_iterations(store, run_id) == [0, 1, 2]
    env = make_environment(cfg.env.name, **cfg.env.kwargs)
    for index in range(3):
        wanted = {t.id for t in iteration_tasks(cfg, env, index)}  # the loop's own task draw
        assert queries.completed_task_ids(store, run_id, index) == wanted
        trees = queries.list_trees(store, run_id, index)
        assert len(trees) == TASKS == len({t.task_id for t in trees}), f"iteration {index}: a task written twice"
    assert lost["written_before"] < TASKS, "the node must go while iteration 1 still has rollouts to do"
    # Chunks re-run because their worker died with the node (0 when the node went while its worker
    # sat between two chunks: then the next call just waits for the restarted worker).
    restarts = sum(v for _, v in queries.metric_series(store, run_id)["rollout/chunk_reruns"])
    assert report.iterations[-1].version >= 2, "the run should have deployed updates (it learns)"
    # The lost node's rollout bundle was re-placed on a node still alive; its worker came back there
    # (every later evaluation uses every worker).
    alive = {cluster.head_node.node_id} | {n.node_id for n in cluster.worker_nodes}
    after = lost["bundles_after"]
    assert lost["node"] not in after.values() and set(after.values()) <= alive and len(after) == 3
    print(f"cluster run with a node lost: {seconds:.1f}s, {restarts:.0f} chunk(s) re-run, lost {lost}, iterations {[r.timings for r in report.iterations]}")


def test_a_run_the_cluster_cannot_place_is_refused_at_once(cluster, tmp_path, monkeypatch):
    """The quickstart's run step (configs/gpu.yaml, model and output on a shared folder) on a cluster
    shaped like ray_cluster.yaml but without GPUs or an autoscaler: refused in one line per cause."""
    from typer.testing import CliRunner

    from treeplay.orchestrator.cli import app
    from treeplay.orchestrator.config import load_config as load
    from treeplay.orchestrator.placement import check_placeable, placement_problem
    from treeplay.orchestrator.workers import check_cluster

    monkeypatch.delenv("TREEPLAY_STORE_URL", raising=False)
    shared = tmp_path / "shared"
    model = shared / "models" / "Qwen2.5-0.5B-Instruct"
    model.mkdir(parents=True)
    (model / "config.json").write_text("{}")
    url = f"sqlite:///{tmp_path / 'store.db'}"
    paths = [f"model.path={model}", f"output_dir={shared / 'runs'}", f"store.url={url}"]
    out = CliRunner().invoke(app, ["run", str(ROOT / "configs" / "gpu.yaml"), "--address", cluster.address, *paths])
    assert out.exit_code == 2, out.output
    [line] = [s for s in out.output.splitlines() if s.strip()]
    assert line.startswith("error: the config asks for 4 rollout workers x 1 GPU + learner 1 GPU = 5 GPUs; the Ray "
                           "cluster has 0 GPUs (")
    assert line.endswith("; if the cluster's autoscaler adds nodes, set ray.wait_for_autoscaler=true)")
    assert queries.list_runs(open_store(url, create=False)) == [] and not (shared / "runs").exists()

    # The real cluster's resources, through Ray: 2 rollout slots per rollout node (fewer nodes if an
    # earlier test of this module took one away), 1 learner slot with 1 CPU on the head.
    import ray

    ray.init(address=cluster.address, ignore_reinit_error=True)
    slots = int(ray.cluster_resources().get("rollout", 0))
    assert slots >= 2
    cpu = [f"ray.address={cluster.address}", "ray.worker_num_gpus=0", "ray.learner_num_gpus=0",
           "ray.worker_num_cpus=0.1", "ray.learner_num_cpus=1"]
    with pytest.raises(ValueError, match=rf"{slots + 1} rollout workers x 1 'rollout' slot = {slots + 1} 'rollout' "
                                         rf"slots; the Ray cluster has {slots} 'rollout' slots"):
        check_cluster(load(None, [*cpu, f"rollout.num_workers={slots + 1}"]))  # CPUs enough
    with pytest.raises(ValueError, match=r"the learner asks for 2 CPUs on one node; the biggest Ray node with a "
                                         r"'learner' slot has 1 CPU"):
        check_cluster(load(None, [*cpu, "rollout.num_workers=2", "ray.learner_num_cpus=2"]))
    check_cluster(load(None, [*cpu, f"rollout.num_workers={slots}"]))
    check_placeable(load(None, [*cpu, "rollout.num_workers=9", "ray.wait_for_autoscaler=true"]).ray, 9)
    assert placement_problem(load(None, cpu).ray, 2, False, {"CPU": 5.0, "rollout": 4.0, "learner": 1.0},
                             [{"CPU": 1.0, "learner": 1.0}, {"CPU": 2.0, "rollout": 2.0}]) is None


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster.onprem.yaml"])
def test_cluster_launcher_configs_pass_rays_schema(name):
    """What ``ray up`` does before it touches a provider: fill in the provider's defaults, then
    validate against ray-schema.json (jsonschema, via Ray's own helper)."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    raw = yaml.safe_load((ROOT / name).read_text())
    prepared = prepare_config(raw)
    validate_config(prepared)
    types = prepared["available_node_types"]
    assert prepared["head_node_type"] in types
    setup = " ".join(prepared["setup_commands"])
    assert "vllm" in setup and "postgres" in setup, "nodes must install treeplay with the vllm and postgres extras"
    if raw["provider"]["type"] == "local":
        starts = " ".join(prepared["head_start_ray_commands"] + prepared["worker_start_ray_commands"])
        assert '"learner"' in starts and '"rollout"' in starts
        return
    roles = {r: [t for t, v in types.items() if r in v["resources"]] for r in ("rollout", "learner")}
    assert roles["rollout"] and roles["learner"] and not set(roles["rollout"]) & set(roles["learner"])
    for t in roles["rollout"] + roles["learner"]:
        assert types[t]["resources"].get("GPU", 0) >= 1 and types[t].get("min_workers", 0) >= 1


SETUP_KEYS = ("initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
              "head_start_ray_commands", "worker_start_ray_commands")


@pytest.mark.parametrize("name", ["ray_cluster.yaml", "ray_cluster.onprem.yaml"])
def test_every_cluster_shell_command_parses_with_bash_n(name):
    """Every command ``ray up`` runs on a node is valid bash in the form Ray runs it (Ray prefixes
    each with ``export RAY_HEAD_IP=...;``). A ``#`` inside a plain YAML list item starts a YAML
    comment, which once cut a pg_hba.conf line in half and left an unterminated quote."""
    import subprocess

    raw = yaml.safe_load((ROOT / name).read_text())
    commands = [(key, cmd) for key in SETUP_KEYS for cmd in raw.get(key) or []]
    assert commands
    for key, cmd in commands:
        assert isinstance(cmd, str), f"{key}: {cmd!r} is not one shell line"
        done = subprocess.run(["bash", "-n", "-c", f"export RAY_HEAD_IP=10.0.0.1; {cmd}"],
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 0, f"{name} {key}: {cmd}\n{done.stderr}"


@pytest.fixture
def fake_imds():
    """EC2's instance metadata service in miniature, IMDSv2 only: a token from PUT /latest/api/token,
    then GETs that carry it. The "VPC" has two ranges (newline-separated, as EC2 answers)."""
    import http.server
    import threading

    token = "rehearsal-token"
    answers = {"/latest/meta-data/mac": "0e:00:00:00:00:01",
               "/latest/meta-data/network/interfaces/macs/0e:00:00:00:00:01/vpc-ipv4-cidr-blocks":
                   "127.0.0.0/8\n10.99.0.0/16"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def _send(self, code: int, body: str) -> None:
            data = body.encode()
            self.send_response(code)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_PUT(self) -> None:  # noqa: N802
            ok = self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds")
            self._send(200 if ok else 400, token if ok else "")

        def do_GET(self) -> None:  # noqa: N802
            if self.headers.get("X-aws-ec2-metadata-token") != token:
                self._send(401, "")
            elif self.path in answers:
                self._send(200, answers[self.path])
            else:
                self._send(404, "")

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.mark.postgres
def test_head_database_commands_rehearsed_on_a_throwaway_postgres(tmp_path, fake_imds):
    """ray_cluster.yaml's own head commands for the VPC ranges and the store, run for real against a
    PostgreSQL server of their own, with system paths pointed at the rehearsal's: twice (a second
    `ray up` runs them again), then the documented URL with the default password opens the store, a
    wrong password is refused, and a changed DB_PASSWORD takes effect."""
    import os
    import subprocess

    import psycopg

    from tests.helpers.postgres_server import PostgresServer, PostgresUnavailable

    head = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())["head_setup_commands"]
    marks = ("169.254.169.254", "/etc/postgresql", "psql", "systemctl restart postgresql")
    rehearsed = [c for c in head if any(m in c for m in marks)]
    assert any("pg_hba.conf" in c for c in rehearsed) and any("DB_PASSWORD=treeplay;" in c for c in rehearsed)
    try:
        server = PostgresServer().start()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    try:
        data = server.data
        # Like Ubuntu's PostgreSQL, local socket connections (sudo -u postgres psql) get in without a
        # password; every TCP connection must match a line that the setup commands add.
        (data / "pg_hba.conf").write_text("local all all trust\n")
        cidrs = tmp_path / "vpc-cidrs"
        swaps = [("http://169.254.169.254", fake_imds), ("/etc/treeplay-vpc-cidrs", str(cidrs)),
                 ("/etc/postgresql/*/main/", f"{data}/"),
                 ("sudo systemctl restart postgresql", "psql -qc 'SELECT pg_reload_conf()'"),
                 ("sudo -u postgres ", ""), ("sudo ", "")]
        env = {**os.environ, "PGHOST": str(server.root), "PGPORT": str(server.port), "PGUSER": "postgres"}

        def run(commands: list[str]) -> None:
            for cmd in commands:
                for old, new in swaps:
                    cmd = cmd.replace(old, new)
                done = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=60)
                assert done.returncode == 0, f"{cmd}\n{done.stderr}"
            subprocess.run(["psql", "-qc", "SELECT pg_reload_conf()"], env=env, check=True, capture_output=True)

        run(rehearsed)
        run(rehearsed)
        assert cidrs.read_text().split() == ["127.0.0.0/8", "10.99.0.0/16"]
        added = [line for line in (data / "pg_hba.conf").read_text().splitlines() if "treeplay-vpc" in line]
        assert [line.split()[:5] for line in added] == [["host", "treeplay", "treeplay", "127.0.0.0/8", "scram-sha-256"],
                                                       ["host", "treeplay", "treeplay", "10.99.0.0/16", "scram-sha-256"]]

        url = f"postgresql://treeplay:treeplay@127.0.0.1:{server.port}/treeplay"  # docs/cluster.md's, default password
        assert queries.list_runs(open_store(url)) == []
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"host=127.0.0.1 port={server.port} user=treeplay password=wrong dbname=treeplay")

        run([c.replace("DB_PASSWORD=treeplay;", "DB_PASSWORD=Changed42;") for c in rehearsed])
        psycopg.connect(f"host=127.0.0.1 port={server.port} user=treeplay password=Changed42 dbname=treeplay").close()
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            psycopg.connect(f"host=127.0.0.1 port={server.port} user=treeplay password=treeplay dbname=treeplay")
    finally:
        server.stop()
