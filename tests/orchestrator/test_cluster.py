"""A multi-node run on one machine: real Ray nodes as separate processes, a real PostgreSQL store.

The cluster is shaped like ray_cluster.yaml in miniature: a head node that carries the ``learner``
resource (and the driver), and two worker nodes that carry ``rollout`` slots. Each node is its own
raylet and object store, started the way Ray's ``cluster_utils.Cluster`` does, so removing one kills
its processes exactly as losing a host would.

- the learner gets its own bundle on the head, the two rollout workers land on different nodes, and
  a new weights version is in the object store of every worker's node after a redeploy;
- a full run that learns, with one rollout node removed mid-run: every iteration finishes, every
  task is written exactly once per iteration, and the run is ``done``;
- ray_cluster.yaml and its on-prem variant pass Ray's own launcher schema.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path

import pytest
import yaml

from treeplay.agents.registry import make_environment
from treeplay.orchestrator.config import load_config
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
        rng = random.Random(cfg.seed * 31 + index)  # the loop's own task draw for this iteration
        wanted = {t.id for t in env.tasks("train", TASKS, seed=rng.randrange(2**31))}
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
