"""Store write benchmark: trees of ~50 nodes through the store API vs. naive ORM adds, and vs. the floor.

    python bench/store.py [--trees 2000] [--naive-trees 300] [--nodes 50] [--pairs 3] [--chunk 128] [--no-postgres]

For each backend (a temp SQLite file; PostgreSQL when a throwaway server can be started with
``tests/helpers/postgres_server.py``) it writes ``--trees`` tasks, each one tree plus a few preference pairs:

- with ``write_task_result``, one transaction per task (what the loop did before it wrote chunks);
- with ``write_task_results``, ``--chunk`` tasks per transaction and a savepoint per task (what the
  loop's writer thread does with each chunk that comes back);
- the naive way, as the baseline: ``--naive-trees`` tasks, one ORM ``session.add`` per row and a
  commit per tree;
- the floor: exactly the rows the API wrote (read back), inserted into an empty database of the same
  schema through a bare DBAPI connection, one ``executemany`` per table in one transaction, ids and
  JSON text prepared beforehand. ``fraction_of_raw`` is the chunked API's throughput as a fraction of
  this (target >= 0.5); ``per_task_fraction_of_raw`` the same for one transaction per task.

It prints human-readable lines; the LAST stdout line is one JSON object with the SQLite figures and
the PostgreSQL ones nested under "postgres".
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

from treeplay.store import queries, schema
from treeplay.store.database import Store, open_store
from treeplay.store.records import NodeRecord, PairRecord, TaskResult, TreeRecord


def make_task(rng: random.Random, task_id: str, n_nodes: int, n_pairs: int) -> TaskResult:
    """One task: a random tree of ``n_nodes`` nodes and ``n_pairs`` sibling pairs from it."""
    nodes = [NodeRecord(key=0, parent_key=None, step="", depth=0, visits=n_nodes)]
    for key in range(1, n_nodes):
        parent = nodes[rng.randrange(max(1, key // 2), key) if key > 2 else 0]
        nodes.append(
            NodeRecord(
                key=key,
                parent_key=parent.key,
                step=f"step {key}: x = {rng.randint(0, 99)} + {rng.randint(0, 99)}",
                depth=parent.depth + 1,
                visits=rng.randint(0, 20),
                value=rng.uniform(-1, 1),
                prior=rng.random(),
                reward=rng.choice([0.0, 1.0]),
                terminal=rng.random() < 0.2,
                correct=rng.choice([None, True, False]),
            )
        )
    pairs = []
    for _ in range(n_pairs):
        a, b = rng.sample(nodes[1:], 2)
        pairs.append(
            PairRecord(
                prompt="Compute the chain.\n", chosen=a.step, rejected=b.step, margin=abs(a.value - b.value),
                chosen_node=a.key, rejected_node=b.key, chosen_visits=a.visits, rejected_visits=b.visits,
            )
        )  # fmt: skip
    tree = TreeRecord(task_id=task_id, prompt="Compute the chain.\n", nodes=nodes, environment="arithmetic")
    return TaskResult(
        task_id=task_id, environment="arithmetic", prompt="Compute the chain.\n", trees=[tree], pairs=pairs
    )


def write_with_api(store: Store, run_id: int, tasks: list[TaskResult]) -> tuple[float, float]:
    """Write with the store API; return (wall seconds, this process's CPU seconds)."""
    start, cpu = time.perf_counter(), time.process_time()
    for task in tasks:
        queries.write_task_result(store, run_id, 0, task)
    return time.perf_counter() - start, time.process_time() - cpu


def write_chunked(store: Store, run_id: int, tasks: list[TaskResult], chunk: int) -> tuple[float, float]:
    """Write ``chunk`` tasks per call (one transaction, a savepoint per task); (wall s, CPU s)."""
    start, cpu = time.perf_counter(), time.process_time()
    for i in range(0, len(tasks), chunk):
        queries.write_task_results(store, run_id, 0, tasks[i : i + chunk])
    return time.perf_counter() - start, time.process_time() - cpu


FLOOR_TABLES = ("tasks", "rollouts", "trees", "tree_nodes", "preference_pairs")


def rows_of_run(store: Store, run_id: int) -> dict[str, tuple[list[str], list[tuple]]]:
    """Every row the API wrote for a run, per table, as the driver would take them (JSON as text)."""
    from sqlalchemy import JSON, Text, cast, select

    tables = schema.Base.metadata.tables
    out = {}
    with store.read() as conn:
        for name in FLOOR_TABLES:
            t = tables[name]
            cols = [cast(c, Text).label(c.name) if isinstance(c.type, JSON) else c for c in t.columns]
            if name == "tree_nodes":
                trees = tables["trees"]
                where = t.c.tree_id.in_(select(trees.c.id).where(trees.c.run_id == run_id))
            else:
                where = t.c.run_id == run_id
            rows = conn.execute(select(*cols).where(where).order_by(t.c.id)).all()
            out[name] = ([c.name for c in t.columns], [tuple(r) for r in rows])
    return out


def write_raw(url: str, rows: dict[str, tuple[list[str], list[tuple]]], run_id: int) -> float:
    """The floor: ``rows`` into an empty store through a bare DBAPI connection, one ``executemany``
    per table in one transaction; returns wall seconds."""
    with open_store(url) as store:
        target = queries.start_run(store, "bench-raw", {})
        queries.start_iteration(store, target, 0, 0)
        prepared = {}
        for name, (cols, values) in rows.items():
            if "run_id" in cols:  # the same rows, under the empty store's run
                k = cols.index("run_id")
                values = [(*v[:k], target, *v[k + 1 :]) for v in values]
            mark = "?" if store.dialect == "sqlite" else "%s"
            sql = f"INSERT INTO {name} ({', '.join(chr(34) + c + chr(34) for c in cols)}) VALUES ({', '.join([mark] * len(cols))})"
            prepared[name] = (sql, values)
        raw = store.engine.raw_connection()
        try:
            dbapi = raw.driver_connection
            start = time.perf_counter()
            cur = dbapi.cursor()
            if store.dialect == "sqlite":
                cur.execute("BEGIN IMMEDIATE")
            for sql, values in prepared.values():
                cur.executemany(sql, values)
            if store.dialect == "sqlite":
                cur.execute("COMMIT")
            else:
                dbapi.commit()
            seconds = time.perf_counter() - start
        finally:
            raw.close()
        assert queries.counts(store, target)["tree_nodes"] == len(rows["tree_nodes"][1])
    return seconds


def write_naively(store: Store, run_id: int, tasks: list[TaskResult]) -> float:
    """The baseline: ORM objects added one at a time, relationships resolved by flush, a commit per tree."""
    start = time.perf_counter()
    with store.sessions() as session:
        for task in tasks:
            row = schema.Task(
                run_id=run_id, environment=task.environment, task_key=task.task_id, prompt=task.prompt
            )
            session.add(row)
            rollout = schema.Rollout(run_id=run_id, iteration=0, task_id=0)
            rollout_task = row
            session.flush()
            rollout.task_id = rollout_task.id
            session.add(rollout)
            session.flush()
            (tree_rec,) = task.trees
            tree = schema.Tree(
                rollout_id=rollout.id, run_id=run_id, iteration=0, task_id=row.id, environment=tree_rec.environment,
                prompt=tree_rec.prompt, policy_version=0, n_nodes=len(tree_rec.nodes), max_depth=0,
            )  # fmt: skip
            session.add(tree)
            by_key: dict[int, schema.TreeNode] = {}
            for n in tree_rec.nodes:
                node = schema.TreeNode(
                    tree=tree, parent=by_key.get(n.parent_key), step=n.step, depth=n.depth, visits=n.visits,
                    value=n.value, prior=n.prior, reward=n.reward, terminal=n.terminal, correct=n.correct,
                    selected=n.selected, policy_version=n.policy_version,
                )  # fmt: skip
                session.add(node)
                by_key[n.key] = node
            session.flush()
            for p in task.pairs:
                session.add(
                    schema.PreferencePair(
                        rollout_id=rollout.id, run_id=run_id, iteration=0, task_id=row.id, prompt=p.prompt,
                        chosen=p.chosen, rejected=p.rejected, source=p.source, margin=p.margin, weight=p.weight,
                        label_smoothing=p.label_smoothing, shared_prefix_chars=p.shared_prefix_chars,
                        chosen_visits=p.chosen_visits, rejected_visits=p.rejected_visits,
                        chosen_node_id=by_key[p.chosen_node].id, rejected_node_id=by_key[p.rejected_node].id,
                    )
                )  # fmt: skip
            session.commit()
    return time.perf_counter() - start


def bench_backend(url: str, floor_url: str, args: argparse.Namespace) -> dict:
    rng = random.Random(0)
    api_tasks = [make_task(rng, f"api-{i}", args.nodes, args.pairs) for i in range(args.trees)]
    chunk_tasks = [make_task(rng, f"chunk-{i}", args.nodes, args.pairs) for i in range(args.trees)]
    naive_tasks = [make_task(rng, f"naive-{i}", args.nodes, args.pairs) for i in range(args.naive_trees)]
    warm = max(1, args.trees // 20)
    with open_store(url) as store:
        run_api = queries.start_run(store, "bench-api", {})
        run_chunk = queries.start_run(store, "bench-chunked", {})
        run_naive = queries.start_run(store, "bench-naive", {})
        for run in (run_api, run_chunk, run_naive):
            queries.start_iteration(store, run, 0, 0)
        write_with_api(store, run_api, api_tasks[:warm])  # warm-up, not timed
        api_s, api_cpu_s = write_with_api(store, run_api, api_tasks[warm:])
        write_chunked(store, run_chunk, chunk_tasks[:warm], args.chunk)  # warm-up, not timed
        chunk_s, chunk_cpu_s = write_chunked(store, run_chunk, chunk_tasks[warm:], args.chunk)
        naive_s = write_naively(store, run_naive, naive_tasks)
        timed = len(api_tasks) - warm
        api_nodes = timed * args.nodes
        naive_nodes = len(naive_tasks) * args.nodes
        assert queries.counts(store, run_api)["tree_nodes"] == len(api_tasks) * args.nodes
        assert queries.counts(store, run_chunk)["tree_nodes"] == len(chunk_tasks) * args.nodes
        assert queries.counts(store, run_naive)["tree_nodes"] == naive_nodes
        floor_rows = rows_of_run(store, run_chunk)
    raw_s = write_raw(floor_url, floor_rows, run_chunk)
    raw_rate = len(chunk_tasks) * args.nodes / raw_s  # the floor wrote every task, warm-up included
    api_rate, chunk_rate, naive_rate = api_nodes / api_s, api_nodes / chunk_s, naive_nodes / naive_s
    return {
        "chunk": args.chunk,
        "chunked_nodes_per_s": round(chunk_rate),
        "chunked_cpu_nodes_per_s": round(api_nodes / chunk_cpu_s),
        "raw_nodes_per_s": round(raw_rate),
        "fraction_of_raw": round(chunk_rate / raw_rate, 3),
        "per_task_fraction_of_raw": round(api_rate / raw_rate, 3),
        "chunked_vs_per_task": round(chunk_rate / api_rate, 2),
        "chunked_ratio_vs_naive": round(chunk_rate / naive_rate, 2),
        "trees": timed,
        "nodes_per_tree": args.nodes,
        "pairs_per_tree": args.pairs,
        "nodes_per_s": round(api_rate),
        "trees_per_s": round(timed / api_s, 1),
        # Wall-clock figures suffer when other work shares the cores; this one counts only our CPU
        # (for SQLite that includes the database engine, which runs in this process).
        "cpu_nodes_per_s": round(api_nodes / api_cpu_s),
        "naive_trees": len(naive_tasks),
        "naive_nodes_per_s": round(naive_rate),
        "ratio_vs_naive": round(api_rate / naive_rate, 2),
    }


def report(backend: str, figures: dict) -> None:
    print(
        f"{backend:10s} store API: {figures['nodes_per_s']:>9,} nodes/s ({figures['trees_per_s']:,} trees/s, "
        f"{figures['trees']} trees)   naive ORM: {figures['naive_nodes_per_s']:>8,} nodes/s   "
        f"ratio {figures['ratio_vs_naive']}x   ({figures['cpu_nodes_per_s']:,} nodes per CPU-second)\n"
        f"{'':10s} chunks of {figures['chunk']}: {figures['chunked_nodes_per_s']:>9,} nodes/s "
        f"({figures['chunked_vs_per_task']}x per-task transactions, {figures['chunked_ratio_vs_naive']}x naive)   "
        f"raw executemany floor: {figures['raw_nodes_per_s']:,} nodes/s   fraction_of_raw "
        f"{figures['fraction_of_raw']} (per task: {figures['per_task_fraction_of_raw']})"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trees", type=int, default=2000)
    parser.add_argument("--naive-trees", type=int, default=300)
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--chunk", type=int, default=128, help="tasks per write_task_results call")
    parser.add_argument("--no-postgres", action="store_true")
    args = parser.parse_args()

    postgres: dict = {}
    if args.no_postgres:
        postgres = {"skipped": "--no-postgres"}
    else:
        # The test suite's throwaway PostgreSQL server lives in the repository's tests/ folder.
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from tests.helpers.postgres_server import PostgresServer, PostgresUnavailable

        try:
            with PostgresServer() as server:
                postgres = bench_backend(server.create_database("bench_store"),
                                         server.create_database("bench_store_floor"), args)
            report("postgresql", postgres)
        except PostgresUnavailable as e:
            postgres = {"skipped": str(e)}
            print(f"postgresql skipped: {e}")

    with tempfile.TemporaryDirectory() as tmp:
        sqlite = bench_backend(f"sqlite:///{tmp}/bench.db", f"sqlite:///{tmp}/floor.db", args)
    report("sqlite", sqlite)
    print(json.dumps({"bench": "store", "backend": "sqlite", **sqlite, "postgres": postgres}))


if __name__ == "__main__":
    main()
