"""Iteration time of the demo config with 1, 2 and 4 rollout workers, each on its own Ray node,
synchronous and pipelined.

    .venv/bin/python bench/cluster.py [--tasks 512] [--warm-steps 300] [--iterations 3] [--workers 1 2 4]
                                      [--max-staleness 0 1]

For each worker count and each ``rollout.max_staleness`` (0: synchronous; 1: the next iteration's
rollouts overlap learning and evaluation) a fresh multi-node Ray cluster is started on this machine
the way Ray's ``cluster_utils.Cluster`` does it (separate raylets and object stores): a head node
with the ``learner`` slot and one node per rollout worker with a ``rollout`` slot, so the run goes
through orchestrator/placement.py exactly as on a real cluster (one placement group, SPREAD; a
pipelined run's evaluator shares the learner's bundle). The demo's tiny model is warm-started once
(briefly: only some answers need to be right, so there are pairs), then ``run_loop`` runs the demo
config (512 tasks, chunks of 128, 300 held-out tasks) for a few iterations. Reported is the mean
wall-clock time per iteration (``time/wall_s``, from one iteration's record to the next, summed and
divided by the iterations: actor start-up and the first evaluation are left out, the pipelined run's
fill is not); use 3 iterations or more, since one pipelined iteration's wall clock alone says little.
The 1-worker baseline is measured in the same process.

Scaling efficiency for n workers = T(1) / (n * T(n)): 1.0 is perfect. Nodes on one machine share its
cores: with 2 cores, 4 rollout workers (plus the learner) oversubscribe the CPU, so efficiency there
measures contention, not the design. Synchronously only rollouts and evaluation are parallel; the
pipelined loop also hides learning and evaluation behind rollouts until the rollouts get shorter than
them (docs/cluster.md). ``pipelined_speedup`` per worker count is T_sync(n) / T_pipelined(n).

Human-readable lines first; the LAST stdout line is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NODE = {"object_store_memory": 200 * 1024**2}


def start_cluster(rollout_nodes: int):
    """A head (driver + learner slot) and ``rollout_nodes`` single-CPU rollout nodes."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 1, "resources": {"learner": 1}, "include_dashboard": False, **NODE})
    for _ in range(rollout_nodes):
        cluster.add_node(num_cpus=1, resources={"rollout": 1}, **NODE)
    cluster.wait_for_nodes()
    return cluster


def stop_cluster(cluster) -> None:
    import ray

    ray.shutdown()
    cluster.shutdown()
    address_file = Path(ray._private.utils.get_ray_address_file(None))
    if address_file.is_file() and address_file.read_text().strip() == cluster.address:
        address_file.unlink()  # a stale address file makes a later plain ray.init() hang


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=512)
    ap.add_argument("--warm-steps", type=int, default=300)
    ap.add_argument("--eval-tasks", type=int, default=300)
    ap.add_argument("--iterations", type=int, default=3)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--max-staleness", type=int, nargs="+", default=[0, 1])
    args = ap.parse_args()
    if args.workers[0] != 1:
        ap.error("the first worker count must be 1 (the baseline)")

    import ray

    from treeplay.agents.registry import make_environment
    from treeplay.engines.tiny import build_tiny_model
    from treeplay.orchestrator.config import load_config
    from treeplay.orchestrator.loop import run_loop
    from treeplay.orchestrator.warmstart import supervised_warm_start
    from treeplay.store import queries
    from treeplay.store.database import open_store

    tmp = Path(tempfile.mkdtemp(prefix="treeplay-bench-cluster-"))
    demo = load_config(None)
    tiny = demo.model.tiny
    model = build_tiny_model(tmp / "model", tiny.hidden_size, tiny.num_layers, tiny.num_heads,
                             max_positions=tiny.max_positions)
    env = make_environment(demo.env.name, **demo.env.kwargs)
    t0 = time.perf_counter()
    supervised_warm_start(model, env.demonstrations(env.tasks("train", 8000, seed=1)), steps=args.warm_steps,
                          num_threads=1)
    print(f"warm start {args.warm_steps} steps: {time.perf_counter() - t0:.1f}s; "
          f"{os.cpu_count()} cores on this machine", flush=True)

    by_mode: dict[int, dict[int, dict]] = {}
    for k in args.max_staleness:
        measured = by_mode[k] = {}
        for n in args.workers:
            t0 = time.perf_counter()
            cluster = start_cluster(n)
            started = time.perf_counter() - t0
            try:
                cfg = load_config(None, [
                    f"model.path={model}", f"output_dir={tmp}", f"store.url=sqlite:///{tmp}/bench-{k}-{n}.db",
                    f"ray.address={cluster.address}", f"iterations={args.iterations}", f"name=cluster-{k}-{n}",
                    f"rollout.num_workers={n}", f"rollout.tasks_per_iteration={args.tasks}",
                    f"eval.tasks={args.eval_tasks}", f"rollout.max_staleness={k}",
                ])
                store = open_store(cfg.store.url)
                run_id = queries.start_run(store, cfg.name, cfg.model_dump(mode="json"))
                report = run_loop(cfg, run_id, store, Path(model))
                nodes = len({node["NodeID"] for node in ray.nodes() if node["Alive"]})
            finally:
                stop_cluster(cluster)
            last = report.iterations[-1]
            total = sum(r.timings["wall_s"] for r in report.iterations) / len(report.iterations)
            measured[n] = {"iteration_s": total, "rollout_s": last.timings.get("rollout_s", 0.0),
                           "all_iterations_s": [round(r.timings["wall_s"], 2) for r in report.iterations],
                           "split": {key: round(v, 3) for key, v in last.timings.items()},
                           "pairs": last.metrics.get("rollout/pairs", 0.0)}
            note = "  (oversubscribed: more rollout workers than cores)" if n > (os.cpu_count() or 1) else ""
            print(f"max_staleness={k}: {n} rollout worker(s) on {nodes} nodes (cluster up in {started:.1f}s): "
                  f"iteration {total:.2f}s (rollout {measured[n]['rollout_s']:.2f}s; every iteration: "
                  f"{measured[n]['all_iterations_s']}){note}", flush=True)

    def efficiency(measured: dict[int, dict], key: str) -> dict[str, float]:
        base = measured[1][key]
        return {str(n): round(base / (n * m[key]), 3) for n, m in measured.items()}

    out: dict = {"bench": "cluster", "tasks": args.tasks, "iterations": args.iterations}
    for k, measured in by_mode.items():
        print(f"max_staleness={k}: scaling efficiency T(1)/(n*T(n)): iteration {efficiency(measured, 'iteration_s')}, "
              f"rollout only {efficiency(measured, 'rollout_s')}")
        out[f"max_staleness_{k}"] = {
            "iteration_s": {str(n): round(m["iteration_s"], 3) for n, m in measured.items()},
            "rollout_s": {str(n): round(m["rollout_s"], 3) for n, m in measured.items()},
            "split": {str(n): m["split"] for n, m in measured.items()},
            "scaling_efficiency": efficiency(measured, "iteration_s"),
            "rollout_scaling_efficiency": efficiency(measured, "rollout_s"),
        }
    if 0 in by_mode:
        for k in by_mode:
            if k > 0:
                speedup = {str(n): round(by_mode[0][n]["iteration_s"] / by_mode[k][n]["iteration_s"], 3)
                           for n in args.workers}
                print(f"pipelined (max_staleness={k}) speed-up over synchronous per worker count: {speedup}")
                out[f"pipelined_speedup_{k}"] = speedup
    out.update(cores=os.cpu_count(), oversubscribed=[str(n) for n in args.workers if n > (os.cpu_count() or 1)])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
