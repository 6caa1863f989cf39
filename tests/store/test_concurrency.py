"""Concurrent writers: 4 processes (spawned) write 500 small trees each at once, on both backends.

Every row must arrive, no writer may see "database is locked", and no id may be handed out twice.
"""

from __future__ import annotations

import multiprocessing as mp

import pytest

from treeplay.store import queries as q
from treeplay.store.database import open_store
from treeplay.store.records import NodeRecord, PairRecord, TaskResult, TreeRecord

WORKERS = 4
TREES_PER_WORKER = 500
NODES_PER_TREE = 4


def small_task(worker: int, i: int) -> TaskResult:
    task_id = f"w{worker}-t{i}"
    nodes = [
        NodeRecord(0, None, "", 0, visits=3),
        NodeRecord(1, 0, f"a{i}", 1, value=1.0),
        NodeRecord(2, 0, f"b{i}", 1, value=-1.0),
        NodeRecord(3, 1, f"c{i}", 2, terminal=True),
    ]
    return TaskResult(
        task_id=task_id,
        environment="arithmetic",
        prompt="p",
        trees=[TreeRecord(task_id=task_id, prompt="p", nodes=nodes)],
        pairs=[PairRecord("p", f"a{i}", f"b{i}", chosen_node=1, rejected_node=2)],
    )


def write_many(url: str, run_id: int, worker: int, start: mp.synchronize.Event) -> list[list[int]]:
    """One worker: wait for the others, then write its trees; return every id it was given."""
    ids: list[list[int]] = []
    with open_store(url, create=False) as store:
        start.wait(60)
        for i in range(TREES_PER_WORKER):
            receipt = q.write_task_result(store, run_id, 0, small_task(worker, i))
            ids.append(
                [receipt.rollout_id, *receipt.tree_ids, *receipt.node_ids[0].values(), *receipt.pair_ids]
            )
    return ids


@pytest.mark.timeout(180)
def test_four_processes_write_at_once(store_url):
    with open_store(store_url) as store:
        run_id = q.start_run(store, "concurrent", {})
        q.start_iteration(store, run_id, 0, 0)
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(WORKERS) as pool:
            pending = [pool.apply_async(write_many, (store_url, run_id, w, start)) for w in range(WORKERS)]
            start.set()
            results = [p.get(timeout=170) for p in pending]  # re-raises a worker's error, if any

    rollouts, trees, nodes, pairs = set(), set(), set(), set()
    for per_worker in results:
        assert len(per_worker) == TREES_PER_WORKER
        for rollout, tree, *rest in per_worker:
            node_ids, pair_ids = rest[:NODES_PER_TREE], rest[NODES_PER_TREE:]
            rollouts.add(rollout)
            trees.add(tree)
            nodes.update(node_ids)
            pairs.update(pair_ids)
    total = WORKERS * TREES_PER_WORKER
    assert (len(rollouts), len(trees), len(nodes), len(pairs)) == (
        total,
        total,
        total * NODES_PER_TREE,
        total,
    )

    with open_store(store_url, create=False) as store:
        counts = q.counts(store, run_id)
        assert counts["rollouts"] == counts["trees"] == counts["tasks"] == counts["preference_pairs"] == total
        assert counts["tree_nodes"] == total * NODES_PER_TREE
        assert len(q.completed_task_ids(store, run_id, 0)) == total
        # Every pair points at nodes of its own tree, whichever process wrote it.
        by_pair = {p.db_id: p for p in q.list_pairs(store, run_id)}
        assert set(by_pair) == pairs
        some_tree = q.load_tree(store, max(trees))
        node_ids = {n.db_id for n in some_tree.nodes}
        assert len(node_ids) == NODES_PER_TREE and node_ids <= nodes


def write_chunks(url: str, run_id: int, start: mp.synchronize.Event) -> str:
    """One of two writers racing to write the same chunks; says how each chunk went."""
    outcome = []
    with open_store(url, create=False) as store:
        start.wait(60)
        for c in range(20):
            try:
                q.write_task_results(store, run_id, 0, [small_task(c, i) for i in range(16)])
                outcome.append("w")
            except q.StoreError as e:
                assert "was already written for iteration 0" in str(e), str(e)
                outcome.append("-")
    return "".join(outcome)


def test_two_writers_racing_for_the_same_chunks_write_each_task_once(store_url):
    """Two processes write the same 20 chunks at once: whichever checks first, a task is written
    exactly once (on PostgreSQL a writer whose check missed the other's rows falls back to a
    savepoint per task when the unique rollout row stops it), and each chunk goes wholly to one of
    the two writers, since the tasks of a chunk travel together."""
    with open_store(store_url) as store:
        run_id = q.start_run(store, "race", {})
        q.start_iteration(store, run_id, 0, 0)
    ctx = mp.get_context("spawn")
    start = ctx.Manager().Event()
    with ctx.Pool(2) as pool:
        pending = [pool.apply_async(write_chunks, (store_url, run_id, start)) for _ in range(2)]
        start.set()
        a, b = (p.get(timeout=300) for p in pending)
    assert all({x, y} == {"w", "-"} for x, y in zip(a, b, strict=True)), (a, b)
    with open_store(store_url) as store:
        assert q.counts(store, run_id)["rollouts"] == 20 * 16
        assert q.counts(store, run_id)["trees"] == 20 * 16
