"""Benchmark: MCTS batched across trees vs one tree at a time, nodes expanded per second.

32 arithmetic tasks, a tiny random-init Llama (hidden 128) behind ``HFEngine``, the same search
config and seeds for both modes. "Batched" is one ``search_many`` call over all tasks (every
generate/score call carries the leaves of all trees); "serial" is one ``search_many`` call per task.
A node is a child added to a tree (sampled, stepped in the environment, scored).

Run:  python bench/search.py [--tasks 32] [--hidden 128] [--self-eval]
Prints human lines, then ONE JSON line last:
    {"bench": "search", "nodes_per_s_batched": ..., "nodes_per_s_serial": ..., "ratio": ...}
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--iterations", type=int, default=2)
    ap.add_argument("--self-eval", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    from treeplay.agents.envs.arithmetic import ArithmeticEnv
    from treeplay.engines.hf import HFEngine
    from treeplay.engines.tiny import build_tiny_model
    from treeplay.search.mcts import search_many
    from treeplay.search.state import MCTSConfig

    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="bench-search-"))
    model = build_tiny_model(tmp / "model", hidden_size=args.hidden, num_layers=args.layers)
    engine = HFEngine(model, seed=0)

    def env() -> ArithmeticEnv:
        return ArithmeticEnv(ops=2, digits=2)

    tasks = env().tasks("train", args.tasks, seed=0)
    cfg = MCTSConfig(
        iterations=args.iterations,
        first_root_multiplier=2,
        root_width=4,
        width=2,
        breadth_limit=4,
        depth_limit=2,
        max_step_tokens=12,
        self_eval=args.self_eval,
        seed=0,
    )
    search_many(tasks[:2], env, engine, cfg)  # warm-up: first-call allocations, tokenizer caches

    t0 = time.perf_counter()
    batched = search_many(tasks, env, engine, cfg)
    t_batched = time.perf_counter() - t0
    n_batched = sum(len(t) - 1 for t in batched)

    t0 = time.perf_counter()
    serial = [search_many([task], env, engine, cfg)[0] for task in tasks]
    t_serial = time.perf_counter() - t0
    n_serial = sum(len(t) - 1 for t in serial)

    nps_b, nps_s = n_batched / t_batched, n_serial / t_serial
    waves_b = batched[0].info["search"]["waves"]
    waves_s = sum(t.info["search"]["waves"] for t in serial)
    print(
        f"tasks={len(tasks)} hidden={args.hidden} layers={args.layers} threads={args.threads} config={cfg.model_dump()}"
    )
    print(f"batched: {n_batched} nodes in {t_batched:.2f}s over {waves_b} waves -> {nps_b:.1f} nodes/s")
    print(f"serial:  {n_serial} nodes in {t_serial:.2f}s over {waves_s} waves -> {nps_s:.1f} nodes/s")
    print(f"ratio {nps_b / nps_s:.2f}x (target >= 3)")
    print(
        json.dumps(
            {
                "bench": "search",
                "nodes_per_s_batched": round(nps_b, 2),
                "nodes_per_s_serial": round(nps_s, 2),
                "ratio": round(nps_b / nps_s, 2),
                "tasks": len(tasks),
                "nodes_batched": n_batched,
                "nodes_serial": n_serial,
                "seconds_batched": round(t_batched, 3),
                "seconds_serial": round(t_serial, 3),
            }
        )
    )


if __name__ == "__main__":
    main()
