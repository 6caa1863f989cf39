"""Pipelined vs synchronous iterations of the demo config, measured in one process.

    .venv/bin/python bench/loop.py [--iterations 4] [--seeds 0 1] [--tasks N] [--eval-tasks 300]
                                   [--warm-steps 500] [--workers 1] [--max-staleness 1]
                                   [--chunks-per-worker 2] [--lane-nice 10]

Builds the demo's tiny model and gives it the demo's warm start (once), then, for each seed, runs the
demo config twice on a fresh local Ray cluster with the same tasks and the same number of
iterations: ``rollout.max_staleness=0`` (synchronous: rollout, store, learn, redeploy, evaluate in
turn) and ``rollout.max_staleness=1`` (pipelined: the next iteration's rollouts run while the learner
trains and the evaluator evaluates). Time per iteration is the loop's own wall clock between
iteration records (``time/wall_s``), summed over the iterations and divided by their number, so
actor start-up and the first held-out evaluation are left out of both. Use at least 4 iterations:
the pipeline needs one to fill.

Last stdout line: one JSON object with ``sync_s_per_iter``, ``async_s_per_iter``,
``pipelined_speedup`` (their ratio), ``steady_pipelined_speedup`` (the same without the first,
pipeline-filling iteration), each run's final held-out accuracy (greedy and T=1; mean over the seeds,
and per seed), ``accuracy_gap_points`` (pipelined minus synchronous, in points) and
``accuracy_gap_points_last3`` (the same on the mean of the last 3 iterations' evaluations, which one
noisy evaluation moves less), and the last
iteration's phase split of each mode (in the pipelined run the phases overlap, so they add up to
more than its wall clock).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# One held-out accuracy moves by several points from one iteration to the next on this model, so
# besides the final one the bench reports the mean over the last LAST_K iterations' evaluations.
LAST_K = 3


def run_once(model: Path, tmp: Path, seed: int, staleness: int, args: argparse.Namespace) -> dict:
    import ray

    from treeplay.orchestrator.config import load_config
    from treeplay.orchestrator.loop import run_loop
    from treeplay.store import queries
    from treeplay.store.database import open_store

    name = f"bench-s{seed}-k{staleness}"
    overrides = [
        f"model.path={model}", f"output_dir={tmp}", f"store.url=sqlite:///{tmp}/{name}.db", f"name={name}",
        f"seed={seed}", f"iterations={args.iterations}", f"rollout.num_workers={args.workers}",
        f"rollout.max_staleness={staleness}", f"eval.tasks={args.eval_tasks}",
    ]
    if args.tasks:
        overrides.append(f"rollout.tasks_per_iteration={args.tasks}")
    if args.chunks_per_worker is not None:
        overrides.append(f"rollout.chunks_per_worker={args.chunks_per_worker}")
    if args.lane_nice is not None:
        overrides.append(f"ray.lane_nice={args.lane_nice}")
    cfg = load_config(None, overrides)
    store = open_store(cfg.store.url)
    run_id = queries.start_run(store, cfg.name, cfg.model_dump(mode="json"))
    try:
        report = run_loop(cfg, run_id, store, Path(model))
    finally:
        ray.shutdown()
    walls = [it.timings["wall_s"] for it in report.iterations]
    last = report.iterations[-1]
    tail = report.iterations[-LAST_K:]

    def tail_mean(key: str) -> float | None:
        vals = [it.metrics[key] for it in tail if key in it.metrics]
        return statistics.fmean(vals) if vals else None

    return {
        "s_per_iter": sum(walls) / len(walls),
        "steady_s_per_iter": statistics.fmean(walls[1:]) if len(walls) > 1 else walls[0],
        "accuracy_greedy_lastk": tail_mean("eval/accuracy_greedy"),
        "accuracy_sample_lastk": tail_mean("eval/accuracy_sample"),
        "wall_s": [round(w, 2) for w in walls],
        "accuracy_greedy": report.accuracy_after,
        "accuracy_sample": report.sample_accuracy_after,
        "split": {k: round(v, 3) for k, v in last.timings.items()},
        "staleness_max": max((it.metrics.get("learn/staleness_max", 0.0) for it in report.iterations), default=0.0),
        "version": last.version,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--tasks", type=int, default=None, help="tasks per iteration (default: the demo's)")
    ap.add_argument("--eval-tasks", type=int, default=300)
    ap.add_argument("--warm-steps", type=int, default=None, help="warm-start steps (default: the demo's)")
    ap.add_argument("--workers", type=int, default=1, help="rollout workers")
    ap.add_argument("--max-staleness", type=int, default=1, help="the pipelined run's bound")
    ap.add_argument("--chunks-per-worker", type=int, default=None, help="rollout.chunks_per_worker (both runs)")
    ap.add_argument("--lane-nice", type=int, default=None, help="ray.lane_nice (only the pipelined run uses it)")
    args = ap.parse_args()
    if args.max_staleness < 1:
        ap.error("--max-staleness must be at least 1 (0 is the synchronous baseline, always run)")

    from treeplay.orchestrator.config import load_config
    from treeplay.orchestrator.run_start import prepare_model

    tmp = Path(tempfile.mkdtemp(prefix="treeplay-bench-loop-"))
    demo = load_config(None, [f"warm_start.steps={args.warm_steps}"] if args.warm_steps is not None else [])
    t0 = time.perf_counter()
    model, _ = prepare_model(demo, tmp / "warm")
    print(f"warm start {demo.warm_start.steps} steps: {time.perf_counter() - t0:.1f}s; {os.cpu_count()} cores", flush=True)

    runs: dict[str, dict[int, dict]] = {"sync": {}, "async": {}}
    for seed in args.seeds:
        for mode, staleness in (("sync", 0), ("async", args.max_staleness)):
            r = runs[mode][seed] = run_once(model, tmp, seed, staleness, args)
            print(f"seed {seed} {mode:5s} (max_staleness={staleness}): {r['s_per_iter']:.2f}s/iteration "
                  f"{r['wall_s']}, accuracy greedy {r['accuracy_greedy']:.3f} T=1 {r['accuracy_sample']:.3f}, "
                  f"v{r['version']}, data staleness <= {r['staleness_max']:.0f}", flush=True)

    def mean(mode: str, key: str) -> float:
        return statistics.fmean(r[key] for r in runs[mode].values())

    sync_s, async_s = mean("sync", "s_per_iter"), mean("async", "s_per_iter")
    steady = mean("sync", "steady_s_per_iter") / mean("async", "steady_s_per_iter")

    def gap(key: str) -> float | None:
        if any(r[key] is None for mode in runs for r in runs[mode].values()):
            return None
        return round(100 * (mean("async", key) - mean("sync", key)), 2)
    out = {
        "bench": "loop",
        "iterations": args.iterations,
        "seeds": args.seeds,
        "workers": args.workers,
        "max_staleness": args.max_staleness,
        "sync_s_per_iter": round(sync_s, 3),
        "async_s_per_iter": round(async_s, 3),
        "pipelined_speedup": round(sync_s / async_s, 3),
        "steady_pipelined_speedup": round(steady, 3),
        "sync_accuracy_greedy": round(mean("sync", "accuracy_greedy"), 4),
        "async_accuracy_greedy": round(mean("async", "accuracy_greedy"), 4),
        "sync_accuracy_sample": round(mean("sync", "accuracy_sample"), 4),
        "async_accuracy_sample": round(mean("async", "accuracy_sample"), 4),
        "accuracy_gap_points": {
            "greedy": round(100 * (mean("async", "accuracy_greedy") - mean("sync", "accuracy_greedy")), 2),
            "sample": round(100 * (mean("async", "accuracy_sample") - mean("sync", "accuracy_sample")), 2),
        },
        f"accuracy_gap_points_last{LAST_K}": {"greedy": gap("accuracy_greedy_lastk"), "sample": gap("accuracy_sample_lastk")},
        "per_seed": {str(s): {mode: {k: runs[mode][s][k] for k in ("s_per_iter", "steady_s_per_iter", "accuracy_greedy",
                                                                  "accuracy_sample", "accuracy_greedy_lastk",
                                                                  "accuracy_sample_lastk")}
                              for mode in runs} for s in args.seeds},
        "split": {mode: runs[mode][args.seeds[-1]]["split"] for mode in runs},
        "chunks_per_worker": args.chunks_per_worker, "lane_nice": args.lane_nice,  # None: the config's default
        "cpus": os.cpu_count(),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
