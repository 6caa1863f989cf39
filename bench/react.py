"""Rubric-guided ReAct episodes one after another vs batched in lock step, in one process.

    .venv/bin/python bench/react.py [--tasks 32] [--max-steps 4] [--parallel 32] [--repeats 2]

The model is the one configs/react.yaml builds before its warm start: a Qwen2 (hidden 128, 4 layers)
with a byte-level BPE tokenizer trained here on the environments' text, random init, on the HF
engine with one torch thread. A random model writes its whole token budget for every rubric and
verdict and mostly invalid actions, so both runs do the same generation work per call. Each run
plays the same toolqa tasks with the whole rubric loop (rubric, act, verify, retry):
``parallel_episodes=1`` (the agent's old way: one episode, one prompt per call) and
``parallel_episodes=N`` (``agents.batching``: the calls of up to N running episodes served together).

Last stdout line: one JSON object with ``sequential_s``, ``batched_s``, ``batched_speedup`` (their
ratio, best of ``--repeats``), the prompts and generate calls of each, and whether the batched
trajectories equal the sequential ones (they need not: a batch is sampled with its first call's seed).
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


class Counting:
    """A policy that counts the generate calls and prompts it is given."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.prompts = inner, 0, 0

    def generate(self, prompts, n=1, **kw):
        self.calls += 1
        self.prompts += len(prompts)
        return self.inner.generate(prompts, n=n, **kw)

    def __getattr__(self, name):
        return getattr(self.inner, name)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tasks", type=int, default=32)
    ap.add_argument("--max-steps", type=int, default=4)
    ap.add_argument("--parallel", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()

    import dataclasses

    from treeplay.agents.envs.toolqa import ToolQAEnv
    from treeplay.agents.react import ReActAgent
    from treeplay.engines import make_engine
    from treeplay.engines.bpe import build_bpe_model
    from treeplay.orchestrator.config import load_config
    from treeplay.orchestrator.run_start import tokenizer_corpus

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "react.yaml", [])
    t = cfg.model.tiny
    env = ToolQAEnv(**cfg.env.kwargs)
    tmp = Path(tempfile.mkdtemp(prefix="treeplay-bench-react-"))
    model = build_bpe_model(tmp / "m", t.arch, t.hidden_size, t.num_layers, t.num_heads, t.num_kv_heads,
                            t.intermediate_size, t.max_positions, t.vocab_size, t.seed, tokenizer_corpus(cfg, env),
                            pretokenizer=t.pretokenizer)
    engine = make_engine("hf", model, num_threads=1)
    tasks = env.tasks("train", args.tasks, seed=0)
    base = dataclasses.replace(cfg.rollout.react, max_steps=args.max_steps, seed=0)

    def play(parallel: int):
        policy = Counting(engine)
        agent = ReActAgent(policy, config=dataclasses.replace(base, parallel_episodes=parallel))
        t0 = time.perf_counter()
        trajs = agent.run_many(lambda: ToolQAEnv(**cfg.env.kwargs), tasks)
        return time.perf_counter() - t0, policy, trajs

    play(args.parallel)  # warm-up: first-call costs out of both timings
    best: dict[str, tuple] = {}
    for _ in range(args.repeats):
        for name, parallel in (("sequential", 1), ("batched", args.parallel)):
            run = play(parallel)
            if name not in best or run[0] < best[name][0]:
                best[name] = run
            print(f"{name:10s} {run[0]:7.2f}s  {run[1].calls} generate calls, {run[1].prompts} prompts", flush=True)

    def summary(trajs):
        return [(t.status, t.outcome, [s.action for s in t.steps]) for t in trajs]

    (seq_s, seq_p, seq_t), (bat_s, bat_p, bat_t) = best["sequential"], best["batched"]
    print(json.dumps({
        "bench": "react",
        "tasks": args.tasks,
        "max_steps": args.max_steps,
        "parallel_episodes": args.parallel,
        "sequential_s": round(seq_s, 3),
        "batched_s": round(bat_s, 3),
        "batched_speedup": round(seq_s / bat_s, 2),
        "sequential_calls": seq_p.calls,
        "batched_calls": bat_p.calls,
        "prompts": [seq_p.prompts, bat_p.prompts],
        "same_trajectories": summary(seq_t) == summary(bat_t),
        "cpus": os.cpu_count(),
    }))


if __name__ == "__main__":
    main()
