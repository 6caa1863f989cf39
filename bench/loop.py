"""One iteration of the demo config with 1 and with 2 rollout workers: where the time goes.

    .venv/bin/python bench/loop.py [--tasks N] [--warm-steps 300]

Builds the demo's tiny model, warm-starts it briefly (accuracy does not matter for speed, only that
some answers are right so there are pairs), then runs one full iteration (rollout -> store -> learn ->
redeploy -> eval) on a fresh local Ray cluster per worker count. The split comes from the loop's own
timings. Judging is part of the rollout in MCTS mode (the environment's verifier scores terminal
nodes inside the search), so it has no separate line.

Last stdout line: one JSON object with iteration_s and the split per worker count, redeploy_s and the
redeploy share of the iteration (target < 5%), and the 2-vs-1 worker speed-up measured in this process.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=None, help="tasks per iteration (default: the demo's)")
    ap.add_argument("--warm-steps", type=int, default=300)
    ap.add_argument("--eval-tasks", type=int, default=300)
    args = ap.parse_args()

    import ray

    from agents.registry import make_environment
    from orchestrator.config import load_config
    from orchestrator.engines.tiny import build_tiny_model
    from orchestrator.loop import run_loop
    from orchestrator.warmstart import supervised_warm_start
    from store import queries
    from store.database import open_store

    tmp = Path(tempfile.mkdtemp(prefix="treeplay-bench-loop-"))
    base = load_config(None)
    args.tasks = args.tasks or base.rollout.tasks_per_iteration
    model = build_tiny_model(tmp / "model", base.model.tiny.hidden_size, base.model.tiny.num_layers,
                             base.model.tiny.num_heads, max_positions=base.model.tiny.max_positions)
    env = make_environment(base.env.name, **base.env.kwargs)
    t0 = time.perf_counter()
    supervised_warm_start(model, env.demonstrations(env.tasks("train", 8000, seed=1)), steps=args.warm_steps,
                          num_threads=1)
    print(f"warm start {args.warm_steps} steps: {time.perf_counter() - t0:.1f}s", flush=True)

    results = {}
    for workers in (1, 2):
        cfg = load_config(None, [
            f"model.path={model}", f"output_dir={tmp}", f"store.url=sqlite:///{tmp}/bench-{workers}.db",
            "iterations=1", f"rollout.num_workers={workers}", f"rollout.tasks_per_iteration={args.tasks}",
            f"eval.tasks={args.eval_tasks}", f"name=bench-{workers}",
        ])
        store = open_store(cfg.store.url)
        run_id = queries.start_run(store, cfg.name, cfg.model_dump(mode="json"))
        report = run_loop(cfg, run_id, store, Path(model))
        ray.shutdown()
        it = report.iterations[0]
        split = {k: round(v, 3) for k, v in it.timings.items()}
        total = sum(it.timings.values())
        results[workers] = {"iteration_s": round(total, 3), "split": split,
                            "pairs": it.metrics.get("rollout/pairs", 0.0)}
        print(f"{workers} worker(s): iteration {total:.2f}s  " + "  ".join(f"{k}={v:.2f}" for k, v in split.items()),
              flush=True)

    one, two = results[1], results[2]
    redeploy = max(one["split"].get("redeploy_s", 0.0), two["split"].get("redeploy_s", 0.0))
    share = max(one["split"].get("redeploy_s", 0.0) / one["iteration_s"],
                two["split"].get("redeploy_s", 0.0) / two["iteration_s"])
    print(json.dumps({
        "bench": "loop",
        "tasks": args.tasks,
        "iteration_s": {"1": one["iteration_s"], "2": two["iteration_s"]},
        "split": {"1": one["split"], "2": two["split"]},
        "redeploy_s": round(redeploy, 4),
        "redeploy_fraction": round(share, 4),
        "speedup_2_vs_1_workers": round(one["iteration_s"] / two["iteration_s"], 3),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
